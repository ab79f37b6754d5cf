"""A small client of the admin API, used by `tangram deploy/ls/rm/status`."""

from __future__ import annotations

import os

import httpx

from tangram.serve.server import is_loopback, token_file


class AdminError(RuntimeError):
    """The server answered with an error (its message is kept)."""


def local_token(url: str) -> str | None:
    """The token from TANGRAM_ADMIN_TOKEN, else the one the local server on `url`'s port wrote at start.

    A token file is only read for a loopback `url`: a local admin token is never sent to another machine.
    """
    token = os.environ.get("TANGRAM_ADMIN_TOKEN")
    if token:
        return token
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return None
    if not parsed.host or not is_loopback(parsed.host):
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    path = token_file(port)
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class AdminClient:
    """Admin calls against a running server."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0) -> None:
        token = token or local_token(url)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kw) -> dict:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach the server at {self.http.base_url}: {exc}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text
            raise AdminError(f"{r.status_code}: {message}")
        return r.json()

    def deploy(self, spec: dict) -> dict:
        """Create or update a deployment."""
        return self._call("POST", "/admin/deployments", json=spec)

    def list(self) -> list[dict]:
        """All deployments."""
        return self._call("GET", "/admin/deployments")["deployments"]

    def remove(self, name: str) -> dict:
        """Delete a deployment."""
        return self._call("DELETE", f"/admin/deployments/{name}")

    def migrate(self, deployment: str, to: str) -> dict:
        """Move the running requests of a deployment to its instance on worker `to` (live migration)."""
        return self._call("POST", "/admin/migrate", json={"deployment": deployment, "to": to})

    def status(self) -> dict:
        """Per device pool bytes and instances; per deployment state."""
        return self._call("GET", "/admin/status")

    def pool_map(self) -> dict:
        """The dashboard's data: per device the merged pool map, deployments, last starts, events."""
        return self._call("GET", "/admin/pool-map")
