"""Where the admin API's unix socket lives, so `pagedd serve` and `pagedctl` agree without options.

The first that applies:
1. $PAGED_ADMIN_SOCKET;
2. $RUNTIME_DIRECTORY/admin.sock: a systemd service with RuntimeDirectory=paged, i.e. /run/paged/admin.sock;
3. $XDG_RUNTIME_DIR/paged/admin.sock: a login session (/run/user/UID, private to the user);
4. /tmp/paged-UID/admin.sock, in a directory of mode 0700.
The socket itself is created with mode 0600: only the daemon's user can connect.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "PAGED_ADMIN_SOCKET"
SOCKET_NAME = "admin.sock"


def default_admin_socket() -> Path:
    if explicit := os.environ.get(ENV_VAR):
        return Path(explicit)
    if service_dir := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(service_dir.split(":")[0]) / SOCKET_NAME
    if session_dir := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(session_dir) / "paged" / SOCKET_NAME
    return Path("/tmp") / f"paged-{os.getuid()}" / SOCKET_NAME
