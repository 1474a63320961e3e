"""Errors as JSON: every failure is ``{"error": {"code", "message", "retryable"}}`` with a fitting status.

Clients match on ``code``; a traceback never leaves the server (it goes to the log with the request id).
"""

from __future__ import annotations

import json
import logging

import webob

from raksha.domain import errors

LOG = logging.getLogger(__name__)


class MethodNotAllowed(errors.InvalidInput):
    code = "METHOD_NOT_ALLOWED"


_STATUS: list[tuple[type[errors.RakshaError], int]] = [
    (MethodNotAllowed, 405),
    (errors.Unauthorized, 401),
    (errors.Forbidden, 403),
    (errors.NotFound, 404),
    (errors.AlreadyExists, 409),
    (errors.Conflict, 409),
    (errors.VaultLocked, 409),
    (errors.InvalidInput, 400),
    (errors.StorageFull, 507),
    (errors.RetryableError, 503),
]


def status_for(err: errors.RakshaError) -> int:
    for cls, status in _STATUS:
        if isinstance(err, cls):
            return status
    return 500


def error_response(status: int, code: str, message: str, *, retryable: bool = False,
                   request_id: str = "", details: dict[str, object] | None = None) -> webob.Response:
    body: dict[str, object] = {"code": code, "message": message, "retryable": retryable}
    if details:
        body["details"] = details
    if request_id:
        body["request_id"] = request_id
    resp = webob.Response(status=status, content_type="application/json", charset="utf-8")
    resp.text = json.dumps({"error": body})
    return resp


def from_exception(err: BaseException, request_id: str) -> webob.Response:
    if isinstance(err, errors.RakshaError):
        d = err.to_dict()
        resp = error_response(status_for(err), err.code, err.message, retryable=err.retryable,
                              request_id=request_id, details=d.get("details"))
        if isinstance(err, MethodNotAllowed):  # RFC 9110: a 405 names the methods the resource has
            resp.headers["Allow"] = ", ".join((d.get("details") or {}).get("allowed", []))
        return resp
    LOG.exception("request %s failed", request_id)
    return error_response(500, "INTERNAL_ERROR", "the server failed to handle the request; see its log",
                          request_id=request_id)
