"""Small helpers every op file shares: interpreter detection, launch checks, and the host side of
the row kernels (layer_norm, rms_norm, softmax, embedding_layer_norm): tile width, row views,
output buffers and the launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Triton decides at ``@triton.jit`` time whether a kernel is compiled or interpreted, so this
#: flag is read once, when ``kiln_kernels`` is imported, exactly as Triton read it.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)


def check_launchable(*tensors: torch.Tensor | None) -> None:
    """Raise if the Triton path cannot run on these tensors.

    Compiled kernels need CUDA tensors; the interpreter (``TRITON_INTERPRET=1`` set before
    ``triton`` was imported) runs on CPU tensors too.

    Raises:
        RuntimeError: a tensor is on a device the current Triton mode cannot reach, or
            tensors are spread over several devices.
    """
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"tensors on several devices: {sorted(map(str, devices))}")
    if not INTERPRET and any(d.type != "cuda" for d in devices):
        raise RuntimeError(
            "the Triton path needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            "imported to run on CPU; the torch.ops.kiln.* ops run the reference on CPU"
        )


def use_autotune(t: torch.Tensor) -> bool:
    """True when launching real GPU kernels, where the autotuned configs apply. Under the
    interpreter every config computes the same thing, only slower, so one fixed small
    config keeps the CPU test suite fast."""
    return t.is_cuda and not INTERPRET


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    """Raise ``TypeError`` naming the argument and the allowed dtypes if ``t`` is not one."""
    if t.dtype not in allowed:
        raise TypeError(f"{name} has dtype {t.dtype}; allowed: {', '.join(map(str, allowed))}")


FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the references compute in: float32 for half types, float64 stays float64 so the
    tests' oracle runs at full precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand dtype for ``tl.dot`` on inputs of ``dtype``.

    Triton 3.x's interpreter gets bfloat16 ``tl.dot`` and int-to-bfloat16 casts wrong (it
    treats the raw 16-bit patterns as numbers), so under it bf16 operands are widened to fp32,
    which is exact (bf16 is a subset of fp32) and leaves the accumulation unchanged. Compiled
    kernels keep bf16 tensor-core dots.
    """
    if INTERPRET and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[dtype]


def shares_storage(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """True if ``a`` and ``b`` are views of one storage (an in-place call).

    The autotuner launches a kernel once per candidate config; an in-place kernel would then
    apply the op several times, so launchers skip autotuning for aliased calls."""
    if a is None or b is None:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def fixed_row_config(block_n: int, single_tile: bool, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_M, num_warps) for row kernels launched without autotuning.

    On GPU: one row per program and a warp per 256 row elements, up to 16 (the Triton
    layer-norm tutorial's heuristic). Under the interpreter: two rows per program when a row
    fits one tile, so odd row counts exercise the row mask; warps are irrelevant there.
    """
    if on_gpu:
        return 1, min(max(block_n // 256, 1), 16)
    return (2 if single_tile else 1), 4


def prune_row_configs(configs, named_args, **kwargs):  # type: ignore[no-untyped-def]
    """Keep configs whose tile gives every thread 1..64 elements: fewer idles threads, more
    spills registers (64 fp32 per thread is where the Triton layer-norm tutorial's 64 KB row
    limit sits at 16 warps). Several rows per program only on the single-tile path."""
    args = {**named_args, **kwargs}
    kept = [
        c for c in configs
        if 1 <= c.kwargs["BLOCK_M"] * args["BLOCK_N"] // (32 * c.num_warps) <= 64
        and (args["SINGLE_TILE"] or c.kwargs["BLOCK_M"] == 1)
    ]
    return kept or [triton.Config({"BLOCK_M": 1}, num_warps=4)]


# Row kernels (layer_norm, rms_norm, softmax) are bandwidth-bound and use no shared memory, so
# one search space serves Ampere and Hopper: several rows per program pay off at BERT widths
# (384, 768) and attention-score rows, one row with many warps for rows of 8k and more.
ROW_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=nw) for bm in (1, 2, 4, 8, 16) for nw in (1, 2, 4, 8, 16)]


def row_autotune(kernel, key: list[str]):  # type: ignore[no-untyped-def]
    """`triton.autotune` of a row kernel (BLOCK_M rows x BLOCK_N columns per program) over
    ROW_CONFIGS, pruned to tiles that neither idle nor spill threads."""
    return triton.autotune(configs=ROW_CONFIGS, key=key,
                           prune_configs_by={"early_config_prune": prune_row_configs})(kernel)


# A row stays in registers up to 16384 elements: 64 KB of fp32 statistics, 32 values per thread
# at 16 warps (Triton's layer-norm tutorial stops at 64 KB too). ptxas -v for sm_90 (Triton
# 3.9, layer_norm in bf16 with residual): 128 registers, no spills at 16384 x 16 warps. Wider
# rows take the looped path in 4096-element chunks.
MAX_FUSED_N = 16384
LOOP_BLOCK_N = 4096


def row_block_n(n: int) -> int:
    """The column tile of a row kernel for rows of ``n`` elements: the whole row (rounded up to
    a power of two) up to ``MAX_FUSED_N``, else ``LOOP_BLOCK_N``-element chunks."""
    return triton.next_power_of_2(n) if n <= MAX_FUSED_N else LOOP_BLOCK_N


def rows_view(t: torch.Tensor, n: int) -> torch.Tensor:
    """View ``t`` as [rows, n] with unit column stride, copying only if it must."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def check_out(name: str, out: torch.Tensor, like: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``out`` is a contiguous buffer shaped, typed and placed like
    ``like``."""
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, dtype {like.dtype}, "
                         f"device {like.device}; got {tuple(out.shape)}, {out.dtype}, {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def norm_outputs(x: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor | None,
                 residual_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output buffers of a (residual +) norm of ``x``: the caller's, checked, or new ones;
    ``residual_out`` only with a residual."""
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    check_out("out", out, x)
    if residual is not None:
        if residual_out is None:
            residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        check_out("residual_out", residual_out, x)
    return out, residual_out


def launch_rows(kernel, tuned, m: int, args: tuple, meta: dict, like: torch.Tensor,  # type: ignore[no-untyped-def]
                in_place: bool = False) -> None:
    """Launch a row kernel over ``m`` rows: its autotuned form (``row_autotune``) on a GPU,
    unless the call is in place (see ``shares_storage``); else ``kernel`` with
    ``fixed_row_config``. ``meta`` holds the kernel's constexprs, ``BLOCK_N`` and
    ``SINGLE_TILE`` among them."""
    on_gpu = use_autotune(like)
    if on_gpu and not in_place:
        tuned[lambda META: (triton.cdiv(m, META["BLOCK_M"]),)](*args, **meta)
    else:
        block_m, num_warps = fixed_row_config(meta["BLOCK_N"], meta["SINGLE_TILE"], on_gpu)
        kernel[(triton.cdiv(m, block_m),)](*args, **meta, BLOCK_M=block_m, num_warps=num_warps)


@triton.jit
def load_residual_sum(x_ptrs, res_ptrs, res_out_ptrs, mask, HAS_RESIDUAL: tl.constexpr):
    """The row tile a norm normalizes, in fp32: ``x``, or with ``HAS_RESIDUAL`` the sum
    ``x + residual`` rounded to the input dtype (exactly what the unfused
    ``h = x + residual; norm(h)`` computes) and stored to ``res_out_ptrs``, the next residual."""
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptrs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptrs.dtype.element_ty)
        tl.store(res_out_ptrs, x, mask=mask)
    return x.to(tl.float32)
