"""`python -m optimize`: a thin argparse layer over `optimize.compile` and `optimize.load`.

Errors the user can fix print as one line on stderr and exit 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import TaskID, BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from optimize.config import PRECISIONS, CompileConfig
from optimize.errors import OptimizeError

console = Console(stderr=True)


class RichReporter:
    """Shows each compile stage as a progress line (a bar when the stage has steps)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None
        self.label = ""

    def start(self, stage: str, total: int | None = None) -> None:
        self.label = escape(stage)
        self.task = self.progress.add_task(self.label, total=total)

    def advance(self, detail: str = "") -> None:
        if self.task is not None:
            description = f"{self.label} · {escape(detail)}" if detail else self.label
            self.progress.update(self.task, advance=1, description=description)

    def finish(self, stage: str, seconds: float) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        self.progress.console.print(f"[green]✓[/] {escape(stage)} [dim]{seconds:.1f}s[/]")


def _summary(engine_dir: Path) -> Table:
    from optimize.manifest import Manifest

    m = Manifest.read(engine_dir)
    table = Table(title=f"engine {m.name} → {engine_dir}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("backend", f"{m.backend} ({m.config.precision})")
    table.add_row("source", escape(f"{m.source.get('kind')}: {m.source.get('location')}"))
    for spec in m.inputs:
        table.add_row(f"input {spec.name}", escape(f"{spec.dtype} {spec.shape_str()}"))
    for spec in m.outputs:
        table.add_row(f"output {spec.name}", escape(f"{spec.dtype} {spec.shape_str()}"))
    dims = {d.name: d for s in m.inputs for d in s.dims}
    table.add_row("shape ranges", ", ".join(f"{d.name} {d.min}..{d.max} (opt {d.opt})" for d in dims.values()))
    acc = m.accuracy
    if acc:
        tol = acc.get("tolerance", {})
        table.add_row(
            "accuracy vs fp32 eager",
            f"max abs err {acc['max_abs_error']:.2e} (≤ {tol.get('max_abs_error', '?')}), "
            f"min cosine {acc['min_cosine']:.6f} (≥ {tol.get('min_cosine', '?')}) over {len(acc.get('shapes', []))} shapes",
        )
    size = sum(p.stat().st_size for p in engine_dir.rglob("*") if p.is_file())
    table.add_row("size on disk", f"{size / 2**20:.1f} MiB")
    if m.pipeline:
        table.add_row("text pipeline", f"tokenizer → {m.pipeline['output']} (max_length {m.pipeline['max_length']})")
    if m.timings_s:
        table.add_row("build time", ", ".join(f"{k} {v:.1f}s" for k, v in m.timings_s.items()))
    return table


def _passes_table(engine_dir: Path) -> Table:
    from optimize.manifest import Manifest

    table = Table(title="graph passes", title_justify="left")
    for column in ("pass", "matched", "time", "accuracy after"):
        table.add_column(column)
    for entry in Manifest.read(engine_dir).passes:
        if entry.get("skipped"):
            table.add_row(entry["pass"], f"[dim]skipped: {escape(entry['skipped'])}[/]", "", "")
            continue
        matched = ", ".join(f"{k} {v}" for k, v in entry["matches"].items() if v) or "-"
        acc = entry.get("accuracy")
        acc_text = f"err {acc['max_abs_error']:.1e}, cos {acc['min_cosine']:.6f}" if acc else ""
        table.add_row(entry["pass"], matched, f"{entry['seconds'] * 1e3:.0f} ms", acc_text)
    return table


def cmd_compile(args: argparse.Namespace) -> int:
    import optimize

    passes = {name: False for name in args.disable_pass} | {name: True for name in args.enable_pass}
    config = CompileConfig(
        backend=args.backend,
        precision=args.precision,
        max_batch=args.max_batch,
        max_seq=args.max_seq,
        min_seq=args.min_seq,
        passes=passes,
        verify_passes=args.verify_passes,
        seed=args.seed,
    )
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        optimize.compile(args.source, args.output, config, name=args.name, reporter=RichReporter(progress))
    Console().print(_summary(Path(args.output)))
    Console().print(_passes_table(Path(args.output)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from optimize.manifest import Manifest

    if args.json:
        print(json.dumps(Manifest.read(args.engine).to_json(), indent=2))
    else:
        Console().print(_summary(Path(args.engine)))
        Console().print(_passes_table(Path(args.engine)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from optimize.backends import available_backends

    parser = argparse.ArgumentParser(prog="python -m optimize", description="Compile transformer models into verified engines.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model into an engine directory")
    c.add_argument("source", help="Hugging Face model directory, exported .pt2 file, or module:function factory")
    c.add_argument("-o", "--output", required=True, type=Path, help="engine directory to write")
    c.add_argument("--backend", default="onnxruntime", choices=available_backends())
    c.add_argument("--precision", default="fp32", choices=PRECISIONS)
    c.add_argument("--max-batch", type=int, default=32, help="largest batch the engine accepts (default 32)")
    c.add_argument("--max-seq", type=int, default=256, help="longest sequence the engine accepts (default 256)")
    c.add_argument("--min-seq", type=int, default=1, help="shortest sequence the engine accepts (default 1)")
    c.add_argument("--name", help="model name recorded in the manifest (default: the source's name)")
    c.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    c.add_argument("--disable-pass", action="append", default=[], metavar="NAME", help="turn a graph pass off (repeatable)")
    c.add_argument("--enable-pass", action="append", default=[], metavar="NAME", help="turn a graph pass on (repeatable)")
    c.add_argument("--verify-passes", action="store_true",
                   help="check accuracy after every pass and name the first one that breaks it")
    c.set_defaults(func=cmd_compile)

    i = sub.add_parser("info", help="describe an engine directory")
    i.add_argument("engine", type=Path)
    i.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    i.set_defaults(func=cmd_info)
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
