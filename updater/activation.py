"""When a prepared update may be activated: the release's activation policy and the local
app's word. Pure: the clock is passed in (local time, like ``download_windows``).

A release may sign an activation policy in its target's ``custom`` metadata (beside
``model`` and ``version``; ``outpost fleet publish --activate-window`` / ``--activate``):

- ``{"window": "02:00-04:00", "max_deferral_s": "86400.0"}``: activate only inside the
  window(s), in the device's local time (``updater/pacing.py``'s form and parser: start
  included, end excluded; ``"22:00-04:00"`` spans midnight, ending the next morning);
- ``{"on_request": true, "max_deferral_s": "86400.0"}``: activate when the app allows it.

Without a policy an update activates as soon as it is validated (as before). The app may
also *defer* an activation, either kind, for a while or for as long as the release lets
it. The release's ``max_deferral_s`` bounds how long the app holds an update back,
measured from when the update became ready (downloaded, validated, shadow passed): past
it the device activates anyway (for a windowed release at its next window: the window is
the fleet's rule, the deferral the app's) and reports ``deferral_expired``. An app's
"allow" never opens a window; it lifts its own deferral, and for an on-request release it
is the word the device waits for.

``decide(now, policy, ready_at, word)`` says ``Activate`` or ``Wait(state, until,
detail)``; the agent journals the inputs, so a restart decides the same way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from updater.pacing import Window, in_windows, parse_windows

DEFAULT_MAX_DEFERRAL_S = 86400.0  # 24 h
MAX_MAX_DEFERRAL_S = 30 * 86400.0
WAITING_WINDOW = "waiting_window"  # report and answer states
WAITING_APP = "waiting_app"
DEFERRAL_EXPIRED = "deferral_expired"
ACTIONS = ("allow", "defer")

# Tests only: a file holding the device's local time (ISO 8601), read at each look at the
# clock, so a real process walks through windows and deferrals without waiting.
CLOCK_ENV = "OUTPOST_UPDATER_CLOCK_FILE"


class ActivationPolicyError(ValueError):
    """A bad activation policy or app's word; ``str()`` says what, where, what to write."""


def duration_text(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def time_text(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M")


@dataclass(frozen=True)
class ActivationPolicy:
    window: str = ""  # local "HH:MM-HH:MM[, ...]"; "" for an on-request release
    on_request: bool = False  # activate when the local app allows it
    max_deferral_s: float = DEFAULT_MAX_DEFERRAL_S  # the app holds it at most this long

    def check(self) -> None:
        """Raise ActivationPolicyError for a policy that can't be followed."""
        if self.on_request and self.window:
            raise ActivationPolicyError(
                "an activation policy is a window (--activate-window 02:00-04:00) or "
                "on-request (--activate on-request), not both")
        if not self.on_request:
            _windows(self.window)  # its error names the bad window
        d = self.max_deferral_s
        if not (isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d)
                and 0 < d <= MAX_MAX_DEFERRAL_S):
            raise ActivationPolicyError(
                f"--max-deferral {d!r}s must be above 0 and at most "
                f"{MAX_MAX_DEFERRAL_S:.0f}s (30 days)")

    @property
    def windows(self) -> tuple[Window, ...]:
        return _windows(self.window)

    def as_custom(self) -> dict:
        """As TUF target ``custom`` data (canonical JSON has no floats: a string)."""
        out = {"window": self.window} if self.window else {"on_request": True}
        return {**out, "max_deferral_s": repr(float(self.max_deferral_s))}

    @classmethod
    def from_custom(cls, data: object) -> ActivationPolicy:
        """The signed policy, checked; ActivationPolicyError for one this agent can't
        follow (the release is then not taken: never activated at the wrong time)."""
        if not isinstance(data, Mapping) or set(data) - {"window", "on_request",
                                                         "max_deferral_s"}:
            raise ActivationPolicyError(f"activation policy {data!r} is not one this "
                                        f"device knows (window or on_request, "
                                        f"max_deferral_s)")
        try:
            policy = cls(window=data.get("window", ""),
                         on_request=data.get("on_request", False),
                         max_deferral_s=float(data.get("max_deferral_s",
                                                       DEFAULT_MAX_DEFERRAL_S)))
        except (TypeError, ValueError) as exc:
            raise ActivationPolicyError(f"activation policy {dict(data)!r}: {exc}") from None
        if not isinstance(policy.window, str) or policy.on_request not in (True, False):
            raise ActivationPolicyError(f"activation policy {dict(data)!r}: window must be "
                                        f"a string, on_request true or false")
        policy.check()
        return policy

    def describe(self) -> str:
        when = (f"in the window {self.window} (local time)" if self.window
                else "when the app allows it")
        return (f"activates {when}; the app may defer it up to "
                f"{duration_text(self.max_deferral_s)} after it is ready")


def _windows(text: str) -> tuple[Window, ...]:
    try:
        windows = parse_windows(text, "--activate-window")
    except ValueError as exc:
        raise ActivationPolicyError(str(exc)) from None
    if not windows:
        raise ActivationPolicyError(f"--activate-window {text!r} names no window; write "
                                    f"e.g. 02:00-04:00 (local time)")
    return windows


def policy_from_flags(window: str | None, activate: str | None,
                      max_deferral: str | None) -> ActivationPolicy | None:
    """`fleet publish`'s --activate-window / --activate / --max-deferral (None: no policy,
    the release activates once validated), checked."""
    from updater.shadow import ShadowPolicyError, parse_duration  # noqa: PLC0415

    if activate is not None and activate != "on-request":
        raise ActivationPolicyError(f"--activate {activate!r}: the one mode is on-request; "
                                    f"for a maintenance window give --activate-window "
                                    f"02:00-04:00")
    if window is None and activate is None:
        if max_deferral is not None:
            raise ActivationPolicyError("--max-deferral belongs to an activation policy; "
                                        "give --activate-window or --activate on-request "
                                        "too")
        return None
    if window is not None and activate is not None:
        raise ActivationPolicyError("give --activate-window or --activate on-request, not "
                                    "both")
    try:
        deferral = (DEFAULT_MAX_DEFERRAL_S if max_deferral is None
                    else parse_duration(max_deferral))
    except ShadowPolicyError:
        raise ActivationPolicyError(f"--max-deferral {max_deferral!r} is not a duration; "
                                    f"write e.g. 30m, 24h, 2d") from None
    policy = ActivationPolicy(window=window or "", on_request=activate is not None,
                              max_deferral_s=deferral)
    policy.check()
    return policy


@dataclass(frozen=True)
class AppWord:
    """The local app's last word on an update's activation."""

    action: str = ""  # "" (none yet), "allow" or "defer"
    until: datetime | None = None  # defer: the end asked for (None: as long as allowed)


@dataclass(frozen=True)
class Activate:
    detail: str = ""
    past_deferral: bool = False  # the app still held it: the release's maximum ran out


@dataclass(frozen=True)
class Wait:
    state: str  # WAITING_WINDOW or WAITING_APP
    until: datetime  # decided again then at the latest
    detail: str


def decide(now: datetime, policy: ActivationPolicy, ready_at: datetime,
           word: AppWord = AppWord()) -> Activate | Wait:
    """Activate now, or wait (what for, until when). ``now`` and ``ready_at`` are local
    times; ``ready_at`` is when the update became ready to activate."""
    deadline = ready_at + timedelta(seconds=policy.max_deferral_s)
    limit = (f"the release lets the app hold it at most "
             f"{duration_text(policy.max_deferral_s)} after it was ready "
             f"({time_text(ready_at)})")
    held = _held_by_app(now, policy, word)
    if held is not None and now < deadline:
        why, until = held
        if until is None or until > deadline:
            return Wait(WAITING_APP, deadline,
                        f"{why}; held at most until {time_text(deadline)}: {limit}")
        return Wait(WAITING_APP, until, why)
    past = held is not None
    if policy.window and not in_windows(policy.windows, now):
        opens = next_window_start(policy.windows, now)
        return Wait(WAITING_WINDOW, opens,
                    f"until {time_text(opens)}, when the activation window "
                    f"{policy.window} (local time) opens"
                    + (f"; the app's deferral ran out ({limit})" if past else ""))
    if past:
        return Activate(f"activated past the app's deferral ({held[0]}): {limit}", True)
    return Activate(f"inside the activation window {policy.window} (local time)"
                    if policy.window else "allowed by the app")


def _held_by_app(now: datetime, policy: ActivationPolicy, word: AppWord
                 ) -> tuple[str, datetime | None] | None:
    """(why, until when: None for as long as the release allows) while the app's word
    holds the update back; None when it does not."""
    if word.action == "defer" and (word.until is None or now < word.until):
        return (f"deferred by the app until {time_text(word.until)}" if word.until
                else "deferred by the app"), word.until
    if policy.on_request and word.action != "allow":
        return "waiting for the app to allow it (update_activation)", None
    return None


def next_window_start(windows: tuple[Window, ...], now: datetime) -> datetime:
    """The next local time, after ``now``, at which one of ``windows`` opens."""
    starts = []
    for w in windows:
        at = now.replace(hour=w.start_min // 60, minute=w.start_min % 60, second=0,
                         microsecond=0)
        starts.append(at if at > now else at + timedelta(days=1))
    return min(starts)


def parse_word(fields: Mapping) -> tuple[str, float | None, str | None]:
    """(action: "" to read, "allow" or "defer"; for_s; model) of an update_activation
    request, or ActivationPolicyError naming the bad field."""
    unknown = set(fields) - {"action", "for_s", "model"}
    if unknown:
        raise ActivationPolicyError(f"unknown field '{sorted(unknown)[0]}'; send action "
                                    f"(allow or defer), for_s and model (both optional)")
    action = fields.get("action")
    if action is not None and action not in ACTIONS:
        raise ActivationPolicyError(f"action {action!r} must be \"allow\" or \"defer\" (or "
                                    f"left out to read the pending updates' state)")
    for_s = fields.get("for_s")
    if for_s is not None:
        if action != "defer":
            raise ActivationPolicyError("for_s belongs to action \"defer\" (how long, in "
                                        "seconds)")
        if isinstance(for_s, bool) or not isinstance(for_s, (int, float)) or \
                not math.isfinite(for_s) or for_s <= 0:
            raise ActivationPolicyError(f"for_s {for_s!r} must be a number of seconds above "
                                        f"0 (left out: as long as the release allows)")
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise ActivationPolicyError(f"model {model!r} must be a model name")
    return action or "", None if for_s is None else float(for_s), model


def status(now: datetime, policy: ActivationPolicy, ready_at: datetime | None,
           word: AppWord) -> dict:
    """What the update_activation op answers for one pending update (JSON-ready)."""
    out = {"policy": policy.describe(), "ready_at": None, "activate_by": None, "until": None,
           "app": {"action": word.action or None,
                   "until": time_text(word.until) if word.until else None}}
    if ready_at is None:
        return {**out, "state": "preparing",
                "detail": "downloading, validating or in its shadow phase"}
    d = decide(now, policy, ready_at, word)
    deadline = ready_at + timedelta(seconds=policy.max_deferral_s)
    out.update(ready_at=time_text(ready_at), activate_by=time_text(deadline))
    if isinstance(d, Wait):
        return {**out, "state": d.state, "detail": d.detail, "until": time_text(d.until)}
    return {**out, "state": "activating", "detail": d.detail}


def local_clock() -> Callable[[], datetime]:
    """The device's local time: ``datetime.now``, or (tests) the time in CLOCK_ENV's file."""
    path = os.environ.get(CLOCK_ENV)
    if not path:
        return datetime.now
    return lambda: datetime.fromisoformat(Path(path).read_text().strip())
