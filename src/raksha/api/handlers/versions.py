"""``GET /`` and ``GET /v1``: which API versions this server speaks."""

from __future__ import annotations

import webob

from raksha.api.app import ApiRequest, json_response

V1 = {
    "id": "v1.0",
    "status": "CURRENT",
    "updated": "2026-11-25T00:00:00Z",
    "links": [{"rel": "self", "href": "/v1/"}, {"rel": "describedby", "href": "/openapi.json"}],
    "media-types": [{"base": "application/json", "type": "application/vnd.openstack.raksha+json;version=1"}],
}


def index(req: ApiRequest) -> webob.Response:
    return json_response({"versions": [V1]})


def v1(req: ApiRequest) -> webob.Response:
    return json_response({"version": V1})
