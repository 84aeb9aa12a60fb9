"""Outpost errors as HTTP answers: the v2 error body ``{"error": "<message>"}``."""

from __future__ import annotations

import json

from aiohttp import web

from appliance.errors import OutpostError

STATUS_BY_CODE = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 400,
    "RESOURCE_EXHAUSTED": 429,
    "DEADLINE_EXCEEDED": 504,
    "UNAVAILABLE": 503,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "INTERNAL": 500,
}


def error_response(status: int, message: str, *, close: bool = False,
                   headers: dict | None = None) -> web.Response:
    resp = web.Response(status=status, body=json.dumps({"error": message}).encode(),
                        content_type="application/json", headers=headers)
    if close:  # the body was left unread: the connection can't carry another request
        resp.force_close()
    return resp


def outpost_error_response(exc: OutpostError) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if exc.code == "UNAUTHENTICATED" else None
    return error_response(STATUS_BY_CODE.get(exc.code, 500), exc.message, headers=headers)
