"""pagedctl's connection to a daemon's admin API: over its unix socket (default, found the way
`pagedd serve` chose it, see shared/admin_socket.py) or a loopback URL with a token.

Every failure becomes an AdminError, a ClickException, so a command exits 1 with one clear line.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx

from paged.shared.admin_socket import default_admin_socket

F = TypeVar("F", bound=Callable[..., Any])
TIMEOUT_S = 10.0


class AdminError(click.ClickException):
    pass


class AdminClient:
    def __init__(self, socket_path: Path | None = None, url: str | None = None, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if url is not None:
            self.where = url
            self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=TIMEOUT_S)
        else:
            path = socket_path or default_admin_socket()
            self.where = f"unix:{path}"
            transport = httpx.HTTPTransport(uds=str(path))
            self._http = httpx.Client(transport=transport, base_url="http://paged-admin", headers=headers, timeout=TIMEOUT_S)

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self._call("POST", path, body)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self._http.request(method, "/v1" + path, json=body)
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach the paged admin API at {self.where}: {exc or type(exc).__name__}") from None
        try:
            payload = response.json()
        except ValueError:
            raise AdminError(f"{self.where} answered {response.status_code} without JSON: is it a paged admin API?") from None
        if response.is_error:
            message = payload.get("error") if isinstance(payload, dict) else None
            if not isinstance(message, str):  # e.g. the public API's OpenAI-shaped 404
                message = f"{response.status_code} from {self.where}: is it a paged admin API?"
            raise AdminError(message)
        return payload

    def close(self) -> None:
        self._http.close()


def admin_command(command: F) -> F:
    """Adds --socket/--url/--token/--json and passes `client` and `as_json` to the command."""

    @click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="The daemon's admin socket [default: $PAGED_ADMIN_SOCKET or the runtime directory's].")
    @click.option("--url", default=None, help="Admin API over loopback TCP instead, e.g. http://127.0.0.1:8001.")
    @click.option("--token", default=None, envvar="PAGED_ADMIN_TOKEN", help="Admin token for --url (env PAGED_ADMIN_TOKEN).")
    @click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
    @functools.wraps(command)
    def wrapper(socket_path: Path | None, url: str | None, token: str | None, **kwargs: Any) -> Any:
        if socket_path is not None and url is not None:
            raise click.UsageError("give --socket or --url, not both")
        client = AdminClient(socket_path, url, token)
        try:
            return command(client=client, **kwargs)
        finally:
            client.close()

    return wrapper  # type: ignore[return-value]
