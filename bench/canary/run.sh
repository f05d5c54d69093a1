#!/usr/bin/env bash
# The canary (`./kiln canary`): kiln built as a wheel and installed with the newest release of
# every dependency pyproject.toml allows, in a throwaway virtual environment, then smoke-tested
# from a directory outside the repository. It is how we learn of the next upstream break before
# a user does; the lock (requirements.lock) keeps `./kiln demo` and `./kiln test` on versions
# that are known to work meanwhile.
#
# torch stays at the CPU build the bootstrap uses (argument 1, default torch==2.13.0): "newest
# torch" on PyPI is a multi-GB CUDA build, and torch upgrades are their own deliberate step.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TORCH_SPEC=${1:-torch==2.13.0}
say() { printf '\033[1m[canary]\033[0m %s\n' "$*" >&2; }
quiet() { "$@" 2>&1 | { grep -v -E 'is ignored|^\[notice\]' || true; }; return "${PIPESTATUS[0]}"; }

python=python3
for candidate in python3.11 python3.12 python3.13 python3; do
  if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say "throwaway environment in $work"
"$python" -m venv "$work/venv"
PY="$work/venv/bin/python"
quiet "$PY" -m pip install -q --upgrade pip
quiet "$PY" -m pip install -q "$TORCH_SPEC"
echo "$TORCH_SPEC" > "$work/torch.txt"
say "installing kiln (a wheel built from this checkout) with the newest dependencies"
quiet "$PY" -m pip install -q --upgrade --upgrade-strategy eager -c "$work/torch.txt" "$ROOT[dev]"
"$PY" -m pip check
"$PY" -m pip list --format=freeze > "$work/versions.txt"
say "versions: $(grep -i -E '^(torch|transformers|kernels|onnxruntime|onnx|tokenizers|grpcio|protobuf|numpy|triton|openvino)==' "$work/versions.txt" | tr '\n' ' ')"
cd "$work"
HF_HUB_OFFLINE=1 "$PY" "$ROOT/bench/canary/smoke.py" "$ROOT"
