"""``GET /openapi.json``: the document that describes this API."""

from __future__ import annotations

import webob

from raksha.api.app import ApiRequest, json_response


def document(req: ApiRequest) -> webob.Response:
    from raksha.api import openapi_spec  # imports every handler; built on demand

    return json_response(openapi_spec.build())
