"""The admin API's unix socket: where (shared/admin_socket.py), bound with mode 0600 in a directory
of mode 0700, and whether a path in use refuses the start. The daemon binds it before it loads
anything (gateway/cli.py), so this module stays light: the server (gateway/admin/server.py) comes later.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from paged.shared.admin_socket import default_admin_socket
from paged.shared.logging import get_logger

log = get_logger("gateway.admin")

ADMIN_HOST = "127.0.0.1"


class AdminSocketError(RuntimeError):
    """The admin socket cannot be served at its path (in use, or in a directory someone else owns)."""


@dataclass(slots=True)
class AdminSettings:
    socket_path: Path | None = None  # None: the default path (shared/admin_socket.py)
    port: int | None = None  # loopback TCP listener, off by default
    token: str | None = None  # required with `port`
    host: str = ADMIN_HOST

    def __post_init__(self) -> None:
        if self.port is not None:
            if not self.token:
                raise ValueError("--admin-port needs --admin-token (or PAGED_ADMIN_TOKEN)")
            if not ipaddress.ip_address(self.host).is_loopback:
                raise ValueError(f"the admin API listens on loopback only, not {self.host}")


def bind_unix_socket(path: Path) -> socket.socket:
    """A listening socket at `path`, mode 0600 in a directory we create with mode 0700. A stale
    socket file (nobody listening) is replaced; a live one means another daemon owns it. The
    directory must belong to us (or root): whoever owns it could swap the socket for their own."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = path.parent.stat().st_uid
        if owner not in (os.getuid(), 0):
            raise AdminSocketError(f"{path.parent} belongs to uid {owner}, not to this user: no admin socket there")
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                except OSError:
                    path.unlink()
                else:
                    raise AdminSocketError(f"another daemon is serving the admin API at {path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # no window in which the socket is reachable by others
        try:
            sock.bind(str(path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
    except OSError as exc:
        raise AdminSocketError(f"cannot serve the admin API at {path}: {exc}") from None
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


@dataclass(slots=True)
class AdminListener:
    """The admin API's unix socket, bound and listening, and where."""

    path: Path
    sock: socket.socket

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def bind_admin_socket(settings: AdminSettings) -> AdminListener | None:
    """Bind the admin socket; the daemon does it before it loads anything, so that a clash fails the
    start in well under a second. A path given (--admin-socket, $PAGED_ADMIN_SOCKET or the config
    file) that cannot be served is an AdminSocketError; the default path unusable (e.g. a second
    daemon of the same user) only costs this daemon its admin socket (None)."""
    path = settings.socket_path or default_admin_socket()
    try:
        return AdminListener(path, bind_unix_socket(path))
    except AdminSocketError as exc:
        if settings.socket_path is not None:
            raise
        log.warning("admin_socket_unavailable", path=str(path), error=str(exc))
        return None
