"""Generate the Python stubs of the KServe v2 protocol from `protos/` with grpcio-tools.

Used twice, so both paths produce the same files: by `setup.py` at build time, and by
`server.proto` on first import from a source checkout (when the stubs are missing, older than
the `.proto` files, or were made by a protoc newer than the installed protobuf runtime).
This module must import nothing but the standard library and `grpc_tools`, because setup.py
loads it by path before kiln or its dependencies are installed.

Two choices shape the output:
- `-Iserver/proto=protos` maps the sources to the virtual path of the package, so the
  generated `grpc_service_pb2` imports `server.proto.model_config_pb2` (package-absolute)
  without rewriting import lines.
- The stubs register their descriptors in kiln's private pool (`server/proto/pool.py`)
  instead of protobuf's process-wide default pool. tritonclient registers the same
  `inference.*` symbols from its own `grpc_service.proto`, and the default pool refuses a
  second file defining them ("duplicate symbol 'inference.ServerLiveRequest'", the known
  clash of every KServe v2 implementation with tritonclient: kserve/kserve#3099,
  triton-inference-server/client#730). With a private pool, the server and tritonclient can
  share a process — the tests do, and so can a user's application. protoc has no option
  for this, so one generated line is rewritten, and generation fails loudly if that line
  ever changes shape.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

PROTO_FILES = ("model_config.proto", "grpc_service.proto")
PACKAGE_PATH = "server/proto"  # where the stubs live, relative to the directory holding `server/`

_DEFAULT_POOL_LINE = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL_LINE = "DESCRIPTOR = _kiln_pool.POOL.AddSerializedFile("
_IMPORTS_END = "# @@protoc_insertion_point(imports)\n"
_PRIVATE_POOL_IMPORT = "from server.proto import pool as _kiln_pool\n"


class CodegenError(RuntimeError):
    """protoc failed, or produced code this generator does not know how to adapt."""


def stub_names() -> list[str]:
    """File names of the generated modules, relative to the stub directory."""
    names = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        names += [f"{stem}_pb2.py", f"{stem}_pb2_grpc.py"]
    return names


def is_stale(proto_dir: Path, stub_dir: Path) -> bool:
    """True when a stub is missing or older than a `.proto` source or this generator."""
    sources = [Path(proto_dir) / p for p in PROTO_FILES] + [Path(__file__)]
    newest_source = max(p.stat().st_mtime for p in sources if p.exists())
    for name in stub_names():
        stub = Path(stub_dir) / name
        if not stub.exists() or stub.stat().st_mtime < newest_source:
            return True
    return False


def _use_private_pool(code: str, path: str) -> str:
    if code.count(_DEFAULT_POOL_LINE) != 1 or code.count(_IMPORTS_END) != 1:
        raise CodegenError(
            f"unexpected protoc output in {path}: cannot move its descriptors to kiln's private pool "
            "(grpcio-tools changed its generated code; update server/proto/codegen.py)"
        )
    code = code.replace(_DEFAULT_POOL_LINE, _PRIVATE_POOL_LINE)
    return code.replace(_IMPORTS_END, _IMPORTS_END + _PRIVATE_POOL_IMPORT)


def generate(proto_dir: Path, package_root: Path) -> list[Path]:
    """Generate `*_pb2.py` and `*_pb2_grpc.py` for every file in `PROTO_FILES`.

    `proto_dir` holds the `.proto` sources; the stubs are written to
    `package_root / "server/proto"`. Files are generated in a temporary directory and moved
    into place one by one (atomically), so concurrent generators never expose a half-written
    module. Returns the written paths. Raises `CodegenError` when protoc fails and
    `ImportError` when grpcio-tools is not installed.
    """
    from grpc_tools import protoc  # imported here: only generation needs it

    proto_dir = Path(proto_dir).resolve()
    stub_dir = Path(package_root).resolve() / PACKAGE_PATH
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")  # well-known types
    with tempfile.TemporaryDirectory(prefix="kiln-protoc-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PACKAGE_PATH}={proto_dir}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(f"{PACKAGE_PATH}/{name}" for name in PROTO_FILES),
        ]
        if protoc.main(args) != 0:
            raise CodegenError(f"protoc failed on {proto_dir} (see its messages above)")
        written = []
        stub_dir.mkdir(parents=True, exist_ok=True)
        for name in stub_names():
            generated = Path(tmp) / PACKAGE_PATH / name
            code = generated.read_text()
            if name.endswith("_pb2.py"):
                code = _use_private_pool(code, name)
            target = stub_dir / name
            staged = stub_dir / f".{name}.{os.getpid()}.tmp"  # same filesystem, so the rename is atomic
            staged.write_text(code)
            os.replace(staged, target)
            written.append(target)
    return written


if __name__ == "__main__":  # python server/proto/codegen.py: regenerate in a source checkout
    root = Path(__file__).resolve().parents[2]
    for path in generate(root / "protos", root):
        print(path.relative_to(root))
    sys.exit(0)
