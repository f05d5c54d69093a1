"""The CUDA extension builds where nvcc exists, imports without a GPU and fails cleanly there."""

import shutil

import pytest
import torch

from kiln_kernels import native

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the extension is not built")


@needs_nvcc
def test_extension_was_built_and_imports_without_a_gpu():
    assert native.is_built(), "nvcc is present, so the install must have built kiln_kernels._C"
    ext = native.extension()
    assert ext.runtime_version() >= 11000
    assert ext.compiled_archs  # e.g. "80;90"


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_calling_a_kernel_without_a_device_says_no_cuda_device():
    ext = native.extension()
    assert ext.device_count() == 0
    assert not native.available()
    with pytest.raises(RuntimeError, match="no CUDA device"):
        ext.gather_rows(0, 0, 1, 16, 0, 0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: native.bias_residual_layer_norm_cuda(torch.randn(2, 64), None, None, torch.ones(64), None, 1e-5),
         "x must be a CUDA tensor"),
        (lambda: native.scale_mask_softmax_cuda(torch.randn(2, 8), None, 1.0), "x must be a CUDA tensor"),
    ],
)
def test_cuda_wrappers_reject_cpu_tensors_with_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
