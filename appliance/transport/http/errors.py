"""Outpost errors as HTTP answers: the v2 error body ``{"error": "<message>"}``."""

from __future__ import annotations

import json
from http import HTTPStatus

from aiohttp import web

from appliance.errors import OutpostError

# What a bug answers: the exception's text is for the log, not for the client.
INTERNAL_MESSAGE = "internal error; see the server log"

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


def raw_error_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 answer with the v2 error body and ``Connection: close``, as bytes:
    for a connection answered outside any request (refused at the connection limit, or
    stalled before its request was read)."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n")
    return head.encode() + body
