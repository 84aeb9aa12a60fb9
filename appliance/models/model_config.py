"""A model's config.toml: what Triton's config.pbtxt says, in TOML (DESIGN section 4).

What the file leaves out is completed from the ONNX graph (tensor names, dtypes, shapes,
whether dim 0 is a dynamic batch dim) and from the appliance's batching defaults. The
completed config is what the repository stores beside the model and what metadata shows.
With ``max_batch_size > 0`` tensor ``dims`` exclude the batch dimension, as in Triton.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config.schema import BatchingConfig
from appliance.config.settings import from_mapping, read_toml, to_mapping
from appliance.errors import ConfigError
from appliance.models.traffic import TrafficPolicy
from engines.base import SUPPORTED_DTYPES, TensorSpec


@dataclass(frozen=True)
class DynamicBatching:
    max_queue_delay_us: int | None = None  # None: the appliance default
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int | None = None
    default_timeout_ms: int | None = None  # 0: no timeout
    priority_levels: int = 1  # priorities 0 .. priority_levels-1, lower runs first
    default_priority_level: int = 0
    # Measure at load which batch size to prefer on this device, with the layout
    # (appliance/scheduling/tuning.py); None: the appliance default ([batching]
    # auto_preferred_batch) at each load
    auto_preferred_batch: bool | None = None

    def check(self) -> None:
        if self.auto_preferred_batch and self.preferred_batch_sizes:
            raise ValueError("set preferred_batch_sizes or auto_preferred_batch = true, "
                             "not both")
        if self.priority_levels < 1:
            raise ValueError("priority_levels must be >= 1")
        if not 0 <= self.default_priority_level < self.priority_levels:
            raise ValueError("default_priority_level must lie in 0..priority_levels-1")
        if any(s < 1 for s in self.preferred_batch_sizes):
            raise ValueError("preferred_batch_sizes must be positive")
        for k in ("max_queue_delay_us", "max_queue_size", "default_timeout_ms"):
            v = getattr(self, k)
            if v is not None and v < 0:
                raise ValueError(f"{k} must be >= 0")


@dataclass(frozen=True)
class TensorConfig:
    name: str
    dtype: str = ""  # "": from the graph; else it must equal the graph's
    dims: tuple[int, ...] | None = None  # None: from the graph; -1 for a dynamic dim

    def check(self) -> None:
        if self.dtype and self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: use one of {', '.join(SUPPORTED_DTYPES)}")
        if self.dims is not None and any(d < -1 for d in self.dims):
            raise ValueError(f"dims of '{self.name}' must be >= -1")


@dataclass(frozen=True)
class ValidationConfig:
    rtol: float = 1e-3
    atol: float = 1e-4


VERSION_POLICIES = ("active", "latest", "all", "specific")
COMBINERS = ("mean", "weighted_mean", "majority_vote")


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions stay resident and servable besides the active one (and those a
    traffic policy names): ``active`` only, the ``latest`` N, ``all``, or ``specific``."""

    kind: str = "active"
    latest: int = 1
    versions: tuple[int, ...] = ()

    def check(self) -> None:
        if self.kind not in VERSION_POLICIES:
            raise ValueError(f"kind {self.kind!r}: use one of {', '.join(VERSION_POLICIES)}")
        if self.latest < 1:
            raise ValueError("latest must be >= 1")
        if self.kind == "specific" and not self.versions:
            raise ValueError("kind = 'specific' needs versions = [...]")


@dataclass(frozen=True)
class EnsembleStep:
    model: str
    version: int | None = None  # None: the member's active version
    inputs: dict[str, str] = field(default_factory=dict)  # member input <- ensemble tensor
    outputs: dict[str, str] = field(default_factory=dict)  # member output -> ensemble tensor


@dataclass(frozen=True)
class EnsembleMember:
    model: str
    version: int | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class EnsembleConfig:
    """A pipeline (a DAG of steps, each model's outputs feeding later inputs) or a
    combiner over several models' outputs. An ensemble has no ONNX file of its own."""

    kind: str = "pipeline"  # pipeline | combine
    steps: tuple[EnsembleStep, ...] = ()
    members: tuple[EnsembleMember, ...] = ()
    combiner: str = "mean"  # mean | weighted_mean | majority_vote
    output: str = ""  # combine: the members' output to combine (default: their only one)

    def check(self) -> None:
        if self.kind == "pipeline":
            if not self.steps:
                raise ValueError("steps: a pipeline ensemble needs [[ensemble.steps]]")
        elif self.kind == "combine":
            if len(self.members) < 2:
                raise ValueError("members: a combine ensemble needs at least two "
                                 "[[ensemble.members]]")
            if self.combiner not in COMBINERS:
                raise ValueError(f"combiner {self.combiner!r}: use one of "
                                 f"{', '.join(COMBINERS)}")
            if any(m.weight <= 0 for m in self.members):
                raise ValueError("members: member weights must be positive")
        else:
            raise ValueError(f"kind {self.kind!r}: use 'pipeline' or 'combine'")


@dataclass(frozen=True)
class ModelConfig:
    max_batch_size: int | None = None  # 0: no batching; None: from the graph and defaults
    instances: int | None = None  # instances at load (the minimum when scaling)
    threads: int | None = None  # intra-op threads of each instance; None: the appliance's
    max_instances: int | None = None  # > instances: scale up with queue depth
    scale_down_idle_s: float = 10.0  # an extra instance goes after this long without work
    load: str = "eager"  # eager: at start; lazy: on the first request
    dynamic_batching: DynamicBatching = field(default_factory=DynamicBatching)
    input: tuple[TensorConfig, ...] = ()
    output: tuple[TensorConfig, ...] = ()
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    traffic: TrafficPolicy | None = None
    ensemble: EnsembleConfig | None = None

    def check(self) -> None:
        if self.max_batch_size is not None and self.max_batch_size < 0:
            raise ValueError("max_batch_size must be >= 0")
        if self.instances is not None and self.instances < 1:
            raise ValueError("instances must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.max_instances is not None and self.max_instances < (self.instances or 1):
            raise ValueError("max_instances must be >= instances")
        if self.load not in ("eager", "lazy"):
            raise ValueError(f"load {self.load!r}: use 'eager' or 'lazy'")

    # Filled in by complete(); present in every stored config.
    def full_shape(self, t: TensorConfig) -> tuple[int, ...]:
        dims = tuple(t.dims or ())
        return (-1, *dims) if self.max_batch_size else dims

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, t.dtype, self.full_shape(t)) for t in self.input)

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, t.dtype, self.full_shape(t)) for t in self.output)


def load_model_config(path: Path | None) -> ModelConfig:
    if path is None:
        return ModelConfig()
    return from_mapping(ModelConfig, read_toml(path), str(path))


def model_config_to_toml(config: ModelConfig) -> str:
    import tomli_w  # noqa: PLC0415

    return tomli_w.dumps(to_mapping(config))


def graph_specs(model_path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Input and output specs as the ONNX graph declares them (-1 for a dynamic dim)."""
    import onnx  # noqa: PLC0415

    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}

    def spec(value_info, where: str) -> TensorSpec:
        tt = value_info.type.tensor_type
        if not value_info.type.HasField("tensor_type"):
            raise ConfigError(f"{model_path}: {where} '{value_info.name}' is not a tensor")
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
        name = np_dtype.name if np_dtype is not None else "undefined"
        if name not in SUPPORTED_DTYPES:
            raise ConfigError(
                f"{model_path}: {where} '{value_info.name}' has element type {name}; "
                f"outpost carries {', '.join(SUPPORTED_DTYPES)}"
            )
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim
        ) if tt.HasField("shape") else ()
        return TensorSpec(value_info.name, name, dims)

    inputs = tuple(spec(v, "input") for v in model.graph.input if v.name not in initializers)
    outputs = tuple(spec(v, "output") for v in model.graph.output)
    return inputs, outputs


def _merge(graph: tuple[TensorSpec, ...], given: tuple[TensorConfig, ...], batched: bool,
           kind: str, where: str) -> tuple[TensorConfig, ...]:
    by_name = {t.name: t for t in given}
    unknown = sorted(set(by_name) - {s.name for s in graph})
    if unknown:
        raise ConfigError(
            f"{where}: {kind} '{unknown[0]}' is not in the model; its {kind}s are "
            f"{', '.join(s.name for s in graph)}"
        )
    out = []
    for s in graph:
        dims = s.shape[1:] if batched else s.shape
        t = by_name.get(s.name)
        if t is not None:
            if t.dtype and t.dtype != s.dtype:
                raise ConfigError(
                    f"{where}: {kind} '{s.name}' is {s.dtype} in the model, not {t.dtype}; "
                    f"outpost does not cast: leave dtype out or fix it"
                )
            if t.dims is not None:
                ok = len(t.dims) == len(dims) and all(
                    g == -1 or g == d for g, d in zip(dims, t.dims)
                )
                if not ok:
                    raise ConfigError(
                        f"{where}: {kind} '{s.name}' dims {list(t.dims)} do not fit the "
                        f"model's {list(dims)}" + (" (batch dim excluded)" if batched else "")
                    )
                dims = tuple(t.dims)
        out.append(TensorConfig(s.name, s.dtype, tuple(dims)))
    return tuple(out)


def complete(config: ModelConfig, model_path: Path, defaults: BatchingConfig,
             where: str) -> ModelConfig:
    """Fill every field left out from the graph and the defaults; refuse contradictions."""
    inputs, outputs = graph_specs(model_path)
    if not inputs:
        raise ConfigError(f"{model_path}: the model has no inputs to feed")
    batchable = all(len(s.shape) >= 1 and s.shape[0] == -1 for s in inputs + outputs)
    mbs = config.max_batch_size
    if mbs is None:
        mbs = defaults.max_batch_size if batchable else 0
    elif mbs > 0 and not batchable:
        fixed = next(s for s in inputs + outputs if not s.shape or s.shape[0] != -1)
        raise ConfigError(
            f"{where}: max_batch_size = {mbs} needs a dynamic dim 0 on every input and "
            f"output, but '{fixed.name}' has shape {list(fixed.shape)}; set max_batch_size = 0"
        )
    batched = mbs > 0
    db = config.dynamic_batching
    db = dataclasses.replace(
        db,
        max_queue_delay_us=defaults.max_queue_delay_us if db.max_queue_delay_us is None
        else db.max_queue_delay_us,
        max_queue_size=defaults.max_queue_size if db.max_queue_size is None
        else db.max_queue_size,
        default_timeout_ms=defaults.default_timeout_ms if db.default_timeout_ms is None
        else db.default_timeout_ms,
    )
    if db.auto_preferred_batch and not batched:
        raise ConfigError(
            f"{where}: auto_preferred_batch needs a batch dimension, but max_batch_size is "
            f"0; drop auto_preferred_batch or let the model batch")
    # auto_preferred_batch left out stays None: the appliance default applies at each load
    if batched and any(s > mbs for s in db.preferred_batch_sizes):
        raise ConfigError(
            f"{where}: preferred_batch_sizes {list(db.preferred_batch_sizes)} go past "
            f"max_batch_size {mbs}"
        )
    return dataclasses.replace(
        config,
        max_batch_size=mbs,
        # an explicit default fixes the count; "auto" leaves it to the measured layout
        instances=config.instances or (defaults.instances
                                       if isinstance(defaults.instances, int) else None),
        dynamic_batching=db,
        input=_merge(inputs, config.input, batched, "input", where),
        output=_merge(outputs, config.output, batched, "output", where),
    )
