"""Per-model inference statistics with Triton's meanings, kept once and read twice: by the
ModelStatistics RPC (which perf_analyzer reads to report server-side queue and compute time)
and by the Prometheus metrics (`server.metrics`).

Triton's definitions (server `docs/user_guide/metrics.md`, `docs/protocol/extension_statistics.md`):
- `success`/`fail`: requests, and their total time from receipt to response (ns);
- `queue`, `compute_input`, `compute_infer`, `compute_output`: per successful request, the time
  it waited in the queue and the time its batch spent preparing inputs, running the engine and
  preparing outputs (every request of a batch is charged the batch's compute time);
- `inference_count`: samples inferred (a request of batch 4 counts 4); `execution_count`:
  engine executions (a batch counts 1); `batch_stats`: per executed batch size, the count and
  compute durations of its executions.
Only the event loop writes these, so no lock is needed.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from server.proto import grpc_service_pb2 as pb

# Failure reasons, as Triton labels nv_inference_request_failure.
REJECTED, CANCELED, BACKEND, OTHER = "REJECTED", "CANCELED", "BACKEND", "OTHER"


@dataclass
class Duration:
    """A count and the nanoseconds summed over it."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, int(ns))

    def proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class Timings:
    """What one request went through, in nanoseconds (filled in by the scheduler)."""

    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0


class ModelStats:
    """Cumulative counters of one model version since it was loaded."""

    def __init__(self, name: str, version: int) -> None:
        self.name = name
        self.version = version
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.failures: Counter[str] = Counter()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, BatchDurations] = {}

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One engine execution over `batch_size` samples."""
        self.inference_count += batch_size
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        durations = self.batches.setdefault(batch_size, BatchDurations())
        durations.compute_input.add(input_ns)
        durations.compute_infer.add(infer_ns)
        durations.compute_output.add(output_ns)

    def record_success(self, request_ns: int, timings: Timings) -> None:
        """A request answered: its total time and what its batch spent."""
        self.success.add(request_ns)
        self.queue.add(timings.queue_ns)
        self.compute_input.add(timings.compute_input_ns)
        self.compute_infer.add(timings.compute_infer_ns)
        self.compute_output.add(timings.compute_output_ns)

    def record_failure(self, request_ns: int, reason: str) -> None:
        """A request that failed after reaching the model; `reason` is REJECTED (queue full,
        timed out), CANCELED, BACKEND (the engine failed) or OTHER (invalid input, shutdown)."""
        self.fail.add(request_ns)
        self.failures[reason] += 1

    def proto(self) -> pb.ModelStatistics:
        """The ModelStatistics message, Triton's layout."""
        return pb.ModelStatistics(
            name=self.name,
            version=str(self.version),
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(
                success=self.success.proto(), fail=self.fail.proto(), queue=self.queue.proto(),
                compute_input=self.compute_input.proto(), compute_infer=self.compute_infer.proto(),
                compute_output=self.compute_output.proto(),
                cache_hit=pb.StatisticDuration(), cache_miss=pb.StatisticDuration(),
            ),
            batch_stats=[
                pb.InferBatchStatistics(
                    batch_size=size, compute_input=d.compute_input.proto(), compute_infer=d.compute_infer.proto(),
                    compute_output=d.compute_output.proto(),
                )
                for size, d in sorted(self.batches.items())
            ],
        )
