"""kernels/cost.py: the Cost type and the registry every op's cost model lands in."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kiln_kernels
from kiln_kernels.cost import Cost, register_cost


def test_every_registered_op_has_both_cost_models():
    ops = {name for name in dir(torch.ops.kiln) if not name.startswith("_") and name != "name"}
    assert ops == set(kiln_kernels.COST_MODELS) == set(kiln_kernels.ARGS_COST_MODELS)


def test_cost_adds_and_bounds_time_by_the_slower_resource():
    c = Cost(flops=10, bytes=4) + Cost(flops=2, bytes=2)
    assert c == Cost(flops=12, bytes=6)
    assert c.intensity == 2.0
    assert c.roofline_s(peak_flops=12.0, peak_bytes_per_s=1.0) == 6.0  # memory-bound
    assert c.roofline_s(peak_flops=1.0, peak_bytes_per_s=6.0) == 12.0  # compute-bound


def test_registering_a_name_twice_raises():
    with pytest.raises(ValueError, match="twice"):
        register_cost("layer_norm", kiln_kernels.layer_norm_cost, kiln_kernels.layer_norm_cost)


def test_unknown_op_raises_key_error_listing_known_ops():
    with pytest.raises(KeyError, match="layer_norm"):
        kiln_kernels.op_cost("no_such_op")


def test_varlen_attention_cost_is_bounded_on_fake_tensors():
    # a profiler walking an exported graph sees fake tensors: no cu_seqlens values to read
    with FakeTensorMode():
        q = torch.empty(10, 2, 32, dtype=torch.float16)
        cu = torch.empty(3, dtype=torch.int32)
        c = kiln_kernels.op_cost("attention_varlen", q, q, q, cu, cu, 6, 6)
    assert c.flops == 4 * 2 * 32 * 10 * 6
