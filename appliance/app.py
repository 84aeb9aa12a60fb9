"""The server process: wire the repository, engine, models, service and listeners."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time

from appliance.config.profiles import choose_engine, resolve
from appliance.config.schema import Config
from appliance.errors import ConfigError
from appliance.models.manager import BudgetTooSmall, ModelManager
from appliance.models.repository import Repository
from appliance.observe import memory
from appliance.serving.service import Service
from appliance.transport.socket_server import SocketServer, check_socket_free

log = logging.getLogger("outpost.app")

# Past the drain, how long a batch already running on an engine may take to finish
UNLOAD_GRACE_S = 2.0


async def serve(config: Config, ready_hook=None, make_agent=None) -> int:
    """Load every active model, listen, serve until SIGTERM/SIGINT, drain, exit 0.

    ``make_agent(service, repo, engine)``: the OTA update agent to run beside the server
    (or None), made by the caller: the CLI wires the updater, this module does not."""
    t0 = time.monotonic()
    stop = install_stop_signals()  # before anything listens: no window where TERM kills
    check_socket_free(config.socket)  # a second server stops here, not after loading
    repo = Repository(config.data_path)
    repo.clean_staging()
    detection = resolve(config.profile)
    log.info("profile", extra={"profile": detection.profile.name, "source": detection.source,
                               "reason": detection.reason})
    engine, reason = choose_engine(config.engine, detection)
    log.info("engine selected", extra={"engine": engine.kind, "reason": reason})
    manager = ModelManager(repo, engine, config)
    try:
        await manager.load_all()
    except BudgetTooSmall as exc:  # the budget can't hold a model at all: say so, stop
        raise ConfigError(f"residency.memory_budget_mb: {exc}") from None
    _settle_gc()
    service = Service(manager)
    agent = make_agent(service, repo, engine) if make_agent is not None else None
    http = None
    if config.http.address:  # before the socket, so a socket that answers means both do
        from appliance.transport.http.server import HttpServer  # noqa: PLC0415 (off by default)

        http = HttpServer(service, config)
        await http.start()
    grpc = None
    if config.grpc.address:  # likewise
        from appliance.transport.grpc.server import GrpcServer  # noqa: PLC0415 (off by default)

        grpc = GrpcServer(service, config)
        await grpc.start()
    server = SocketServer(service, config)
    await server.start()
    if ready_hook is not None:
        ready_hook(server, service)
    log.info("ready", extra={
        "socket": str(server.socket_path),
        "tcp": f"{server.tcp_address[0]}:{server.tcp_address[1]}" if server.tcp_address
        else None,
        "http": http.url if http else None,
        "grpc": grpc.target if grpc else None,
        "models": sorted(f"{n}:{v}" for n, v in manager.active.items()),
        "ready": manager.ready(), "start_s": round(time.monotonic() - t0, 3)})
    agent_task = asyncio.create_task(agent.run_forever()) if agent is not None else None
    trimming = asyncio.create_task(_trim_memory_forever())
    await stop.wait()
    trimming.cancel()
    loop = asyncio.get_running_loop()
    ends = loop.time() + config.server.drain_timeout_s
    if agent_task is not None:
        agent_task.cancel()
        await asyncio.gather(agent_task, return_exceptions=True)
        agent.close()
    log.info("stopping: draining in-flight requests",
             extra={"drain_timeout_s": config.server.drain_timeout_s})
    service.draining = True
    await asyncio.gather(server.stop(), *(v2.stop() for v2 in (http, grpc) if v2))
    # The versions get what is left of the drain, and at least a moment for a batch
    # already running to finish (a worker left inside the engine can crash the exit);
    # a stuck instance is abandoned then.
    manager.unload_timeout_s = max(UNLOAD_GRACE_S, ends - loop.time())
    await manager.unload_all()
    repo.close()
    log.info("stopped")
    return 0


def install_stop_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (a graceful stop), from now on."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _trim_memory_forever() -> None:
    """Hand freed heap back to the system now and then (observe/memory.py): a burst of
    connections or large frames otherwise leaves its high-water mark in RSS."""
    while True:
        await asyncio.sleep(memory.TRIM_INTERVAL_S)
        await asyncio.to_thread(memory.trim)


def _settle_gc() -> None:
    """What start-up loaded lives as long as the process: freeze it, so the collector's
    full passes stop walking every object of onnx, numpy and the models, and run the
    young pass less often (requests free their objects by reference counting; the
    collector is there for cycles). It was 5% of the event loop's busy time at c=1."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)


def run(config: Config, loop_kind: str = "auto", make_agent=None) -> int:
    if loop_kind in ("auto", "uvloop"):
        try:
            import uvloop  # noqa: PLC0415
        except ImportError:
            if loop_kind == "uvloop":
                raise
        else:
            return uvloop.run(serve(config, make_agent=make_agent))
    return asyncio.run(serve(config, make_agent=make_agent))
