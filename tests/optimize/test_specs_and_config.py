import numpy as np
import pytest
import torch

from optimize.runtime.config import DEFAULT_TOLERANCES, CompileConfig
from optimize.runtime.errors import ConfigError
from optimize.runtime.specs import Dim, TensorSpec


def test_dim_rejects_inverted_range():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Dim("seq", 8, 4, 16)


def test_tensor_spec_json_round_trip_keeps_dims_and_value_range():
    batch, seq = Dim("batch", 1, 4, 8), Dim("seq", 2, 16, 64)
    spec = TensorSpec("input_ids", "int64", (batch, seq), value_range=(0, 99))
    again = TensorSpec.from_json(spec.to_json())
    assert again == spec
    assert again.shape[1] == seq and again.batched


def test_check_shape_names_the_input_and_the_range():
    spec = TensorSpec("ids", "int64", (Dim("batch", 1, 1, 4), 7))
    assert spec.check_shape((2, 7)) is None
    assert "rank 1" in spec.check_shape((2,))
    assert "allowed range is [1, 4]" in spec.check_shape((5, 7))
    assert "dim 1 is 6, expected 7" in spec.check_shape((2, 6))


def test_check_values_reports_out_of_range_ids_for_numpy_and_torch():
    spec = TensorSpec("ids", "int64", (3,), value_range=(0, 9))
    assert spec.check_values(np.array([0, 5, 9])) is None
    assert "value 10" in spec.check_values(np.array([0, 10, 3]))
    assert "value -1" in spec.check_values(torch.tensor([-1, 2, 3]))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="precision"):
        CompileConfig(precision="fp12")
    with pytest.raises(ConfigError, match="max_batch"):
        CompileConfig(max_batch=0)
    with pytest.raises(ConfigError, match="min_seq"):
        CompileConfig(min_seq=64, max_seq=32)
    with pytest.raises(ConfigError, match="unknown CompileConfig field"):
        CompileConfig.from_json({"backend": "eager", "speed": "max"})


def test_config_derives_opt_sizes_and_tolerance_and_round_trips():
    config = CompileConfig(precision="bf16", max_batch=4, max_seq=64)
    assert (config.opt_batch, config.opt_seq) == (4, 64)
    assert config.tolerance == DEFAULT_TOLERANCES["bf16"]
    assert config.dims["seq"] == Dim("seq", 1, 64, 64)
    assert CompileConfig.from_json(config.to_json()) == config
