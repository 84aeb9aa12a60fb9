"""A model version's layout here: what its config and the appliance's fix, the rest
measured (appliance/scheduling/tuning.py) and cached beside its engine artifact.

Who wins, first to last: the model's config.toml (``threads``, ``instances``,
``[dynamic_batching] preferred_batch_sizes`` or ``auto_preferred_batch = false``), then the
appliance config and its flags (``[threads] intra_op``, ``spinning``; ``[batching]
instances``; ``--threads``), then the firmware profile's defaults; what is still "auto" is
measured. The serve path and ``outpost models add`` (which measures ahead, with a
progress bar) both come through ``resolve``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from appliance.config.cpus import UsableCpus, usable_cpus
from appliance.config.schema import Config
from appliance.models.model_config import ModelConfig
from appliance.scheduling.tuning import Layout, Progress, Want, layout_path, resolve_layout
from engines import Artifact, BuildOptions, Engine, RuntimeOptions


@functools.lru_cache(maxsize=1)
def host_cpus() -> UsableCpus:
    """This process's usable CPUs, read once: its affinity and cgroup do not change."""
    return usable_cpus()


def want_for(config: ModelConfig, appliance: Config, engine_kind: str,
             cores: int | None = None) -> Want:
    threads = config.threads or (appliance.threads.intra_op
                                 if isinstance(appliance.threads.intra_op, int) else None)
    instances = config.instances or (appliance.batching.instances
                                     if isinstance(appliance.batching.instances, int)
                                     else None)
    spinning = appliance.threads.spinning if isinstance(appliance.threads.spinning,
                                                        bool) else None
    db = config.dynamic_batching
    mbs = config.max_batch_size or 0
    if db.preferred_batch_sizes:
        preferred = max(db.preferred_batch_sizes)  # fixed: the batcher takes the config's
    elif mbs > 1 and (db.auto_preferred_batch if db.auto_preferred_batch is not None
                      else appliance.batching.auto_preferred_batch):
        preferred = None  # measured with the layout
    else:
        preferred = 0  # no preference: nothing to measure
    cpu = engine_kind != "tensorrt"  # TensorRT has no intra-op threads to set
    return Want(cores=cores if cores is not None else host_cpus().count, max_batch_size=mbs,
                threads=threads if cpu else 1, instances=instances,
                spinning=spinning if cpu else False, preferred_batch=preferred,
                thread_counts=cpu)


def resolve(engine: Engine, artifact: Artifact, options: BuildOptions,
            runtime: RuntimeOptions, want: Want, cache_dir: Path,
            progress: Progress | None = None) -> Layout:
    """The layout: cached in ``cache_dir`` beside the artifact, else measured on sessions
    made here (call from a worker thread: measuring takes seconds)."""

    def make_session(threads: int, spinning: bool):
        return engine.load(artifact, options, dataclasses.replace(
            runtime, intra_op_threads=threads, spinning=spinning))

    return resolve_layout(make_session, want,
                          layout_path(cache_dir, artifact.cache_key, want),
                          progress=progress)


def runtime_for(runtime: RuntimeOptions, layout: Layout) -> RuntimeOptions:
    """The sessions' runtime options under ``layout``."""
    return dataclasses.replace(runtime, intra_op_threads=layout.threads,
                               spinning=layout.spinning)
