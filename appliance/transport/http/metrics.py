"""Prometheus metrics, read from the same ``VersionStats`` the socket's `stats` op reports.

A custom collector reads every loaded version's figures when /metrics is scraped (on the
event loop, like every other reader of them), so the two views never disagree and the
request path pays nothing extra. Its own ``CollectorRegistry`` keeps the process-global
default registry (and whatever a library put there) out of the output.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from appliance.observe.stats import DURATION_BOUNDS_S, VersionStats
from appliance.serving.service import Service

LABELS = ["model", "version"]
LAYOUT_LABELS = ["threads", "instances", "spinning", "preferred_batch", "source", "reason"]
HISTOGRAMS = (
    ("request", "outpost_request_duration_seconds",
     "Time from queueing to the answer, successful requests"),
    ("queue", "outpost_queue_duration_seconds",
     "Time a successful request waited in the batcher's queue"),
    ("compute", "outpost_compute_duration_seconds",
     "Engine time of the batch that ran a successful request"),
)


class ModelCollector(Collector):
    """Per model and version: counts, duration histograms, queue depth, readiness."""

    def __init__(self, service: Service):
        self.service = service

    def collect(self) -> Iterator[Metric]:
        success = CounterMetricFamily(
            "outpost_request_success", "Requests answered with outputs", labels=LABELS)
        failure = CounterMetricFamily(
            "outpost_request_failure", "Requests answered with an error, by error code",
            labels=[*LABELS, "code"])
        inferences = CounterMetricFamily(
            "outpost_inference_count",
            "Rows run by the engine (a batch of 8 counts 8); divide by execution count for "
            "the average batch size", labels=LABELS)
        executions = CounterMetricFamily(
            "outpost_execution_count", "Engine calls (batches run)", labels=LABELS)
        pending = GaugeMetricFamily(
            "outpost_queue_depth", "Requests queued or running right now", labels=LABELS)
        ready = GaugeMetricFamily(
            "outpost_model_ready", "1 when the version is loaded and serving", labels=LABELS)
        layout = GaugeMetricFamily(
            "outpost_model_layout", "1 per loaded version: the layout it runs with (threads "
            "and instances, spinning, preferred batch) and why (measured, cached or fixed)",
            labels=[*LABELS, *LAYOUT_LABELS])
        hists = {kind: HistogramMetricFamily(name, doc, labels=LABELS)
                 for kind, name, doc in HISTOGRAMS}
        loaded = 0
        for info in self.service.statistics():
            labels = [info.name, str(info.version)]
            st: VersionStats = info.stats
            success.add_metric(labels, st.request_success)
            for code, n in sorted(st.failures_by_code.items()):
                failure.add_metric([*labels, code], n)
            inferences.add_metric(labels, st.inference_count)
            executions.add_metric(labels, st.execution_count)
            pending.add_metric(labels, info.inflight)
            loaded += info.ready
            ready.add_metric(labels, int(info.ready))
            if info.layout is not None:
                layout.add_metric([*labels, *(str(info.layout[k]) for k in LAYOUT_LABELS)], 1)
            for kind, counts, total in (("request", st.request_hist, st.request_s_total),
                                        ("queue", st.queue_hist, st.queue_s_total),
                                        ("compute", st.compute_hist, st.compute_s_total)):
                hists[kind].add_metric(labels, _cumulative(counts), total)
        yield success
        yield failure
        yield inferences
        yield executions
        yield from hists.values()
        yield pending
        yield ready
        yield layout
        yield GaugeMetricFamily("outpost_models_loaded",
                                "Model versions loaded and serving", value=loaded)
        yield from self._traffic()
        yield from self._memory()
        by_protocol = CounterMetricFamily(
            "outpost_protocol_requests", "Infer requests answered, by transport (socket, "
            "http, grpc) and outcome (OK or the error code)", labels=["protocol", "code"])
        for (protocol, code), n in sorted(self.service.protocol_counts.counts.items()):
            by_protocol.add_metric([protocol, code], n)
        yield by_protocol

    def _memory(self) -> Iterator[Metric]:
        """The memory budget's account: measured bytes, instances and evictions."""
        account = self.service.memory()
        held = GaugeMetricFamily(
            "outpost_model_memory_bytes", "What a loaded version holds, measured at load "
            "and as instances are added: RSS and arena growth across load and warm-up, "
            "plus the device memory its engine reports", labels=LABELS)
        per_instance = GaugeMetricFamily(
            "outpost_model_instance_memory_bytes", "The latest instance's measured cost",
            labels=LABELS)
        instances = GaugeMetricFamily(
            "outpost_model_instances", "Instances (sessions) now: what autoscaling did",
            labels=LABELS)
        evictions = CounterMetricFamily(
            "outpost_model_evictions", "Times the memory budget unloaded this version",
            labels=LABELS)
        evicted = GaugeMetricFamily(
            "outpost_model_evicted", "1 while the budget keeps this version unloaded (it "
            "loads on its next request); the label says why", labels=[*LABELS, "reason"])
        for v in account["versions"]:
            labels = [v["model"], str(v["version"])]
            held.add_metric(labels, v["memory_bytes"])
            per_instance.add_metric(labels, v["instance_bytes"])
            instances.add_metric(labels, v["instances"])
            evictions.add_metric(labels, v["evictions"])
            if v["evictions"]:
                evicted.add_metric([*labels, v["eviction_reason"]], int(v["evicted"]))
        yield from (held, per_instance, instances, evictions, evicted)
        for key, doc in (
                ("budget_bytes", "residency.memory_budget_mb in bytes (0: no budget)"),
                ("baseline_bytes", "The process's RSS before any model loaded"),
                ("accounted_bytes", "Baseline plus every loaded version's measured bytes: "
                                    "what the budget is checked against")):
            yield GaugeMetricFamily(f"outpost_memory_{key}", doc, value=account[key])

    def _traffic(self) -> Iterator[Metric]:
        """Per-variant routing counts and shadow divergence, per model."""
        routed = CounterMetricFamily(
            "outpost_routed_requests", "Requests the router sent to each version",
            labels=LABELS)
        compared = CounterMetricFamily(
            "outpost_shadow_compared", "Shadow answers compared with the live ones",
            labels=["model"])
        agreed = CounterMetricFamily(
            "outpost_shadow_agreed", "Compared shadow answers that agreed with the live ones "
            "(top class, or within the validation tolerances)", labels=["model"])
        shed = CounterMetricFamily(
            "outpost_shadow_shed", "Copies shed so live requests go first (counted in "
            "dropped too)", labels=["model"])
        sampled_out = CounterMetricFamily(
            "outpost_shadow_sampled_out", "Requests the shadow sampling rate left uncopied",
            labels=["model"])
        dropped = CounterMetricFamily(
            "outpost_shadow_dropped", "Copies not sent: the shadow was busy or not ready",
            labels=["model"])
        errors = CounterMetricFamily(
            "outpost_shadow_errors", "Shadow requests that failed, by cause",
            labels=["model", "code"])
        max_diff = GaugeMetricFamily(
            "outpost_shadow_max_abs_diff", "Largest absolute difference seen between a "
            "shadow output and the live one", labels=["model"])
        agree = GaugeMetricFamily(
            "outpost_shadow_top1_agreement", "Share of rows whose top class agrees",
            labels=["model"])
        latency = GaugeMetricFamily(
            "outpost_shadow_latency_seconds", "The shadow's recent latency",
            labels=["model", "quantile"])
        for name, figures in self.service.traffic_figures().items():
            for version, n in figures["routed"].items():
                routed.add_metric([name, version], n)
            snap = figures["shadow"]
            if snap is None:
                continue
            compared.add_metric([name], snap["compared"])
            dropped.add_metric([name], snap["dropped"])
            agreed.add_metric([name], snap["agreed"])
            shed.add_metric([name], snap["shed"])
            sampled_out.add_metric([name], snap["sampled_out"])
            for code, n in sorted(snap["errors"].items()):
                errors.add_metric([name, code], n)
            max_diff.add_metric([name], snap["max_abs_diff"])
            if snap["top1_agreement"] is not None:
                agree.add_metric([name], snap["top1_agreement"])
            for q in ("p50", "p99"):
                latency.add_metric([name, "0." + q[1:]], snap["latency_ms"][q] / 1e3)
        yield from (routed, compared, agreed, dropped, shed, sampled_out, errors, max_diff,
                    agree, latency)


def _cumulative(counts: list[int]) -> list[tuple[str, int]]:
    out, running = [], 0
    for bound, n in zip((*map(str, DURATION_BOUNDS_S), "+Inf"), counts, strict=True):
        running += n
        out.append((bound, running))
    return out


def make_registry(service: Service) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ModelCollector(service))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition format and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
