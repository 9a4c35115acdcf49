"""The HTTP port, bound before the workers start: a port in use fails the start at once, with one
clear line, instead of after the model loaded (uvicorn would then exit from inside the loop)."""

from __future__ import annotations

import socket

from paged.shared.startup_failure import StartupError


def bind_http_listener(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn's `serve(sockets=[...])`; it listens once the server starts, so
    until the daemon is ready connections are refused rather than left hanging."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
