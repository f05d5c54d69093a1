"""Triton's ModelConfig for a served model, and the shapes the metadata RPCs put on the wire.

Apart from the service because it is a translation of `Model` and its `ModelConfig` (config.toml)
into protobuf, with no state of its own; the ModelConfig RPC answers it (and so the HTTP
`/v2/models/{name}/config` route, which calls that RPC).
"""

from __future__ import annotations

import json
from typing import Any

from optimize.runtime.specs import Dim, TensorSpec
from server import codec
from server.proto import model_config_pb2 as mc
from server.repository import Model


def wire_shape(spec: TensorSpec) -> list[int]:
    """Triton's shape convention: -1 for every dynamic dim. Metadata shapes include the batch
    dim (as -1); config dims leave it out when the model batches."""
    return [-1 if isinstance(d, Dim) else d for d in spec.shape]



_TIMEOUT_ACTION = {"reject": mc.ModelQueuePolicy.REJECT, "delay": mc.ModelQueuePolicy.DELAY}


def _queue_policy(policy: Any) -> mc.ModelQueuePolicy:
    return mc.ModelQueuePolicy(
        timeout_action=_TIMEOUT_ACTION[policy.timeout_action],
        default_timeout_microseconds=policy.default_timeout_us,
        allow_timeout_override=policy.allow_timeout_override,
        max_queue_size=policy.max_queue_size,
    )


def model_config(model: Model) -> mc.ModelConfig:
    """Triton's ModelConfig for a served model: batching, queue policy, instances, and the
    inputs and outputs of the interface it advertises (the engine's, or its text pipeline's)."""
    batching = model.max_batch_size > 0
    config = model.config

    def dims(spec: TensorSpec) -> list[int]:
        shape = wire_shape(spec)
        return shape[1:] if batching and spec.batched else shape

    if model.advertises_text:
        assert model.text is not None
        inputs = [mc.ModelInput(name=t.name, data_type=mc.TYPE_STRING, dims=[1] if batching else [-1])
                  for t in model.text.inputs]
        outputs = [mc.ModelOutput(name=t.name, data_type=codec.config_datatype(t.dtype),
                                  dims=list(t.shape) if batching else [-1, *t.shape]) for t in model.text.outputs]
    else:
        inputs = [mc.ModelInput(name=s.name, data_type=codec.config_datatype(s.dtype), dims=dims(s))
                  for s in model.inputs.values()]
        outputs = [mc.ModelOutput(name=s.name, data_type=codec.config_datatype(s.dtype), dims=dims(s))
                   for s in model.outputs.values()]
    result = mc.ModelConfig(
        name=model.name,
        platform=f"kiln_{model.engine.backend}",
        backend=model.engine.backend,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
        max_batch_size=model.max_batch_size,
        input=inputs,
        output=outputs,
        # The Engine API does not say which device an engine runs on, hence KIND_AUTO.
        instance_group=[
            mc.ModelInstanceGroup(name=model.name, kind=mc.ModelInstanceGroup.KIND_AUTO, count=config.instances)
        ],
    )
    if batching:
        batcher = result.dynamic_batching
        batcher.max_queue_delay_microseconds = config.max_queue_delay_us
        batcher.preferred_batch_size.extend(config.preferred_batch_sizes)
        batcher.preserve_ordering = config.preserve_ordering
        batcher.priority_levels = config.priority_levels
        if config.priority_levels:
            batcher.default_priority_level = config.default_priority_level or config.priority_levels
        batcher.default_queue_policy.CopyFrom(_queue_policy(config.queue_policy))
        for level, policy in sorted(config.priority_queue_policy.items()):
            batcher.priority_queue_policy[level].CopyFrom(_queue_policy(policy))
    if config.sequence_buckets and not getattr(model.engine, "accepts_packed", False):
        result.parameters["sequence_buckets"].string_value = ",".join(map(str, config.sequence_buckets))
    if getattr(model.engine, "accepts_packed", False):
        result.parameters["packed_batches"].string_value = "true"
    if config.max_batch_tokens:
        result.parameters["max_batch_tokens"].string_value = str(config.max_batch_tokens)
    if config.warmup:  # Triton's model_warmup, as the shapes run at load: "8x128,1x32"
        result.parameters["warmup"].string_value = ",".join(f"{batch}x{tokens}" for batch, tokens in config.warmup)
    if model.text_limits is not None:
        result.parameters["max_text_bytes"].string_value = str(model.text_limits.max_text_bytes)
        result.parameters["max_request_text_bytes"].string_value = str(model.text_limits.max_request_text_bytes)
    if model.text is not None:  # what a client needs to read the text interface's answers
        result.parameters["task"].string_value = model.text.task
        if model.text.options:
            result.parameters["text_options"].string_value = ",".join(model.text.options)
        if model.text.labels:
            result.parameters["labels"].string_value = json.dumps(list(model.text.labels), ensure_ascii=False)
    return result
