"""FLOP formulas for ops at dispatch level (`aten::*` and kiln's `kiln::*` custom ops).

Like `torch.utils.flop_counter`, counts follow 2·M·N·K per matrix product (see
`records.FLOP_CONVENTION`); unlike it, scaled-dot-product attention is counted on every
device and backend (FlopCounterMode counts 0 on CPU, pytorch#195460), causal attention counts
only the visible pairs, `kiln::*` ops use the kernels' own cost models, elementwise work is
reported separately as vector FLOPs, and an op without a formula is reported as uncounted
rather than as zero (fvcore#143).

`op_cost(func, args, kwargs, out)` is the single entry point; `has_formula(func)` tells the
dispatch mode whether to count an op as one or let a composite op decompose first.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from optimize.profile.bytes import numel


@dataclass(frozen=True)
class Count:
    """The work of one op call. `bytes` is set only when a cost model knows the op's minimum
    traffic better than the generic rule in `bytes.py` (kernels' cost models do)."""

    flops: int = 0
    vector_flops: int = 0
    kind: str = "data"
    counted: bool = True
    reason: str = ""
    bytes: int | None = None


Formula = Callable[[dict[str, Any], Any], Count]
_FORMULAS: dict[str, Formula] = {}


def _register(*names: str) -> Callable[[Formula], Formula]:
    def wrap(fn: Formula) -> Formula:
        for name in names:
            _FORMULAS[f"aten::{name}"] = fn
        return fn

    return wrap


def bind(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The op's arguments by schema name, defaults filled in."""
    bound: dict[str, Any] = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _schema_name(func: torch._ops.OpOverload) -> str:
    """`aten::add` for aten.add.Tensor, aten.add_.Tensor and aten.add.out alike."""
    name = func._schema.name
    namespace, _, op = name.partition("::")
    if op.endswith("_") and not op.endswith("__"):
        op = op[:-1]
    return f"{namespace}::{op}"


# ------------------------------------------------------------------------------------------
# Matrix products: 2·M·N·K, the bias / beta·C add of addmm-like ops as vector FLOPs.
# ------------------------------------------------------------------------------------------
def _product(out: torch.Tensor, k: int, bias: Any = None) -> Count:
    """Any product whose output element is a length-k dot product: 2·numel(out)·k."""
    n = numel(out)
    return Count(flops=2 * n * k, vector_flops=n if isinstance(bias, torch.Tensor) else 0, kind="matmul")


@_register("mm", "bmm", "matmul", "_int_mm", "dot", "vdot", "mv")
def _mm(a: dict[str, Any], out: Any) -> Count:
    first = a.get("self", a.get("input"))
    return _product(out, first.shape[-1])


@_register("addmm", "baddbmm", "addmv", "addbmm")
def _addmm(a: dict[str, Any], out: Any) -> Count:
    k = a["mat1"].shape[-1] if "mat1" in a else a["batch1"].shape[-1] if "batch1" in a else a["mat"].shape[-1]
    count = _product(out, k, a["self"])
    if "batch1" in a and out.dim() == 2:  # addbmm sums over the batch too
        count = Count(flops=2 * numel(a["batch1"]) * a["batch2"].shape[-1], vector_flops=count.vector_flops, kind="matmul")
    return count


@_register("linear")
def _linear(a: dict[str, Any], out: Any) -> Count:
    return _product(out, a["weight"].shape[-1], a.get("bias"))


@_register("_scaled_mm")
def _scaled_mm(a: dict[str, Any], out: Any) -> Count:
    return _product(out, a["self"].shape[-1], a.get("bias"))


@_register("convolution", "_convolution")
def _convolution(a: dict[str, Any], out: Any) -> Count:
    weight, transposed = a["weight"], bool(a.get("transposed", False))
    kernel = math.prod(weight.shape[2:])
    # forward: each output element is a dot product over (C_in / groups) · kernel inputs;
    # transposed: each input element is scattered to (C_out / groups) · kernel outputs.
    macs = numel(a["input"]) * weight.shape[1] * kernel if transposed else numel(out) * weight.shape[1] * kernel
    bias = a.get("bias")
    return Count(flops=2 * macs, vector_flops=numel(out) if isinstance(bias, torch.Tensor) else 0, kind="conv")


# ------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------
def visible_pairs(seq_q: int, seq_k: int, causal: bool) -> int:
    """(query, key) pairs attended. PyTorch's `is_causal` aligns the mask top-left (query i
    sees keys 0..i), so the count is sum over i < seq_q of min(i + 1, seq_k)."""
    if not causal:
        return seq_q * seq_k
    if seq_q <= seq_k:
        return seq_q * (seq_q + 1) // 2
    return seq_k * (seq_k + 1) // 2 + (seq_q - seq_k) * seq_k


def attention_count(heads: int, seq_q: int, seq_k: int, head_dim: int, value_dim: int, causal: bool,
                    masked: bool = False) -> Count:
    """QKᵀ and PV over `heads` (batch × heads) heads: 2·pairs·D + 2·pairs·Dv each. Softmax (max,
    subtract, exp, sum, divide) and the scale, plus a mask add, go to vector FLOPs. A dense mask
    does not reduce the count: kernels compute the masked pairs; `is_causal` lets them skip
    whole blocks, so it does."""
    pairs = visible_pairs(seq_q, seq_k, causal)
    return Count(flops=2 * heads * pairs * (head_dim + value_dim), vector_flops=heads * pairs * (6 + int(masked)),
                 kind="attention")


@_register(
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)
def _sdpa(a: dict[str, Any], out: Any) -> Count:
    q, k, v = a["query"], a["key"], a["value"]  # [..., heads, seq, dim]
    mask = a.get("attn_mask", a.get("attn_bias"))
    return attention_count(math.prod(q.shape[:-2]), q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1],
                           bool(a.get("is_causal", False)), isinstance(mask, torch.Tensor))


@_register("_native_multi_head_attention")
def _native_mha(a: dict[str, Any], out: Any) -> Count:
    """nn.MultiheadAttention's inference fast path ([batch, seq, embed] in): the q, k, v and
    out projections plus attention over all heads (heads · head_dim = embed)."""
    q, k, v, e, heads = a["query"], a["key"], a["value"], a["embed_dim"], a["num_head"]
    tokens_q, tokens_k, tokens_v = numel(q) // e, numel(k) // e, numel(v) // e
    proj = 2 * e * e * (2 * tokens_q + tokens_k + tokens_v)
    batch = tokens_q // q.shape[-2]
    att = attention_count(batch * heads, q.shape[-2], k.shape[-2], e // heads, e // heads, False,
                          isinstance(a.get("mask"), torch.Tensor))
    return Count(flops=proj + att.flops, vector_flops=att.vector_flops + 4 * tokens_q * e, kind="attention")


# ------------------------------------------------------------------------------------------
# Vector work: normalization, softmax, reductions, elementwise.
# ------------------------------------------------------------------------------------------
@_register("layer_norm", "native_layer_norm", "group_norm", "native_group_norm")
def _layer_norm(a: dict[str, Any], out: Any) -> Count:
    # per element: sum, center, square + accumulate, scale by rstd (5) + weight + bias
    # (kiln_kernels.layer_norm_cost's convention).
    per = 5 + int(isinstance(a.get("weight"), torch.Tensor)) + int(isinstance(a.get("bias"), torch.Tensor))
    return Count(vector_flops=per * numel(a["input"]), kind="normalization")


@_register("rms_norm", "_fused_rms_norm")
def _rms_norm(a: dict[str, Any], out: Any) -> Count:
    per = 3 + int(isinstance(a.get("weight"), torch.Tensor))  # square, accumulate, scale (+ weight)
    return Count(vector_flops=per * numel(a["input"]), kind="normalization")


@_register("batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit")
def _batch_norm(a: dict[str, Any], out: Any) -> Count:
    per = 2 + int(isinstance(a.get("weight"), torch.Tensor)) + int(isinstance(a.get("bias"), torch.Tensor))
    return Count(vector_flops=per * numel(a["input"]), kind="normalization")


@_register("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax")
def _softmax(a: dict[str, Any], out: Any) -> Count:
    # max, subtract, exp, sum, normalize (kiln_kernels.softmax_cost's convention)
    return Count(vector_flops=5 * numel(a["self"]), kind="softmax")


_PER_INPUT_ELEMENT = {
    "sum": 1, "mean": 1, "nansum": 1, "prod": 1, "amax": 1, "amin": 1, "argmax": 1, "argmin": 1,
    "cumsum": 1, "cumprod": 1, "logsumexp": 3, "norm": 2, "linalg_vector_norm": 2,
    "var": 4, "std": 4, "var_mean": 4, "std_mean": 4, "scatter_add": 1, "index_add": 1,
}
_PER_OUTPUT_ELEMENT = {
    **dict.fromkeys(
        "add sub rsub mul div neg abs relu clamp clamp_min clamp_max maximum minimum fmax fmin eq ne lt le "
        "gt ge exp exp2 expm1 log log1p log2 log10 sqrt rsqrt reciprocal tanh erf erfc erfinv sin cos tan "
        "atan atan2 sign sgn floor ceil round trunc frac square remainder fmod threshold hardtanh "
        "isnan isinf isfinite heaviside native_dropout".split(), 1),
    **dict.fromkeys("addcmul addcdiv lerp leaky_relu hardsigmoid".split(), 2),
    **dict.fromkeys("sigmoid elu softplus hardswish".split(), 3),
    "silu": 4, "mish": 5,
}
# Ops that do no arithmetic: views, copies, layout, creation, indexing, boolean logic.
# Composite ops (reshape, contiguous, dropout, ...) are left out on purpose: they decompose into
# these, so a real copy shows as one.
_NO_FLOPS = set(
    "alias as_strided clone copy _to_copy _unsafe_view view t transpose permute expand slice select "
    "unsqueeze squeeze split split_with_sizes unbind narrow index index_select gather scatter index_put "
    "embedding cat stack zeros ones empty empty_like empty_strided zeros_like ones_like full full_like "
    "new_zeros new_ones new_full new_empty new_empty_strided arange linspace fill zero masked_fill where "
    "constant_pad_nd repeat roll flip tril triu detach lift_fresh lift_fresh_copy _assert_async "
    "_assert_scalar _assert_tensor_metadata sym_size sym_numel sym_stride sym_storage_offset is_nonzero "
    "_local_scalar_dense item bitwise_and bitwise_or bitwise_xor bitwise_not logical_and logical_or "
    "logical_not logical_xor __and__ __or__ __xor__ __lshift__ __rshift__ scalar_tensor _unsafe_index "
    "_unsafe_index_put diagonal unfold view_as_real view_as_complex resolve_conj resolve_neg "
    "_reshape_alias select_scatter slice_scatter set resize rand randn randint rand_like randn_like "
    "bernoulli _to_dim_order_copy any all one_hot _assert_tensor_metadata expand_copy permute_copy "
    "view_copy t_copy transpose_copy unsqueeze_copy squeeze_copy slice_copy select_copy "
    "split_with_sizes_copy unbind_copy alias_copy as_strided_copy "
    # composite, but their decomposition clones where the real op returns its input in eval
    "dropout feature_dropout alpha_dropout feature_alpha_dropout".split()
)


def _gelu(a: dict[str, Any], out: Any) -> Count:
    # erf form 5 per element, tanh form 9 (kiln_kernels.bias_gelu_cost's convention)
    return Count(vector_flops=(5 if a.get("approximate", "none") == "none" else 9) * numel(out), kind="elementwise")


def _pow(a: dict[str, Any], out: Any) -> Count:
    exponent = a.get("exponent")
    # x**n with a small integer n is n-1 multiplies; anything else one pow call
    per = int(exponent) - 1 if isinstance(exponent, (int, float)) and float(exponent).is_integer() and 2 <= exponent <= 8 else 1
    return Count(vector_flops=per * numel(out), kind="elementwise")


def _binary_max_min(a: dict[str, Any], out: Any) -> Count:
    # aten::max / min are reductions with one tensor and elementwise with two
    if isinstance(a.get("other"), torch.Tensor):
        return Count(vector_flops=numel(out), kind="elementwise")
    return Count(vector_flops=numel(a["self"]), kind="reduction")


_FORMULAS["aten::gelu"] = _gelu
_FORMULAS["aten::pow"] = _pow
_FORMULAS["aten::max"] = _binary_max_min
_FORMULAS["aten::min"] = _binary_max_min


# ------------------------------------------------------------------------------------------
# kiln kernels: their own cost models (kiln_kernels.ARGS_COST_MODELS, computed from call args).
# ------------------------------------------------------------------------------------------
# Kernel ops whose FLOPs are matrix products; every other kernel op's FLOPs are vector work.
_MATRIX_KERNELS = {"attention": "attention", "attention_varlen": "attention", "int8_weight_linear": "matmul"}
_MATRIX_WORDS = ("attention", "linear", "matmul", "gemm", "conv")


def _kernel_kind(op: str) -> str:
    if op in _MATRIX_KERNELS:
        return _MATRIX_KERNELS[op]
    return "matmul" if any(w in op for w in _MATRIX_WORDS) else "kernel"


KILN_NAMESPACE = "kiln"  # torch.ops.kiln.*: the only custom ops whose cost models are known


def _kernel_registries() -> tuple[dict[str, Any], dict[str, Any]]:
    """(args-based, shape-based) cost registries of `kiln_kernels`, empty if it cannot import
    (it needs triton, which a serving-only install may lack)."""
    try:
        kernels = importlib.import_module("kiln_kernels")
    except ImportError:
        return {}, {}
    return dict(kernels.ARGS_COST_MODELS), dict(kernels.COST_MODELS)


def _kernel_cost(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Count:
    namespace, _, op = func._schema.name.partition("::")
    if namespace != KILN_NAMESPACE:
        # Another library's op may share a name with one of ours; its cost is not ours to guess.
        return Count(kind="kernel", counted=False, reason=f"{namespace}::{op} is not a kiln kernel; no cost model")
    by_args, by_shapes = _kernel_registries()
    fn = by_args.get(op)
    if fn is None and op in by_shapes:
        fn = by_shapes[op]  # an older registry whose formulas happen to take the call args
    if fn is None:
        return Count(kind="kernel", counted=False, reason=f"{namespace}::{op} has no cost model in kiln_kernels.COST_MODELS")
    try:
        cost = fn(*args, **kwargs)
    except Exception as exc:  # a cost model that cannot read these args is reported, not guessed
        return Count(kind="kernel", counted=False, reason=f"cost model of {namespace}::{op} failed: {type(exc).__name__}: {exc}")
    kind = _kernel_kind(op)
    flops, nbytes = int(cost.flops), int(cost.bytes)
    if kind == "kernel":
        return Count(vector_flops=flops, kind=kind, bytes=nbytes)
    return Count(flops=flops, kind=kind, bytes=nbytes)


# ------------------------------------------------------------------------------------------
def has_formula(func: torch._ops.OpOverload) -> bool:
    """True when `op_cost` knows `func` without decomposing it."""
    name = _schema_name(func)
    namespace, _, op = name.partition("::")
    if namespace != "aten":
        return namespace != "prim"
    return name in _FORMULAS or op in _PER_OUTPUT_ELEMENT or op in _PER_INPUT_ELEMENT or op in _NO_FLOPS


def op_cost(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Count:
    """FLOPs (matrix and vector) of one call of `func`; `counted` False when unknown."""
    name = _schema_name(func)
    namespace, _, op = name.partition("::")
    if namespace != "aten":
        return _kernel_cost(func, args, kwargs)
    if name in _FORMULAS:
        return _FORMULAS[name](bind(func, args, kwargs), _first_tensor(out))
    if op in _PER_OUTPUT_ELEMENT:
        return Count(vector_flops=_PER_OUTPUT_ELEMENT[op] * numel(_first_tensor(out)), kind="elementwise")
    if op in _PER_INPUT_ELEMENT:
        return Count(vector_flops=_PER_INPUT_ELEMENT[op] * numel(_first_tensor(args)), kind="reduction")
    if op in _NO_FLOPS:
        return Count(kind="data")
    return Count(kind="unknown", counted=False, reason="no FLOP formula for this op")


def _first_tensor(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


__all__ = ["Count", "op_cost", "has_formula", "bind", "visible_pairs", "attention_count"]
