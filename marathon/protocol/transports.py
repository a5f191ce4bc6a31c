"""How a byte stream is opened.  Addresses are strings:

    tcp:HOST:PORT      TCP
    tls:HOST:PORT      TCP with TLS (the node <-> orchestrator gateway across networks)
    unix:/path         Unix domain socket
    vsock:CID:PORT     AF_VSOCK (inside a guest)
    fcvsock:/uds:PORT  Firecracker's hybrid vsock from the host (CONNECT <port>\\n -> OK <n>\\n)
    fd:N               (listen only) a listening Unix socket inherited as file descriptor N: the
                       process sandbox's agent gets its socket this way, so no host directory
                       needs to be writable from inside the sandbox

Everything above this module sees a trio Stream and does not care which.
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass

import trio

from marathon.errors import ConfigError, ProtocolError


@dataclass(frozen=True)
class Address:
    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fcvsock":
            return f"fcvsock:{self.path}:{self.port}"
        if self.kind == "fd":
            return f"fd:{self.port}"
        return f"{self.kind}:{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    kind, _, rest = text.partition(":")
    try:
        if kind == "unix" and rest:
            return Address("unix", path=rest)
        if kind in ("tcp", "tls"):
            host, _, port = rest.rpartition(":")
            return Address(kind, host=host.strip("[]") or "127.0.0.1", port=int(port))
        if kind == "vsock":
            cid, _, port = rest.partition(":")
            return Address("vsock", host=cid, port=int(port))
        if kind == "fcvsock":
            path, _, port = rest.rpartition(":")
            return Address("fcvsock", path=path, port=int(port))
        if kind == "fd" and rest.isdigit():
            return Address("fd", port=int(rest))
    except ValueError:
        pass
    raise ConfigError(
        f"bad address {text!r}: expected tcp:HOST:PORT, tls:HOST:PORT, unix:/PATH, vsock:CID:PORT, fcvsock:/PATH:PORT or fd:N"
    )


def client_tls(cafile: str = "") -> ssl.SSLContext:
    """Verify the server against ``cafile`` (or the system's CAs)."""
    ctx = ssl.create_default_context(cafile=cafile or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_tls(certfile: str, keyfile: str) -> ssl.SSLContext:
    if not certfile or not keyfile:
        raise ConfigError("a tls: listener needs a certificate and a key (gateway_tls_cert, gateway_tls_key)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {certfile}: {exc}") from None
    return ctx


async def open_stream(address: str | Address, *, tls: ssl.SSLContext | None = None) -> trio.abc.Stream:
    addr = parse_address(address) if isinstance(address, str) else address
    if addr.kind == "tcp":
        return await trio.open_tcp_stream(addr.host, addr.port)
    if addr.kind == "tls":
        stream = await trio.open_tcp_stream(addr.host, addr.port)
        ssl_stream = trio.SSLStream(stream, tls or client_tls(), server_hostname=addr.host)
        try:
            await ssl_stream.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(stream)
            raise ProtocolError(f"TLS handshake with {addr} failed: {exc.__cause__ or exc}") from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return ssl_stream
    if addr.kind == "unix":
        return await trio.open_unix_socket(addr.path)
    if addr.kind == "vsock":
        sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            await sock.connect((int(addr.host), addr.port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    if addr.kind == "fcvsock":
        stream = await trio.open_unix_socket(addr.path)
        try:
            await stream.send_all(f"CONNECT {addr.port}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                chunk = await stream.receive_some(1)
                if not chunk:
                    raise ProtocolError(f"firecracker vsock closed during CONNECT {addr.port}")
                line += chunk
                if len(line) > 64:
                    raise ProtocolError("firecracker vsock handshake line too long")
            if not line.startswith(b"OK "):
                raise ProtocolError(f"firecracker vsock refused CONNECT {addr.port}: {line!r}")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream
    raise ConfigError(f"cannot dial {addr}")


async def open_listeners(address: str | Address, *, mode: int = 0o600, tls: ssl.SSLContext | None = None) -> list:
    addr = parse_address(address) if isinstance(address, str) else address
    if addr.kind == "tcp":
        return await trio.open_tcp_listeners(addr.port, host=addr.host)
    if addr.kind == "tls":
        if tls is None:
            raise ConfigError(f"{addr} needs a TLS certificate")
        return [trio.SSLListener(lis, tls) for lis in await trio.open_tcp_listeners(addr.port, host=addr.host)]
    if addr.kind in ("unix", "fcvsock"):
        try:
            os.unlink(addr.path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(addr.path)
            os.chmod(addr.path, mode)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return [trio.SocketListener(sock)]
    if addr.kind == "vsock":
        sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            await sock.bind((int(addr.host) if addr.host else socket.VMADDR_CID_ANY, addr.port))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return [trio.SocketListener(sock)]
    if addr.kind == "fd":
        try:
            sock = trio.socket.fromfd(addr.port, socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError(f"no listening socket on file descriptor {addr.port}: {exc}") from None
        os.close(addr.port)  # fromfd duplicated it
        return [trio.SocketListener(sock)]
    raise ConfigError(f"cannot listen on {addr}")


def listener_address(listener) -> str:
    """The address a listener ended up bound to (useful with port 0)."""
    if isinstance(listener, trio.SSLListener):
        return "tls:" + listener_address(listener.transport_listener).split(":", 1)[1]
    sock = listener.socket
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    if sock.family == socket.AF_VSOCK:
        cid, port = sock.getsockname()
        return f"vsock:{cid}:{port}"
    host, port = sock.getsockname()[:2]
    return f"tcp:{host}:{port}"
