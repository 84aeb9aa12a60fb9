"""What the agent needs of the device it updates: the appliance's repository and models.

``ApplianceHost`` stages versions with ``Repository.add``, prepares and validates them
with the device's engine, activates through the running server's service (its hot swap;
or the repository pointer when no server runs), reads health from the version's
statistics there, and marks bad versions. The fleet simulation supplies its own host
with the same methods.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from pathlib import Path

from appliance.errors import NotFound
from appliance.models.repository import Repository
from updater.errors import ReleaseError
from updater.health import Health
from updater.validation import compare, read_samples, run_session, tolerances


class ApplianceHost:
    def __init__(self, repo: Repository, engine, profile=None, service=None,
                 socket_path: Path | None = None):
        self.repo = repo
        self.engine = engine
        self.profile = profile  # the firmware profile whose build fields engines use
        self.service = service  # None: no server in this process (`outpost update check`)
        self.socket_path = socket_path  # a server that may be running, for `update check`

    def active(self, model: str) -> int | None:
        try:
            return self.repo.model(model).active_version
        except NotFound:
            return None

    def has_version(self, model: str, version: int) -> bool:
        try:
            self.repo.version(model, version)
            return True
        except NotFound:
            return False

    @contextmanager
    def _thread_repo(self):
        """A Repository of this thread's own: SQLite connections stay in their thread."""
        repo = Repository(self.repo.data_dir)
        try:
            yield repo
        finally:
            repo.close()

    def stage(self, model: str, version: int, folder: Path) -> None:
        """Blocking (runs in a worker thread): move the unpacked release into the
        repository (a rename, not a copy: the disk holds the model once more, not twice);
        its model and samples leave ``folder``."""
        with self._thread_repo() as repo:
            repo.add(model, folder / "model.onnx", version=version,
                     config_path=folder / "config.toml",
                     samples_path=folder / "samples.npz", activate=False, adopt=True)

    def build_inputs(self, model: str, version: int):
        """(the stored version's record, its config, its BuildOptions for this profile)."""
        from appliance.models.loaded import build_options  # noqa: PLC0415

        with self._thread_repo() as repo:
            record = repo.version(model, version)
        config = record.config()
        return record, config, build_options(config, self.profile)

    def prepare_and_validate(self, model: str, version: int, release_samples: Path,
                             fault=None) -> None:
        """Prepare the engine for this device (cached) and check it on the samples.

        The stored version's own samples.npz when it has one (a version added locally
        may not), else the release's.
        """
        from engines import EngineError, RuntimeOptions  # noqa: PLC0415

        where = f"release {model} {version}"
        record, config, opts = self.build_inputs(model, version)
        try:
            artifact = self.engine.prepare(record.model_file, opts, self.repo.engines_dir)
            if fault is not None:
                fault("prepare-mid")
            session = self.engine.load(artifact, opts, RuntimeOptions())
        except EngineError as exc:
            raise ReleaseError(f"{where}: the engine could not prepare it: {exc}") from exc
        try:
            samples = record.path / "samples.npz"
            inputs, expected = read_samples(samples if samples.exists() else release_samples)
            if not expected:
                raise ReleaseError(f"{where}: its samples hold no expected outputs")
            got = run_session(session, inputs)
        except EngineError as exc:
            raise ReleaseError(f"{where}: running the samples failed: {exc}") from exc
        finally:
            session.close()
        rtol, atol = tolerances(config.validation.rtol, config.validation.atol,
                                self.engine.kind,
                                self.profile.engine.precision if self.profile else "fp32")
        compare(got, expected, rtol, atol, where)

    async def activate(self, model: str, version: int) -> None:
        if self.service is None:
            self._activate_offline(model, version)
            return
        # The hot swap: load and warm, switch between requests, drain and unload the old
        # one. A version that fails to load raises FailedPrecondition and leaves the old
        # one serving.
        await self.service.activate(model, version)

    def _activate_offline(self, model: str, version: int) -> None:
        """No server here: tell a running one over its socket, else move the pointer."""
        if self.socket_path is not None and Path(self.socket_path).exists():
            from appliance.client import Client  # noqa: PLC0415
            from appliance.errors import InvalidArgument, Unavailable  # noqa: PLC0415

            try:
                with Client(self.socket_path, timeout_s=120) as client:
                    client.call("activate", model=model, version=version)
                return
            except (Unavailable, InvalidArgument):
                pass  # no server listening, or one without the activate op: the pointer
        self.repo.set_active(model, version)

    # -- the shadow phase: the candidate sees copies of live requests ------------------------

    async def start_shadow(self, model: str, version: int, sample: float) -> bool:
        """Make ``version`` the shadow of the active one (the traffic policy, with its
        split kept; its figures start again). False when no server runs here to give it
        live traffic. A version that can't load raises OutpostError."""
        change = {"policy": None}

        def policy(current: dict | None) -> dict:
            return {**(current or {}), "shadow": version, "shadow_sample": sample}

        if self.service is not None:
            change["policy"] = policy(await self.service.traffic(model))
            await self.service.traffic(model, change)
            return True
        return await asyncio.to_thread(self._over_socket, lambda c: c.call(
            "traffic", model=model, policy=policy(c.call("traffic", model=model)["traffic"])))

    async def shadow_snapshot(self, model: str, version: int) -> dict | None:
        """The router's figures of ``version`` as the shadow now in force (ShadowStats
        snapshot; {} before the first copy), or None when it is not the shadow there
        (no server, or a server restarted since with another policy)."""
        def pick(figures: dict, policy: dict | None) -> dict | None:
            if not policy or policy.get("shadow") != version:
                return None
            return (figures.get(model) or {}).get("shadow") or {}

        if self.service is not None:
            return pick(self.service.traffic_figures(model), await self.service.traffic(model))
        result: list = []
        ok = await asyncio.to_thread(self._over_socket, lambda c: result.append(
            pick(c.call("stats", model=model)["traffic"],
                 c.call("traffic", model=model)["traffic"])))
        return result[0] if ok else None

    async def end_shadow(self, model: str, version: int) -> None:
        """Stop shadowing ``version`` (idempotent): the split, if any, stays."""
        def change(current: dict | None) -> dict | None:
            if not current or current.get("shadow") != version:
                return None
            rest = {**current, "shadow": None}
            return {"policy": rest} if rest.get("split") else {"clear": True}

        if self.service is not None:
            if model in self.service.manager.active:
                c = change(await self.service.traffic(model))
                if c is not None:
                    await self.service.traffic(model, c)
            return
        await asyncio.to_thread(self._over_socket, lambda client: (
            (c := change(client.call("traffic", model=model)["traffic"])) is not None
            and client.call("traffic", model=model, **c)))

    def _over_socket(self, use) -> bool:
        """Run ``use(client)`` against a server beside this process; False if none runs."""
        from appliance.client import Client  # noqa: PLC0415
        from appliance.errors import Unavailable  # noqa: PLC0415

        if self.socket_path is None or not Path(self.socket_path).exists():
            return False
        try:
            with Client(self.socket_path, timeout_s=120) as client:
                use(client)
        except Unavailable:
            return False
        return True

    def health(self, model: str, version: int | None) -> Health | None:
        if self.service is None or version is None:
            return None
        try:
            infos = self.service.statistics(model)
        except NotFound:  # not loaded here
            return None
        info = next((i for i in infos if i.version == version), None)
        if info is None:
            return None
        snap = info.stats.snapshot()
        return Health(snap["request_success"], snap["request_failure"],
                      snap["latency_ms"]["p50"])

    def mark_bad(self, model: str, version: int, why: str) -> None:
        if self.has_version(model, version):
            self.repo.mark(model, version, "bad", why)

