"""Dead-code elimination: drop every node whose result reaches no output (e.g. BERT's pooler
when only the hidden states and the sentence embedding are returned) and unused weights."""

from __future__ import annotations

from typing import ClassVar

from torch import fx

from optimize.passes.base import GraphPass, PassContext


class RemoveDeadCode(GraphPass):
    name: ClassVar[str] = "remove_dead_code"
    description: ClassVar[str] = "remove nodes and weights no output depends on"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        before = sum(1 for n in gm.graph.nodes if n.op == "call_function")
        gm.graph.eliminate_dead_code()
        after = sum(1 for n in gm.graph.nodes if n.op == "call_function")
        used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        unused = [name for name, _ in list(gm.named_buffers()) if name not in used and name.startswith("_kiln_")]
        for name in unused:
            delattr(gm, name)
        return {"nodes": before - after, "weights": len(unused)}
