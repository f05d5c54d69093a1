"""The server sees engines only through optimize's Engine API (DESIGN.md "Packages")."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parents[2] / "server"
ALLOWED = {"optimize", "optimize.specs", "optimize.errors"}
ALLOWED_NAMES = {"load", "Engine", "OptimizeError"}  # names the server may take from `optimize` itself


def test_server_imports_nothing_from_optimize_but_the_engine_api():
    offenders = []
    for path in sorted(SERVER.rglob("*.py")):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [(node.module, alias.name) for alias in node.names]
            else:
                continue
            for module, name in names:
                if not module.startswith("optimize"):
                    continue
                if module not in ALLOWED or (module == "optimize" and name is not None and name not in ALLOWED_NAMES):
                    offenders.append(f"{path.relative_to(SERVER.parent)}:{node.lineno} imports {module}.{name or ''}")
    assert not offenders, offenders
