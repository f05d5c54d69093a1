"""`onnx_fuse_layer_norm` and `onnx_fuse_gelu` on the decomposed graphs exporters below opset 20 emit."""

import numpy as np
import onnx
import pytest
import torch

from optimize.onnx.fuse_gelu import FuseGelu
from optimize.onnx.fuse_layer_norm import FuseLayerNorm
from tests.optimize.onnx.helpers import op_types, run_ort


class HandWrittenBlock(torch.nn.Module):
    """A layer norm spelled out by hand and both GELU forms, as older code writes them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(16, 24)
        self.gamma = torch.nn.Parameter(torch.rand(24) + 0.5)
        self.beta = torch.nn.Parameter(torch.randn(24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        mean = h.mean(-1, keepdim=True)
        var = ((h - mean) ** 2).mean(-1, keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5) * self.gamma + self.beta
        return torch.nn.functional.gelu(h) + torch.nn.functional.gelu(h, approximate="tanh")


@pytest.fixture(scope="module")
def decomposed() -> tuple[onnx.ModelProto, torch.nn.Module]:
    import warnings

    module = HandWrittenBlock().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (torch.randn(3, 16),), dynamo=True, opset_version=18, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},))
    return program.model_proto, module


def test_layernorm_and_both_gelus_fuse_into_standard_ops(decomposed):
    model, module = decomposed
    assert {"Erf", "Tanh", "Sqrt", "ReduceMean"} <= set(op_types(model)), "opset 18 export is decomposed"
    x = torch.randn(5, 16)
    model, ln = FuseLayerNorm().run(onnx.ModelProto.FromString(model.SerializeToString()), None)
    model, gelu = FuseGelu().run(model, None)
    assert ln == {"layernorm": 1}
    assert gelu == {"gelu_erf": 1, "gelu_tanh": 1, "opset_upgraded": 1}
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain == "") == 20
    assert not {"Erf", "Tanh", "Sqrt", "ReduceMean", "Pow"} & set(op_types(model))
    assert all(n.domain == "" for n in model.graph.node), "standard ops only: TensorRT and OpenVINO take them"
    got = next(iter(run_ort(model, {"x": x}).values()))
    np.testing.assert_allclose(got, module(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_already_fused_export_is_left_alone(minilm_onnx):
    before = op_types(minilm_onnx)
    model, ln = FuseLayerNorm().run(minilm_onnx, None)
    model, gelu = FuseGelu().run(model, None)
    assert ln == {"layernorm": 0} and gelu == {"gelu_erf": 0, "gelu_tanh": 0}
    assert op_types(model) == before
