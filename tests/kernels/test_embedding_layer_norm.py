"""kernels/embedding_layer_norm.py: fused BERT embeddings + LayerNorm against references."""

from __future__ import annotations

import pytest
import torch

import kiln_kernels
from kiln_kernels.embedding_layer_norm import (
    embedding_layer_norm_cost,
    embedding_layer_norm_reference,
    embedding_layer_norm_triton,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tables(vocab, max_pos, types, hidden, dtype, device):
    word = torch.randn(vocab, hidden).to(dtype).to(device)
    pos = torch.randn(max_pos, hidden).to(dtype).to(device) if max_pos else None
    typ = torch.randn(types, hidden).to(dtype).to(device) if types else None
    w = (1 + 0.1 * torch.randn(hidden)).to(dtype).to(device)
    b = torch.randn(hidden).to(dtype).to(device)
    return word, pos, typ, w, b


def _d(t):
    return t.double().cpu() if t is not None else None


def _c(t):
    return t.cpu() if t is not None else None


# (input_ids shape, hidden): a single token, odd batch/sequence sizes, a wide odd hidden
SHAPES = [((1, 1), 1), ((3, 7), 33), ((2, 5), 129), ((11,), 1000)]


@pytest.mark.parametrize("ids_shape,hidden", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bert_embeddings_match_float64_reference(device, dtype, ids_shape, hidden, poisoned, assert_close):
    word, pos, typ, w, b = _tables(50, 16, 2, hidden, dtype, device)
    ids = torch.randint(0, 50, ids_shape, device=device)
    type_ids = torch.randint(0, 2, ids_shape, device=device)
    out = poisoned((*ids_shape, hidden), dtype, device)
    embedding_layer_norm_triton(ids, word, pos, typ, w, b, 1e-12, token_type_ids=type_ids, out=out)
    ref = embedding_layer_norm_reference(_c(ids), _d(word), _d(pos), _d(typ), _d(w), _d(b), 1e-12,
                                         token_type_ids=_c(type_ids))
    assert_close(out, ref, dtype)


def test_explicit_broadcast_position_ids_and_int32_ids(device, assert_close):
    word, pos, typ, w, b = _tables(30, 20, 2, 48, torch.float32, device)
    ids = torch.randint(0, 30, (3, 6), device=device, dtype=torch.int32)
    pos_ids = torch.arange(4, 10, device=device, dtype=torch.int32)[None]  # HF's [1, S] buffer
    got = embedding_layer_norm_triton(ids, word, pos, typ, w, b, 1e-12, position_ids=pos_ids)
    ref = embedding_layer_norm_reference(_c(ids), _d(word), _d(pos), _d(typ), _d(w), _d(b), 1e-12,
                                         position_ids=_c(pos_ids))
    assert_close(got, ref)


@pytest.mark.parametrize("with_pos,with_type", [(False, False), (True, False), (False, True)])
def test_optional_tables_and_no_bias(device, with_pos, with_type, assert_close):
    word, pos, typ, w, _ = _tables(20, 8 if with_pos else 0, 3 if with_type else 0, 40, torch.float32, device)
    ids = torch.randint(0, 20, (2, 7), device=device)
    got = embedding_layer_norm_triton(ids, word, pos, typ, w, None, 1e-5)
    ref = embedding_layer_norm_reference(_c(ids), _d(word), _d(pos), _d(typ), _d(w), None, 1e-5)
    assert_close(got, ref)


def test_wide_hidden_takes_looped_path(device, poisoned, assert_close):
    word, pos, typ, w, b = _tables(10, 8, 2, 300, torch.float32, device)
    ids = torch.randint(0, 10, (5,), device=device)
    tt = torch.randint(0, 2, (5,), device=device)
    out = poisoned((5, 300), torch.float32, device)
    embedding_layer_norm_triton(ids, word, pos, typ, w, b, 1e-12, token_type_ids=tt, out=out, block_n=64)
    ref = embedding_layer_norm_reference(_c(ids), _d(word), _d(pos), _d(typ), _d(w), _d(b), 1e-12,
                                         token_type_ids=_c(tt))
    assert_close(out, ref)


def test_custom_op_matches_hugging_face_bert_embeddings(op_device, assert_close):
    # Hugging Face BertEmbeddings: sum of three nn.Embedding lookups, then nn.LayerNorm
    word, pos, typ, w, b = _tables(40, 16, 2, 32, torch.float32, op_device)
    ids = torch.randint(0, 40, (2, 9), device=op_device)
    tt = torch.randint(0, 2, (2, 9), device=op_device)
    expected = torch.nn.functional.layer_norm(
        word[ids] + pos[torch.arange(9, device=op_device)][None] + typ[tt], (32,), w, b, 1e-12
    )
    got = torch.ops.kiln.embedding_layer_norm(ids, None, tt, word, pos, typ, w, b, 1e-12)
    assert got.device.type == op_device
    assert_close(got, expected)


def test_opcheck_schema_fake_and_dispatch(op_device):
    word, pos, typ, w, b = _tables(40, 16, 2, 32, torch.float32, op_device)
    ids = torch.randint(0, 40, (2, 9), device=op_device)
    tt = torch.randint(0, 2, (2, 9), device=op_device)
    pos_ids = torch.arange(9, device=op_device)[None]
    torch.library.opcheck(torch.ops.kiln.embedding_layer_norm.default,
                          (ids, None, tt, word, pos, typ, w, b, 1e-12))
    torch.library.opcheck(torch.ops.kiln.embedding_layer_norm.default,
                          (ids, pos_ids, None, word, pos, None, w, None, 1e-5))


class _Embeddings(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word = torch.nn.Parameter(torch.randn(40, 16))
        self.pos = torch.nn.Parameter(torch.randn(16, 16))
        self.typ = torch.nn.Parameter(torch.randn(2, 16))
        self.w = torch.nn.Parameter(torch.ones(16))
        self.b = torch.nn.Parameter(torch.zeros(16))

    def forward(self, ids: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return torch.ops.kiln.embedding_layer_norm(
            ids, None, tt, self.word, self.pos, self.typ, self.w, self.b, 1e-12
        )


def test_export_traces_through_the_op(assert_close):
    args = (torch.randint(0, 40, (2, 5)), torch.randint(0, 2, (2, 5)))
    m = _Embeddings()
    ep = torch.export.export(m, args)
    assert "kiln.embedding_layer_norm.default" in {str(n.target) for n in ep.graph.nodes}
    assert_close(ep.module()(*args), m(*args))


def test_cost_model_counts_flops_and_bytes_by_hand():
    # BERT-base: 8 x 128 tokens, H = 768, fp16 tables, int64 input and token-type ids
    t = 8 * 128
    c = embedding_layer_norm_cost(t, 768, torch.float16)
    assert c.flops == t * 768 * (2 + 7)
    assert c.bytes == t * 2 * 8 + t * 768 * 3 * 2 + 768 * 2 * 2 + t * 768 * 2
    ids = torch.empty(8, 128, dtype=torch.int64, device="meta")
    word = torch.empty(30522, 768, dtype=torch.float16, device="meta")
    pos = torch.empty(512, 768, dtype=torch.float16, device="meta")
    typ = torch.empty(2, 768, dtype=torch.float16, device="meta")
    w = torch.empty(768, dtype=torch.float16, device="meta")
    assert kiln_kernels.op_cost("embedding_layer_norm", ids, None, ids, word, pos, typ, w, w, 1e-12) == c
