"""Saving a captured program as graph (`program.pt2`) + weights (`weights.safetensors`), and
reading program archives without running anything they carry.

`torch.export.save` would embed the weights in the archive; kiln keeps them in safetensors so
every engine's weights are inspectable, mmap-able and never unpickled. The archive is written
with weights replaced by meta tensors (a few KB of graph) and the real ones are put back on load.

`torch.export.load` is not safe on an archive someone else wrote: it unpickles (with
`weights_only=False`) every weight or constant its JSON configs mark `use_pickle`, custom and
opaque objects, legacy `.pt` weight files and the example inputs; it evaluates every symbolic
shape (`expr_str`) of the graph with `sympy.sympify`, i.e. Python `eval`; and `.module()` turns
the graph's `guards_code` into Python with `exec`. So `read_archive` opens the zip first and
refuses, naming the entry, anything but what a kiln-written archive holds:

    <root>/archive_format, archive_version, byteorder, .data/version, .data/serialization_id
    <root>/models/<name>.json                        the graph: JSON, no guards_code, every
                                                     expr_str a plain sympy expression
    <root>/data/weights/<name>_weights_config.json    JSON, every entry use_pickle false
    <root>/data/constants/<name>_constants_config.json   JSON, tensors only, use_pickle false
    <root>/data/weights/weight_<n>, data/constants/tensor_<n>   raw tensor bytes
    <root>/data/sample_inputs/<name>.pt              empty (a pickle when not)

and hands torch the very bytes it checked. Graph node targets are left to torch's own verifier,
which admits operators only (tested: a node calling `os.system` is refused).
"""

from __future__ import annotations

import ast
import functools
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any
import inspect

import torch
from safetensors.torch import load_file, save_file
from torch.export import ExportedProgram
import sympy
import torch.utils._sympy.functions as functions

from optimize.runtime.errors import EngineError, OptimizeError

PROGRAM_FILE = "program.pt2"
WEIGHTS_FILE = "weights.safetensors"
_CONSTANT_PREFIX = "__constant__."

_TEXT_ENTRIES = frozenset({"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"})
_GRAPH = re.compile(r"models/[\w.-]+\.json")
_CONFIG = re.compile(r"data/(?:weights/[\w.-]+_weights|constants/[\w.-]+_constants)_config\.json")
_RAW = re.compile(r"data/(?:weights/weight|constants/tensor)_\d+")
_SAMPLE_INPUTS = re.compile(r"data/sample_inputs/[\w.-]+\.pt")
_PICKLE_START = re.compile(rb"\x80[\x02-\x05]")  # PROTO opcode of pickle protocols 2-5
_ZIP_START = b"PK\x03\x04"  # torch.save's format: a zip holding data.pkl


def _on_meta(value: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(value, device="meta")
    return torch.nn.Parameter(meta, requires_grad=False) if isinstance(value, torch.nn.Parameter) else meta


def save_program(program: ExportedProgram, directory: Path, file: str = PROGRAM_FILE,
                 weights: bool = True) -> list[str]:
    """Write `file` (graph only) and, with `weights`, `weights.safetensors`; return the file
    names written. A second program of the same weights (a triton engine's packed entry) is
    saved with `weights=False`: it reads the first one's."""
    if weights:
        tensors: dict[str, torch.Tensor] = {}
        for name, value in program.state_dict.items():
            tensors[name] = value.detach().contiguous().clone()
        for name, value in program.constants.items():
            if isinstance(value, torch.Tensor):
                tensors[_CONSTANT_PREFIX + name] = value.detach().contiguous().clone()
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "kiln-program-weights"})

    real_state = dict(program.state_dict)
    real_constants = dict(program.constants)
    # The archive would also torch.save (pickle) the example inputs; they are not needed.
    examples = program._example_inputs
    program._example_inputs = None
    try:
        for name, value in real_state.items():
            program.state_dict[name] = _on_meta(value)
        for name, value in real_constants.items():
            if isinstance(value, torch.Tensor):
                program.constants[name] = _on_meta(value)
        torch.export.save(program, str(directory / file))
    finally:
        program._example_inputs = examples
        program.state_dict.update(real_state)
        program.constants.update(real_constants)
    return [file, WEIGHTS_FILE] if weights else [file]


def load_weights(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of `weights.safetensors`, on `device` (for `load_program`)."""
    return load_file(str(Path(directory) / WEIGHTS_FILE), device=str(device))


def load_program(directory: Path, device: str | torch.device = "cpu", file: str = PROGRAM_FILE,
                 weights: dict[str, torch.Tensor] | None = None) -> ExportedProgram:
    """Read back what `save_program` wrote, with weights on `device`; pass `weights`
    (`load_weights`) to give two programs of one directory the same tensors. Raises
    `EngineError` when `file` carries anything `read_archive` refuses or lacks a weight."""
    program = read_archive(Path(directory) / file)
    if weights is None:
        weights = load_weights(directory, device)
    # a name is a weight of one program and a constant of another (a buffer the packed entry
    # reads): look both up by the bare name
    tensors = {name.removeprefix(_CONSTANT_PREFIX): value for name, value in weights.items()}
    for name, current in program.state_dict.items():
        if name not in tensors:
            raise EngineError(f"{Path(directory) / file}: weight {name} is not in {WEIGHTS_FILE}")
        value = tensors[name]
        program.state_dict[name] = (torch.nn.Parameter(value, requires_grad=False)
                                    if isinstance(current, torch.nn.Parameter) else value)
    for name in program.constants:
        if name in tensors:
            program.constants[name] = tensors[name]
    return program


def read_archive(path: Path, *, error: type[OptimizeError] = EngineError,
                 drop_sample_inputs: bool = False) -> ExportedProgram:
    """`torch.export.load` of `path` once the archive is found to carry nothing that loading
    would unpickle or evaluate (see the module docstring). `drop_sample_inputs` blanks pickled
    example inputs instead of refusing them (every `torch.export.save` writes them; kiln never
    reads them). Raises `error` with one line naming the file and the entry."""
    data = Path(path).read_bytes()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except zipfile.BadZipFile:
        raise error(f"{path}: not a torch.export program (not a zip archive)") from None
    blank: list[str] = []
    for name in names:
        why = _refusal(archive, name, names[0].split("/", 1)[0])
        if why == "sample inputs" and drop_sample_inputs:
            blank.append(name)
        elif why:
            raise error(f"{path}: entry {name} {why}; kiln never unpickles or evaluates what an archive carries")
    if blank:
        data = _rewrite(archive, {name: b"" for name in blank})
    return torch.export.load(io.BytesIO(data))


def _refusal(archive: zipfile.ZipFile, name: str, root: str) -> str | None:
    """Why loading entry `name` could run code ("sample inputs" for non-empty example inputs),
    or None when it is one of the entries kiln writes, in the form kiln writes it."""
    if not name.startswith(root + "/"):
        return f"lies outside the archive's root folder {root}/"
    rel = name[len(root) + 1:]
    if _RAW.fullmatch(rel):
        return None  # read as raw bytes; whether they are unpickled is up to the configs, checked below
    size = archive.getinfo(name).file_size
    if _SAMPLE_INPUTS.fullmatch(rel):
        return "sample inputs" if size else None
    if rel not in _TEXT_ENTRIES and not _GRAPH.fullmatch(rel) and not _CONFIG.fullmatch(rel):
        return "is not part of a kiln program (only a graph, JSON configs and raw tensors are read)"
    content = archive.read(name)
    if _PICKLE_START.match(content) or content.startswith(_ZIP_START):
        return "holds pickle data"
    if rel in _TEXT_ENTRIES:
        return None
    try:
        document = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "is not valid JSON"
    if _CONFIG.fullmatch(rel):
        return _payload_refusal(document, weights=rel.startswith("data/weights/"))
    return _graph_refusal(document)


def _payload_refusal(config: Any, *, weights: bool) -> str | None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        return "is not a payload config"
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            return f"marks {'weight' if weights else 'constant'} {fqn!r} as pickled"
        if not _RAW.fullmatch(f"data/{'weights' if weights else 'constants'}/{meta.get('path_name')}"):
            kind = "an object (custom objects are pickled)" if not weights else "a file that is not a raw tensor"
            return f"stores {'weight' if weights else 'constant'} {fqn!r} as {kind}"
    return None


def _graph_refusal(graph: Any) -> str | None:
    if not isinstance(graph, dict):
        return "is not a graph"
    guards = graph.get("guards_code") or []
    for guard in guards if isinstance(guards, list) else [guards]:
        if not isinstance(guard, str) or not _plain_guard(guard):
            return f"has a guard that is not a plain shape comparison (torch would exec it): {str(guard)[:80]!r}"
    for expr in _values_of(graph, "expr_str"):
        if not isinstance(expr, str) or not _plain_sympy(expr):
            return f"has a symbolic shape that is not a plain sympy expression: {str(expr)[:80]!r}"
    return None


def _values_of(node: Any, key: str) -> list[Any]:
    """Every value stored under `key` anywhere in a JSON document."""
    found, stack = [], [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.extend(v for k, v in item.items() if k == key)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


# Shape expressions are written with sympy's srepr: Mul(Integer(4), Symbol('s23', positive=True,
# integer=True)). torch evaluates them with sympify (Python eval), so only calls of these sympy
# and torch.utils._sympy classes are admitted, over numbers, symbol names and booleans: no
# attribute, subscript, lambda or other call, and no string that sympify would evaluate again.
_SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor", "ceiling",
    "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "ExprCondPair", "Tuple",
})
_SYMPY_NAMES = frozenset({"true", "false", "True", "False", "oo", "zoo", "nan"})
_SYMBOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_NUMBER_TEXT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not,
              ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


@functools.cache
def _torch_sympy_classes() -> frozenset[str]:

    return frozenset(n for n, o in vars(functions).items()
                     if inspect.isclass(o) and issubclass(o, sympy.Basic) and not n.startswith("_"))


def _plain_sympy(text: str) -> bool:
    """True when `text` is a sympy expression built only from the admitted calls and names."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    calls = _SYMPY_CALLS | _torch_sympy_classes()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in calls):
                return False
        elif isinstance(node, ast.Name):
            if node.id not in calls and node.id not in _SYMPY_NAMES and not _SYMBOL_NAME.fullmatch(node.id):
                return False
        elif isinstance(node, ast.keyword):
            if node.arg is None or not node.arg.isalpha():
                return False
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str) and not (_SYMBOL_NAME.fullmatch(value) or _NUMBER_TEXT.fullmatch(value)):
                return False
            if not isinstance(value, (str, int, float, bool)):
                return False
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Load,
                                   *_OPERATORS)):
            return False
    return True


# Guards are Python that `.module()` compiles with exec (only when the archive has example inputs,
# which kiln refuses or drops, but they are checked all the same): comparisons and arithmetic
# over input sizes, e.g. L['attention_mask'].size()[0] == L['input_ids'].size()[0].
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_GUARD_FUNCTIONS = frozenset({"max", "min", "abs"})
_INPUT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _plain_guard(text: str) -> bool:
    """True when `text` only compares and combines numbers and the sizes of inputs `L[...]`."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    callees = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            method = isinstance(node.func, ast.Attribute) and node.func.attr in _GUARD_METHODS
            function = isinstance(node.func, ast.Name) and node.func.id in _GUARD_FUNCTIONS
            if not (method or function) or node.keywords or (method and node.args):
                return False
        elif isinstance(node, ast.Attribute):
            if id(node) not in callees or node.attr not in _GUARD_METHODS:
                return False
        elif isinstance(node, ast.Name):
            if node.id != "L" and not (id(node) in callees and node.id in _GUARD_FUNCTIONS):
                return False
        elif isinstance(node, ast.Subscript):
            key = node.slice
            if not isinstance(key, ast.Constant) or isinstance(key.value, bool):
                return False
            if isinstance(key.value, str) and not (isinstance(node.value, ast.Name) and _INPUT_NAME.fullmatch(key.value)):
                return False
            if not isinstance(key.value, (str, int)):
                return False
        elif isinstance(node, ast.Constant):  # strings stay names: torch pastes the guard into a "..." literal
            if isinstance(node.value, str) and not _INPUT_NAME.fullmatch(node.value):
                return False
            if not isinstance(node.value, (str, int, float, bool)):
                return False
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Load,
                                   *_OPERATORS)):
            return False
    return True


def _rewrite(archive: zipfile.ZipFile, replace: dict[str, bytes]) -> bytes:
    """The archive's bytes with the entries of `replace` given new contents."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in archive.infolist():
            target.writestr(info.filename, replace.get(info.filename, archive.read(info.filename)))
    return out.getvalue()
