"""Serving configuration: defaults, config.toml parsing, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.batch_policy import QueuePolicy
from server.config import DEFAULT_MAX_MESSAGE_BYTES, SHAPE_BUCKETS, ModelConfig, ServerConfig
from server.errors import ConfigError


def test_model_config_defaults_follow_the_engine_and_triton():
    config = ModelConfig()
    assert config.max_batch_size is None  # the engine's own maximum, resolved at load
    assert config.max_queue_delay_us == 0
    assert config.instances == 1
    assert config.resolve(8).max_batch_size == 8


def test_model_config_reads_config_toml(tmp_path: Path):
    (tmp_path / "config.toml").write_text("max_batch_size = 4\nmax_queue_delay_us = 2000\ninstances = 2\n")
    assert ModelConfig.read(tmp_path) == ModelConfig(max_batch_size=4, max_queue_delay_us=2000, instances=2)


def test_batching_and_queue_policy_keys_are_read_with_per_level_overrides(tmp_path: Path):
    (tmp_path / "config.toml").write_text(
        "max_batch_size = 16\n"
        "preferred_batch_sizes = [8, 4, 8]\n"
        "sequence_buckets = [32, 16]\n"
        "preserve_ordering = true\n"
        "priority_levels = 2\n"
        "default_priority_level = 2\n"
        "max_queue_size = 64\n"
        "default_timeout_us = 5000\n"
        "interface = \"text\"\n"
        "[priority_queue_policy.1]\n"
        "max_queue_size = 8\n"
        "timeout_action = \"delay\"\n"
    )
    config = ModelConfig.read(tmp_path)
    assert config.preferred_batch_sizes == (4, 8) and config.sequence_buckets == (16, 32)
    assert config.preserve_ordering and config.interface == "text"
    assert config.queue_policy == QueuePolicy(max_queue_size=64, default_timeout_us=5000)
    # A level's table inherits the top-level keys it does not set.
    assert config.priority_queue_policy == {1: QueuePolicy(max_queue_size=8, default_timeout_us=5000,
                                                           timeout_action="delay")}
    policy = config.batch_policy()
    assert policy.max_batch_size == 16 and policy.levels == 2 and policy.policy(1).max_queue_size == 8
    assert policy.policy(2).max_queue_size == 64


def test_text_byte_limits_default_to_the_pipelines_max_tokens_times_32_bytes_per_token(tmp_path: Path):
    resolved = ModelConfig(max_batch_size=4).resolve(8, max_tokens=64)
    assert (resolved.max_text_bytes, resolved.max_request_text_bytes) == (64 * 32, 64 * 32 * 4)
    assert ModelConfig(max_batch_size=0).resolve(8, max_tokens=64).max_request_text_bytes == 64 * 32 * 8
    assert ModelConfig().resolve(8).max_text_bytes is None  # no pipeline, no text input
    (tmp_path / "config.toml").write_text("max_text_bytes = 100\nmax_request_text_bytes = 150\n")
    configured = ModelConfig.read(tmp_path).resolve(8, max_tokens=64)
    assert (configured.max_text_bytes, configured.max_request_text_bytes) == (100, 150)


def test_a_model_without_config_toml_gets_the_defaults(tmp_path: Path):
    assert ModelConfig.read(tmp_path) == ModelConfig()


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_batch_size = -1", "max_batch_size must be an integer between 0 and"),
        ("max_batch_size = true", "max_batch_size must be an integer"),
        ("max_queue_delay_us = 1.5", "max_queue_delay_us must be an integer"),
        ("instances = 0", "instances must be an integer between 1 and 64"),
        ("max_batch = 8", "unknown key 'max_batch'"),
        ("max_batch_size = ", "not readable TOML"),
        ("preferred_batch_sizes = 4", "preferred_batch_sizes must be a list of integers"),
        ("preferred_batch_sizes = [0, 4]", "preferred_batch_sizes entries must be an integer"),
        ("max_batch_size = 4\npreferred_batch_sizes = [8]", "preferred_batch_sizes entry 8 exceeds max_batch_size 4"),
        ("sequence_buckets = [16, -1]", "sequence_buckets entries must be an integer"),
        ("preserve_ordering = 1", "preserve_ordering must be true or false"),
        ("interface = \"words\"", "interface must be one of 'tokens', 'text'"),
        ("max_queue_size = -1", "max_queue_size must be an integer"),
        ("timeout_action = \"drop\"", "timeout_action must be one of 'reject', 'delay'"),
        ("priority_levels = 2\ndefault_priority_level = 3",
         "default_priority_level must be an integer between 0 and 2"),
        ("priority_levels = 2\n[priority_queue_policy.3]\nmax_queue_size = 1", "priority_queue_policy level must be"),
        ("[priority_queue_policy.1]\nmax_size = 1", "priority_queue_policy.1: unknown key 'max_size'"),
        ("max_text_bytes = 0", "max_text_bytes must be an integer between 1 and"),
        ("max_request_text_bytes = \"1MB\"", "max_request_text_bytes must be an integer"),
        ("warmup = [8, 128]", "warmup must be a list of \\[batch, tokens\\] pairs"),
        ("warmup = [[8, 128, 1]]", "warmup must be a list of \\[batch, tokens\\] pairs"),
        ("warmup = [[0, 128]]", "warmup batch must be an integer between 1 and"),
        ("warmup = [[8, \"long\"]]", "warmup tokens must be an integer"),
        ("max_batch_size = 4\nwarmup = [[8, 16]]", "warmup \\[8, 16\\]: batch 8 exceeds max_batch_size 4"),
    ],
)
def test_a_bad_config_toml_names_the_file_and_the_field(tmp_path: Path, text: str, message: str):
    (tmp_path / "config.toml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        ModelConfig.read(tmp_path)
    assert str(tmp_path / "config.toml") in str(info.value)


def test_max_batch_size_above_the_engine_maximum_is_refused():
    with pytest.raises(ConfigError, match="max_batch_size = 16 but the engine accepts batches up to 8"):
        ModelConfig(max_batch_size=16).resolve(8)
    with pytest.raises(ConfigError, match="has no batch dimension"):
        ModelConfig(max_batch_size=2).resolve(0)
    assert ModelConfig(max_batch_size=0).resolve(8).max_batch_size == 0  # batching turned off


def test_server_config_bounds_grpc_messages_to_64_mib_by_default():
    config = ServerConfig(repository="engines")
    assert config.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES == 64 * 1024 * 1024
    assert config.repository == Path("engines")
    assert config.address == "127.0.0.1:8001"
    assert ServerConfig(host="::1", port=0).address == "[::1]:0"


@pytest.mark.parametrize(
    "field, value",
    [("port", 70000), ("port", -1), ("max_message_bytes", 2**31), ("shutdown_grace_s", -1.0), ("host", ""),
     ("metrics_port", 70000), ("model_control_mode", "poll"), ("auth_token", ""), ("auth_token", "a b"),
     ("tls_cert_file", "/nonexistent.pem")],
)
def test_server_config_names_the_bad_field(field: str, value: object):
    with pytest.raises(ConfigError, match=field if field != "host" else "host must not be empty"):
        ServerConfig(**{field: value})


def test_tls_needs_both_certificate_and_key(tmp_path: Path):
    pem = tmp_path / "x.pem"
    pem.write_text("")
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file must be given together"):
        ServerConfig(tls_cert_file=pem)
    with pytest.raises(ConfigError, match="tls_client_ca_file needs"):
        ServerConfig(tls_client_ca_file=pem)
    assert ServerConfig(tls_cert_file=pem, tls_key_file=pem).tls


def test_text_batches_of_openvino_engines_are_padded_to_a_few_lengths_unless_configured():
    assert ModelConfig().text_buckets("openvino") == SHAPE_BUCKETS["openvino"]
    assert ModelConfig().text_buckets("onnxruntime") == ()
    assert ModelConfig(sequence_buckets=[]).text_buckets("openvino") == ()
    assert ModelConfig(sequence_buckets=[64, 32]).text_buckets("openvino") == (32, 64)


def test_max_batch_tokens_reaches_the_batch_policy_and_is_checked():
    config = ModelConfig.from_dict({"max_batch_tokens": 4096}).resolve(32)
    assert config.batch_policy().max_batch_tokens == 4096
    with pytest.raises(ConfigError, match="max_batch_tokens must be an integer between 0 and"):
        ModelConfig.from_dict({"max_batch_tokens": -1})
