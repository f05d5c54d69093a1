"""Every kernel compiles for Ampere (sm_80) and Hopper (sm_90) — checked without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler, so a construct the compiler
rejects (a non-power-of-two arange, mismatched types across branches, a bad dot operand) would
pass CI and fail on the first GPU. Triton compiles to PTX and cubin ahead of time for any
target with its bundled ptxas; this does that in a subprocess, where TRITON_INTERPRET is unset
so ``@triton.jit`` yields compilable kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent(
    """
    import importlib
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_for(fn, ptrs, constexprs, floats=(), ccs=(80, 90), num_warps=4, num_stages=3):
        sig = {}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in ptrs:
                sig[name] = "*" + ptrs[name]
            else:
                sig[name] = "fp32" if name in floats else "i32"
        for cc in ccs:
            src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
            opts = {"num_warps": num_warps, "num_stages": num_stages}
            triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)

    m = {n: importlib.import_module("kiln_kernels." + n) for n in (
        "layer_norm", "rms_norm", "softmax", "bias_gelu", "rotary_embedding",
        "embedding_layer_norm", "int8_weight_linear", "attention")}
    bf = "bf16"
    for single in (True, False):
        compile_for(m["layer_norm"]._layer_norm_fwd_kernel,
                    dict(X=bf, RES=bf, W=bf, B=bf, Y=bf, RES_OUT=bf),
                    dict(HAS_RESIDUAL=True, HAS_BIAS=True, BLOCK_M=4 if single else 1,
                         BLOCK_N=1024, SINGLE_TILE=single), floats=("eps",))
        compile_for(m["rms_norm"]._rms_norm_fwd_kernel, dict(X=bf, RES=bf, W=bf, Y=bf, RES_OUT=bf),
                    dict(HAS_RESIDUAL=True, BLOCK_M=1, BLOCK_N=1024, SINGLE_TILE=single),
                    floats=("eps",), ccs=(90,))
        compile_for(m["softmax"]._softmax_fwd_kernel, dict(X=bf, MASK=bf, Y=bf),
                    dict(HAS_MASK=True, BLOCK_M=1, BLOCK_N=1024, SINGLE_TILE=single), ccs=(90,))
        compile_for(m["embedding_layer_norm"]._embedding_layer_norm_kernel,
                    dict(IDS="i64", POS_IDS="i64", TYPE_IDS="i64", WORD=bf, POS_EMB=bf, TYPE_EMB=bf,
                         W=bf, B=bf, Y=bf),
                    dict(HAS_POS=True, HAS_POS_IDS=single, HAS_TYPE=True, HAS_TYPE_IDS=True,
                         HAS_BIAS=True, BLOCK_M=1, BLOCK_N=1024, SINGLE_TILE=single),
                    floats=("eps",), ccs=(90,))
    compile_for(m["bias_gelu"]._bias_gelu_kernel, dict(X=bf, BIAS=bf, Y=bf),
                dict(HAS_BIAS=True, APPROX="tanh", BLOCK=2048), ccs=(90,))
    compile_for(m["rotary_embedding"]._rotary_kernel,
                dict(Q=bf, K=bf, COS="fp32", SIN="fp32", POS="i64", Q_OUT=bf, K_OUT=bf),
                dict(HALF=32, INTERLEAVED=True, BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=32, BLOCK_PASS=16),
                ccs=(90,))
    il = m["int8_weight_linear"]
    for split in (1, 4):
        compile_for(il._int8_linear_kernel,
                    dict(X="fp16", W="i8", SCALE="fp32", BIAS="fp16", Y="fp16", WS="fp32"),
                    dict(HAS_BIAS=True, ACTIVATION="gelu", DOT_DTYPE=tl.float16, DOT_PRECISION="tf32",
                         SPLIT_K=split, BLOCK_M=16 if split > 1 else 128, BLOCK_N=64,
                         BLOCK_K=128 if split > 1 else 64, GROUP_M=8))
    compile_for(il._int8_linear_reduce_kernel, dict(WS="fp32", SCALE="fp32", BIAS="fp16", Y="fp16"),
                dict(HAS_BIAS=True, ACTIVATION="gelu_tanh", SPLIT_K=4, BLOCK_M=16, BLOCK_N=128), ccs=(90,))
    at = m["attention"]
    for varlen, causal, mask, d in ((False, True, True, 80), (True, True, False, 128)):
        bd = triton.next_power_of_2(d)
        compile_for(at._attention_fwd_kernel,
                    dict(Q=bf, K=bf, V=bf, O=bf, KEY_MASK="u8", CU_Q="i32", CU_K="i32"),
                    dict(HEAD_DIM=d, VARLEN=varlen, CAUSAL=causal, HAS_KEY_MASK=mask, PAD_D=bd != d,
                         DOT_DTYPE=tl.bfloat16, DOT_PRECISION="tf32", BLOCK_M=128, BLOCK_N=64, BLOCK_D=bd),
                    floats=("qk_scale",), num_warps=8)
    print("compiled")
    """
)


@pytest.mark.slow
def test_every_kernel_compiles_for_ampere_and_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from cache
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns until the default is chosen
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=_REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
