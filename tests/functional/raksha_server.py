"""A real Raksha server for tests: ``raksha serve``'s Embedded on a free loopback port (waitress, a thread),
and a tiny JSON client over HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from raksha import conf as config
from raksha.wsgi.embedded import Embedded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Response:
    def __init__(self, status: int, body: Any, headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    def __repr__(self) -> str:
        return f"<{self.status} {json.dumps(self.body)[:400]}>"


class Client:
    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        self.base = base
        self.headers = headers or {}

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **self.headers, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                payload = resp.read()
                status, hdrs = resp.status, dict(resp.headers)
        except urllib.error.HTTPError as err:
            payload, status, hdrs = err.read(), err.code, dict(err.headers)
        return Response(status, json.loads(payload) if payload else None, hdrs)

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        return self.request("POST", path, body, **kw)

    def put(self, path: str, body: Any = None, **kw: Any) -> Response:
        return self.request("PUT", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> Response:
        return self.request("DELETE", path, **kw)

    def wait(self, path: str, key: str, *, until: tuple[str, ...], timeout: float = 600) -> dict[str, Any]:
        """Poll ``path`` until its ``key`` resource's status is one of ``until``."""
        deadline = time.monotonic() + timeout
        while True:
            resp = self.get(path)
            assert resp.status == 200, resp
            if resp.body[key]["status"] in until:
                return dict(resp.body[key])
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} still {resp.body[key]['status']} after {timeout} s")
            time.sleep(0.5)


class Server:
    """``with Server(tmp_path, libvirt_uri=...) as srv:`` ``srv.client("tenant")``."""

    def __init__(self, data_dir: Path, *, libvirt_uri: str = "test:///default", **overrides: Any) -> None:
        from waitress.server import create_server

        conf = config.load([])
        conf.set_override("data_dir", str(data_dir))
        conf.set_override("uri", libvirt_uri, group="libvirt")
        conf.set_override("tick_seconds", 0.2, group="scheduler")
        if any(key.startswith(config.KEYSTONE_GROUP + "__") for key in overrides):
            config.register_keystone(conf)
        for key, value in overrides.items():
            group, _, opt = key.rpartition("__")
            conf.set_override(opt, value, group=group or None)
        self.embedded = Embedded(conf)
        self.port = free_port()
        self._wsgi = create_server(self.embedded.app, host="127.0.0.1", port=self.port, threads=4)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        try:
            self._wsgi.run()
        except OSError:
            pass  # the listening socket was closed by __exit__ (as raksha serve's stop() does)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, tenant: str | None = None, headers: dict[str, str] | None = None) -> Client:
        return Client(self.url + (f"/v1/{tenant}" if tenant else ""), headers)

    def __enter__(self) -> Server:
        self.embedded.start_background()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._wsgi.close()
        self._thread.join(timeout=10)
        self.embedded.stop()
