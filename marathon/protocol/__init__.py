"""Wire protocol shared by every role: messages, framing, transports.

Imports nothing else from marathon except ``marathon.errors``.  The submodules are imported
by name (``marathon.protocol.framing`` …): importing the messages alone — as every client
command does through the config — must not pull in trio.
"""

from marathon.protocol.messages import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
