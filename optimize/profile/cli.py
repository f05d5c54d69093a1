"""`python -m optimize profile`: a thin argparse layer over `optimize.profile`.

    python -m optimize profile SOURCE|ENGINE_DIR --batch B --seq S [--json F] [--plot DIR] [--trace F]
    python -m optimize profile --compare A B --batch B --seq S [--json F] [--plot DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
import torch

from optimize.profile.compare import compare, render_comparison
from optimize.profile.report import render, save_json, write_plots
from optimize.profile.report import summary_table
from optimize.profile.runner import ProfileOptions
from optimize.profile.runner import profile_target
from optimize.profile.target import resolve
from optimize.runtime.errors import ConfigError


def add_profile_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the `profile` subcommand on the CLI's subparsers."""
    p = sub.add_parser("profile", help="FLOPs, bytes, latency, memory and roofline of a model source or engine",
                       description="Profile a model source or an engine directory (see optimize/profile/).")
    p.add_argument("target", nargs="?", help="engine directory, Hugging Face directory, .pt2 file or module:function")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="profile A and B on the same inputs; speed-up of B over A")
    p.add_argument("--batch", type=int, help="batch size (default: the engine's opt, or 1 for a source)")
    p.add_argument("--seq", type=int, help="sequence length (default: the engine's opt, or 128 for a source)")
    p.add_argument("--json", type=Path, metavar="F", help="write the profile (or comparison) as JSON")
    p.add_argument("--plot", type=Path, metavar="DIR", help="write roofline, per-layer and latency PNGs into DIR")
    p.add_argument("--trace", type=Path, metavar="F", help="write a chrome trace of one inference (torch.profiler)")
    p.add_argument("--warmup", type=int, default=3, help="untimed inferences first (default 3)")
    p.add_argument("--repeats", type=int, default=20, help="timed whole-model inferences (default 20)")
    p.add_argument("--op-repeats", type=int, help="instrumented inferences for per-op timing (default min(repeats, 10))")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--no-roofline", action="store_true", help="skip device ceilings and roofline placement")
    p.add_argument("--refresh-ceilings", action="store_true", help="re-measure the device ceilings instead of the cache")
    p.add_argument("--no-nvml", action="store_true", help="do not sample NVML")
    p.set_defaults(func=cmd_profile)
    return p


def _options(args: argparse.Namespace) -> Any:
    return ProfileOptions(warmup=args.warmup, repeats=args.repeats, op_repeats=args.op_repeats,
                          roofline=not args.no_roofline, refresh_ceilings=args.refresh_ceilings, nvml=not args.no_nvml,
                          trace=args.trace, seed=args.seed)


def _device(args: argparse.Namespace) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_profile(args: argparse.Namespace) -> int:

    if (args.target is None) == (args.compare is None):
        raise ConfigError("give either a TARGET or --compare A B")
    out, err = Console(), Console(stderr=True)
    opts = _options(args)
    device = _device(args)
    if args.compare is None:
        prof = profile_target(resolve(args.target, batch=args.batch, seq=args.seq, device=device, seed=args.seed), opts)
        render(prof, out)
        if args.json:
            err.print(f"profile JSON → {save_json(prof, args.json)}")
        if args.plot:
            _plots(prof, args.plot, err, write_plots)
        return 0


    a_path, b_path = args.compare
    target_a = resolve(a_path, batch=args.batch, seq=args.seq, device=device, seed=args.seed)
    target_b = resolve(b_path, target_a.inputs, device=device, seed=args.seed)
    prof_a = profile_target(target_a, opts)
    opts.trace = None  # one trace is enough and would be overwritten
    prof_b = profile_target(target_b, opts)
    out.print(summary_table(prof_a))
    out.print(summary_table(prof_b))
    result = compare(prof_a, prof_b)
    render_comparison(result, out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"comparison": result.to_json(), "a": prof_a.to_json(), "b": prof_b.to_json()},
                                        indent=1, allow_nan=False) + "\n")
        err.print(f"comparison JSON → {args.json}")
    if args.plot:
        _plots(prof_a, args.plot / "a", err, write_plots)
        _plots(prof_b, args.plot / "b", err, write_plots)
    return 0


def _plots(prof: Any, directory: Path, console: Any, write_plots: Any) -> None:
    written, skipped = write_plots(prof, directory)
    for path in written:
        console.print(f"plot → {path}")
    for reason in skipped:
        console.print(f"[dim]plot skipped: {reason}[/]")


__all__ = ["add_profile_parser", "cmd_profile"]
