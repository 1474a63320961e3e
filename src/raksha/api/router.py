"""URL → handler dispatch with the ``routes`` library; 404 and 405 answered as JSON errors.

Every route is declared once in :data:`raksha.api.urls.ROUTES`; the seed's spelling
``backupjobsruns`` and the 2013 client's ``backupjobruns`` both map to the same handlers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import routes
import webob

from raksha.api.faults import MethodNotAllowed
from raksha.domain.errors import NotFound

Handler = Callable[..., webob.Response]


class Router:
    def __init__(self, table: list[tuple[str, str, Handler]]) -> None:
        self._mapper = routes.Mapper(explicit=True)
        self._mapper.minimization = False
        self._allowed: dict[str, set[str]] = {}
        for i, (method, path, handler) in enumerate(table):
            self._mapper.connect(f"r{i}", path, handler=handler, conditions={"method": [method]})
            self._allowed.setdefault(path, set()).add(method)
        # Matched only when no route took the method: the path exists, the verb does not (405).
        for i, path in enumerate(self._allowed):
            self._mapper.connect(f"any{i}", path, handler=None, template=path)

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, Any]]:
        found = self._mapper.match(path, environ={"REQUEST_METHOD": method})
        if found is None:
            raise NotFound(f"no resource at {path}", code="RESOURCE_NOT_FOUND")
        if found.get("handler") is None:
            allowed = sorted(self._allowed[found["template"]])
            raise MethodNotAllowed(f"{method} is not allowed on {path}; allowed: {', '.join(allowed)}",
                                   allowed=allowed)
        params = {k: v for k, v in found.items() if k not in ("handler", "template")}
        return found["handler"], params
