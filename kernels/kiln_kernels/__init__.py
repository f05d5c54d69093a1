"""kiln's Triton kernel library.

Importing this package registers every op as ``torch.ops.kiln.<name>`` (CPU tensors run the
plain-torch reference, CUDA tensors run Triton) and every op's cost model. Each op lives in its
own module: the Triton kernel, its launcher (``<op>_triton``, usable on CPU under
``TRITON_INTERPRET=1``), the custom-op registration, the reference (``<op>_reference``) and the
cost formula (``<op>_cost``).

Costs, keyed by op name (``"layer_norm"``, ``"add_layer_norm"``, ``"attention_varlen"``, ...):

* ``COST_MODELS[name](...shapes..., dtype, ...) -> Cost`` — formulas over shapes;
* ``op_cost(name, *args, **kwargs) -> Cost`` (``ARGS_COST_MODELS``) — from the op's own call
  arguments, real, fake or meta tensors, for a profiler walking an FX graph.

``import kiln_kernels`` needs only torch and triton and works without a GPU. (The import name is
not ``kernels``: that is Hugging Face's kernel hub package, which transformers imports.)
"""

from kiln_kernels.attention import (
    attention,
    attention_cost,
    attention_reference,
    attention_triton,
    attention_varlen,
    attention_varlen_cost,
    attention_varlen_reference,
    attention_varlen_triton,
)
from kiln_kernels.bias_gelu import bias_gelu, bias_gelu_cost, bias_gelu_reference, bias_gelu_triton
from kiln_kernels.cost import ARGS_COST_MODELS, COST_MODELS, Cost, op_cost
from kiln_kernels.embedding_layer_norm import (
    embedding_layer_norm,
    embedding_layer_norm_cost,
    embedding_layer_norm_reference,
    embedding_layer_norm_triton,
)
from kiln_kernels.int8_weight_linear import (
    int8_weight_linear,
    int8_weight_linear_cost,
    int8_weight_linear_reference,
    int8_weight_linear_triton,
    quantize_int8_per_channel,
)
from kiln_kernels.layer_norm import (
    add_layer_norm,
    layer_norm,
    layer_norm_cost,
    layer_norm_reference,
    layer_norm_triton,
)
from kiln_kernels.rms_norm import add_rms_norm, rms_norm, rms_norm_cost, rms_norm_reference, rms_norm_triton
from kiln_kernels.rotary_embedding import (
    rotary_cos_sin,
    rotary_embedding,
    rotary_embedding_cost,
    rotary_embedding_reference,
    rotary_embedding_triton,
)
from kiln_kernels.softmax import softmax, softmax_cost, softmax_reference, softmax_triton

__all__ = [
    "attention",
    "attention_cost",
    "attention_reference",
    "attention_triton",
    "attention_varlen",
    "attention_varlen_cost",
    "attention_varlen_reference",
    "attention_varlen_triton",
    "embedding_layer_norm",
    "embedding_layer_norm_cost",
    "embedding_layer_norm_reference",
    "embedding_layer_norm_triton",
    "int8_weight_linear",
    "int8_weight_linear_cost",
    "int8_weight_linear_reference",
    "int8_weight_linear_triton",
    "quantize_int8_per_channel",
    "add_layer_norm",
    "layer_norm",
    "layer_norm_cost",
    "layer_norm_reference",
    "layer_norm_triton",
    "rotary_cos_sin",
    "rotary_embedding",
    "rotary_embedding_cost",
    "rotary_embedding_reference",
    "rotary_embedding_triton",
    "bias_gelu",
    "bias_gelu_cost",
    "bias_gelu_reference",
    "bias_gelu_triton",
    "ARGS_COST_MODELS",
    "COST_MODELS",
    "Cost",
    "op_cost",
    "add_rms_norm",
    "rms_norm",
    "rms_norm_cost",
    "rms_norm_reference",
    "rms_norm_triton",
    "softmax",
    "softmax_cost",
    "softmax_reference",
    "softmax_triton",
]
