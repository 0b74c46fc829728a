"""Length-prefixed frames over a stream socket: 8 bytes big-endian length, then the frame.

Both local links of the Flower backend speak it: the round loop <-> its ServerApp (on the server
machine), and a ClientApp <-> its site worker (on a client machine). A frame is a `messages.pack`
message, so no pickle ever crosses either link.
"""

from __future__ import annotations

import socket
import struct

_LENGTH = struct.Struct(">Q")


def send_frame(sock: socket.socket, frame: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(frame)) + frame)


def recv_frame(sock: socket.socket) -> bytes:
    """The next frame; raises EOFError when the other side closed the connection."""
    (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
    return _recv_exactly(sock, length)


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    chunks, left = [], count
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
