"""`python -m optimize`: a thin argparse layer over `optimize.compile` and `optimize.load`.

Errors the user can fix print as one line on stderr and exit 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

import optimize
from optimize.runtime.config import (AUTO_PRECISION, CALIBRATION_METHODS, DEFAULT_TOLERANCES, PRECISIONS,
                                     CompileConfig, Tolerance)
from optimize.runtime.errors import OptimizeError
from optimize.runtime.manifest import Manifest
from optimize.runtime.pipeline import Pipeline
from optimize.backends import available_backends
from optimize.guards import FP32_LEVEL_COSINE
from optimize.passes.order import RENAMED, names
from optimize.profile.cli import add_profile_parser
from optimize.sources.tasks import TASKS
from optimize.tuning import TuningCache, default_path

console = Console(stderr=True)


class RichReporter:
    """Shows each compile stage as a progress line (a bar when the stage has steps). Stages
    nest (a backend's calibration runs inside "build"): the innermost one advances."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.stack: list[tuple[TaskID, str]] = []

    def start(self, stage: str, total: int | None = None) -> None:
        label = ("  " * len(self.stack)) + escape(stage)
        self.stack.append((self.progress.add_task(label, total=total), label))

    def advance(self, detail: str = "") -> None:
        if self.stack:
            task, label = self.stack[-1]
            description = f"{label} · {escape(detail)}" if detail else label
            self.progress.update(task, advance=1, description=description)

    def finish(self, stage: str, seconds: float) -> None:
        indent = "  " * max(len(self.stack) - 1, 0)
        if self.stack:
            task, _ = self.stack.pop()
            self.progress.remove_task(task)
        self.progress.console.print(f"{indent}[green]✓[/] {escape(stage)} [dim]{seconds:.1f}s[/]")


def _summary(engine_dir: Path) -> Table:
    m = Manifest.read(engine_dir)
    table = Table(title=f"engine {m.name} → {engine_dir}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("backend", f"{m.backend} ({m.config.precision})")
    table.add_row("source", escape(f"{m.source.get('kind')}: {m.source.get('location')}"))
    if m.source.get("task"):
        labels = m.source.get("labels") or []
        shown = f" — labels {', '.join(labels[:6])}{' ...' if len(labels) > 6 else ''}" if labels else ""
        table.add_row("task", escape(f"{m.source['task']} ({m.source.get('architecture')}){shown}"))
    for spec in m.inputs:
        table.add_row(f"input {spec.name}", escape(f"{spec.dtype} {spec.shape_str()}"))
    for spec in m.outputs:
        table.add_row(f"output {spec.name}", escape(f"{spec.dtype} {spec.shape_str()}"))
    dims = {d.name: d for s in m.inputs for d in s.dims}
    table.add_row("shape ranges", ", ".join(f"{d.name} {d.min}..{d.max} (opt {d.opt})" for d in dims.values()))
    acc = m.accuracy
    if acc.get("skipped"):
        table.add_row("accuracy vs fp32 eager", f"[yellow]{escape(acc['skipped'])}[/]")
    elif acc:
        tol = acc.get("tolerance", {})
        table.add_row(
            "accuracy vs fp32 eager",
            f"max abs err {acc['max_abs_error']:.2e} (≤ {tol.get('max_abs_error', '?') or 'unbounded'}), "
            f"min cosine {acc['min_cosine']:.6f} (≥ {tol.get('min_cosine', '?')}) over {len(acc.get('shapes', []))} random shapes",
        )
        if acc.get("samples"):
            real = acc["samples"]
            table.add_row(
                "  on real sentences",
                f"max abs err {real['max_abs_error']:.2e}, min cosine {real['min_cosine']:.6f} over "
                f"{len(real.get('shapes', []))} batches (judged on {', '.join(acc.get('judged_on', []))})",
            )
            if real.get("labels_compared"):
                table.add_row("  labels (arg-max)", f"{real['labels_compared'] - real['labels_differ']} of "
                                                    f"{real['labels_compared']} the same as fp32's")
    if m.build.get("quantization"):
        table.add_row("quantization", escape(quantization_text(m.build["quantization"])))
    size = sum(p.stat().st_size for p in engine_dir.rglob("*") if p.is_file())
    table.add_row("size on disk", f"{size / 2**20:.1f} MiB")
    if m.pipeline:
        table.add_row("text pipeline", escape(_text_interface(engine_dir, m)))
    if m.timings_s:
        table.add_row("build time", ", ".join(f"{k} {v:.1f}s" for k, v in m.timings_s.items()))
    return table


def quantization_text(record: dict[str, Any]) -> str:
    """One line on how a quantized engine was made, from its build record: the scheme,
    SmoothQuant's alpha, and how many MatMuls the accuracy search kept in float (the record
    names them)."""
    parts = [str(record.get("mode", "quantized"))]
    parts += [f"{key} {record[key]}" for key in ("weights", "activations") if record.get(key)]
    if "smooth_quant_alpha" in record:
        parts.append(f"SmoothQuant alpha {record['smooth_quant_alpha']}")
    kept = record.get("kept_in_float")
    if isinstance(kept, dict):
        names = kept.get("linears", kept.get("matmuls", []))
        parts.append(f"{kept['quantized']} int8, {len(names)} kept in float (calibration cosine "
                     f"{kept['calibration_cosine']:.5f}, aimed at {kept['target']:.5g})")
    elif isinstance(record.get("kept_float"), list):
        parts.append(f"{len(record['kept_float'])} MatMuls kept in float")
    return "; ".join(parts)


def _text_interface(engine_dir: Path, m: Manifest) -> str:
    """What a text request to the engine sends and gets back: "text → label, score (options
    top_k, all_scores; max_length 32)"."""
    limit = f"max_length {m.pipeline['max_length']}"
    try:
        interface = Pipeline.from_manifest(engine_dir, m.pipeline).text_interface(m.outputs)
    except ValueError as exc:  # a task this version serves as tokens only
        return f"tokenizer → {m.pipeline['output']} ({limit}); {exc}"
    options = f"options {', '.join(interface.options)}; " if interface.options else ""
    return (f"{', '.join(t.name for t in interface.inputs)} → {', '.join(t.name for t in interface.outputs)} "
            f"({options}{limit})")


def _passes_table(engine_dir: Path) -> Table:
    """The pass order as the build ran it: FX passes over the captured graph, then (for
    backends that consume ONNX) the ONNX passes, each with its stage."""
    table = Table(title="passes", title_justify="left")
    for column in ("stage", "pass", "matched", "time", "accuracy after"):
        table.add_column(column)
    for entry in Manifest.read(engine_dir).passes:
        if entry.get("skipped", "").startswith("not supported by backend"):
            continue  # e.g. kernel fusions on a backend that cannot run kiln kernels: noise here
        stage = entry.get("stage") or ("onnx" if entry["pass"].startswith("onnx_") else "fx")  # older manifests
        if entry.get("skipped"):
            table.add_row(stage, entry["pass"], f"[dim]skipped: {escape(entry['skipped'])}[/]", "", "")
            continue
        matched = ", ".join(f"{k} {v}" for k, v in entry["matches"].items() if v) or "-"
        acc = entry.get("accuracy") or {}
        acc_text = (f"err {acc['max_abs_error']:.1e}, cos {acc['min_cosine']:.6f}" if "max_abs_error" in acc
                    else escape(acc.get("skipped", "")))
        table.add_row(stage, entry["pass"], matched, f"{entry['seconds'] * 1e3:.0f} ms", acc_text)
    return table


def _pass_toggles(enable: list[str], disable: list[str]) -> dict[str, bool]:
    """`--disable-pass`/`--enable-pass` as `CompileConfig.passes`, an old pass name replaced
    by its new one with a note on stderr (`optimize.passes.order.RENAMED`)."""
    toggles: dict[str, bool] = {}
    for names, on in ((disable, False), (enable, True)):
        for name in names:
            if name in RENAMED:
                console.print(f"[yellow]note:[/] pass {escape(name)} is now called {escape(RENAMED[name])}; "
                              "the old name is deprecated")
                name = RENAMED[name]
            toggles[name] = on
    return toggles


def _auto_table(engine_dir: Path) -> Table | None:
    """The candidates `--backend auto` tried, fastest first, with why any was rejected, and
    underneath how sure the choice is and how busy the machine was while timing. A time marked
    (cpu) is the CPU time of a run, shorter than any run was on the busy machine."""
    auto = Manifest.read(engine_dir).build.get("auto")
    if not auto:
        return None
    shapes = auto.get("shapes") or [f"{auto['shape']['batch']}x{auto['shape']['seq']}"]  # older manifests: one shape

    def time_of(c: dict) -> float | None:  # manifests before `time_ms` ranked by `median_ms`
        return c.get("time_ms", c.get("median_ms"))

    confidence = auto.get("confidence")
    caption = None
    if confidence:
        colour = "green" if confidence["sure"] and not confidence.get("busy") else "yellow"
        caption = f"[{colour}]{escape(confidence['verdict'])}[/]"
    tuning = auto.get("tuning") or {}
    if tuning.get("hit"):
        kept = tuning.get("engine")
        engine = f", engine copied from {escape(kept['copied_from'])}" if kept else ", engine rebuilt"
        cached = (f"[dim]choice from the tuning cache {escape(tuning['cache'])} (recorded {tuning.get('recorded')})"
                  f"{engine}; --retune measures again[/]")
        caption = f"{caption}\n{cached}" if caption else cached
    table = Table(title=f"backend auto: candidates at batch × seq {', '.join(shapes)} ({auto['timing']})",
                  title_justify="left", caption=caption, caption_justify="left")
    several = len(shapes) > 1
    for column in ("candidate", "time (geomean)" if several else "time", "median run", "cpu/run", "spread",
                   "max abs err", "min cosine", "result"):
        table.add_column(column)
    rows = sorted(auto["candidates"], key=lambda c: (time_of(c) is None, time_of(c) or 0.0))
    for c in rows:
        acc = c.get("accuracy") or {}
        result = {"chosen": "[green]chosen[/]", "passed": "passed", "skipped": f"[dim]skipped: {escape(c['reason'])}[/]"
                  }.get(c["status"], f"[red]rejected:[/] {escape(c['reason'])}")
        cpu = c.get("cpu_ms") or {}
        table.add_row(
            escape(c["candidate"]),
            f"{time_of(c):.3g} ms" + (" (cpu)" if c.get("cpu_bound") else "") if time_of(c) is not None else "-",
            f"{c['median_ms']:.3g} ms" if c.get("median_ms") is not None and "time_ms" in c else "-",
            ", ".join(f"{v:.3g} ms" for v in cpu.values()) or "-",
            f"{c['spread']:.0%}" if c.get("spread") is not None else "-",
            f"{acc['max_abs_error']:.1e}" if acc.get("max_abs_error") is not None else "-",
            f"{acc['min_cosine']:.6f}" if acc.get("min_cosine") is not None else "-", result,
        )
    return table


def cmd_compile(args: argparse.Namespace) -> int:
    # No --backend: measure (auto); no --precision either: any precision that keeps the task's
    # guard (optimize.guards). A backend named alone builds fp32, as it always did.
    backend = args.backend or "auto"
    precision = args.precision or (AUTO_PRECISION if backend == "auto" else "fp32")
    passes = _pass_toggles(args.enable_pass, args.disable_pass)
    tolerance = None
    if args.min_cosine is not None or args.max_abs_error is not None:
        if precision == AUTO_PRECISION:  # the task's guard with the bounds given (optimize.guards)
            default = Tolerance(max_abs_error=None, min_cosine=FP32_LEVEL_COSINE)
        else:
            default = DEFAULT_TOLERANCES[precision]
        tolerance = Tolerance(
            max_abs_error=args.max_abs_error if args.max_abs_error is not None else default.max_abs_error,
            min_cosine=args.min_cosine if args.min_cosine is not None else default.min_cosine,
        )
    config = CompileConfig(
        tolerance=tolerance,
        opt_batch=args.opt_batch,
        opt_seq=args.opt_seq,
        calibration=args.calibration,
        calibration_method=args.calibration_method,
        backend_options=dict(args.backend_option),
        backend=backend,
        precision=precision,
        max_batch=args.max_batch,
        max_seq=args.max_seq,
        min_seq=args.min_seq,
        passes=passes,
        verify_passes=args.verify_passes,
        seed=args.seed,
        task=args.task,
    )
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        tuning = None if args.no_tuning_cache else TuningCache(args.tuning_cache or default_path(), retune=args.retune)
        optimize.compile(args.source, args.output, config, name=args.name, reporter=RichReporter(progress),
                         tuning=tuning)
    Console().print(_summary(Path(args.output)))
    Console().print(_passes_table(Path(args.output)))
    auto = _auto_table(Path(args.output))
    if auto is not None:
        Console().print(auto)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(Manifest.read(args.engine).to_json(), indent=2))
    else:
        Console().print(_summary(Path(args.engine)))
        Console().print(_passes_table(Path(args.engine)))
        auto = _auto_table(Path(args.engine))
        if auto is not None:
            Console().print(auto)
    return 0


def _backend_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m optimize", description="Compile transformer models into verified engines.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model into an engine directory")
    c.add_argument("source", help="Hugging Face model directory, exported .pt2 file, or module:function factory")
    c.add_argument("-o", "--output", required=True, type=Path, help="engine directory to write")
    c.add_argument("--backend", choices=[*available_backends(), "auto"],
                   help="engine backend (inductor = torch.compile ahead of time); auto, the default, builds every "
                        "candidate this machine runs, verifies each, times them and keeps the fastest")
    c.add_argument("--precision", choices=PRECISIONS,
                   help="compute precision; auto, the default with backend auto, admits any precision that keeps "
                        "the task's accuracy guard (embeddings: cosine >= 0.9999 on real text; classifiers: the same "
                        "labels too); with a named backend the default is fp32")
    c.add_argument("--tuning-cache", type=Path, metavar="FILE",
                   help="where backend auto records its choice per machine and model (and keeps the winner's "
                        "engine beside it), so the next build of the same model copies that engine "
                        "(default: $KILN_CACHE_DIR/tuning.json, else ~/.cache/kiln/tuning.json)")
    c.add_argument("--retune", action="store_true",
                   help="measure every candidate again, replacing the cached choice and its kept engine")
    c.add_argument("--no-tuning-cache", action="store_true", help="neither read nor write the tuning cache or its engines")
    c.add_argument("--task", metavar="TASK",
                   help="which head of a Hugging Face model to build: " + ", ".join(TASKS)
                        + " (default: the one the directory describes; an unknown head is refused)")
    c.add_argument("--max-batch", type=int, default=32, help="largest batch the engine accepts (default 32)")
    c.add_argument("--max-seq", type=int, default=256, help="longest sequence the engine accepts (default 256)")
    c.add_argument("--min-seq", type=int, default=1, help="shortest sequence the engine accepts (default 1)")
    c.add_argument("--opt-batch", type=int, help="the batch size to optimize and time for (default min(8, max-batch))")
    c.add_argument("--opt-seq", type=int, help="the sequence length to optimize and time for (default min(128, max-seq))")
    c.add_argument("--min-cosine", type=float, metavar="C",
                   help="accuracy guard: least cosine similarity to fp32 eager (default: the precision's)")
    c.add_argument("--max-abs-error", type=float, metavar="E",
                   help="accuracy guard: largest absolute difference from fp32 eager (default: the precision's)")
    c.add_argument("--name", help="model name recorded in the manifest (default: the source's name)")
    c.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    c.add_argument("--disable-pass", action="append", default=[], metavar="NAME",
                   help="turn a pass off (repeatable); the passes, FX then ONNX: " + ", ".join(names()))
    c.add_argument("--enable-pass", action="append", default=[], metavar="NAME", help="turn a pass on (repeatable)")
    c.add_argument("--verify-passes", action="store_true",
                   help="check accuracy after every pass and name the first one that breaks it")
    c.add_argument("--calibration", metavar="FILE",
                   help="calibration data: .txt (one text per line), .jsonl ({'text': ...}) or .safetensors "
                        "(default: built-in sentences for text models)")
    c.add_argument("--calibration-method", default="percentile", choices=CALIBRATION_METHODS,
                   help="int8 and fp8 activation calibration (default percentile; fp8 takes minmax or percentile)")
    c.add_argument("--backend-option", action="append", default=[], type=_backend_option, metavar="KEY=VALUE",
                   help="a backend-specific setting, VALUE parsed as JSON when it is JSON (repeatable), "
                        "e.g. optimization_level=5, compute_capabilities='[\"sm89\"]'")
    c.set_defaults(func=cmd_compile)

    i = sub.add_parser("info", help="describe an engine directory")
    i.add_argument("engine", type=Path)
    i.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    i.set_defaults(func=cmd_info)


    add_profile_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except OptimizeError as exc:
        if args.debug:
            raise
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
