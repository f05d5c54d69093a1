"""The op recorder: a `TorchDispatchMode` that costs and times every op and attributes it to
the module that ran it.

Modules are tracked two ways, to the same effect:
- an `nn.Module` with submodules: forward pre/post hooks keep a stack of module paths;
- a `torch.export` graph (an engine's program): there are no submodules at run time, so the
  graph runs under an `fx.Interpreter` that reads each node's `nn_module_stack` metadata.

An op with a formula is counted as one op (`aten::linear` stays one row). A composite op
without one is decomposed first, as `torch.utils.flop_counter` does, so its parts are counted;
an op that is neither is run, timed and listed as uncounted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from optimize.profile.bytes import op_bytes
from optimize.profile.flops import Count, has_formula, op_cost
from optimize.profile.timing import Stopwatch

ROOT = ""
_EMPTY_STACK = "_empty_nn_module_stack_from_metadata_hook"
# Ops the dispatcher sends to a mode for bookkeeping only; never decomposed or recorded.
_PASS_THROUGH = {"prim::device", "prim::layout", "aten::is_contiguous", "aten::is_strides_like_format",
                 "aten::is_non_overlapping_and_dense"}


@dataclass
class ModuleInfo:
    """A module seen while running: its type, the module that called it, first-seen order."""

    path: str
    type: str
    parent: str | None
    order: int


@dataclass
class OpEvent:
    """One op call of the counting run."""

    op: str
    module: str
    count: Count
    bytes: int
    dtype: str
    shapes: list[list[int]]


@dataclass
class Recording:
    """What the recorder collected over its runs: the ops of the first run, each run's per-op
    durations (same order), and the modules seen."""

    events: list[OpEvent] = field(default_factory=list)
    durations: list[list[float]] = field(default_factory=list)
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    dropped_runs: int = 0


class ModuleStack:
    """The current module path while a model runs, and every module seen so far."""

    def __init__(self, root_type: str) -> None:
        self.stack: list[str] = []
        self.modules: dict[str, ModuleInfo] = {ROOT: ModuleInfo(ROOT, root_type, None, 0)}

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else ROOT

    def see(self, path: str, type_name: str, parent: str | None) -> None:
        if path not in self.modules:
            self.modules[path] = ModuleInfo(path, type_name, parent, len(self.modules))

    def push(self, path: str, type_name: str) -> None:
        if path != ROOT:
            self.see(path, type_name, self.current)
        self.stack.append(path)

    def pop(self) -> None:
        if self.stack:
            self.stack.pop()

    def set_from_meta(self, nn_module_stack: Mapping[str, Any] | None) -> None:
        """Make the stack the one recorded on a graph node (outermost first)."""
        self.stack = []
        for value in (nn_module_stack or {}).values():
            path, type_name = value[0], value[1]
            if path == _EMPTY_STACK:
                continue
            short = type_name.rsplit(".", 1)[-1] if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
            if path == ROOT:
                self.modules[ROOT].type = short
                continue
            self.see(path, short, self.current)
            self.stack.append(path)


def _dtype_of(args: Any, out: Any) -> str:
    tensors = [t for t in pytree.tree_leaves((args, out)) if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.is_floating_point():
            return str(t.dtype).removeprefix("torch.")
    return str(tensors[0].dtype).removeprefix("torch.") if tensors else "none"


def _shapes(args: Any) -> list[list[int]]:
    return [list(t.shape) for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]


def op_name(func: torch._ops.OpOverload) -> str:
    """`aten.addmm` style: namespace.op, overload dropped (it is rarely what readers want)."""
    return func._schema.name.replace("::", ".")


class OpRecorder(TorchDispatchMode):
    """Counts (first run) and times (every run) each op dispatched while it is active."""

    def __init__(self, modules: ModuleStack, cuda: bool, time_ops: bool) -> None:
        super().__init__()
        self.modules = modules
        self.watch = Stopwatch(cuda)
        self.time_ops = time_ops
        self.recording = Recording()
        self._counting = True
        self._marks: list[tuple[Any, Any]] = []

    def start_run(self) -> None:
        self._marks = []

    def end_run(self) -> None:
        """Close a run: resolve its durations, stop counting after the first."""
        if self.time_ops:
            self.watch.sync()
            durations = [self.watch.seconds(a, b) for a, b in self._marks]
            if len(durations) == len(self.recording.events):
                self.recording.durations.append(durations)
            else:  # data-dependent control flow ran different ops; the run cannot be aligned
                self.recording.dropped_runs += 1
        self._counting = False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        schema_name = func._schema.name
        if schema_name in _PASS_THROUGH:
            return func(*args, **kwargs)
        if not has_formula(func):
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        if self.time_ops:
            start = self.watch.mark()
            out = func(*args, **kwargs)
            self._marks.append((start, self.watch.mark()))
        else:
            out = func(*args, **kwargs)
        if self._counting:
            self.recording.events.append(OpEvent(
                op=op_name(func),
                module=self.modules.current,
                count=op_cost(func, args, kwargs, out),
                bytes=0,
                dtype=_dtype_of(args, out),
                shapes=_shapes((args, kwargs)),
            ))
            event = self.recording.events[-1]
            event.bytes = event.count.bytes if event.count.bytes is not None else op_bytes(func, args, kwargs, out)
        return out


def is_exported_graph(model: torch.nn.Module) -> bool:
    """True for a flat graph whose nodes carry module-hierarchy metadata (torch.export)."""
    return isinstance(model, fx.GraphModule) and any("nn_module_stack" in n.meta for n in model.graph.nodes)


def has_module_hierarchy(model: torch.nn.Module) -> bool:
    """False for a graph whose nodes' `nn_module_stack` name no module but the root (a graph
    re-exported from a flat GraphModule); True otherwise, and for any non-graph module."""
    if not isinstance(model, fx.GraphModule):
        return True
    return any(path not in (ROOT, _EMPTY_STACK)
               for n in model.graph.nodes for path, *_ in (n.meta.get("nn_module_stack") or {}).values())


class _NodeInterpreter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, stack: ModuleStack) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.module_stack = stack

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("call_function", "call_method", "call_module"):
            self.module_stack.set_from_meta(n.meta.get("nn_module_stack"))
        return super().run_node(n)


def _graph_runner(gm: fx.GraphModule, stack: ModuleStack) -> Callable[[tuple[Any, ...], dict[str, Any]], Any]:
    codegen = gm.graph._codegen
    in_spec = getattr(getattr(codegen, "pytree_info", None), "in_spec", None)

    def run(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if in_spec is not None:
            flat = fx_pytree.tree_flatten_spec((args, kwargs), in_spec)
        else:
            flat = [*args, *kwargs.values()]
        out = _NodeInterpreter(gm, stack).run(*flat, enable_io_processing=False)
        return gm.graph.process_outputs(out)

    return run


class _Hooks:
    """Forward pre/post hooks on every submodule that keep `ModuleStack` in step."""

    def __init__(self, model: torch.nn.Module, stack: ModuleStack) -> None:
        self.handles = []
        for path, module in model.named_modules():
            if path == ROOT:
                continue
            type_name = type(module).__name__
            self.handles.append(module.register_forward_pre_hook(
                lambda m, a, p=path, t=type_name: stack.push(p, t)))
            self.handles.append(module.register_forward_hook(
                lambda m, a, o, s=stack: s.pop(), always_call=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def record(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, cuda: bool,
           runs: int, time_ops: bool) -> Recording:
    """Run `model(*args, **kwargs)` `runs` times under the op recorder. The first run is
    counted; every run is timed when `time_ops`. Runs under `torch.inference_mode`."""
    graph = is_exported_graph(model)
    stack = ModuleStack(type(model).__name__)
    recorder = OpRecorder(stack, cuda=cuda, time_ops=time_ops)
    hooks = None if graph else _Hooks(model, stack)
    call = _graph_runner(model, stack) if graph else (lambda a, k: model(*a, **k))  # type: ignore[arg-type]
    try:
        with torch.inference_mode():
            for _ in range(runs):
                stack.stack = []
                recorder.start_run()
                with recorder:
                    call(args, kwargs)
                recorder.end_run()
    finally:
        if hooks is not None:
            hooks.remove()
    recorder.recording.modules = stack.modules
    return recorder.recording


__all__ = ["record", "Recording", "OpEvent", "ModuleInfo", "OpRecorder", "ModuleStack", "is_exported_graph",
           "has_module_hierarchy", "ROOT"]
