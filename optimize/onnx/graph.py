"""Small helpers over an `onnx.ModelProto` graph for the passes that rewrite it by hand.

Only what the passes need: who produces and who consumes a value, constant values (from
initializers or `Constant` nodes), value element types, fresh names, and a topological re-sort
after nodes are inserted.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})


class Graph:
    """An index over `model.graph` that stays valid while a pass edits through its methods.

    Direct edits of `model.graph.node` must be followed by `reindex()`.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self._counter = 0
        self.reindex()

    def reindex(self) -> None:
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.outputs = {o.name for o in self.graph.output}
        self.types: dict[str, int] = {}
        for vi in [*self.graph.input, *self.graph.value_info, *self.graph.output]:
            if vi.type.HasField("tensor_type"):
                self.types[vi.name] = vi.type.tensor_type.elem_type
        self.shapes: dict[str, list[int | str | None]] = {}
        for vi in [*self.graph.input, *self.graph.value_info, *self.graph.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                self.shapes[vi.name] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in vi.type.tensor_type.shape.dim
                ]
        for t in self.graph.initializer:
            self.types[t.name] = t.data_type
            self.shapes[t.name] = list(t.dims)
        self.names = {n for node in self.graph.node for n in [*node.input, *node.output, node.name]}
        self.names |= set(self.initializers) | {v.name for v in self.graph.input}

    def fresh(self, hint: str) -> str:
        """A value/node name not used anywhere in the graph."""
        while True:
            self._counter += 1
            name = f"{hint}__kiln{self._counter}"
            if name not in self.names:
                self.names.add(name)
                return name

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` when it is an initializer or a `Constant` node's output."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name in ("value_float", "value_int"):
                    return np.array(onnx.helper.get_attribute_value(attr))
                if attr.name in ("value_floats", "value_ints"):
                    return np.array(onnx.helper.get_attribute_value(attr))
        return None

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return len(shape) if shape is not None else None

    def single_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) == 1 and name not in self.outputs:
            return users[0]
        return None

    def add_initializer(self, value: np.ndarray, hint: str) -> str:
        name = self.fresh(hint)
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        self.types[name] = tensor.data_type
        return name

    def remove_nodes(self, nodes: list[onnx.NodeProto]) -> None:
        """Remove `nodes` (messages of this graph). Other node references stay valid, unlike
        rebuilding the repeated field, which copies every message."""
        for node in nodes:
            self.graph.node.remove(node)
        self.reindex()

    def rename_input(self, old: str, new: str) -> None:
        """Make every consumer of `old` read `new` instead (graph outputs are not touched)."""
        for node in self.consumers.get(old, []):
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
        self.reindex()

    def prune(self) -> int:
        """Remove nodes and initializers nothing needs; return how many nodes went."""
        needed = set(self.outputs)
        kept: list[onnx.NodeProto] = []
        for node in reversed(list(self.graph.node)):
            if any(o in needed for o in node.output):
                kept.append(node)
                needed.update(i for i in node.input if i)
        removed = len(self.graph.node) - len(kept)
        del self.graph.node[:]
        self.graph.node.extend(reversed(kept))
        unused = [t for t in self.graph.initializer if t.name not in needed]
        for t in unused:
            self.graph.initializer.remove(t)
        self.reindex()
        return removed


def topological_sort(graph: onnx.GraphProto) -> None:
    """Re-order `graph.node` so every node follows its producers (insertions may break order)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = False
        remaining = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                remaining.append(node)
        if not progressed:
            raise ValueError(f"graph has a cycle or a dangling input near node {remaining[0].name!r}")
        pending = remaining
    del graph.node[:]
    graph.node.extend(ordered)


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        counts[node.op_type] += 1
    return dict(counts)
