"""Pagination and filters shared by the list handlers."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from raksha.api.app import ApiRequest
from raksha.api.validation import query_int
from raksha.domain.errors import InvalidInput

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000


def page_args(req: ApiRequest, filters: tuple[str, ...]) -> dict[str, Any]:
    """``limit``, ``marker`` (the last id of the previous page) and the allowed equality filters."""
    unknown = set(req.http.GET) - {"limit", "marker", *filters}
    if unknown:
        raise InvalidInput(f"unknown query parameter(s): {', '.join(sorted(unknown))}; "
                           f"allowed: limit, marker, {', '.join(filters)}", code="QUERY_INVALID")
    return {
        "limit": query_int(req.http, "limit", DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT),
        "marker": req.http.GET.get("marker") or None,
        "filters": {k: req.http.GET[k] for k in filters if req.http.GET.get(k)},
    }


def page_links(req: ApiRequest, items: list[dict[str, Any]], limit: int) -> list[dict[str, str]]:
    """A ``next`` link when the page is full (OpenStack style ``<collection>_links``)."""
    if len(items) < limit:
        return []
    query = {k: v for k, v in req.http.GET.items() if k != "marker"}
    query["marker"] = items[-1]["id"]
    return [{"rel": "next", "href": f"{req.http.path_url}?{urlencode(query)}"}]
