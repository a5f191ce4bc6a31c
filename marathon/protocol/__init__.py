"""Wire protocol shared by every role: messages, framing, transports.

Imports nothing else from marathon except ``marathon.errors``.
"""

from marathon.protocol.framing import FramedStream, decode_frame, encode_frame
from marathon.protocol.messages import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION", "FramedStream", "decode_frame", "encode_frame"]
