"""Prebuilt TensorRT plans: attached to a release by the fleet, taken by the devices whose
plan key matches, instead of a build of minutes on every board of a class.

Fleet side: `outpost fleet attach-engine` signs a plan that `outpost compile` made on a
reference device as a target beside a release (``FleetRepo.attach_engine``); its signed
``custom`` names the plan key (engines/tensorrt/plan_key.py), the firmware profile and
the sha256 of the model it was built from. ``check_plan_fits`` first refuses a plan that no
device of that profile would take for that release.

Device side: ``prepare_engine`` is the agent's prepare step. Where the device's engine is
TensorRT and a plan is attached for exactly its key, the plan is downloaded through the
agent's verified download (resumable, paced, never past the signed length), then checked
against the signed length and hashes; only then does TensorRT deserialize it, here, and it
is moved into the engine cache as if built here (``TensorRTEngine.adopt``). The release is
then validated on its samples from that plan: no build runs. A plan that fails its hash
check, does not deserialize, or fails validation is dropped (nothing of it left in the
cache or staging) and the engine is built here, said once in the journal and the report.
No plan for this key (another TensorRT version, GPU or build setting): the attached plans
are never downloaded, and the engine is built as before; the active version keeps serving
meanwhile, as during any update's prepare step.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engines.errors import EngineError
from engines.tensorrt.plan_key import PlanKey, PlanKeyError, key_from_custom, plan_key
from updater.errors import ReleaseError, TrustError, UpdaterError

log = logging.getLogger("outpost.updater")
PREBUILT, BUILT = "prebuilt", "built"


@dataclass(frozen=True)
class PlanOffer:
    """A plan the fleet attached to a release, as its signed metadata describes it."""

    path: str  # the target path
    target: object  # its tuf TargetFile (length and hashes)
    key: PlanKey
    profile: str
    source_sha256: str


# -- the fleet side ------------------------------------------------------------------------


def check_plan_fits(key: PlanKey, config_toml: bytes, profile, release: str,
                    plan: Path) -> None:
    """Refuse (UpdaterError) a plan no device of ``profile`` would take for ``release``: a
    profile that serves with another engine, a GPU of another compute capability than the
    profile's, or build settings other than those the release's config.toml gives with
    the profile (what a device computes its key from)."""
    from appliance.models.loaded import build_options  # noqa: PLC0415
    from appliance.models.model_config import load_model_config  # noqa: PLC0415

    if profile.engine.kind != "tensorrt":
        raise UpdaterError(f"profile {profile.name} serves with {profile.engine.kind}: its "
                           f"devices take no TensorRT plan; pick a TensorRT profile "
                           f"('outpost profiles list')")
    want_cc = profile.device.compute_capability
    have_cc = ".".join(map(str, key.compute_capability))
    if want_cc and want_cc != have_cc:
        raise UpdaterError(f"{plan} was built on {key.gpu} (compute capability {have_cc}) "
                           f"but profile {profile.name} is for {want_cc}; build it on a "
                           f"{profile.name} device")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_bytes(config_toml)
        want = build_options(load_model_config(path), profile).cache_fields()
    have = {k: v for k, v in key.build.items() if k != "precision_path"}
    diffs = [f"{k} {have.get(k)} in the plan, {want[k]} on the devices"
             for k in sorted(want) if have.get(k) != want[k]]
    if diffs:
        raise UpdaterError(
            f"{plan} was built with other settings than a {profile.name} device uses for "
            f"{release} ({'; '.join(diffs)}), so no device would take it; compile the "
            f"release's model.onnx with its config.toml: 'outpost compile model.onnx "
            f"--profile {profile.name} --config config.toml'")


# -- the device side: which plan -----------------------------------------------------------


def offers(targets: Mapping, model: str, version: int,
           problems: list[str] | None = None) -> list[PlanOffer]:
    """The plans attached to ``model`` ``version`` in verified targets metadata. One whose
    signed description can't be read is left out (named in ``problems``)."""
    out = []
    for path, tf in sorted(targets.items()):
        about = tf.custom.get("engine") if isinstance(tf.custom, dict) else None
        if not path.startswith("engines/") or not isinstance(about, dict) or \
                about.get("model") != model or about.get("version") != version:
            continue
        try:
            out.append(PlanOffer(path, tf, key_from_custom(about.get("key")),
                                 str(about["profile"]), str(about["source_sha256"])))
        except (PlanKeyError, KeyError) as exc:
            if problems is not None:
                problems.append(f"plan {path} left out: its signed description is "
                                f"unreadable ({exc})")
    return out


def choose(found: list[PlanOffer], key: PlanKey, source_sha256: str
           ) -> tuple[PlanOffer | None, str]:
    """The offer for exactly this device's key and model, or None and why none fits."""
    for offer in found:
        if offer.key.digest == key.digest and offer.source_sha256 == source_sha256:
            return offer, ""
    if not found:
        return None, "no plan is attached to this release"
    why = "; ".join(
        f"{o.profile} {o.key.short}: "
        + (", ".join(key.differences(o.key)) or "built from another model")
        for o in found[:3])
    return None, (f"none of the {len(found)} plans attached is for this device's key "
                  f"{key.short} (here vs the plan: {why})")


# -- the device side: the prepare step -----------------------------------------------------


def prepare_engine(agent, u) -> tuple[str, str]:
    """The agent's prepare step (a worker thread): the engine of ``u`` from a plan attached
    for this device's key, else built here; then validated on the release's samples.

    Returns ``(prebuilt | built, the line the journal and the report carry)``. Uses the
    agent's trusted TUF metadata and verified download, its journal and its host.
    """
    host = agent.host
    samples = agent._unpacked(u) / "samples.npz"
    how, why = _take_plan(agent, u)
    try:
        host.prepare_and_validate(u.model, u.version, samples, agent.fault)
    except ReleaseError as exc:
        if how != PREBUILT:
            raise
        _evict(host, u)  # the plan may be what fails: build here and judge that
        why = f"the prebuilt plan failed validation ({exc}); built here instead"
        agent.journal.note(u, why)
        host.prepare_and_validate(u.model, u.version, samples, agent.fault)
        how = BUILT
    line = f"engine: {how}" + (f" ({why})" if why else "")
    agent.journal.note(u, line)
    return how, line


def _device(host, u):
    """(engine, model file, options, this device's plan key, the model's sha256) where
    the engine is TensorRT; None elsewhere, or when the key can't be computed (the build
    then says why)."""
    engine = getattr(host, "engine", None)
    if getattr(engine, "kind", "") != "tensorrt" or not hasattr(host, "build_inputs"):
        return None
    from engines.base import file_sha256  # noqa: PLC0415

    record, _config, options = host.build_inputs(u.model, u.version)
    try:
        meta = engine.plan_meta(file_sha256(record.model_file), options)
        return engine, record.model_file, options, plan_key(meta), meta["source_sha256"]
    except (EngineError, OSError) as exc:
        log.warning("no plan key here", extra={"model": u.model, "error": str(exc)})
        return None


def _take_plan(agent, u) -> tuple[str, str]:
    """Put the plan attached for this device's key into the engine cache, verified and
    deserialized here; ``(prebuilt, why)`` when it is there, else ``(built, why not)``."""
    from engines.cache import read_meta  # noqa: PLC0415

    device = _device(agent.host, u)
    if device is None:
        return BUILT, ""
    engine, model_file, options, key, source_sha = device
    cache_dir = agent.host.repo.engines_dir
    cached = Path(cache_dir) / f"{engine.key_for(source_sha, options)}.plan"
    if cached.exists() and (meta := read_meta(cached)) is not None:
        return (PREBUILT if meta.get("origin") else BUILT), "in the engine cache already"
    problems: list[str] = []
    found = offers(_trusted_targets(agent), u.model, u.version, problems)
    for line in problems:
        agent.journal.note(u, line)
    offer, why = choose(found, key, source_sha)
    if offer is None:
        return BUILT, why if found else ""
    if offer.target.length > agent.config.max_release_bytes:
        return _fallback(agent, u, f"the attached plan {offer.path} is {offer.target.length} "
                                   f"bytes, over updater.max_release_bytes "
                                   f"{agent.config.max_release_bytes}")
    part = agent.downloads / f"{u.sha256}.plan-{key.short}.part"
    try:  # a download that breaks off (FetchError) keeps its part: resumed next pass
        _download(agent, u, offer, part)
    except TrustError as exc:
        part.unlink(missing_ok=True)
        return _fallback(agent, u, f"the attached plan {offer.path} was refused ({exc})")
    try:
        complaint = engine.adopt(part, model_file, options, cache_dir, origin=offer.path)
    finally:
        part.unlink(missing_ok=True)  # moved into the cache, or refused: none left here
    if complaint is not None:
        return _fallback(agent, u, f"the attached plan {offer.path} was verified but "
                                   f"{complaint}")
    agent.journal.note(u, f"prebuilt plan {offer.path} ({offer.target.length} bytes, key "
                          f"{key.short}) verified and deserialized: no build")
    return PREBUILT, f"{offer.profile} plan {key.short}"


def _fallback(agent, u, why: str) -> tuple[str, str]:
    why += "; built here instead"
    agent.journal.note(u, why)
    log.warning("prebuilt plan not used", extra={"model": u.model, "why": why})
    return BUILT, why


def _download(agent, u, offer: PlanOffer, part: Path) -> None:
    """The plan into ``part`` through the agent's verified download: never past the signed
    length, then TUF's length and hash check (TrustError), before anything reads it."""
    from tuf.api import exceptions as tuf_exc  # noqa: PLC0415

    from updater.fleet_repo import target_url_path  # noqa: PLC0415

    tf = offer.target
    url = f"{agent.base_url}/targets/{target_url_path(offer.path, tf.hashes['sha256'])}"
    agent._fetch_to(u, url, part, tf.length, f"plan {offer.path}")
    with open(part, "rb") as f:
        try:
            tf.verify_length_and_hashes(f)
        except tuf_exc.LengthOrHashMismatchError as exc:
            raise TrustError(f"it failed TUF verification: {exc}") from exc


def _trusted_targets(agent) -> Mapping:
    """The targets the agent's last refresh verified (the copy ngclient keeps)."""
    from tuf.api.metadata import Metadata  # noqa: PLC0415

    try:
        return Metadata.from_file(str(agent.tuf_dir / "targets.json")).signed.targets
    except Exception as exc:  # noqa: BLE001 - unreadable: no plan, the build goes on
        log.warning("trusted targets unreadable", extra={"error": str(exc)})
        return {}


def _evict(host, u) -> None:
    from engines.base import file_sha256  # noqa: PLC0415
    from engines.cache import evict  # noqa: PLC0415

    record, _config, options = host.build_inputs(u.model, u.version)
    evict(Path(host.repo.engines_dir),
          host.engine.key_for(file_sha256(record.model_file), options), ".plan")
