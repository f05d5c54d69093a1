"""Prometheus metrics over HTTP (`GET /metrics`), with Triton's `nv_inference_*` names and
meanings (Triton's `docs/user_guide/metrics.md`), labels `model` and
`version`, plus kiln's batch-size histogram.

Only `/metrics` (and `/metrics/`, as Triton's `/metrics/?`) is served; every other path is 404.
prometheus-client's own server answers the metrics on any path, and Triton's metrics port answers
200 with an empty body (src/http_server.cc, HTTPMetricsServer::Handle), so on either a readiness
probe aimed at `/v2/health/ready` there, by Triton habit, reads 200 and calls a server ready that
is not. Here it fails.

Triton's counters are exposed untyped, so their names are exactly Triton's (prometheus-client
would append `_total` to a counter's). Nothing is counted twice: a custom collector reads each
served model's `ModelStats` and queue
when Prometheus scrapes, so the metrics always agree with the ModelStatistics RPC.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric, UnknownMetricFamily

from server.stats import BACKEND, CANCELED, OTHER, REJECTED, ModelStats

log = logging.getLogger(__name__)

FAILURE_REASONS = (REJECTED, CANCELED, BACKEND, OTHER)
LABELS = ["model", "version"]
METRICS_PATH = "/metrics"
_SERVED_PATHS = (METRICS_PATH, METRICS_PATH + "/")
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class InferenceCollector:
    """Collects the metrics of whatever models `models()` returns at scrape time: a mapping of
    model name → (stats, pending request count, max batch size)."""

    def __init__(self, models: Callable[[], Mapping[str, tuple[ModelStats, int, int]]]) -> None:
        self._models = models

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: families are only known at scrape time

    def collect(self) -> Iterator[Metric]:
        def counter(name: str, doc: str, extra: list[str] | None = None) -> UnknownMetricFamily:
            # Cumulative counters, exposed untyped: prometheus-client would append `_total` to a
            # counter's name, and dashboards built for Triton query the names as they are.
            return UnknownMetricFamily(name, doc, labels=LABELS + (extra or []))

        success = counter("nv_inference_request_success", "Number of successful inference requests, all batch sizes")
        failure = counter("nv_inference_request_failure", "Number of failed inference requests, all batch sizes",
                          ["reason"])
        count = counter("nv_inference_count", "Number of inferences performed (a request of batch 4 counts 4)")
        executions = counter("nv_inference_exec_count", "Number of model executions performed (a batch counts 1)")
        request_us = counter("nv_inference_request_duration_us",
                             "Cumulative inference request duration in microseconds (successful requests)")
        queue_us = counter("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds")
        input_us = counter("nv_inference_compute_input_duration_us",
                           "Cumulative compute input duration in microseconds")
        infer_us = counter("nv_inference_compute_infer_duration_us",
                           "Cumulative compute inference duration in microseconds")
        output_us = counter("nv_inference_compute_output_duration_us",
                            "Cumulative inference compute output duration in microseconds")
        pending = GaugeMetricFamily("nv_inference_pending_request_count",
                                    "Instantaneous number of pending requests awaiting execution", labels=LABELS)
        batch_size = HistogramMetricFamily("kiln_batch_size", "Samples per engine execution (dynamic batch size)",
                                           labels=LABELS)
        for name, (stats, queued, max_batch) in sorted(self._models().items()):
            labels = [name, str(stats.version)]
            success.add_metric(labels, stats.success.count)
            for reason in FAILURE_REASONS:
                failure.add_metric(labels + [reason], stats.failures.get(reason, 0))
            count.add_metric(labels, stats.inference_count)
            executions.add_metric(labels, stats.execution_count)
            request_us.add_metric(labels, stats.success.ns // 1000)
            queue_us.add_metric(labels, stats.queue.ns // 1000)
            input_us.add_metric(labels, stats.compute_input.ns // 1000)
            infer_us.add_metric(labels, stats.compute_infer.ns // 1000)
            output_us.add_metric(labels, stats.compute_output.ns // 1000)
            pending.add_metric(labels, queued)
            buckets, total_samples = _histogram(stats, max_batch)
            batch_size.add_metric(labels, buckets, sum_value=total_samples)
        yield from (success, failure, count, executions, request_us, queue_us, input_us, infer_us, output_us,
                    pending, batch_size)


def _histogram(stats: ModelStats, max_batch: int) -> tuple[list[tuple[str, int]], int]:
    """Cumulative bucket counts over powers of two up to `max_batch` (exact: the batch sizes of
    every execution are known), and the sum of samples."""
    bounds = [1]
    while bounds[-1] < max_batch:
        bounds.append(bounds[-1] * 2)
    if max_batch > 1 and bounds[-1] != max_batch:
        bounds[-1] = max_batch
    counts = {size: d.compute_infer.count for size, d in stats.batches.items()}
    buckets = [(str(float(b)), sum(n for size, n in counts.items() if size <= b)) for b in bounds]
    buckets.append(("+Inf", sum(counts.values())))
    return buckets, sum(size * n for size, n in counts.items())


def only_metrics_path(app: WsgiApp) -> WsgiApp:
    """`app` at `/metrics` (or `/metrics/`); 404 everywhere else."""

    def routed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in _SERVED_PATHS:
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"not found: this port serves only {METRICS_PATH}\n".encode()]

    return routed


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Nothing: a scrape per few seconds is not worth a line, and paths come from anyone."""


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up shutdown


class MetricsServer:
    """The HTTP endpoint, in a daemon thread. `port` is the bound port (also when 0 was asked).
    Raises `OSError` when the address cannot be bound."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        family, address = _family(host, port)
        server_class = type("MetricsHTTPServer", (_ThreadingServer,), {"address_family": family})
        self._httpd = make_server(address, port, only_metrics_path(make_wsgi_app(registry)), server_class,
                                  handler_class=_Quiet)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="kiln-metrics", daemon=True)
        self._thread.start()
        self.host = host
        self.port = int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{METRICS_PATH}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The address family of `host` (IPv6 for '::1'), and the address to bind."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return family, str(sockaddr[0])


def registry_for(models: Callable[[], Mapping[str, tuple[ModelStats, int, int]]]) -> CollectorRegistry:
    """A registry of its own per server (several servers may share a process, as in tests)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(InferenceCollector(models))  # type: ignore[arg-type]
    return registry
