"""The device agent: poll the fleet, take the version DESIGN section 5 says, safely.

One pass (``check_once``): TUF refresh; the desired version of each model; for each
change an update driven step by step through the journal (download with HTTP Range to
staging, TUF length+hash check, unpack, stage in the repository, engine prepare,
validation on the release's samples, the rollout's shadow phase if it has one, activation,
health watch, commit or roll back).
Each step is journaled before it has effects, so a killed process resumes or rolls
back on restart (``recover``). Reports queue in SQLite until the fleet takes them.

Fault injection for the crash tests: OUTPOST_UPDATER_FAULT=<point> makes the process
SIGKILL itself at that point (download-mid, download-done, stage-mid, stage-stored,
prepare-mid, shadow-mid, activate-done, watch-mid).

The shadow phase (updater/shadow.py): the candidate shadows the active version on live
traffic through the serving process's traffic policy until the window has passed and
enough requests were compared; only a candidate within the rollout's limits is
activated. One outside them is never activated: it is marked bad and reported
``rejected_in_shadow`` with its figures. The figures live in the serving process, so a
restart starts the window again; without enough traffic the update stays in the shadow
phase (reported ``shadow_waiting``), the active version answering, until traffic comes or
the fleet stops offering the release (then it is abandoned). A device that does not serve
the model yet has no version to compare with: it skips the shadow phase and reports
``shadow_skipped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from appliance.errors import FailedPrecondition, InvalidArgument, OutpostError, Unavailable
from engines.base import file_sha256
from engines.files import replace_synced
from updater import report_auth
from updater.activation import (
    DEFERRAL_EXPIRED,
    ActivationPolicy,
    ActivationPolicyError,
    AppWord,
    Wait,
    decide,
    parse_word,
    time_text,
)
from updater.activation import status as activation_status
from updater.cohort import Release, desired_version
from updater.config import UpdaterConfig, report_key, trusted_root_bytes
from updater.delta import DeltaError, apply_delta
from updater.errors import FetchError, HealthError, ReleaseError, TrustError, UpdaterError
from updater.fetcher import Fetcher
from updater.fleet_repo import delta_path, releases_from_targets, target_url_path
from updater.health import Health, verdict, window
from updater.journal import Journal, Step, Update
from updater.pacing import TokenBucket, describe, in_windows
from updater.prebuilt import prepare_engine
from updater.release import extract_release
from updater.shadow import (
    REJECT,
    WAIT,
    ShadowFigures,
    ShadowPolicy,
    figures_from_snapshot,
    shadow_verdict,
)

log = logging.getLogger("outpost.updater")
FAULT_ENV = "OUTPOST_UPDATER_FAULT"


class OutsideWindow(FetchError):
    """Now is outside updater.download_windows: the download waits (it is not broken)."""


class ShadowWaiting(Exception):
    """The shadow phase can't be judged yet (too little traffic, or none here); the
    update stays in it and the active version keeps answering."""


class ActivationWaiting(Exception):
    """The release's activation policy holds the ready update (its window, the app's
    word); decided again on the next pass."""


# Steps before activation: given up when the fleet stops offering the release
PENDING_STEPS = (Step.DOWNLOAD, Step.STAGE, Step.PREPARE, Step.SHADOW, Step.READY)


def fault_point(name: str) -> None:
    """SIGKILL this process here when OUTPOST_UPDATER_FAULT names this point."""
    if os.environ.get(FAULT_ENV) == name:
        log.warning("fault injection: killing the process", extra={"point": name})
        os.kill(os.getpid(), signal.SIGKILL)


class Agent:
    def __init__(self, config: UpdaterConfig, data_dir: Path, host, *,
                 fetcher: Fetcher | None = None, fault=fault_point,
                 clock: Callable[[], datetime] = datetime.now):
        self.config = config
        self.host = host
        self.data_dir = Path(data_dir)
        self.tuf_dir = self.data_dir / "tuf"
        self.downloads = self.data_dir / "staging" / "downloads"
        self.unpack_root = self.data_dir / "staging" / "updates"
        self.downloads.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.data_dir / "state.db")
        self.fetcher = fetcher or Fetcher(config.http_timeout_s, config.download_chunk_bytes)
        self.fault = fault
        self.clock = clock  # local time, for download_windows
        self.windows = config.windows
        self.device_id = config.device
        self.base_url = config.fleet_url.rstrip("/")
        key = report_key(config)
        self._sign = (None if key is None else
                      lambda data: report_auth.sign(key, self.device_id, data))
        self._tuf = None
        self._shadow_started: dict[int, float] = {}  # update id -> monotonic start
        self._shadow_waiting_told: set[int] = set()  # updates reported shadow_waiting
        self._delta_targets: dict = {}  # delta path -> signed TargetFile, from _refresh
        self._delta_failed: dict[int, str] = {}  # update id -> why its delta wasn't used
        self._delta_wasted: dict[int, int] = {}  # update id -> bytes of a delta not used
        self._wake = asyncio.Event()  # the app's word: the next pass now, not after the poll
        self._closed = False

    def close(self) -> None:
        self._closed = True
        self.journal.close()

    # -- the loop ------------------------------------------------------------------------

    async def run_forever(self) -> None:
        """Recover, then poll every poll_interval_s + jitter; errors are logged, not fatal."""
        recovered = False
        while True:
            try:
                if not recovered:
                    recovered = True
                    for line in await self.recover():
                        log.info("update recovered", extra={"result": line})
                for line in await self.check_once():
                    log.info("update", extra={"result": line})
            except UpdaterError as exc:
                log.error("update check failed", extra={"error": str(exc)})
            except Exception:  # a bug here must not take the serving process down
                log.exception("update check crashed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval_s
                                       + random.uniform(0, self.config.poll_jitter_s))
            self._wake.clear()

    async def recover(self) -> list[str]:
        """Finish what a killed process left between activation and commit."""
        out = []
        for found in self.journal.open_updates():
            u = found
            if u.step is Step.WATCH:
                u = self.journal.advance(u, Step.WATCH, "restarted during the health watch",
                                         watch_restarts=u.watch_restarts + 1)
                if u.watch_restarts > self.config.max_watch_restarts:
                    u = self.journal.advance(
                        u, Step.ROLLBACK, f"the device restarted {u.watch_restarts} times "
                        f"during the health watch")
            if u.step is Step.SHADOW:  # check_once resumes it if the fleet still offers it
                self.journal.note(u, "restarted during the shadow phase: the window "
                                     "starts again (the figures were in memory)")
            if u.step in (Step.ACTIVATE, Step.WATCH, Step.ROLLBACK):
                out.append(await self._drive(u))
        return out

    async def check_once(self) -> list[str]:
        """One pass: refresh, resume open updates, start the ones the metadata asks for."""
        await self.flush_reports()
        problems: list[str] = []
        releases = await asyncio.to_thread(self._refresh, problems)
        for line in problems:
            log.warning("release not taken", extra={"why": line})
        out = list(problems)
        for u in self.journal.open_updates():
            want = self._desired(releases, u.model)
            if u.step in PENDING_STEPS and (want is None or want.version != u.version):
                if u.step is Step.SHADOW:
                    await self.host.end_shadow(u.model, u.version)
                self.journal.advance(u, Step.DONE, "the fleet no longer offers it",
                                     outcome="abandoned")
                self._cleanup(u)
                out.append(f"{u.model} {u.version}: abandoned (no longer offered)")
                continue
            out.append(await self._drive(u))
        for model in sorted({r.model for r in releases}):
            if any(u.model == model for u in self.journal.open_updates()):
                continue
            want = self._desired(releases, model)
            current = self.host.active(model)
            if want is None or want.version == current:
                continue
            out.append(await self.start_update(want, current))
        await self.flush_reports()
        return out

    def _desired(self, releases: list[Release], model: str) -> Release | None:
        return desired_version(releases, model, self.device_id, self.config.labels,
                               bad=self.journal.bad(model), current=self.host.active(model))

    # -- TUF -----------------------------------------------------------------------------

    def _refresh(self, problems: list[str] | None = None) -> list[Release]:
        from tuf.api import exceptions as tuf_exc  # noqa: PLC0415
        from tuf.api.metadata import Metadata  # noqa: PLC0415
        from tuf.ngclient import Updater  # noqa: PLC0415

        self.tuf_dir.mkdir(parents=True, exist_ok=True)
        bootstrap = None if (self.tuf_dir / "root.json").exists() \
            else trusted_root_bytes(self.config)
        try:
            updater = Updater(metadata_dir=str(self.tuf_dir),
                              metadata_base_url=f"{self.base_url}/metadata/",
                              target_dir=str(self.downloads),
                              target_base_url=f"{self.base_url}/targets/",
                              fetcher=self.fetcher, bootstrap=bootstrap)
            updater.refresh()
            # ngclient has no public listing of the targets; the top-level targets it just
            # verified are the copy it keeps in metadata_dir (what it trusts on start too).
            targets = Metadata.from_file(str(self.tuf_dir / "targets.json")).signed
        except tuf_exc.DownloadError as exc:
            raise FetchError(f"fleet {self.base_url} unreachable: {exc}") from exc
        except tuf_exc.RepositoryError as exc:
            raise TrustError(f"fleet metadata from {self.base_url} rejected "
                             f"({type(exc).__name__}): {exc}; keeping the current versions"
                             ) from exc
        except (OSError, ValueError) as exc:
            raise TrustError(f"local TUF metadata in {self.tuf_dir} unusable: {exc}") from exc
        self._tuf = updater
        self._delta_targets = {p: tf for p, tf in targets.targets.items()
                               if p.startswith("deltas/") and isinstance(tf.custom, dict)}
        return releases_from_targets(targets, problems)

    # -- one update ----------------------------------------------------------------------

    async def start_update(self, release: Release, current: int | None) -> str:
        info = await asyncio.to_thread(self._tuf.get_targetinfo, release.target_path)
        if info is None or "sha256" not in info.hashes:
            raise TrustError(f"release {release.target_path} has no signed sha256 in the "
                             f"fleet metadata")
        if info.length > self.config.max_release_bytes:
            raise TrustError(f"release {release.target_path} is {info.length} bytes, over "
                             f"updater.max_release_bytes {self.config.max_release_bytes}")
        shadow = release.rollout.shadow
        activation = release.activation
        u = self.journal.begin(release.model, release.version, release.target_path,
                               rollout_id=release.rollout.id, length=info.length,
                               sha256=info.hashes["sha256"], previous=current,
                               shadow=json.dumps(shadow.as_custom()) if shadow else "",
                               activation=json.dumps(activation.as_custom())
                               if activation else "")
        self._report(u, "downloading")
        return await self._drive(u)

    async def _drive(self, u: Update) -> str:
        """Run ``u`` from its journaled step to the end (or until the fleet is unreachable)."""
        where = f"{u.model} {u.previous} -> {u.version}"
        while u.step is not Step.DONE:
            try:
                u = await self._step(u)
            except FetchError as exc:  # the download resumes on the next pass
                self.journal.note(u, str(exc))
                return f"{where}: paused at {u.step.value} ({exc})"
            except ShadowWaiting as exc:  # judged again on the next pass
                return f"{where}: in shadow ({exc})"
            except ActivationWaiting as exc:  # decided again on the next pass
                return f"{where}: {exc}"
            except TrustError as exc:  # never mark bad: an attacker could block a release
                self._discard_download(u)
                u = self.journal.advance(u, Step.DONE, str(exc), outcome="failed")
                self._report(u, "failed", str(exc))
            except (ReleaseError, OutpostError) as exc:
                if u.step in (Step.ACTIVATE, Step.WATCH):
                    u = self.journal.advance(u, Step.ROLLBACK, str(exc))
                    continue
                self._mark_bad(u, str(exc))
                u = self.journal.advance(u, Step.DONE, str(exc), outcome="failed")
                self._report(u, "failed", str(exc))
            except HealthError as exc:
                u = self.journal.advance(u, Step.ROLLBACK, str(exc))
            except Exception as exc:  # a bug of ours: leave no update half done
                if u.step is Step.ROLLBACK:
                    raise  # the journal keeps it; recover() retries at the next start
                log.exception("update step crashed", extra={"step": u.step.value})
                why = f"internal error at step {u.step.value}: {exc!r}"
                if u.step in (Step.ACTIVATE, Step.WATCH):
                    u = self.journal.advance(u, Step.ROLLBACK, why)
                    continue
                self._discard_download(u)
                u = self.journal.advance(u, Step.DONE, why, outcome="failed")
                self._report(u, "failed", why)
        self._cleanup(u)
        if u.shadow:  # however it ended, the candidate shadows nothing any more
            try:
                await self.host.end_shadow(u.model, u.version)
            except Exception as exc:  # best effort: a policy left behind only copies to it
                log.warning("shadow policy not cleared", extra={"error": str(exc)})
        self._shadow_started.pop(u.id, None)
        await self.flush_reports()
        return f"{where}: {u.outcome}" + (f" ({u.detail})" if u.detail else "")

    async def _step(self, u: Update) -> Update:
        if u.step is Step.DOWNLOAD:
            await asyncio.to_thread(self._download, u)
            got = self.journal.get(u.id).download
            self._report(u, "downloaded", self._delta_failed.pop(u.id, ""),
                         download=json.loads(got) if got else None)
            return self.journal.advance(u, Step.STAGE)
        if u.step is Step.STAGE:
            staged = self.host.has_version(u.model, u.version)
            if not staged and not self._part(u)[1].exists():  # removed by hand: fetch again
                return self.journal.advance(u, Step.DOWNLOAD, "the verified archive is gone "
                                            "and the version not stored: downloading again")
            await asyncio.to_thread(self._stage, u, staged)
            self._report(u, "staged")
            return self.journal.advance(u, Step.PREPARE)
        if u.step is Step.PREPARE:  # a plan the fleet prebuilt for this device, or a build
            how, line = await asyncio.to_thread(prepare_engine, self, u)
            self._report(u, "validated", line, engine=how)
            current = self.host.active(u.model)
            previous = current if current != u.version else u.previous
            if u.shadow and current is None:
                why = (f"{u.model} is not served here yet: no active version to compare "
                       f"with, so the shadow phase is skipped (the health watch still runs)")
                self._report(u, "shadow_skipped", why)
                return self._to_activate(u, previous, why)
            if u.shadow and current != u.version:
                return self.journal.advance(u, Step.SHADOW, previous=previous)
            return self._to_activate(u, previous)
        if u.step is Step.SHADOW:
            return await self._shadow(u)
        if u.step is Step.READY:
            return await self._await_activation(u)
        if u.step is Step.ACTIVATE:
            await self.host.activate(u.model, u.version)
            if u.shadow:
                await self.host.end_shadow(u.model, u.version)  # the split, if any, stays
            self.fault("activate-done")
            self._report(u, "activated")
            return self.journal.advance(u, Step.WATCH)
        if u.step is Step.WATCH:
            await self._watch(u)
            self._report(u, "committed")
            return self.journal.advance(u, Step.DONE, outcome="committed")
        if u.step is Step.ROLLBACK:
            return await self._rollback(u)
        raise AssertionError(u.step)

    def _to_activate(self, u: Update, previous: int | None, detail: str = "") -> Update:
        """Next: activation, with the health of the version answering now as the watch's
        baseline; first the wait the release's activation policy asks for, if any."""
        current = self.host.active(u.model)
        if u.activation and u.step is not Step.READY and current != u.version:
            return self.journal.advance(u, Step.READY, detail, previous=previous,
                                        ready_at=self.clock().timestamp())
        base = self.host.health(u.model, current)
        return self.journal.advance(
            u, Step.ACTIVATE, detail, previous=previous,
            baseline=json.dumps(dataclasses.asdict(base)) if base else "")

    async def _await_activation(self, u: Update) -> Update:
        """Activate when the release's activation policy and the app's word let it
        (updater/activation.py); else report what it waits for, once per change."""
        if u.shadow:  # it passed: copying live requests to it while it waits costs
            try:
                await self.host.end_shadow(u.model, u.version)
            except Exception as exc:  # best effort: activation ends it in any case
                log.warning("shadow policy not cleared", extra={"error": str(exc)})
        u = self.journal.get(u.id)  # the app's word may have come since
        d = decide(self.clock(), *self._activation_inputs(u))
        if isinstance(d, Wait):
            told = f"{d.state} ({d.detail})"
            if u.waiting != told:
                self._report(u, d.state, d.detail)
                self.journal.remember(u, told, waiting=told)
            raise ActivationWaiting(told)
        if d.past_deferral:
            self._report(u, DEFERRAL_EXPIRED, d.detail)
        return self._to_activate(u, u.previous, d.detail)

    @staticmethod
    def _activation_inputs(u: Update) -> tuple[ActivationPolicy, datetime | None, AppWord]:
        """(policy, when it became ready, the app's word) as the journal holds them."""
        return (ActivationPolicy.from_custom(json.loads(u.activation)),
                None if u.ready_at is None else datetime.fromtimestamp(u.ready_at),
                AppWord(u.app_action, None if u.app_until is None
                        else datetime.fromtimestamp(u.app_until)))

    async def app_word(self, fields: dict) -> dict:
        """The local app's word on activation (the update_activation op, its HTTP
        route): ``action`` allow or defer (``for_s``) the updates with an activation
        policy not yet activated (of ``model``), or none to read where they stand."""
        if self._closed:
            raise Unavailable("the update agent is stopping; ask again after the restart")
        try:
            action, for_s, model = parse_word(fields)
        except ActivationPolicyError as exc:
            raise InvalidArgument(str(exc)) from None
        now = self.clock()
        pending = [u for u in self.journal.open_updates() if u.activation and
                   u.step in PENDING_STEPS and model in (None, u.model)]
        if action and not pending:
            raise FailedPrecondition(
                f"no update{f' of {model}' if model else ''} waits for activation on this "
                f"device; nothing to {action} (the app's word applies to a release "
                f"published with an activation policy, until it is activated)")
        until = None if for_s is None else now + timedelta(seconds=for_s)
        said = f"the app's word: {action}" + (f" until {time_text(until)}" if until else "")
        answer = []
        for found in pending:
            u = self.journal.remember(found, said, app_action=action, app_until=(
                until.timestamp() if until else None)) if action else found
            answer.append({"model": u.model, "version": u.version, "step": u.step.value,
                           **activation_status(now, *self._activation_inputs(u))})
        if action:
            self._wake.set()
        return {"updates": answer}

    async def _shadow(self, u: Update) -> Update:
        """Run the candidate as the shadow until the window has passed, then judge it."""
        policy = ShadowPolicy.from_custom(json.loads(u.shadow))
        started = self._shadow_started.get(u.id)
        if started is None:  # first time in this process: the window (re)starts
            if not await self.host.start_shadow(u.model, u.version, policy.sample):
                self._tell_waiting(u, ShadowFigures(), "no server runs here")
                raise ShadowWaiting(
                    "no server runs here to give it live traffic; it is judged when "
                    "`outpost serve` runs with [updater], or beside this command")
            started = self._shadow_started[u.id] = time.monotonic()
            self._report(u, "shadowing", policy.describe())
        while (left := policy.window_s - (time.monotonic() - started)) > 0:
            await asyncio.sleep(min(0.25, left))
            self.fault("shadow-mid")
        snap = await self.host.shadow_snapshot(u.model, u.version)
        if snap is None:  # the server lost the policy (restarted): start again
            self._shadow_started.pop(u.id, None)
            raise ShadowWaiting("the serving process no longer shadows it; the window "
                                "starts again on the next pass")
        fig = figures_from_snapshot(snap, time.monotonic() - started)
        verdict, why = shadow_verdict(fig, policy)
        if verdict == WAIT:
            self._tell_waiting(u, fig, why)
            raise ShadowWaiting(f"{why}; waiting for live traffic while the active "
                                f"version answers (no timeout: it is activated only on "
                                f"evidence)")
        if verdict == REJECT:
            await self.host.end_shadow(u.model, u.version)
            self._mark_bad(u, f"rejected in shadow: {why}")
            self._report(u, "rejected_in_shadow", f"{why}; {fig.describe()}", shadow=fig)
            return self.journal.advance(u, Step.DONE, why, outcome="rejected_in_shadow")
        self._report(u, "shadow_passed", fig.describe(), shadow=fig)
        return self._to_activate(u, u.previous, f"shadow passed: {why}")

    def _tell_waiting(self, u: Update, fig: ShadowFigures, why: str) -> None:
        """Report shadow_waiting once per update and process (figures in the detail)."""
        if u.id not in self._shadow_waiting_told:
            self._shadow_waiting_told.add(u.id)
            self._report(u, "shadow_waiting", f"{why}; {fig.describe()}", shadow=fig)

    def _part(self, u: Update) -> tuple[Path, Path]:
        return self.downloads / f"{u.sha256}.part", self.downloads / f"{u.sha256}.tar"

    def _download(self, u: Update) -> None:
        """Fetch the target into staging, resuming a partial file with HTTP Range; from a
        delta when this device holds its base (the full file when that fails)."""
        from tuf.api.metadata import TargetFile  # noqa: PLC0415

        part, done = self._part(u)
        info = TargetFile(u.length, {"sha256": u.sha256}, u.target_path)
        if not done.exists():
            if part.exists() or not self._from_delta(u, info, part):
                url = f"{self.base_url}/targets/{target_url_path(u.target_path, u.sha256)}"
                self._fetch_to(u, url, part, u.length, f"release {u.target_path}")
                _verify(info, part, f"release {u.target_path} failed TUF verification "
                                    f"({{}}); it was tampered with or corrupted")
                if not self.journal.get(u.id).download:  # else rebuilt before a restart
                    wasted = self._delta_wasted.pop(u.id, 0)
                    self._remember_download(u, {"kind": "full", "bytes": u.length + wasted,
                                                "full_bytes": u.length})
            replace_synced(part, done)
        else:  # downloaded and verified before a restart; check again, it's cheap
            _verify(info, done, f"staged release {done} no longer matches its signed "
                                f"hash ({{}})")
        self.fault("download-done")

    def _fetch_to(self, u: Update, url: str, part: Path, length: int, what: str) -> None:
        """Download ``url`` into ``part`` (resuming what it holds), at most ``length``.

        A link that breaks off (reset, clean close, stall past http_timeout_s) is resumed
        with Range at once, in this pass: every chunk is fsynced before the next is read,
        so only the chunk in flight is fetched again. Attempts that bring no new byte are
        bounded by download_attempts; then the download waits for the next pass."""
        barren = 0  # attempts in a row that brought nothing
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                self._fetch_once(u, url, part, length, what)
                return
            except OutsideWindow:
                raise
            except FetchError as exc:
                gained = (part.stat().st_size if part.exists() else 0) > before
                barren = 0 if gained else barren + 1
                if barren >= self.config.download_attempts:
                    raise FetchError(f"{exc} ({barren} attempts in a row brought no byte; "
                                     f"it resumes on the next pass)") from exc
                self.journal.note(u, f"{exc}; resuming in this pass")
                time.sleep(0.0 if gained else min(2.0, 0.1 * 2 ** barren))

    def _fetch_once(self, u: Update, url: str, part: Path, length: int, what: str) -> None:
        from tuf.api import exceptions as tuf_exc  # noqa: PLC0415

        self._check_window()
        have = part.stat().st_size if part.exists() else 0
        if have > length:
            part.unlink()
            have = 0
        if have >= length:
            return
        if have:
            self.journal.note(u, f"resuming the download at byte {have}")
        cap = self.config.max_download_bytes_per_s
        bucket = TokenBucket(cap, burst=self.config.download_chunk_bytes) if cap else None
        t0 = time.monotonic()
        start, chunks = self.fetcher.fetch_from(url, have)
        with open(part, "r+b" if part.exists() else "wb") as f:
            f.seek(start)
            f.truncate()
            written = start
            try:
                for chunk in chunks:
                    written += len(chunk)
                    if written > length:
                        raise TrustError(f"{what}: the fleet sent more than the {length} "
                                         f"bytes its signed metadata allows")
                    f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
                    self.fault("download-mid")
                    if bucket is not None:
                        bucket.take(len(chunk))
                    if written < length:
                        self._check_window()
            except tuf_exc.DownloadError as exc:
                raise FetchError(f"download of {url} broke off at byte {written}: "
                                 f"{exc}") from exc
        if cap:
            took = time.monotonic() - t0
            self.journal.note(u, f"downloaded {written - start} bytes in {took:.2f} s: "
                                 f"{(written - start) / max(took, 1e-9):.0f} B/s, capped "
                                 f"at {cap}")

    def _check_window(self) -> None:
        if not in_windows(self.windows, self.clock()):
            raise OutsideWindow(f"outside the download windows ({describe(self.windows)}, "
                                f"local time); the download waits for the next one")

    def _pick_delta(self, u: Update) -> tuple[str, object, dict, Path] | None:
        """The smallest signed delta to ``u`` whose base this device holds, or None (the
        reason noted when deltas were offered but none applies here)."""
        offered, usable = [], []
        for path, tf in self._delta_targets.items():
            about = tf.custom.get("delta")
            if not isinstance(about, dict) or about.get("model") != u.model or \
                    about.get("version") != u.version or "sha256" not in tf.hashes:
                continue
            base = about.get("base_version")
            if path != delta_path(u.model, u.version, base) or tf.length >= u.length:
                continue
            offered.append(str(base))
            base_file = self._version_file(u.model, base)
            if base_file is not None:
                usable.append((tf.length, path, tf, about, base_file))
        if offered and not usable:
            self._delta_failed[u.id] = (f"deltas from {', '.join(offered)} not used: this "
                                        f"device holds none of those versions; downloaded "
                                        f"the full release")
            self.journal.note(u, self._delta_failed[u.id])
        return min(usable, key=lambda c: c[0])[1:] if usable else None

    def _version_file(self, model: str, version) -> Path | None:
        """A held version's model file, by the repository's layout (DESIGN section 3;
        this runs in a worker thread, away from the repository's SQLite connection).
        What it holds is checked against the delta's signed base hash before use."""
        if not isinstance(version, int):
            return None
        path = self.data_dir / "models" / model / str(version) / "model.onnx"
        return path if path.is_file() else None

    def _from_delta(self, u: Update, info, part: Path) -> bool:
        """Rebuild the release into ``part`` from a delta; False: fetch the full file.

        Disk: the delta and the rebuilt release beside the base version's model file; the
        delta is removed as soon as the release is rebuilt."""
        if u.id in self._delta_failed:
            return False
        picked = self._pick_delta(u)
        if picked is None:
            return False
        path, tf, about, base_file = picked
        base = about["base_version"]
        dpart = self.downloads / f"{u.sha256}.delta-{base}.part"
        url = f"{self.base_url}/targets/{target_url_path(path, tf.hashes['sha256'])}"
        try:
            self._fetch_to(u, url, dpart, tf.length, f"delta {path}")
            _verify(tf, dpart, f"delta {path} failed TUF verification ({{}})")
            if file_sha256(base_file) != about.get("base_sha256"):
                raise DeltaError(f"this device's {u.model} {base} ({base_file}) is not the "
                                 f"file the delta was made from")
            apply_delta(dpart, base_file, part, u.length)
            _verify(info, part, f"release {u.target_path} rebuilt from the delta does not "
                                f"match its signed hash ({{}})")
        except (TrustError, DeltaError) as exc:
            part.unlink(missing_ok=True)
            self._delta_wasted[u.id] = dpart.stat().st_size if dpart.exists() else 0
            dpart.unlink(missing_ok=True)
            why = f"delta from {base} not used ({exc}); downloaded the full release"
            self._delta_failed[u.id] = why
            self.journal.note(u, why)
            log.warning("delta not used", extra={"model": u.model, "error": str(exc)})
            return False
        dpart.unlink(missing_ok=True)
        self._remember_download(u, {"kind": "delta", "bytes": tf.length,
                                    "full_bytes": u.length, "base_version": base})
        return True

    def _remember_download(self, u: Update, facts: dict) -> None:
        """Journal how the release came (the ``downloaded`` report carries it: the fleet
        counts bytes sent as deltas and as full files); ``bytes`` counts a failed delta's
        bytes too."""
        if facts["kind"] == "delta":
            line = (f"rebuilt from the delta from {facts['base_version']}: {facts['bytes']} "
                    f"bytes downloaded instead of {facts['full_bytes']}")
        else:
            wasted = facts["bytes"] - facts["full_bytes"]
            line = (f"the full release: {facts['bytes']} bytes downloaded"
                    + (f" ({wasted} of them a delta not used)" if wasted else ""))
        self.journal.remember(u, line, download=json.dumps(facts))

    def _stage(self, u: Update, staged_before: bool) -> None:
        """Unpack the verified archive and move its files into the repository.

        Disk: never more than two copies of the new model (docs/ota.md): the archive and
        the unpacked folder, then the archive and the stored version (moved in, not
        copied), then the stored version alone. The archive goes only once the version
        is stored, so a restart before that unpacks it again."""
        _, done = self._part(u)
        if staged_before:  # in the repository already (before a restart, or a fallback):
            if done.exists():  # immutable; only the release's samples are wanted
                extract_release(done, self._unpacked(u), self.config.max_release_bytes,
                                only=("samples.npz",))
            done.unlink(missing_ok=True)
            return
        folder = extract_release(done, self._unpacked(u), self.config.max_release_bytes)
        self.fault("stage-mid")
        try:
            self.host.stage(u.model, u.version, folder)
        except OutpostError as exc:
            raise ReleaseError(f"release {u.model} {u.version} can't be stored: {exc}") from exc
        self.fault("stage-stored")
        done.unlink()

    async def _watch(self, u: Update) -> None:
        """Compare the new version's errors and latency with the previous one's."""
        start = self.host.health(u.model, u.version)
        watch_s = self.config.health_window_s
        t0 = time.monotonic()
        while time.monotonic() - t0 < watch_s:
            await asyncio.sleep(min(0.5, watch_s))
            self.fault("watch-mid")
        end = self.host.health(u.model, u.version)
        if start is None or end is None:
            if getattr(self.host, "manager", None) is not None:
                raise HealthError(f"{u.model} {u.version} is not loaded after activation")
            return  # no server in this process: nothing served, nothing to watch
        base = Health(**json.loads(u.baseline)) if u.baseline else None
        why = verdict(window(start, end), base,
                      max_error_rate_increase=self.config.health_max_error_rate_increase,
                      max_latency_ratio=self.config.health_max_latency_ratio,
                      min_requests=self.config.health_min_requests)
        if why:
            raise HealthError(why)

    async def _rollback(self, u: Update) -> Update:
        why = u.detail or "the update failed"
        if u.shadow:  # before the version is marked bad
            await self.host.end_shadow(u.model, u.version)
        self._mark_bad(u, why)
        if u.previous is not None and u.previous != u.version and \
                self.host.active(u.model) != u.previous:
            await self.host.activate(u.model, u.previous)
        self._report(u, "rolled_back", why)
        return self.journal.advance(u, Step.DONE, why, outcome="rolled_back")

    def _mark_bad(self, u: Update, why: str) -> None:
        self.journal.mark_bad(u.model, u.version, why)
        self.host.mark_bad(u.model, u.version, why)

    def _discard_download(self, u: Update) -> None:
        for p in (*self._part(u), *self.downloads.glob(f"{u.sha256}.*.part")):  # deltas, plans
            p.unlink(missing_ok=True)

    def _unpacked(self, u: Update) -> Path:
        return self.unpack_root / f"{u.model}-{u.version}"

    def _cleanup(self, u: Update) -> None:
        self._discard_download(u)
        shutil.rmtree(self._unpacked(u), ignore_errors=True)

    # -- reports -------------------------------------------------------------------------

    def _report(self, u: Update, state: str, detail: str = "",
                shadow: ShadowFigures | None = None, engine: str = "",
                download: dict | None = None) -> None:
        report = {"device_id": self.device_id, "model": u.model, "version": u.version,
                  "rollout_id": u.rollout_id, "state": state, "detail": detail[:2000],
                  "ts": time.time(), "labels": dict(self.config.labels)}
        if shadow is not None:
            report["shadow"] = shadow.as_report()
        if engine:  # prebuilt | built: how this device got its engine
            report["engine"] = engine
        if download is not None:  # delta | full, and its bytes
            report["download"] = download
        if self.journal.queue_report(report, self.config.max_queued_reports):
            log.warning("report queue full: the oldest report dropped",
                        extra={"dropped": self.journal.dropped_reports()})

    async def flush_reports(self) -> int:
        """Send the queued reports; they stay queued while the fleet is unreachable."""
        sent = 0
        while queued := self.journal.queued_reports():
            body = {"reports": [r for _, r in queued]}
            dropped = self.journal.dropped_reports()
            if dropped:  # the fleet learns how many it will never see
                body["dropped_reports"] = dropped
            try:
                await asyncio.to_thread(self.fetcher.post_json, self.config.reports_endpoint,
                                        body, self._sign)
            except FetchError as exc:
                log.info("reports queued", extra={"queued": len(queued), "error": str(exc)})
                return sent
            self.journal.drop_reports([i for i, _ in queued])
            if dropped:
                self.journal.forget_dropped(dropped)
            sent += len(queued)
        return sent


def _verify(info, path: Path, message: str) -> None:
    """TUF's length and hash check of a downloaded file; ``message`` has a {} for why."""
    from tuf.api import exceptions as tuf_exc  # noqa: PLC0415

    with open(path, "rb") as f:
        try:
            info.verify_length_and_hashes(f)
        except tuf_exc.LengthOrHashMismatchError as exc:
            raise TrustError(message.format(exc)) from exc
