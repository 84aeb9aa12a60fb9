"""Outpost errors as gRPC answers: the status code of the same name, and the message.

Outpost's codes (DESIGN section 2) are gRPC's own names, so the mapping is one to one. A
bug answers INTERNAL with a fixed message; its text and traceback go to the log only.
"""

from __future__ import annotations

import grpc

from appliance.errors import CODES

# What a bug answers: the exception's text is for the log, not for the client.
INTERNAL_MESSAGE = "internal error; see the server log"

STATUS_BY_CODE = {code: grpc.StatusCode[code] for code in CODES}


def status_code(code: str) -> grpc.StatusCode:
    return STATUS_BY_CODE.get(code, grpc.StatusCode.INTERNAL)
