"""Device reports signed with a key of each device's own (HMAC-SHA256).

Reports decide rollouts (the fleet halts one on them), so the fleet server takes only
reports a device signed. The fleet holds one secret (``keys/report.key``, made by
``outpost fleet init``); a device's key is derived from it and the device id
(``outpost fleet device-key``), so the fleet needs no list of devices and one device's
key speaks for that device alone. A POST carries the device id, a millisecond timestamp
and the HMAC of both and the body. The fleet server refuses a signature made with another
key, a timestamp more than ``MAX_SKEW_S`` from its clock, and a timestamp not newer than
the last it took from that device (a replayed POST).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

DEVICE_HEADER = "X-Outpost-Device"
TIME_HEADER = "X-Outpost-Time"
SIGNATURE_HEADER = "X-Outpost-Signature"
MAX_SKEW_S = 300.0
KEY_BYTES = 32


class ReportAuthError(Exception):
    """A report POST the fleet won't take; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def new_secret() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def device_key(secret: bytes, device_id: str) -> bytes:
    return hmac.new(secret, b"outpost report key\0" + device_id.encode(),
                    hashlib.sha256).digest()


def parse_key(text: str, where: str) -> bytes:
    """A key as written by ``outpost fleet device-key``: 64 hex digits."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(f"{where} must hold the {KEY_BYTES * 2} hex digits that "
                         f"'outpost fleet device-key' prints")
    return key


def _mac(key: bytes, device_id: str, stamp: str, body: bytes) -> str:
    return hmac.new(key, f"{device_id}\n{stamp}\n".encode() + body,
                    hashlib.sha256).hexdigest()


def sign(key: bytes, device_id: str, body: bytes, now: float | None = None) -> dict:
    """The headers that authenticate ``body`` as ``device_id``'s."""
    stamp = str(int((time.time() if now is None else now) * 1000))
    return {DEVICE_HEADER: device_id, TIME_HEADER: stamp,
            SIGNATURE_HEADER: _mac(key, device_id, stamp, body)}


class Verifier:
    """The fleet server's side: checks each POST, remembers each device's last timestamp
    (in memory: after a restart a POST captured within ``MAX_SKEW_S`` could be replayed
    once, and would only repeat what that device already said)."""

    def __init__(self, secret: bytes, clock=time.time):
        self.secret = secret
        self.clock = clock
        self.last_ms: dict[str, int] = {}

    def verify(self, headers, body: bytes) -> str:
        """The device id a POST was signed by; raises ReportAuthError."""
        device_id = headers.get(DEVICE_HEADER, "")
        stamp = headers.get(TIME_HEADER, "")
        signature = headers.get(SIGNATURE_HEADER, "")
        if not device_id or not stamp or not signature:
            raise ReportAuthError(401, "reports must be signed: set updater.report_key_file "
                                       "to the key 'outpost fleet device-key' prints")
        if not stamp.isdigit():
            raise ReportAuthError(401, f"{TIME_HEADER} must be unix milliseconds")
        expected = _mac(device_key(self.secret, device_id), device_id, stamp, body)
        if not hmac.compare_digest(expected, signature):
            raise ReportAuthError(401, f"the signature is not {device_id!r}'s; check the "
                                       f"device's updater.report_key_file and device_id")
        ms = int(stamp)
        skew = ms / 1000 - self.clock()
        if abs(skew) > MAX_SKEW_S:
            raise ReportAuthError(401, f"the report's time is {skew:+.0f} s off the fleet "
                                       f"server's clock (at most {MAX_SKEW_S:.0f} s); set "
                                       f"the device's clock")
        if ms <= self.last_ms.get(device_id, -1):
            raise ReportAuthError(401, "a POST no newer than the last one from this device "
                                       "(a replay); send new reports")
        self.last_ms[device_id] = ms
        return device_id
