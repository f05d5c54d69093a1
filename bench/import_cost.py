"""What serving pays for the compiler: modules imported and wall time of `import server`, and of
loading an engine (`optimize.load` then one call), in fresh processes (issue 17, point 1).

    python -m bench.import_cost ENGINE_DIR --checkout before=OLD_CHECKOUT --checkout after=.

Each checkout is imported from its own root in a new interpreter per run; runs alternate
between the checkouts (one round: every checkout once per case, in rotating order), so a busy
spell on the shared machine falls on all of them alike. Reported per checkout and case: the
median and spread of the wall time over the rounds, the modules the step added to
`sys.modules` (the same every run), and how many of them are the compiler's build side. The
machine's load average is read before and after.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

# Modules that only building an engine needs; serving should import none of them.
BUILD_SIDE = ("onnxscript", "onnx", "transformers", "optimize.build", "optimize.compiler", "optimize.passes", "optimize.onnx", "optimize.capture",
              "optimize.sources", "optimize.auto", "optimize.verify", "optimize.backends", "optimize.profile",
              "optimize.samples", "optimize.timing", "onnxruntime.quantization", "nncf", "tensorrt")

_PROBE = """
import json, sys, time
before = set(sys.modules)
t0 = time.perf_counter()
if sys.argv[1] == "import server":
    import server
else:
    import numpy as np
    import optimize
    engine = optimize.load(sys.argv[2])
    ids = np.ones((1, 8), dtype=np.int64)
    engine.run({"input_ids": ids, "attention_mask": ids})
seconds = time.perf_counter() - t0
added = sorted(set(sys.modules) - before)
print(json.dumps({"seconds": seconds, "modules": added}))
"""


def probe(root: Path, case: str, engine: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # -E: the checkout is imported from `root` (the working directory) and nowhere else
    done = subprocess.run([sys.executable, "-E", "-c", _PROBE, case, str(engine)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_side(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == b or m.startswith(b + ".") for b in BUILD_SIDE)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", type=Path, help="a compiled MiniLM engine directory")
    parser.add_argument("--checkout", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    checkouts = dict(item.split("=", 1) for item in args.checkout)
    cases = ("import server", "load engine")
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(n, c): [] for n in checkouts for c in cases}
    load_before = os.getloadavg()
    order = list(checkouts)
    for r in range(args.rounds):
        for case in cases:
            for name in order[r % len(order):] + order[:r % len(order)]:
                runs[name, case].append(probe(Path(checkouts[name]).resolve(), case, args.engine.resolve()))
    results = []
    for (name, case), got in runs.items():
        seconds = [g["seconds"] for g in got]
        modules = got[-1]["modules"]
        results.append({"checkout": name, "case": case, "median_s": round(statistics.median(seconds), 3),
                        "min_s": round(min(seconds), 3), "max_s": round(max(seconds), 3), "runs": len(seconds),
                        "modules_added": len(modules), "build_side_modules": len(build_side(modules)),
                        "build_side_examples": build_side(modules)[:12]})
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    report = {"date": dt.date.today().isoformat(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "note": "shared machine: other jobs ran alongside; times are medians of fresh processes, alternating",
              "results": results}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
