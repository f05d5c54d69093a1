"""What the Ray tests share (tests/server/test_batch.py, test_ray_serve.py): a local Ray of 2 CPUs
without a dashboard, joinable from subprocesses, and the processes it runs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

RAY_MISSING = "needs the ray extra: pip install 'kiln[ray]'"


@contextlib.contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[str]:
    """A Ray started in this process for the duration; yields the address subprocesses join
    (`--address`, `serve run --address`)."""
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def joining_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess that joins the local Ray: this process's (after
    `ray.init`, which sets how the cluster authenticates, RAY_AUTH_MODE), offline Hugging Face."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


def descendants(pid: int | None = None) -> dict[int, str]:
    """Every process below `pid` (default: this one) with its command line, from /proc. Ray's
    workers are children of the raylet this process started, so a test finds the workers of
    its own cluster only, never another Ray on the machine."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found: dict[int, str] = {}
    frontier = [pid or os.getpid()]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                frontier.append(child)
    return found
