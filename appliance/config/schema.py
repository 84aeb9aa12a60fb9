"""The appliance config: one TOML file, flags on top, defaults for everything.

``outpost serve --config FILE`` reads it; ``outpost config show`` prints the effective
result. Sizes and times carry their unit in the key name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import ConfigError
from appliance.paths import is_loopback, parse_host_port
from appliance.protocol.frames import DEFAULT_MAX_FRAME_BYTES

LOG_LEVELS = ("debug", "info", "warning", "error")


LOG_FORMATS = ("auto", "json", "text")


MAX_BUSY_POLL_US = 10_000

# gRPC keeps message limits in a C int
MAX_GRPC_MESSAGE_BYTES = (1 << 31) - 1


def check_busy_poll_us(value: int) -> None:
    """server.busy_poll_us, in the appliance config or a firmware profile."""
    if not 0 <= value <= MAX_BUSY_POLL_US:
        raise ValueError(f"busy_poll_us must lie in 0..{MAX_BUSY_POLL_US} (0: off)")


@dataclass(frozen=True)
class ServerConfig:
    socket_path: str = ""  # "": $XDG_RUNTIME_DIR/outpost/outpost.sock, else <data_dir>/outpost.sock
    socket_mode: str = "0660"
    tcp: str = ""  # "HOST:PORT"; "" keeps TCP off
    token: str = ""  # when set (always on TCP), a connection must say hello with it first
    token_file: str = ""  # read the token from this file instead (first line)
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_connections: int = 1024
    max_inflight_per_connection: int = 256
    # A connection that began a frame (socket) or a request (HTTP) and sends no more of it
    # for this long is closed; a request's own time is bounded elsewhere.
    stall_timeout_s: float = 10.0
    # A socket connection with nothing in flight for this long is closed; 0: never (local
    # apps hold their connections). HTTP's keep-alive has its own, http.idle_timeout_s.
    idle_timeout_s: float = 0.0
    drain_timeout_s: float = 5.0  # SIGTERM: in-flight requests get this long, then exit
    # After answering, keep polling the sockets this long instead of sleeping (saves a
    # wake-up per request of a sequential client; costs that much CPU). 0: off. The
    # firmware profile's default applies where the config says nothing.
    busy_poll_us: int = 0

    def check(self) -> None:
        try:
            mode = int(self.socket_mode, 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o777:
            raise ValueError(f"socket_mode {self.socket_mode!r} must be octal like \"0660\"")
        if self.tcp:
            parse_host_port(self.tcp, "tcp")
        if self.token and self.token_file:
            raise ValueError("set token or token_file, not both")
        if not 1024 <= self.max_frame_bytes <= 1 << 31:
            raise ValueError("max_frame_bytes must lie in 1024..2147483648")
        if self.max_connections < 1 or self.max_inflight_per_connection < 1:
            raise ValueError("max_connections and max_inflight_per_connection must be >= 1")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")
        if self.stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be > 0")
        if self.idle_timeout_s < 0:
            raise ValueError("idle_timeout_s must be >= 0 (0: never)")
        check_busy_poll_us(self.busy_poll_us)


@dataclass(frozen=True)
class HttpConfig:
    """The Open Inference Protocol v2 endpoint (docs/http.md); off unless address is set."""

    address: str = ""  # "HOST:PORT"; "" keeps HTTP off
    public: bool = False  # false: address must be loopback (127.0.0.0/8, ::1, localhost)
    admin_token: str = ""  # when set, model control needs "Authorization: Bearer <token>"
    admin_token_file: str = ""  # read the admin token from this file instead (first line)
    max_body_bytes: int = DEFAULT_MAX_FRAME_BYTES  # larger requests get 413, unread
    request_timeout_s: float = 60.0  # body read + queue + run; past it: 504
    max_inflight: int = 1024  # concurrent HTTP requests; past it: 503
    max_connections: int = 256  # open HTTP connections; past it, a new one: 503 and closed
    idle_timeout_s: float = 75.0  # keep-alive: a connection idle this long is closed

    def check(self) -> None:
        if self.address:
            host, _ = parse_host_port(self.address, "address")
            if not self.public and not is_loopback(host):
                raise ValueError(
                    f"address {self.address!r} is not a loopback address; set http.public = "
                    f"true to serve beyond this machine (and set http.admin_token)")
        if self.admin_token and self.admin_token_file:
            raise ValueError("set admin_token or admin_token_file, not both")
        if not 1024 <= self.max_body_bytes <= 1 << 31:
            raise ValueError("max_body_bytes must lie in 1024..2147483648")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
        if self.max_inflight < 1 or self.max_connections < 1:
            raise ValueError("max_inflight and max_connections must be >= 1")
        if self.idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be > 0")

    def token(self) -> str:
        """The admin token ('' for none), read from admin_token_file where that is set."""
        if self.admin_token_file:
            try:
                return Path(self.admin_token_file).read_text().strip().splitlines()[0]
            except (OSError, IndexError) as exc:
                raise ConfigError(f"http.admin_token_file {self.admin_token_file}: can't read "
                                  f"a token from it") from exc
        return self.admin_token


@dataclass(frozen=True)
class GrpcConfig:
    """Triton's KServe v2 gRPC endpoint (docs/grpc.md); off unless address is set."""

    address: str = ""  # "HOST:PORT"; "" keeps gRPC off
    public: bool = False  # false: address must be loopback (127.0.0.0/8, ::1, localhost)
    admin_token: str = ""  # when set, model control needs "authorization: Bearer <token>"
    admin_token_file: str = ""  # read the admin token from this file instead (first line)
    max_message_bytes: int = DEFAULT_MAX_FRAME_BYTES  # a request or response; past it: refused
    max_inflight: int = 1024  # concurrent inference and control calls (a stream is one)

    def check(self) -> None:
        if self.address:
            host, _ = parse_host_port(self.address, "address")
            if not self.public and not is_loopback(host):
                raise ValueError(
                    f"address {self.address!r} is not a loopback address; set grpc.public = "
                    f"true to serve beyond this machine (and set grpc.admin_token)")
        if self.admin_token and self.admin_token_file:
            raise ValueError("set admin_token or admin_token_file, not both")
        if not 1024 <= self.max_message_bytes <= MAX_GRPC_MESSAGE_BYTES:
            raise ValueError(f"max_message_bytes must lie in 1024..{MAX_GRPC_MESSAGE_BYTES}")
        if self.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")

    def token(self) -> str:
        """The admin token ('' for none), read from admin_token_file where that is set."""
        if self.admin_token_file:
            try:
                return Path(self.admin_token_file).read_text().strip().splitlines()[0]
            except (OSError, IndexError) as exc:
                raise ConfigError(f"grpc.admin_token_file {self.admin_token_file}: can't read "
                                  f"a token from it") from exc
        return self.admin_token


@dataclass(frozen=True)
class ThreadsConfig:
    """Threads of each model instance. "auto": measured per model at its first load, within
    the cores this process may use (appliance/scheduling/tuning.py)."""

    intra_op: int | str = "auto"  # threads inside one engine call
    inter_op: int = 1
    spinning: bool | str = "auto"  # ONNX Runtime's intra-op threads spin for the next batch

    def check(self) -> None:
        _auto_or_at_least_one(self.intra_op, "intra_op")
        if self.inter_op < 1:
            raise ValueError("inter_op must be >= 1")
        if isinstance(self.spinning, str) and self.spinning != "auto":
            raise ValueError(f"spinning {self.spinning!r}: use true, false or \"auto\"")


def _auto_or_at_least_one(value: int | str, key: str) -> None:
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"{key} {value!r}: use a whole number >= 1 or \"auto\"")
    elif value < 1:
        raise ValueError(f"{key} must be >= 1 (or \"auto\")")


@dataclass(frozen=True)
class BatchingConfig:
    """Defaults for every model whose config.toml leaves them out."""

    max_batch_size: int = 32
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024
    default_timeout_ms: int = 0  # 0: no timeout
    instances: int | str = "auto"  # "auto": measured with the threads at first load
    # Measure each batched model's preferred batch size at load, with its layout
    # (appliance/scheduling/tuning.py), unless its config.toml names preferred sizes
    auto_preferred_batch: bool = True

    def check(self) -> None:
        if self.max_batch_size < 0 or self.max_queue_delay_us < 0 or self.default_timeout_ms < 0:
            raise ValueError("max_batch_size, max_queue_delay_us, default_timeout_ms must be >= 0")
        if self.max_queue_size < 1:
            raise ValueError("max_queue_size must be >= 1")
        _auto_or_at_least_one(self.instances, "instances")


@dataclass(frozen=True)
class ResidencyConfig:
    """How much memory the whole process may hold, models measured as they load; past
    it, idle versions unload (LRU). docs/operations.md, "Memory budget"."""

    # MiB; left out: the firmware profile's share of this device's memory (0 then: none)
    memory_budget_mb: int = 0

    def check(self) -> None:
        if self.memory_budget_mb < 0:
            raise ValueError(f"memory_budget_mb = {self.memory_budget_mb}: a budget is a "
                             f"positive number of MiB (the whole process's memory); leave "
                             f"the key out for the firmware profile's default")


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"  # auto: JSON lines unless stderr is a terminal

    def check(self) -> None:
        if self.level not in LOG_LEVELS:
            raise ValueError(f"level {self.level!r}: use one of {', '.join(LOG_LEVELS)}")
        if self.format not in LOG_FORMATS:
            raise ValueError(f"format {self.format!r}: use one of {', '.join(LOG_FORMATS)}")


@dataclass(frozen=True)
class WarmupConfig:
    """Warm-up before a model instance is ready (engines/warmup.py)."""

    # each instance runs every batch size the batcher forms until two consecutive runs
    # agree; past this budget each size still gets two runs. 0: one run at batch one only
    # (quickest start; the first requests at each batch size are then slow)
    budget_ms: int = 2000

    def check(self) -> None:
        if self.budget_ms < 0:
            raise ValueError("budget_ms must be >= 0 (0: one run at batch one)")


@dataclass(frozen=True)
class Config:
    # "": $OUTPOST_DATA_DIR, else $XDG_DATA_HOME/outpost, else ~/.local/share/outpost
    data_dir: str = ""
    profile: str = "auto"  # a firmware profile name, or auto-detect
    engine: str = "auto"  # auto | onnxruntime | tensorrt
    server: ServerConfig = field(default_factory=ServerConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    threads: ThreadsConfig = field(default_factory=ThreadsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    residency: ResidencyConfig = field(default_factory=ResidencyConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # [updater]: the OTA agent's table, checked key by key by updater.config.from_table
    updater: dict[str, str | int | float | bool | dict[str, str]] = field(default_factory=dict)

    def check(self) -> None:
        from engines import ENGINE_KINDS  # noqa: PLC0415

        if self.engine not in ENGINE_KINDS:
            raise ValueError(f"engine {self.engine!r}: use one of {', '.join(ENGINE_KINDS)}")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def socket(self) -> Path:
        return Path(self.server.socket_path)

    def token(self) -> str:
        """The configured token ('' for none), read from token_file where that is set."""
        if self.server.token_file:
            try:
                return Path(self.server.token_file).read_text().strip().splitlines()[0]
            except (OSError, IndexError) as exc:
                raise ConfigError(
                    f"server.token_file {self.server.token_file}: can't read a token from it"
                ) from exc
        return self.server.token or os.environ.get("OUTPOST_TOKEN", "")
