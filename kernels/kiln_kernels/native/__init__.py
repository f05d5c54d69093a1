"""CUDA C++ kernels (csrc/, built into `kiln_kernels._C`) behind torch custom ops `kiln_cuda::*`.

CUDA tensors run the hand-written kernels; CPU tensors run the plain-torch references, so
graphs using these ops stay runnable (and exportable) anywhere.
"""

from kiln_kernels.native._ext import available, extension, is_built
from kiln_kernels.native.layer_norm import (
    bias_residual_layer_norm,
    bias_residual_layer_norm_cuda,
    bias_residual_layer_norm_reference,
)
from kiln_kernels.native.packing import gather_rows, pack_indices, pack_indices_reference, scatter_rows
from kiln_kernels.native.softmax import scale_mask_softmax, scale_mask_softmax_cuda, scale_mask_softmax_reference

__all__ = [
    "available", "extension", "is_built",
    "bias_residual_layer_norm", "bias_residual_layer_norm_cuda", "bias_residual_layer_norm_reference",
    "pack_indices", "pack_indices_reference", "gather_rows", "scatter_rows",
    "scale_mask_softmax", "scale_mask_softmax_cuda", "scale_mask_softmax_reference",
]
