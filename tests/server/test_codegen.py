"""The stub generator used by setup.py and by `server.proto` on first import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from server.proto import codegen

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_use_the_private_pool_and_package_absolute_imports(tmp_path: Path):
    written = codegen.generate(ROOT / "protos", tmp_path)
    assert sorted(p.name for p in written) == sorted(codegen.stub_names())
    service = (tmp_path / "server" / "proto" / "grpc_service_pb2.py").read_text()
    assert "_kiln_pool.POOL.AddSerializedFile(" in service and "_descriptor_pool.Default()" not in service
    assert "from server.proto import model_config_pb2" in service
    assert not list((tmp_path / "server" / "proto").glob(".*.tmp"))  # staged files were renamed into place


def test_stubs_are_stale_when_missing_or_older_than_a_proto(tmp_path: Path):
    protos = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", protos)
    stubs = tmp_path / "server" / "proto"
    assert codegen.is_stale(protos, stubs)
    codegen.generate(protos, tmp_path)
    assert not codegen.is_stale(protos, stubs)
    later = (stubs / "grpc_service_pb2.py").stat().st_mtime + 10
    os.utime(protos / "model_config.proto", (later, later))
    assert codegen.is_stale(protos, stubs)


def test_a_source_checkout_without_stubs_generates_them_on_first_import(tmp_path: Path):
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "protos", checkout / "protos")
    shutil.copytree(ROOT / "server" / "proto", checkout / "server" / "proto",
                    ignore=shutil.ignore_patterns("*_pb2*.py", "__pycache__"))
    (checkout / "server" / "__init__.py").write_text("")  # the package alone, without its heavy imports
    code = "import server.proto as p; print(p.grpc_service_pb2.ModelInferRequest.DESCRIPTOR.full_name)"
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "inference.ModelInferRequest"
    assert (checkout / "server" / "proto" / "grpc_service_pb2.py").exists()
