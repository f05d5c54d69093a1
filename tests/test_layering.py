"""The house rules of imports, checked over every Python file in the repository (ARCHITECTURE.md,
"Packages and their imports"), and the rule that made them necessary: kiln's kernel library is
`kiln_kernels`, so Hugging Face's `kernels` (which transformers imports) is never shadowed."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = {"kiln_kernels": ROOT / "kernels" / "kiln_kernels", "optimize": ROOT / "optimize", "server": ROOT / "server"}
# The engine runtime: all that loading and running an engine needs. It imports nothing else of
# optimize, and it is all of optimize that the server imports.
RUNTIME = "optimize.runtime"
# The one test that puts a path on PYTHONPATH does so for a copy of the sources in a temporary
# directory, to prove a bare checkout generates its gRPC stubs.
PYTHONPATH_ALLOWED = {"tests/server/test_codegen.py", "tests/test_layering.py"}


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str  # the imported module, absolute
    name: str | None  # for `from module import name`

    def __str__(self) -> str:
        what = f"{self.module}.{self.name}" if self.name else self.module
        return f"{self.path.relative_to(ROOT)}:{self.line} imports {what}"


def python_files() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=False)
    if tracked.returncode == 0 and tracked.stdout.strip():
        paths = [ROOT / line for line in tracked.stdout.splitlines()]
    else:  # not a git checkout (an unpacked sdist): every file but the virtual environment's
        paths = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts]
    return [p for p in paths if p.is_file() and not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]


def imports_of(path: Path) -> list[Import]:
    """Every import in `path`: module level, function-local and `TYPE_CHECKING` alike, relative
    ones made absolute, and `importlib.import_module("...")` calls with a literal name."""
    found = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            found += [Import(path, node.lineno, base, alias.name) for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append(Import(path, node.lineno, arg.value, None))
    return found


def module_name(path: Path) -> str:
    """`optimize/runtime/engine.py` -> `optimize.runtime.engine` (packages by their folder)."""
    for name, folder in PRODUCT.items():
        if folder in path.parents:
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return str(path.relative_to(ROOT).with_suffix("")).replace(os.sep, ".")


def top(module: str) -> str:
    return module.split(".", 1)[0]


ALL = {path: imports_of(path) for path in python_files()}


def package_of(path: Path) -> str | None:
    for name, folder in PRODUCT.items():
        if folder in path.parents:
            return name
    return None


def offenders(rule) -> list[str]:  # type: ignore[no-untyped-def]
    return [str(imp) for path, imps in ALL.items() for imp in imps if rule(package_of(path), imp)]


def test_the_walk_sees_every_package():
    assert {package_of(p) for p in ALL} >= set(PRODUCT), "the layering rules would check nothing"
    assert len(ALL) > 100


# The canary imports Hugging Face's `kernels` on purpose, to check it is the one installed.
HF_KERNELS_CHECKERS = {ROOT / "bench" / "canary" / "smoke.py"}


def test_nobody_imports_a_top_level_kernels_package():
    """`kernels` is Hugging Face's; kiln's kernel library is `kiln_kernels`."""
    assert offenders(lambda _, imp: top(imp.module) == "kernels" and imp.path not in HF_KERNELS_CHECKERS) == []


def test_kernels_import_neither_optimize_nor_server():
    assert offenders(lambda pkg, imp: pkg == "kiln_kernels" and top(imp.module) in ("optimize", "server")) == []


def test_optimize_never_imports_server():
    assert offenders(lambda pkg, imp: pkg == "optimize" and top(imp.module) == "server") == []


def target_of(imp: Import) -> str:
    """The module an import names: `from optimize import runtime` is `optimize.runtime`."""
    if imp.name is not None and f"{imp.module}.{imp.name}" in MODULES:
        return f"{imp.module}.{imp.name}"
    return imp.module


def in_runtime(module: str) -> bool:
    return module == RUNTIME or module.startswith(RUNTIME + ".")


def test_server_imports_only_the_runtime_of_optimize():
    """The server serves engines; it never needs (nor loads) the compiler."""
    assert offenders(lambda pkg, imp: pkg == "server" and top(imp.module) == "optimize"
                     and not in_runtime(target_of(imp))) == []


def test_the_runtime_imports_nothing_of_the_build_side():
    def breaks(pkg: str | None, imp: Import) -> bool:
        return (pkg == "optimize" and in_runtime(module_name(imp.path)) and top(imp.module) == "optimize"
                and not in_runtime(target_of(imp)))

    assert offenders(breaks) == []


# ---- no import cycles -----------------------------------------------------------------------
MODULES = {module_name(path): path for path in ALL if package_of(path) is not None}


def import_graph() -> dict[str, set[str]]:
    """Product module -> the product modules it imports anywhere in its text (module level,
    function-local, `TYPE_CHECKING`). A package's `__init__` running before its submodules is
    Python's order, not an import of the submodule's, so only named imports make edges."""
    def resolve(name: str) -> str | None:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = {resolve(target_of(imp)) for imp in ALL[path]}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (its modules in order, the first repeated at the end), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycles_in_the_product_packages():
    graph = import_graph()
    assert {"optimize.runtime.engine", "optimize.build", "server.service"} <= set(graph), "the graph missed modules"
    assert find_cycle(graph) == []


def function_local_imports(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every import inside a function body."""
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import | ast.ImportFrom):
                    found.append((sub.lineno, lines[sub.lineno - 1]))
    return sorted(set(found))


def test_function_local_imports_say_why():
    """An import inside a function hides a dependency from the reader and from this file's
    checks; it is kept only for an optional dependency or a measured import cost, and says
    which in a comment on its line or above its group of imports (`# why: ...`)."""
    missing = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        for line, text in function_local_imports(path):
            above = line - 2
            while above >= 0 and lines[above].strip().startswith(("import ", "from ")):
                above -= 1
            if "#" not in text and not (above >= 0 and lines[above].strip().startswith("#")):
                missing.append(f"{path.relative_to(ROOT)}:{line}: {text.strip()}")
    assert missing == []


def test_product_code_never_imports_bench_or_tests():
    assert offenders(lambda pkg, imp: pkg is not None and top(imp.module) in ("bench", "tests", "examples")) == []


def test_no_module_imports_a_conftest():
    """Shared test and bench helpers live in plain modules; a conftest is pytest's to import."""
    assert offenders(lambda _, imp: imp.module.split(".")[-1] == "conftest" or imp.name == "conftest") == []


def test_nothing_puts_the_repository_on_sys_path():
    """No `sys.path.insert/append`, no `PYTHONPATH` set for a subprocess: kiln is installed, and
    a module that only imports with the checkout on the path would break for users."""
    found = []
    for path in ALL:
        rel = str(path.relative_to(ROOT))
        if rel in PYTHONPATH_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value == "PYTHONPATH":
                found.append(f"{rel}:{node.lineno} sets PYTHONPATH")
            elif (isinstance(node, ast.Attribute) and node.attr in ("insert", "append", "extend")
                  and ast.unparse(node.value) == "sys.path"):
                found.append(f"{rel}:{node.lineno} changes sys.path")
    assert found == []


# ---- the shadowing that broke installs ------------------------------------------------------
_PROBE = """
import pathlib, sys
import kernels
import torch
import transformers
from transformers import BertConfig, BertModel
import kiln_kernels
root = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(kernels.__file__).resolve()
assert root / "kernels" not in where.parents, f"`import kernels` found kiln's folder: {where}"
assert hasattr(kernels, "get_kernel"), f"`kernels` is not Hugging Face's package: {where}"
BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
assert hasattr(torch.ops.kiln, "layer_norm") and hasattr(torch.ops.kiln, "attention")
print("ok")
"""


@pytest.mark.parametrize("where", ["repository root", "another directory"])
def test_hugging_face_kernels_and_transformers_import_beside_kiln_kernels(where: str, tmp_path: Path):
    pytest.importorskip("kernels", reason="Hugging Face's kernels is installed with transformers >= 5.25")
    cwd = ROOT if where == "repository root" else tmp_path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.slow
def test_the_wheel_installs_kiln_kernels_and_no_top_level_kernels(tmp_path: Path):
    """A wheel that shipped `kernels/__init__.py` would overwrite Hugging Face's package on
    install and delete it on uninstall."""
    env = {**os.environ, "KILN_SKIP_CUDA": "1"}  # the extension's name is checked in setup, not built here
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("kiln-*.whl")
    import zipfile

    tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist() if "/" in name}
    packages = {t for t in tops if not t.endswith((".dist-info", ".data"))}
    assert packages == {"kiln_kernels", "optimize", "server"}, packages


# The documents the project was first designed from live outside the repository; the code may
# only point at documents inside it (ARCHITECTURE.md, server/README.md, ...).
_OUTSIDE_DOCUMENTS = ("FIELD" + "_NOTES", "DESIGN" + ".md", "STYLE" + ".md", "../" + "shared")


def test_comments_cite_only_documents_in_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    found = []
    for rel in tracked.stdout.splitlines():
        path = ROOT / rel
        if path.suffix not in (".py", ".md", ".toml", ".sh", ".cu", ".cuh", ".h", ".cpp", ".proto", ".txt", ".lock"):
            continue
        text = path.read_text(errors="replace")
        found += [f"{rel}: {name}" for name in _OUTSIDE_DOCUMENTS if name in text]
    assert found == []
    assert (ROOT / "ARCHITECTURE.md").is_file()
