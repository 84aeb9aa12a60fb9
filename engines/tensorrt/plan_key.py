"""What makes a TensorRT plan valid on a device, as one key.

A plan deserializes and runs only where it was built for: the same TensorRT version, the
same GPU (name and compute capability), and it holds the build settings it was made with
(the firmware profile's precision, workspace, optimisation level, DLA core, GPU fallback
and version compatibility; the model's batch and shape ranges; the precision path: the
TensorRT generation, weak or strong typing, the fp16 graph converter). The key is exactly
what the engine cache key hashes (DESIGN section 3) less the model's hash: the plan of a
release is tied to that release's model by the fleet's signature, not by the key.

``plan_key(meta)`` is the one function: it gives the key a plan was built with from the
meta its sidecar recorded (``outpost compile`` writes ``<plan>.json`` beside its output, the
engine cache the same beside each cached plan), and the key a device would build with from
the meta ``TensorRTEngine.plan_meta`` gives there. TensorRT offers no way to read a plan's
header without deserializing it (10.x and 11.x have ``Runtime.deserialize_cuda_engine``
only; ``getEngineValidity`` is TensorRT-RTX's), so the key travels beside the plan, and
`outpost fleet attach-engine` signs it into the release's metadata: a device compares keys
before it downloads, let alone deserializes, anything.

Pure: no TensorRT import.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engines.errors import EngineError

KIND = "tensorrt"


class PlanKeyError(EngineError):
    """A plan's key can't be read (no sidecar, an unreadable one, or one of another plan)."""


@dataclass(frozen=True)
class PlanKey:
    trt_version: str
    gpu: str
    compute_capability: tuple[int, int]
    build: Mapping  # the build fields and "precision_path", as the engine cache hashes them

    def material(self) -> dict:
        return {"kind": KIND, "engine_version": self.trt_version,
                "device": {"gpu": self.gpu, "compute_capability": list(self.compute_capability)},
                "build": dict(self.build)}

    @property
    def digest(self) -> str:
        blob = json.dumps(self.material(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def short(self) -> str:
        return self.digest[:16]

    def as_custom(self) -> dict:
        """For a target's signed ``custom`` metadata: the fields and their digest."""
        return {**self.material(), "digest": self.digest}

    def describe(self) -> str:
        """One line: the key, then what it stands for."""
        b = self.build
        cc = ".".join(map(str, self.compute_capability))
        batch = b.get("max_batch_size") or 1
        return (f"{self.short}: TensorRT {self.trt_version}, {self.gpu} (sm {cc}), "
                f"precision {b.get('precision')}, workspace "
                f"{int(b.get('workspace_bytes') or 0) >> 20} MiB, optimization level "
                f"{b.get('optimization_level')}, batch 1..{batch}")

    def differences(self, other: PlanKey) -> list[str]:
        """What differs, as 'what: this key's value vs the other's' phrases."""
        out = []
        if self.trt_version != other.trt_version:
            out.append(f"TensorRT {self.trt_version} vs {other.trt_version}")
        if (self.gpu, self.compute_capability) != (other.gpu, other.compute_capability):
            out.append(f"GPU {self.gpu} ({_sm(self)}) vs {other.gpu} ({_sm(other)})")
        for name in sorted(set(self.build) | set(other.build)):
            mine, theirs = self.build.get(name), other.build.get(name)
            if mine != theirs:
                out.append(f"{name} {_show(mine)} vs {_show(theirs)}")
        return out


def plan_key(meta: Mapping) -> PlanKey:
    """The key of a plan from its meta (a sidecar's, or ``TensorRTEngine.plan_meta``);
    PlanKeyError naming the field that is missing or malformed."""
    try:
        if meta.get("kind", KIND) != KIND:
            raise ValueError(f"kind {meta.get('kind')!r} is not a TensorRT plan")
        device = meta["device"]
        cc = tuple(int(x) for x in device["compute_capability"])
        if len(cc) != 2:
            raise ValueError(f"compute_capability {list(cc)} is not [major, minor]")
        build = dict(meta["build"])
        if "precision_path" in meta:  # a sidecar keeps it beside the build fields
            build["precision_path"] = dict(meta["precision_path"])
        if "precision_path" not in build:
            raise KeyError("precision_path")
        return PlanKey(str(meta["engine_version"]), str(device["gpu"]), cc, build)
    except KeyError as exc:
        raise PlanKeyError(f"the plan's meta has no {exc.args[0]!r}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise PlanKeyError(f"the plan's meta is malformed: {exc}") from exc


def key_from_custom(custom: object) -> PlanKey:
    """The key a target's signed metadata carries (``PlanKey.as_custom``), its digest
    checked against its fields; PlanKeyError when it is not one."""
    if not isinstance(custom, Mapping):
        raise PlanKeyError("the plan key is not an object")
    key = plan_key(custom)
    if custom.get("digest") != key.digest:
        raise PlanKeyError(f"the plan key's digest {str(custom.get('digest'))[:16]} does not "
                           f"match its fields ({key.short})")
    return key


def read_plan_key(plan: Path) -> tuple[PlanKey, dict]:
    """(the key, the whole sidecar) of the plan file ``plan``, from ``<plan>.json``: what
    `outpost compile` wrote beside it, or the engine cache beside a cached plan. The
    sidecar must name this plan's sha256 and length (a sidecar left by another build of the
    same name is refused)."""
    from engines.base import file_sha256  # noqa: PLC0415

    plan = Path(plan)
    sidecar = plan.with_name(plan.name + ".json")
    redo = "run 'outpost compile' again to write the plan and its key together"
    if not plan.is_file():
        raise PlanKeyError(f"{plan}: no such plan file")
    try:
        meta = json.loads(sidecar.read_text())
    except FileNotFoundError as exc:
        raise PlanKeyError(f"{plan}: its key can't be read: {sidecar} is missing ({redo})"
                           ) from exc
    except (OSError, ValueError) as exc:
        raise PlanKeyError(f"{plan}: its key can't be read from {sidecar} ({exc}); {redo}"
                           ) from exc
    if not isinstance(meta, dict):
        raise PlanKeyError(f"{plan}: {sidecar} is not a JSON object; {redo}")
    try:
        size = plan.stat().st_size
    except OSError as exc:
        raise PlanKeyError(f"{plan}: can't be read ({exc.strerror})") from exc
    if meta.get("bytes") != size or meta.get("sha256") != file_sha256(plan):
        raise PlanKeyError(f"{plan}: {sidecar} describes another plan (its sha256 and length "
                           f"are not this file's); {redo}")
    if not isinstance(meta.get("source_sha256"), str):
        raise PlanKeyError(f"{plan}: {sidecar} does not say which model the plan was built "
                           f"from (source_sha256); {redo}")
    try:
        return plan_key(meta), meta
    except PlanKeyError as exc:
        raise PlanKeyError(f"{plan}: {sidecar}: {exc}; {redo}") from exc


def _sm(key: PlanKey) -> str:
    return "sm " + ".".join(map(str, key.compute_capability))


def _show(value: object) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)
