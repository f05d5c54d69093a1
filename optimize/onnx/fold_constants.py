"""Pass `onnx_fold_constants`: evaluate every node whose inputs are all constant, offline.

onnxscript's folder does the work (it also folds shape arithmetic on static dims); the limits
are raised so whole weight matrices fold (a transposed or cast weight is the common case after
the other passes). Quantize/Dequantize nodes are never folded: folding a DequantizeLinear of an
int8 weight would turn it back into an fp32 weight and undo the quantization.
"""

from __future__ import annotations

from typing import ClassVar

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer

from optimize.onnx.base import OnnxPass, OnnxPassContext

# Elements: the largest tensor folded offline (BERT-large's 1024x4096 FFN weight fits).
FOLD_LIMIT = 1 << 24
NEVER_FOLD = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def _should_fold(node: ir.Node) -> bool | None:
    return False if node.op_type in NEVER_FOLD else None


class FoldConstants(OnnxPass):
    name: ClassVar[str] = "onnx_fold_constants"
    description: ClassVar[str] = "evaluate constant subgraphs offline and drop unused nodes"

    def run(self, model: onnx.ModelProto, ctx: OnnxPassContext) -> tuple[onnx.ModelProto, dict[str, int]]:
        graph = ir.from_proto(model)

        def count() -> int:
            return sum(1 for n in graph.graph if n.op_type != "Constant")

        before = count()
        optimizer.fold_constants_ir(graph, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT,
                                    should_fold=_should_fold)
        common_passes.RemoveUnusedNodesPass()(graph)
        folded = before - count()
        common_passes.CommonSubexpressionEliminationPass()(graph)
        common_passes.RemoveUnusedNodesPass()(graph)
        merged = before - folded - count()
        return ir.to_proto(graph), {"folded": folded, "duplicates_merged": merged}
