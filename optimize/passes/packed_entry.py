"""The packed entry point: a second program, derived from the padding-removal pass's graph,
that takes a batch already packed (rows back to back, delimited by `cu_seqlens`) and returns
token outputs packed, so a packed batch is never padded and re-packed on its way through.

The graph after `remove_padding` reads padded [batch, seq] inputs, packs their real tokens at
the first layer (`kiln_cuda.pack_indices` on the mask, `gather_rows`), runs the layers packed
and restores the padded layout where values leave the region (`scatter_rows`). The packed
entry reads what the server's `Packed` layout sends instead:

    <token inputs> [T, ...]   every [batch, seq, ...] input, its rows concatenated
    <row inputs>   [rows, ...]
    cu_seqlens     int32 [rows + 1], starting at 0
    max_seqlen     int, the longest row (the attention kernel's grid)

and is built by walking the padded graph once, giving each value the form it has on packed
tokens:
- padded token values ([B, S, ...] or [B*S, ...]) become [T, ...] (the token inputs as they
  come; per-token ops such as embedding lookups, casts, pointwise math, linears run as they
  are, their feature dims renumbered);
- values that depend on the position only (BERT's position ids, `arange(seq)`, computed with
  `max_seqlen` for `seq`) are gathered by each token's position in its row where they meet
  tokens; values per row ([B, ...]) stay as they are (the same tensors in both forms);
- the pack at the first layer disappears (`gather_rows` of a token value is that value), the
  scatter at the outputs too (token outputs stay [T, ...]); a pooling that reads the padded
  layout is computed per row from `cu_seqlens`: a sum or mean over the sequence becomes a sum
  into each token's row (`index_add`), a read at a fixed position (`h[:, 0]`: BERT's pooler,
  CLS pooling) a read at `cu_seqlens[:-1] + position`;
- the pass's extra query-only tokens (padding positions read outside the region) are none: a
  packed row holds real tokens only, so their attention call and its concatenation go.

A cumulative sum along the sequence (RoBERTa's position ids, counted from its ids) becomes
the running sum over all tokens less what the rows before had summed. What the walk cannot
express on packed tokens (any other op that mixes positions) raises `Unpackable` naming the op; the engine then has no
packed entry and `Engine.run_packed` pads the batch once for the padded program. The packed
program shares the padded one's weights (same names), so the engine directory stores them once.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.export import Dim as ExportDim
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from optimize.passes.base import aten
from optimize.passes.matching import ensure_meta, expr, kernel_ops, native_ops, shape_of, token_dims, value
from optimize.passes.remove_padding import _DIM_OPS, _POINTWISE, _RESHAPES, _ROW_DATA, _kernel_row_data
from optimize.runtime.specs import TensorSpec

CU_SEQLENS = "cu_seqlens"
MAX_SEQLEN = "max_seqlen"
_COMPARISONS = {
    aten.eq.Scalar, aten.eq.Tensor, aten.ne.Scalar, aten.ne.Tensor, aten.ge.Scalar, aten.gt.Scalar,
    aten.le.Scalar, aten.lt.Scalar, aten.logical_and.default, aten.logical_or.default, aten.logical_not.default,
    aten.to.device, aten.type_as.default, aten.where.self, aten.masked_fill.Scalar,
}
_ELEMENTWISE = _POINTWISE | _COMPARISONS
# reductions over dims given as a list: per token when every dim is a feature dim
_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.var.correction}


class Unpackable(Exception):
    """The padded graph holds something the packed entry cannot express; the message says what."""


def packed_input_names(inputs: Sequence[TensorSpec]) -> list[str]:
    """The packed program's inputs in call order: the engine's inputs, then `cu_seqlens` and
    `max_seqlen`."""
    return [s.name for s in inputs] + [CU_SEQLENS, MAX_SEQLEN]


def packed_program(program: ExportedProgram, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                   mask_input: str, max_batch: int, max_seq: int) -> ExportedProgram:
    """Export the packed entry of `program` (a graph rewritten by `remove_padding`, packing by
    input `mask_input`), over up to `max_batch` rows of up to `max_seq` tokens. Raises
    `Unpackable` with the reason when it cannot be derived."""
    gm = program.module()
    ensure_meta(gm)
    graph = _PackedGraph(gm, inputs, outputs).build()
    packed = fx.GraphModule(gm, graph)
    example, dynamic = _examples(inputs, mask_input, max_batch, max_seq)
    try:
        with torch.no_grad():
            exported = torch.export.export(packed, example, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # torch.export raises many types
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise Unpackable(f"torch.export of the packed entry failed: {first}") from exc
    missing = sorted((set(exported.state_dict) | set(exported.constants)) - set(program.state_dict)
                     - set(program.constants))
    if missing:
        raise Unpackable(f"the packed entry's weights are not the padded program's: {missing[0]}")
    return exported


def _examples(inputs: Sequence[TensorSpec], mask_input: str, max_batch: int,
              max_seq: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Example packed inputs (3 rows of 2, 5, 4 tokens when the ranges allow: sizes unlike each
    other, so export does not tie them) and their dynamic dims."""
    lengths = [min(n, max_seq) for n in (2, 5, 4)][:max(1, min(3, max_batch))]
    total, rows = sum(lengths), len(lengths)
    tokens = ExportDim("tokens", min=1, max=max_batch * max_seq)
    batch = ExportDim("rows", min=1, max=max_batch)
    values: list[Any] = []
    dynamic: list[Any] = []
    g = torch.Generator().manual_seed(0)
    for spec in inputs:
        rest = [d if isinstance(d, int) else d.opt for d in spec.shape[2 if spec.token_layout else 1:]]
        shape = [total if spec.token_layout else rows, *rest]
        low, high = spec.value_range or (0, 1)
        dtype = getattr(torch, spec.dtype)
        if dtype.is_floating_point:
            values.append(torch.rand(shape, generator=g, dtype=dtype))
        else:
            values.append(torch.randint(int(low), int(high) + 1, shape, generator=g).to(dtype))
        if spec.name == mask_input:
            values[-1] = torch.ones(shape, dtype=dtype)
        dynamic.append({0: tokens if spec.token_layout else batch})
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    values += [cu, max(lengths)]
    dynamic += [{0: batch + 1}, ExportDim.DYNAMIC]
    return tuple(values), tuple(dynamic)


class _Marker:
    """A value of the padded graph that the packed graph does not compute (the pack's token
    index); only the uses listed in `_PackedGraph` may read it."""

    def __init__(self, what: str) -> None:
        self.what = what


class _PackedGraph:
    """One walk over the padded graph, building the packed one (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.gm, self.inputs, self.outputs = gm, list(inputs), list(outputs)
        self.g = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.tokens: set[fx.Node] = set()  # padded token values, whose packed form is [T, ...]
        self.native, self.ops = native_ops(), kernel_ops()
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self.inputs):
            raise Unpackable("the program's inputs are not the engine's")
        self.placeholders = dict(zip(placeholders, self.inputs, strict=True))
        token_specs = [p for p, s in self.placeholders.items() if s.token_layout]
        if not token_specs:
            raise Unpackable("no input of token layout")
        shape = shape_of(token_specs[0]) or ()
        self.batch, self.seq = expr(shape[0]), expr(shape[1])
        self._derived: dict[str, fx.Node] = {}

    # the packed graph's inputs and the indexes derived from them, built once on first use
    def _get(self, key: str) -> fx.Node:
        if key in self._derived:
            return self._derived[key]
        g, d = self.g, self._derived
        if key == "T":
            d[key] = g.call_function(aten.sym_size.int, (self.first_token, 0))
        elif key == "R":
            d[key] = g.call_function(operator.sub, (g.call_function(aten.sym_size.int, (self.cu, 0)), 1))
        elif key == "cu_long":
            d[key] = g.call_function(aten._to_copy.default, (self.cu,), {"dtype": torch.int64})
        elif key == "starts":
            d[key] = g.call_function(aten.slice.Tensor, (self._get("cu_long"), 0, 0, -1))
        elif key == "ends":
            d[key] = g.call_function(aten.slice.Tensor, (self._get("cu_long"), 0, 1))
        elif key == "row":  # each token's row
            lengths = g.call_function(aten.sub.Tensor, (self._get("ends"), self._get("starts")))
            d[key] = g.call_function(aten.repeat_interleave.Tensor, (lengths,), {"output_size": self._get("T")})
        elif key == "position":  # each token's position in its row
            arange = g.call_function(aten.arange.default, (self._get("T"),), {"device": self.device})
            start = g.call_function(aten.index_select.default, (self._get("starts"), 0, self._get("row")))
            d[key] = g.call_function(aten.sub.Tensor, (arange, start))
        else:
            raise KeyError(key)
        return d[key]

    def build(self) -> fx.Graph:
        g = self.g
        new_inputs = {s.name: g.placeholder(s.name) for s in self.inputs}
        self.cu = g.placeholder(CU_SEQLENS)
        self.max_seqlen = g.placeholder(MAX_SEQLEN)
        first = next(p for p, s in self.placeholders.items() if s.token_layout)
        self.first_token = new_inputs[self.placeholders[first].name]
        self.device = value(first).device
        out_node = None
        for node in self._live_nodes():
            if node.op == "placeholder":
                self.env[node] = new_inputs[self.placeholders[node].name]
                if self.placeholders[node].token_layout:
                    self.tokens.add(node)
            elif node.op == "get_attr":
                self.env[node] = g.get_attr(node.target)  # type: ignore[arg-type]
            elif node.op == "output":
                out_node = node
            elif node.op == "call_function":
                self.env[node] = self._call(node)
            else:
                raise Unpackable(f"{node.op} {node.target} in the program")
        assert out_node is not None
        flat = list(out_node.args[0]) if isinstance(out_node.args[0], (list, tuple)) else [out_node.args[0]]
        names = pytree.tree_unflatten(list(range(len(flat))), self.gm._out_spec)  # type: ignore[attr-defined]
        result = {}
        for spec in self.outputs:
            node = flat[names[spec.name]]
            if (node in self.tokens) != spec.token_layout:
                raise Unpackable(f"output {spec.name} does not keep its layout when packed")
            result[spec.name] = self.env[node]
        g.output(result)
        g.eliminate_dead_code()
        return g

    def _live_nodes(self) -> list[fx.Node]:
        """The padded graph's nodes that reach an output; export's metadata asserts are dropped
        (run_packed checks the inputs), so a mask-processing branch that only they read
        (HF's unused 4-D mask) goes with them."""
        live: set[fx.Node] = set()
        stack = [n for n in self.gm.graph.nodes if n.op == "output"]
        while stack:
            n = stack.pop()
            if n in live:
                continue
            live.add(n)
            stack.extend(n.all_input_nodes)
        for n in self.gm.graph.nodes:  # runtime asserts on sizes stay when what they read is live
            if n.op == "call_function" and n.target is aten._assert_scalar.default and all(
                    a in live for a in n.all_input_nodes):
                live.add(n)
        return [n for n in self.gm.graph.nodes if n in live]

    def _call(self, node: fx.Node) -> Any:
        target, args = node.target, node.args
        native, g = self.native, self.g
        if target is native.pack_indices.default:
            return _Marker("pack")
        if target is operator.getitem and isinstance(self.env.get(args[0]), _Marker):  # type: ignore[arg-type]
            if args[1] == 0:
                return _Marker("token_index")
            if args[1] == 1:  # the main pack's cu_seqlens; the extra tokens': there are none
                return self.cu if self._is_main_pack(args[0]) else _Marker("no_tokens")
            raise Unpackable("the pack's max length is read")
        if target is self.ops.attention_varlen.default and isinstance(self.env.get(args[3]), _Marker):  # type: ignore[arg-type]
            return _Marker("no_tokens")  # the extra query-only tokens' attention: no queries
        if target is aten.cat.default and any(isinstance(self.env.get(a), _Marker) for a in args[0]):  # type: ignore[union-attr]
            kept = [self.env[a] for a in args[0] if not isinstance(self.env.get(a), _Marker)]  # type: ignore[union-attr]
            if not kept or any(self.env[a].what == "token_index" for a in args[0]  # type: ignore[union-attr]
                               if isinstance(self.env.get(a), _Marker)):
                return _Marker("token_index")  # real tokens, then no extra ones
            return kept[0] if len(kept) == 1 else g.call_function(aten.cat.default, (kept, *args[1:]))
        if target is aten.sym_size.int:
            x, dim = args
            if isinstance(self.env.get(x), _Marker):  # type: ignore[arg-type]
                return self._get("T") if self._is_main_index(x) else 0  # type: ignore[arg-type]
            if x in self.tokens:
                shape = shape_of(x) or ()
                size = expr(shape[dim])  # type: ignore[index]
                if size == self.batch:
                    return self._get("R")
                if size == self.seq:
                    return self.max_seqlen
                if size == self.batch * self.seq:
                    return self._get("T")
                return g.call_function(aten.sym_size.int, (self.env[x], dim - 1))  # type: ignore[arg-type,operator]
        if target is native.gather_rows.default:
            x = args[0]
            if x not in self.tokens:
                raise Unpackable("gather_rows of a value that is not padded tokens")
            return self.env[x]  # the pack of packed tokens: they are already
        if target is native.scatter_rows.default:
            self.tokens.add(node)
            return self.env[args[0]]  # type: ignore[index]
        if any(isinstance(self.env.get(a), _Marker) for a in node.all_input_nodes):
            raise Unpackable(f"{target} reads the pack's token index")
        token_args = [a for a in node.all_input_nodes if a in self.tokens]
        if not token_args:
            return self._copy(node)
        self.tokens.add(node)
        return self._on_tokens(node)

    def _is_main_pack(self, pack: Any) -> bool:
        source = pack.args[0]
        while isinstance(source, fx.Node) and source.op == "call_function" and source.target is aten.contiguous.default:
            source = source.args[0]
        return isinstance(source, fx.Node) and source.op == "placeholder"

    def _is_main_index(self, index: fx.Node) -> bool:
        return index.target is aten.cat.default or self._is_main_pack(index.args[0])

    def _copy(self, node: fx.Node) -> Any:
        """A node that reads no padded tokens: the same op on the mapped arguments. A result
        laid out as padded tokens (an expand of per-position values) is gathered into tokens."""
        if node.target is aten.expand.default and self._padded(node) is not None:
            self.tokens.add(node)
            return self._broadcast(node.args[0])  # type: ignore[arg-type]
        if self._padded(node) is not None:
            raise Unpackable(f"{node.target} makes padded tokens from no input")
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: self.env[a])
        return self.g.call_function(node.target, args, kwargs)  # type: ignore[arg-type]

    def _padded(self, node: Any) -> int | None:
        """2 for a [B, S, ...] value, 1 for [B*S, ...], None otherwise."""
        return token_dims(node, self.batch, self.seq)

    def _broadcast(self, x: fx.Node) -> fx.Node:
        """A value that broadcasts against padded tokens ([S, ...] or [1, S, ...] per position,
        [B, 1, ...] per row, or features only) in the form that broadcasts against [T, ...]."""
        shape = shape_of(x)
        new = self.env[x]
        if x in self.tokens or not shape:
            return new
        dims = [expr(s) for s in shape]
        if self.seq in dims:
            axis = dims.index(self.seq)
            if any(d != 1 for d in dims[:axis]) or self.batch in dims:
                raise Unpackable(f"{x.name} mixes batch and positions")
            for _ in range(axis):
                new = self.g.call_function(aten.select.int, (new, 0, 0))
            return self.g.call_function(aten.index_select.default, (new, 0, self._get("position")))
        if len(dims) >= 2 and dims[0] == self.batch and dims[1] == 1:
            row = self.g.call_function(aten.select.int, (new, 1, 0))
            return self.g.call_function(aten.index_select.default, (row, 0, self._get("row")))
        if self.batch in dims:
            raise Unpackable(f"{x.name} is per row but not [batch, 1, ...]")
        return new

    def _feature_dim(self, x: fx.Node, dim: Any) -> Any:
        """A dim of padded `x` renumbered for its packed form; refuses the token dims."""
        t = self._padded(x)
        rank = len(shape_of(x) or ())
        if not isinstance(dim, int) or t is None:
            raise Unpackable(f"dim {dim} of {x.name}")
        if dim < 0:
            return dim
        if dim < t:
            raise Unpackable(f"an op over the token dims of {x.name}")
        return dim - t + 1 if dim < rank else dim

    def _on_tokens(self, node: fx.Node) -> Any:
        """An op that reads padded tokens, on packed tokens."""
        target, args, g = node.target, node.args, self.g
        out_t = self._padded(node)
        if target in _ELEMENTWISE:
            if out_t is None:
                raise Unpackable(f"{target} turns padded tokens into another layout")
            new_args, new_kwargs = fx.node.map_arg((args, node.kwargs), self._broadcast)
            return g.call_function(target, new_args, new_kwargs)  # type: ignore[arg-type]
        x = args[0]
        if target is operator.getitem:  # an item of a per-token op's tuple
            return g.call_function(operator.getitem, (self.env[x], args[1]))  # type: ignore[index]
        if target in _RESHAPES:
            out = shape_of(node) or ()
            if out_t is None or not all(isinstance(s, int) for s in out[out_t:]):
                raise Unpackable(f"{target} of {x.name} changes the token dims")  # type: ignore[union-attr]
            return g.call_function(target, (self.env[x], [-1, *out[out_t:]]))  # type: ignore[arg-type,index]
        if target is aten.expand.default:
            out = shape_of(node) or ()
            if out_t is None:
                raise Unpackable(f"expand of {x.name}")  # type: ignore[union-attr]
            return g.call_function(target, (self.env[x], [-1, *args[1][out_t:]]))  # type: ignore[arg-type,index]
        if target is aten.select.int and self._padded(x) == 2 and args[1] in (1, 1 - len(shape_of(x) or ())):
            self.tokens.discard(node)  # a read at a fixed position: one value per row
            position = args[2]
            base = self._get("starts") if position >= 0 else self._get("ends")  # type: ignore[operator]
            index = g.call_function(aten.add.Tensor, (base, position))
            return g.call_function(aten.index_select.default, (self.env[x], 0, index))  # type: ignore[arg-type]
        if target in (aten.sum.dim_IntList, aten.mean.dim) and self._padded(x) == 2 and list(args[1]) in ([1], [-len(shape_of(x) or ()) + 1]):  # type: ignore[arg-type]
            return self._per_row_sum(node)
        if target in _REDUCTIONS and out_t is not None and len(args) > 1 and isinstance(args[1], (list, tuple)):
            dims = [self._feature_dim(x, d) for d in args[1]]  # type: ignore[arg-type]
            return g.call_function(target, (self.env[x], dims, *args[2:]), dict(node.kwargs))  # type: ignore[arg-type,index]
        if target is aten.linalg_vector_norm.default and out_t is not None and len(args) > 2:
            dims = [self._feature_dim(x, d) for d in args[2]]  # type: ignore[arg-type,union-attr]
            return g.call_function(target, (self.env[x], args[1], dims, *args[3:]), dict(node.kwargs))  # type: ignore[arg-type,index]
        if target is aten.gather.default and self._padded(args[2]) == 2 and args[1] in (1, -1) and out_t == 2 \
                and len(shape_of(node) or ()) == 2:  # type: ignore[arg-type]
            return self._lookup(node)
        if target is aten.cumsum.default and self._padded(x) == 2 and args[1] in (1, 1 - len(shape_of(x) or ())):  # type: ignore[arg-type,operator]
            return self._per_row_cumsum(node)
        if target in _DIM_OPS and len(args) > _DIM_OPS[target]:
            pos = _DIM_OPS[target]
            dim = args[pos]
            if target is aten.unsqueeze.default:
                rank = len(shape_of(x) or ()) + 1  # type: ignore[arg-type]
                d = dim if dim >= 0 else dim + rank  # type: ignore[operator]
                if d < (self._padded(x) or 0):  # type: ignore[operator]
                    raise Unpackable(f"unsqueeze inside the token dims of {x.name}")  # type: ignore[union-attr]
                new_dim = dim if dim < 0 else d - (self._padded(x) or 0) + 1  # type: ignore[operator]
            else:
                new_dim = self._feature_dim(x, dim)  # type: ignore[arg-type]
            new_args = [self.env[a] if isinstance(a, fx.Node) else a for a in args]
            new_args[pos] = new_dim
            if out_t is None:
                raise Unpackable(f"{target} of {x.name} leaves the token layout")  # type: ignore[union-attr]
            return g.call_function(target, tuple(new_args), dict(node.kwargs))  # type: ignore[arg-type]
        row_data = _ROW_DATA.get(target) or _kernel_row_data(target, self.ops)  # type: ignore[arg-type]
        if target is self.ops.embedding_layer_norm.default:
            row_data = (0, 1, 2)
        elif target is aten.embedding.default:
            row_data = (1,)
        if row_data is not None and out_t is not None:
            def arg(i: int, a: Any) -> Any:
                if i in row_data:
                    return self._broadcast(a) if isinstance(a, fx.Node) else a
                if isinstance(a, fx.Node) and a in self.tokens:
                    raise Unpackable(f"{target} reads padded tokens as a weight")
                return self.env[a] if isinstance(a, fx.Node) else a
            return g.call_function(target, tuple(arg(i, a) for i, a in enumerate(args)), dict(node.kwargs))  # type: ignore[arg-type]
        raise Unpackable(f"{target} on padded tokens")

    def _lookup(self, node: fx.Node) -> fx.Node:
        """`gather(table, 1, index)` of one table row for every row (RoBERTa's token types looked
        up by position): the table's row indexed by each packed token's index."""
        table = node.args[0]
        while isinstance(table, fx.Node) and table.target is aten.expand.default and (shape_of(table.args[0]) or (0,))[0] == 1:
            table = table.args[0]  # type: ignore[assignment]
        if not isinstance(table, fx.Node) or table in self.tokens or (shape_of(table) or (0,))[0] != 1:
            raise Unpackable("gather from a table that differs per row")
        row = self.g.call_function(aten.select.int, (self.env[table], 0, 0))
        return self.g.call_function(aten.index_select.default, (row, 0, self.env[node.args[2]]))  # type: ignore[index]

    def _per_row_cumsum(self, node: fx.Node) -> fx.Node:
        """cumsum along the sequence (RoBERTa's positions from its ids): the running sum over all
        tokens, less what the rows before had summed."""
        g = self.g
        features = list((shape_of(node.args[0]) or ())[2:])  # type: ignore[arg-type]
        running = g.call_function(aten.cumsum.default, (self.env[node.args[0]], 0), {"dtype": value(node).dtype})  # type: ignore[index]
        zero = g.call_function(aten.new_zeros.default, (running, [1, *features]))
        shifted = g.call_function(aten.cat.default, ([zero, running], 0))
        before = g.call_function(aten.index_select.default, (shifted, 0, self._get("starts")))
        return g.call_function(aten.sub.Tensor, (running, g.call_function(
            aten.index_select.default, (before, 0, self._get("row")))))

    def _per_row_sum(self, node: fx.Node) -> fx.Node:
        """sum / mean over the sequence: each token added into its row."""
        g = self.g
        x = node.args[0]
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dtype = value(node).dtype
        tokens = g.call_function(aten._to_copy.default, (self.env[x],), {"dtype": dtype})  # type: ignore[arg-type]
        features = list((shape_of(x) or ())[2:])  # type: ignore[arg-type]
        zeros = g.call_function(aten.new_zeros.default, (tokens, [self._get("R"), *features]))
        total = g.call_function(aten.index_add.default, (zeros, 0, self._get("row"), tokens))
        if node.target is aten.mean.dim:
            counts = g.call_function(aten.sub.Tensor, (self._get("ends"), self._get("starts")))
            counts = g.call_function(aten.view.default, (counts, [-1, *([1] * len(features))]))
            total = g.call_function(aten.div.Tensor, (total, counts))
        if keepdim:
            total = g.call_function(aten.unsqueeze.default, (total, 1))
        self.tokens.discard(node)
        return total


__all__ = ["CU_SEQLENS", "MAX_SEQLEN", "Unpackable", "packed_input_names", "packed_program"]
