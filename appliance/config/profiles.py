"""Firmware profiles: one TOML file per device class (DESIGN section 4).

A profile says which engine serves, how TensorRT builds for the board (precision,
workspace, optimisation level, DLA core), how much memory resident models may use, and
the batching and thread defaults a model's config.toml falls back to. Files are read
through ``settings.from_mapping``, so an error names the file, the key and what is allowed.

Detection: the Jetson device-tree model (``/proc/device-tree/model``), else the CUDA
device's name, else the CPU profile. The device-tree path, host memory and GPU name are
parameters, so tests can hand in a fake board.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appliance.config.schema import (
    BatchingConfig,
    ThreadsConfig,
    WarmupConfig,
    check_busy_poll_us,
)
from appliance.config.settings import from_mapping, read_toml
from appliance.errors import ConfigError

ENGINES = ("tensorrt", "onnxruntime")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
CPU_PROFILE = "x86-cpu"
# A board whose memory is below this share of the profile's nominal memory is another
# variant (the kernel reserves some; an 8 GB Orin Nano reports about 7.4 GiB).
MEMORY_MATCH_SHARE = 0.8


@dataclass(frozen=True)
class DeviceMatch:
    description: str = ""
    device_tree_model: tuple[str, ...] = ()  # substrings of /proc/device-tree/model
    gpu_name: tuple[str, ...] = ()  # substrings of the CUDA device name
    memory_mb: int = 0  # the board's memory (shared CPU/GPU on Jetson); 0: any
    dla_cores: int = 0
    cpu_cores: int = 0  # the board's CPU cores (documentation; ``outpost info`` shows both)
    compute_capability: str = ""  # like "8.7"; documentation, and checked when known

    def check(self) -> None:
        if self.memory_mb < 0 or self.dla_cores < 0 or self.cpu_cores < 0:
            raise ValueError("memory_mb, dla_cores and cpu_cores must be >= 0")


@dataclass(frozen=True)
class EngineSettings:
    kind: str = "onnxruntime"  # tensorrt | onnxruntime
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8 (int8: Q/DQ models only)
    workspace_mb: int = 1024  # TensorRT builder memory pool limit
    optimization_level: int = 3  # TensorRT builder optimisation level, 0..5
    dla_core: int = -1  # -1: GPU only
    gpu_fallback: bool = True  # layers DLA can't run go to the GPU
    version_compatible: bool = False  # plans that load on later TensorRT versions

    def check(self) -> None:
        if self.kind not in ENGINES:
            raise ValueError(f"kind {self.kind!r}: use one of {', '.join(ENGINES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: use one of "
                             f"{', '.join(PRECISIONS)}")
        if not 16 <= self.workspace_mb <= 1 << 20:
            raise ValueError(f"workspace_mb {self.workspace_mb}: use 16 to 1048576")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level {self.optimization_level}: use 0 to 5")
        if self.dla_core < -1:
            raise ValueError(f"dla_core {self.dla_core}: use -1 (no DLA) or a core index")
        if self.dla_core >= 0 and self.precision == "fp32":
            raise ValueError("dla_core needs precision \"fp16\" or \"int8\" (DLA has no fp32)")


@dataclass(frozen=True)
class MemorySettings:
    # The default of residency.memory_budget_mb (the whole process): a share of this
    # device's memory (MemTotal; on a Jetson the unified memory CPU and GPU share), or a
    # fixed model_budget_mb where that is set. Both 0: no budget.
    budget_percent: int = 0
    model_budget_mb: int = 0

    def check(self) -> None:
        if self.model_budget_mb < 0:
            raise ValueError("model_budget_mb must be >= 0")
        if not 0 <= self.budget_percent <= 100:
            raise ValueError(f"budget_percent {self.budget_percent}: use 0 to 100")

    def budget_mb(self, memory_mb: int) -> int:
        """The budget on a device with ``memory_mb`` of memory."""
        return self.model_budget_mb or self.budget_percent * memory_mb // 100


@dataclass(frozen=True)
class ServerSettings:
    # The default of the appliance's server.busy_poll_us on this device class: CPU spent
    # for latency, right on mains-powered hosts, wrong on power-budgeted boards.
    busy_poll_us: int = 0

    def check(self) -> None:
        check_busy_poll_us(self.busy_poll_us)


@dataclass(frozen=True)
class UpdaterSettings:
    # Defaults of the appliance config's [updater] keys of the same names on this device
    # class (its usual link): the config's own [updater] values win.
    max_download_bytes_per_s: int = 0  # 0: no cap
    download_windows: str = ""  # local "HH:MM-HH:MM", comma-separated; "": any time

    def check(self) -> None:  # the windows are read by the updater's own config
        if self.max_download_bytes_per_s < 0:
            raise ValueError("max_download_bytes_per_s must be >= 0 (0: no cap)")

    def defaults(self) -> dict:
        """The keys this profile sets, for the [updater] table's defaults."""
        return {k: v for k, v in asdict(self).items() if v != getattr(UpdaterSettings, k)}


@dataclass(frozen=True)
class Profile:
    name: str
    device: DeviceMatch = field(default_factory=DeviceMatch)
    engine: EngineSettings = field(default_factory=EngineSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    # The appliance config's own sections: a profile supplies their defaults.
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    threads: ThreadsConfig = field(default_factory=ThreadsConfig)
    server: ServerSettings = field(default_factory=ServerSettings)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    updater: UpdaterSettings = field(default_factory=UpdaterSettings)
    path: str = ""  # the file it came from (not a key of the file)

    def check(self) -> None:
        if self.engine.dla_core >= 0 and self.engine.dla_core >= self.device.dla_cores:
            raise ValueError(f"engine.dla_core = {self.engine.dla_core} but device.dla_cores "
                             f"= {self.device.dla_cores}; use -1 or 0..{self.device.dla_cores - 1}"
                             if self.device.dla_cores else
                             f"engine.dla_core = {self.engine.dla_core} but this board has no "
                             f"DLA (device.dla_cores = 0); use -1")
        if self.engine.kind == "onnxruntime" and self.engine.dla_core >= 0:
            raise ValueError("engine.dla_core needs engine.kind = \"tensorrt\"")

    def build_fields(self) -> dict:
        """The TensorRT build settings this profile fixes (part of the engine cache key)."""
        e = self.engine
        return {"precision": e.precision, "workspace_bytes": e.workspace_mb << 20,
                "optimization_level": e.optimization_level, "dla_core": e.dla_core,
                "gpu_fallback": e.gpu_fallback, "version_compatible": e.version_compatible}


# -- finding and reading profiles ---------------------------------------------------------


def profile_dirs() -> list[Path]:
    """Where profiles are looked up, first match wins: $OUTPOST_PROFILES_DIR, then the
    ones shipped with outpost (beside the package, in the source tree, or the frozen app)."""
    dirs = []
    if os.environ.get("OUTPOST_PROFILES_DIR"):
        dirs.append(Path(os.environ["OUTPOST_PROFILES_DIR"]))
    package = Path(__file__).resolve().parent.parent  # appliance/
    dirs += [package / "firmware_profiles", package.parent / "firmware_profiles"]
    if getattr(sys, "_MEIPASS", None):
        dirs.append(Path(sys._MEIPASS) / "firmware_profiles")
    return [d for d in dirs if d.is_dir()]


def profile_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in profile_dirs():
        for f in sorted(d.glob("*.toml")):
            found.setdefault(f.stem, f)
    return found


def read_profile(path: Path) -> Profile:
    data = read_toml(path)
    name = path.stem
    if "name" in data and data["name"] != name:
        raise ConfigError(f"{path}: 'name' is {data['name']!r} but the file is {path.name}; "
                          f"a profile's name is its file name: rename one to match")
    if "path" in data:
        raise ConfigError(f"{path}: unknown key 'path'; allowed here: "
                          f"batching, device, engine, memory, name, server, threads, updater, "
                          f"warmup")
    return from_mapping(Profile, {**data, "name": name, "path": str(path)}, str(path))


def load_profile(name: str) -> Profile:
    files = profile_files()
    path = files.get(name)
    if path is None:
        raise ConfigError(f"profile: unknown firmware profile {name!r}; known: "
                          f"{', '.join(sorted(files)) or 'none (no firmware_profiles folder)'}")
    return read_profile(path)


def all_profiles() -> list[Profile]:
    return [read_profile(p) for _, p in sorted(profile_files().items())]


# -- detection -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    profile: Profile
    source: str  # config | device-tree | gpu | none
    reason: str


def read_device_tree_model(path: Path = DEVICE_TREE_MODEL) -> str:
    try:
        return path.read_bytes().split(b"\0", 1)[0].decode(errors="replace").strip()
    except OSError:
        return ""


def host_memory_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cuda_gpu_name() -> tuple[str, str]:
    """The first CUDA device's name ('' when there is none), and why there is none."""
    try:
        from engines.tensorrt.cuda import load_cuda, usable_gpus  # noqa: PLC0415

        return usable_gpus(load_cuda())[0].name, ""
    except Exception as exc:  # no binding, no driver, no device: all mean "no GPU" here
        return "", str(exc)


def _fits_memory(p: Profile, memory_mb: int) -> bool:
    return not memory_mb or not p.device.memory_mb or \
        memory_mb >= p.device.memory_mb * MEMORY_MATCH_SHARE


def detect(*, device_tree: Path | None = None, memory_mb: int | None = None,
           gpu_name: str | None = None, profiles: list[Profile] | None = None) -> Detection:
    """The profile for this host. Arguments left as None are read from the host."""
    profiles = profiles if profiles is not None else all_profiles()
    by_name = {p.name: p for p in profiles}
    if CPU_PROFILE not in by_name:
        raise ConfigError(f"profile: the fallback profile {CPU_PROFILE!r} is missing from "
                          f"{', '.join(map(str, profile_dirs())) or 'the profile folders'}")
    memory_mb = host_memory_mb() if memory_mb is None else memory_mb
    model = read_device_tree_model(device_tree or Path(
        os.environ.get("OUTPOST_DEVICE_TREE_MODEL", DEVICE_TREE_MODEL)))
    if model:
        hits = [(len(s), p) for p in profiles for s in p.device.device_tree_model
                if s.lower() in model.lower()]
        fitting = [(n, p) for n, p in hits if _fits_memory(p, memory_mb)]
        if fitting:
            best = max(fitting, key=lambda t: t[0])[1]
            return Detection(best, "device-tree", f"device-tree model {model!r} with "
                                                  f"{memory_mb} MiB of memory")
        if hits:
            closest = max(hits, key=lambda t: t[0])[1]
            return Detection(by_name[CPU_PROFILE], "none", (
                f"device-tree model {model!r} matches {closest.name}, but this board has "
                f"{memory_mb} MiB and that profile is for {closest.device.memory_mb} MiB; "
                f"write a profile for this variant (docs/profiles.md) and set profile"))
    gpu, why = cuda_gpu_name() if gpu_name is None else (gpu_name, "")
    if gpu:
        for p in profiles:
            if any(s.lower() in gpu.lower() for s in p.device.gpu_name):
                return Detection(p, "gpu", f"CUDA device {gpu!r}")
        return Detection(by_name[CPU_PROFILE], "none",
                         f"CUDA device {gpu!r} matches no profile's gpu_name")
    where = f"device-tree model {model!r} matches no profile and " if model else ""
    return Detection(by_name[CPU_PROFILE], "none", f"{where}no CUDA device was found"
                     + (f" ({why})" if why else ""))


def resolve(name: str, **detect_args) -> Detection:
    """The profile ``name`` names, or the detected one for ``auto`` (this host's detection
    is done once a process: the board does not change under it)."""
    if name == "auto":
        return detect(**detect_args) if detect_args else _host_detection()
    return Detection(load_profile(name), "config", "named in the config")


@functools.lru_cache(maxsize=1)
def _host_detection() -> Detection:
    return detect()


def choose_engine(engine: str, detection: Detection):
    """(Engine, reason) for the config's ``engine`` on this host.

    ``auto`` takes TensorRT where it and a GPU are usable, else ONNX Runtime, saying why;
    a profile named in the config whose engine.kind is onnxruntime keeps ONNX Runtime.
    """
    from engines import select_engine  # noqa: PLC0415

    profile = detection.profile
    if engine == "auto" and detection.source == "config" and profile.engine.kind == "onnxruntime":
        chosen, _ = select_engine("onnxruntime")
        return chosen, f"onnxruntime, as the configured profile {profile.name} says"
    return select_engine(engine)
