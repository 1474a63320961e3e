"""The CLI's HTTP client of the Raksha API (the CLI talks only to the API, never to the database)."""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request
from typing import Any

from raksha.domain import errors

DEFAULT_URL = "http://127.0.0.1:8791"
RUN_END = ("available", "partial", "error", "cancelled", "deleted")
RESTORE_END = ("available", "error", "cancelled")

_BY_STATUS: dict[int, type[errors.RakshaError]] = {
    400: errors.InvalidInput, 401: errors.Unauthorized, 403: errors.Forbidden, 404: errors.NotFound,
    405: errors.InvalidInput, 409: errors.Conflict, 503: errors.RetryableError,
}


def tls_context(verify: bool | str) -> ssl.SSLContext:
    """``verify``: True checks the server against the system's CAs, a path against that CA bundle, False
    not at all (a test cloud's self-signed endpoint)."""
    if verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        return ctx
    if isinstance(verify, str):
        try:
            return ssl.create_default_context(cafile=verify)
        except (OSError, ssl.SSLError) as exc:
            raise errors.InvalidInput(f"cannot use CA bundle {verify}: {exc}", code="CACERT_INVALID") from None
    return ssl.create_default_context()


def _env_verify() -> bool | str:
    """$RAKSHA_CACERT (a CA bundle), else not $RAKSHA_INSECURE; as OS_CACERT and OS_INSECURE for OpenStack."""
    cacert = os.environ.get("RAKSHA_CACERT") or os.environ.get("OS_CACERT")
    if cacert:
        return cacert
    insecure = os.environ.get("RAKSHA_INSECURE") or os.environ.get("OS_INSECURE") or ""
    return insecure.lower() not in ("1", "true", "yes")


class ApiClient:
    def __init__(self, url: str | None = None, project: str | None = None, token: str | None = None,
                 timeout: float = 60.0, verify: bool | str | None = None) -> None:
        self.url = (url or os.environ.get("RAKSHA_URL") or DEFAULT_URL).rstrip("/")
        self.project = project or os.environ.get("RAKSHA_PROJECT") or os.environ.get("OS_PROJECT_ID") or "default"
        self.token = token or os.environ.get("RAKSHA_TOKEN") or os.environ.get("OS_TOKEN")
        self.timeout = timeout
        self.verify = _env_verify() if verify is None else verify
        self._tls = tls_context(self.verify) if self.url.startswith("https:") else None

    def request(self, method: str, path: str, body: Any = None) -> Any:
        url = f"{self.url}/v1/{self.project}{path}"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["X-Auth-Token"] = self.token
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._tls) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as err:
            raise _error(err.code, err.read()) from None
        except (TimeoutError, urllib.error.URLError, ConnectionError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise errors.PermanentError(
                    f"the Raksha API at {self.url} presented a certificate that does not verify "
                    f"({reason.verify_message}); give its CA bundle with --cacert ($RAKSHA_CACERT), "
                    "or --insecure for a test endpoint", code="TLS_VERIFY_FAILED") from None
            raise errors.RetryableError(f"no Raksha API at {self.url} ({reason}); is `raksha serve` running?",
                                        code="SERVER_UNREACHABLE") from None
        return json.loads(payload) if payload else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def wait(self, path: str, key: str, terminal: tuple[str, ...], on_update: Any = None,
             interval: float = 0.5) -> dict[str, Any]:
        while True:
            resource: dict[str, Any] = self.get(path)[key]
            if on_update is not None:
                on_update(resource)
            if resource["status"] in terminal:
                return resource
            time.sleep(interval)


def job_body(name: str, vms: list[str], *, excluded: dict[str, list[str]] | None = None,
             description: str | None = None, vault_service: str | None = None, interval_hours: float | None = None,
             cron: str | None = None, full_every: int | None = None, keep: dict[str, int] | None = None,
             consistency: str | None = None) -> dict[str, Any]:
    """The ``backupjob`` of a create request, from command-line values (``keep``: keep_last=N...;
    ``consistency``: the level wanted, crash|filesystem|application, None: the best each VM reaches)."""
    excluded = excluded or {}
    body: dict[str, Any] = {"name": name, "vms": [{"id": vm, **({"exclude_disks": excluded[vm]}
                                                                if vm in excluded else {})} for vm in vms]}
    if description:
        body["description"] = description
    if vault_service:
        body["vault_service"] = vault_service
    if interval_hours or cron:
        body["schedule"] = {k: v for k, v in (("interval_hours", interval_hours), ("cron", cron),
                                              ("full_every", full_every)) if v}
    kept = {k: v for k, v in (keep or {}).items() if v}
    if kept:
        body["retention"] = kept
    if consistency:
        body["consistency"] = consistency
    return body


def restore_body(restore_type: str, *, vms: list[str] | None = None, disks: list[str] | None = None,
                 directory: str | None = None, name_prefix: str | None = None, fmt: str | None = None,
                 keep_macs: bool = False, start: bool = True, rewrite_whole: bool = False,
                 read_back: bool = False) -> dict[str, Any]:
    """The ``restore`` of a restore request, from command-line values."""
    target: dict[str, Any] = {k: v for k, v in (("directory", directory), ("name_prefix", name_prefix),
                                                ("format", fmt)) if v}
    if keep_macs:
        target["keep_macs"] = True
    if not start:
        target["start"] = False
    if rewrite_whole:
        target["rewrite_whole"] = True
    if read_back:
        target["read_back"] = True
    spec: dict[str, Any] = {"type": restore_type}
    if vms:
        spec["vms"] = vms
    if disks:
        spec["disks"] = disks
    if target:
        spec["target"] = target
    return spec


def _error(status: int, payload: bytes) -> errors.RakshaError:
    try:
        doc = json.loads(payload)["error"]
        code, message = doc["code"], doc["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "HTTP_ERROR", f"HTTP {status}: {payload[:200]!r}"
    cls = _BY_STATUS.get(status, errors.RakshaError)
    return cls(message, code=code)
