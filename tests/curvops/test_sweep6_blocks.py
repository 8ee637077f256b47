"""transformer_blocks and per_block against the models they partition (sweep 6).

* A fused query/key/value projection is split only by a layout known for its attention
  module, each checked against the index sets that the Hugging Face forward itself
  computes (its own split/view code applied to the positions of the output features),
  by perturbation (a query/key head's entries move that head's attention and no other,
  a value head's move only that head's output) and, for CodeGen, against the dense
  float64 Hessian; an unknown fused layout is left whole, with a logged note.
* ``kv_heads=`` and ``heads=`` contradicting the counts that the model declares are
  refused naming the argument and the model's count.
* ``head_slices`` names each bad argument; a bad selection in ``per_block``'s ``blocks``
  is reported as ``blocks`` with the block's label, not as ``params``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from curvops import HessianOperator, per_block, transformer_blocks
from curvops.blocks import ParamSlice, head_slices
from curvops.losses import sequence_cross_entropy

transformers = pytest.importorskip("transformers")

VOCAB, T = 11, 5


# ---------------------------------------------------------------------- models
def _gpt2(**extra: Any) -> nn.Module:
    settings = {"vocab_size": VOCAB, "n_positions": T, "n_embd": 8, "n_layer": 1, "n_head": 2}
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**settings, **extra}))


def _mpt() -> nn.Module:
    config = transformers.MptConfig(
        vocab_size=VOCAB, d_model=8, n_heads=2, n_layers=1, max_seq_len=T, expansion_ratio=2
    )
    return transformers.MptForCausalLM(config)


def _bigcode(multi_query: bool) -> nn.Module:
    config = transformers.GPTBigCodeConfig(
        vocab_size=VOCAB, n_positions=T, n_embd=8, n_layer=1, n_head=2, multi_query=multi_query
    )
    return transformers.GPTBigCodeForCausalLM(config)


def _codegen(width: int, heads: int) -> nn.Module:
    config = transformers.CodeGenConfig(
        vocab_size=VOCAB, n_positions=T, n_embd=width, n_layer=1, n_head=heads,
        rotary_dim=2, n_inner=16,
    )  # fmt: skip
    return transformers.CodeGenForCausalLM(config)


def _phi3(heads: int = 4, kv: int = 2, width: int = 8) -> nn.Module:
    config = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=width, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=8, num_hidden_layers=1, max_position_embeddings=T,
        pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.Phi3ForCausalLM(config)


def _built(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = make()
    model.config._attn_implementation = "eager"
    return model.double().eval()


# ---------------------------------------------------------------------- the HF index sets
# Each function applies the model's own forward code (transformers 5.x) to the positions
# of the fused output features: ``role -> (heads of the role, head_dim)`` positions.
def _split_gpt2(n: int, k: int, d: int) -> dict[str, torch.Tensor]:
    q, key, v = torch.arange(3 * n * d).split(n * d)  # c_attn(...).split(split_size)
    return {"q": q.view(-1, d), "k": key.view(-1, d), "v": v.view(-1, d)}


def _split_mpt(n: int, k: int, d: int) -> dict[str, torch.Tensor]:
    q, key, v = torch.arange(3 * n * d).chunk(3)  # mixed_qkv.chunk(3, dim=2)
    return {"q": q.reshape(n, d), "k": key.reshape(n, d), "v": v.reshape(n, d)}


def _split_phi3(n: int, k: int, d: int) -> dict[str, torch.Tensor]:
    qkv, query_pos = torch.arange((n + 2 * k) * d), n * d
    q = qkv[:query_pos]
    key = qkv[query_pos : query_pos + k * d]
    v = qkv[query_pos + k * d :]
    return {"q": q.view(-1, d), "k": key.view(-1, d), "v": v.view(-1, d)}


def _split_bigcode_mq(n: int, k: int, d: int) -> dict[str, torch.Tensor]:
    q, key, v = torch.arange((n + 2 * k) * d).split((n * d, k * d, k * d))
    return {"q": q.view(-1, d), "k": key.view(-1, d), "v": v.view(-1, d)}


def _split_bigcode(n: int, k: int, d: int) -> dict[str, torch.Tensor]:
    # c_attn(...).view(..., num_heads, 3 * head_dim).split(3 * [head_dim], dim=3)
    q, key, v = torch.arange(3 * n * d).view(n, 3 * d).split(3 * [d], dim=-1)
    return {"q": q, "k": key, "v": v}


def _split_codegen(n: int, k: int, d: int) -> dict[str, torch.Tensor]:
    local_dim = n * d // 4  # mp_num = 4
    qkv = torch.arange(3 * n * d).view(-1, 3 * local_dim)
    query, value, key = qkv.split(local_dim, dim=-1)
    return {"q": query.reshape(-1, d), "k": key.reshape(-1, d), "v": value.reshape(-1, d)}


#: name -> (model, fused projection, out projection, heads, kv heads, head_dim, HF split)
FUSED: dict[str, tuple[Callable[[], nn.Module], str, str, int, int, int, Any]] = {
    "gpt2": (_gpt2, "transformer.h.0.attn.c_attn", "c_proj", 2, 2, 4, _split_gpt2),
    "mpt": (_mpt, "transformer.blocks.0.attn.Wqkv", "out_proj", 2, 2, 4, _split_mpt),
    "phi3": (_phi3, "model.layers.0.self_attn.qkv_proj", "o_proj", 4, 2, 2, _split_phi3),
    "bigcode-mq": (
        lambda: _bigcode(True), "transformer.h.0.attn.c_attn", "c_proj", 2, 1, 4,
        _split_bigcode_mq,
    ),
    "bigcode": (
        lambda: _bigcode(False), "transformer.h.0.attn.c_attn", "c_proj", 2, 2, 4,
        _split_bigcode,
    ),
    "codegen-2-heads": (
        lambda: _codegen(8, 2), "transformer.h.0.attn.qkv_proj", "out_proj", 2, 2, 4,
        _split_codegen,
    ),
    "codegen-8-heads": (
        lambda: _codegen(16, 8), "transformer.h.0.attn.qkv_proj", "out_proj", 8, 8, 2,
        _split_codegen,
    ),
}  # fmt: skip


def _plain(blocks: dict[str, list[ParamSlice]]) -> dict[str, list[tuple[str, Any]]]:
    """A partition as comparable lists (ParamSlice compares by identity)."""
    return {
        label: [(s.name, None if s.index is None else s.index.tolist()) for s in slices]
        for label, slices in blocks.items()
    }


def _label_of(proj: str, role: str, j: int, grouped: bool) -> str:
    word = "kv-head" if grouped and role != "q" else "head"
    return f"{proj} ({role}, {word} {j})"


def _expected(model: nn.Module, case: str) -> dict[str, dict[str, list[int]]]:
    """``label -> parameter -> flat positions`` of every per-head block of the fused
    projection, from the HF split of its output features."""
    _, proj, _, n, k, d, split = FUSED[case]
    rows = split(n, k, d)
    out: dict[str, dict[str, list[int]]] = {}
    for role in "qkv":
        for j, features in enumerate(rows[role]):
            label = _label_of(proj, role, j, k != n)
            for pname, p in model.get_submodule(proj).named_parameters():
                flat = torch.arange(p.numel()).reshape(p.shape)
                conv1d = type(model.get_submodule(proj)).__name__ == "Conv1D"
                dim = 1 if conv1d and pname == "weight" else 0
                picked = flat.index_select(dim, features.sort().values).reshape(-1)
                out.setdefault(label, {})[f"{proj}.{pname}"] = sorted(picked.tolist())
    return out


@pytest.mark.parametrize("case", list(FUSED))
def test_fused_head_blocks_are_the_index_sets_of_the_hf_forward(case: str) -> None:
    model = _built(FUSED[case][0])
    proj, n = FUSED[case][1], FUSED[case][3]
    want = _expected(model, case)
    blocks = transformer_blocks(model, heads=n)
    got = {
        label: {s.name: sorted(s.index.tolist()) for s in slices}
        for label, slices in blocks.items()
        if label.startswith(proj + " (")
    }
    assert got == want
    whole = transformer_blocks(model)  # heads=None: one block per role, the union
    for role in "qkv":
        union: dict[str, list[int]] = {}
        for label, per_param in want.items():
            if f"({role}," in label:
                for pname, idx in per_param.items():
                    union[pname] = sorted(union.get(pname, []) + idx)
        got_role = {s.name: sorted(s.index.tolist()) for s in whole[f"{proj} ({role})"]}
        assert got_role == union, role


def _per_head(model: nn.Module, case: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities ``(head, query, key)`` and the heads' outputs (the input of
    the output projection) as ``(position, head, head_dim)``."""
    _, proj, out_name, n, _, d, _ = FUSED[case]
    seen = {}
    out_proj = model.get_submodule(proj.rpartition(".")[0] + "." + out_name)
    hook = out_proj.register_forward_pre_hook(lambda _, args: seen.update(x=args[0].detach()))
    try:
        with torch.no_grad():
            out = model(input_ids=x, output_attentions=True)
    finally:
        hook.remove()
    return out.attentions[0][0].detach(), seen["x"].reshape(x.shape[1], n, d)


@pytest.mark.parametrize("case", list(FUSED))
def test_fused_head_blocks_move_only_their_own_head(case: str) -> None:
    model = _built(FUSED[case][0])
    proj, n, k = FUSED[case][1], FUSED[case][3], FUSED[case][4]
    x = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(1))
    blocks = transformer_blocks(model, heads=n)
    probs, outputs = _per_head(model, case, x)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(2)
    for label in [lab for lab in blocks if lab.startswith(proj + " (")]:
        role, j = label.split("(")[1][0], int(label.rstrip(")").split()[-1])
        saved = {s.name: params[s.name].detach().clone() for s in blocks[label]}
        with torch.no_grad():
            for s in blocks[label]:
                noise = torch.randn(s.index.numel(), generator=g, dtype=torch.float64)
                params[s.name].view(-1)[s.index] += noise
        moved_p, moved_o = _per_head(model, case, x)
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        group = n // k if role != "q" else 1
        own = set(range(j * group, (j + 1) * group))
        for h in range(n):
            p_moved = (moved_p[h] - probs[h]).abs().max().item() > 1e-12
            o_moved = (moved_o[:, h] - outputs[:, h]).abs().max().item() > 1e-12
            assert p_moved == (h in own and role != "v"), (label, h)
            assert o_moved == (h in own), (label, h)


def test_codegen_head_blocks_are_the_dense_float64_hessian_sub_blocks() -> None:
    model = _built(lambda: _codegen(8, 2))
    name = "transformer.h.0.attn.qkv_proj.weight"
    x = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(3))
    data, loss = ({"input_ids": x[:, :-1]}, x[:, 1:]), sequence_cross_entropy()
    blocks = transformer_blocks(model, heads=2, params=[name])
    B = per_block(HessianOperator, model, loss, data, blocks)
    weight = model.get_parameter(name).detach()

    def f(w: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {name: w.reshape(weight.shape)}, (), data[0]).logits
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), data[1].reshape(-1))

    full = torch.autograd.functional.hessian(f, weight.reshape(-1)).numpy()
    hf = _split_codegen(2, 2, 4)
    for role in "qkv":
        for h in range(2):
            rows = hf[role][h].sort().values
            idx = (rows[:, None] * 8 + torch.arange(8)).reshape(-1).numpy()
            op = B.block(f"transformer.h.0.attn.qkv_proj ({role}, head {h})")
            dense = np.asarray(op @ np.eye(idx.size))
            tol = 1e-10 * np.abs(full).max()
            np.testing.assert_allclose(dense, full[np.ix_(idx, idx)], rtol=0, atol=tol)


class _Attention(nn.Module):
    """A fused projection of a layout that curvops does not know (here [q_h; k_h; v_h])."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.out_proj = nn.Linear(4, 4)


def test_fused_projections_of_unknown_layout_are_left_whole_with_a_note(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = nn.Module()
    model.attn = _Attention()
    with caplog.at_level(logging.INFO, logger="curvops.blocks"):
        blocks = transformer_blocks(model)
    assert list(blocks) == ["attn.qkv", "attn.out_proj (attn out)"]
    assert [s.index for s in blocks["attn.qkv"]] == [None, None]
    assert "attn.qkv is left whole" in caplog.text and "_Attention.qkv" in caplog.text
    with pytest.raises(ValueError, match=r"Argument 'heads'.*left whole: \['attn\.qkv'\]"):
        transformer_blocks(model, heads=2)
    # GPT-2's cross-attention c_attn holds only [k; v]: left whole, not cut in thirds
    cross = _built(lambda: _gpt2(add_cross_attention=True))
    labels = list(transformer_blocks(cross, heads=2))
    assert "transformer.h.0.crossattention.c_attn" in labels
    assert "transformer.h.0.attn.c_attn (v, head 1)" in labels
    assert not any("crossattention.c_attn (" in label for label in labels)


# ---------------------------------------------------------------------- kv_heads, heads
@pytest.mark.parametrize(
    ("make", "heads", "kv_heads", "declared"),
    [
        (lambda: _gpt2(n_head=4), 4, 2, "4"),
        (lambda: _phi3(4, 2), 4, 1, "2"),
        (lambda: _phi3(8, 2, 32), 8, 4, "2"),
        (lambda: _bigcode(True), 2, 2, "1"),
    ],
)
def test_kv_heads_contradicting_a_fused_projection_is_refused(
    make: Callable[[], nn.Module], heads: int, kv_heads: int, declared: str
) -> None:
    model = _built(make)
    with pytest.raises(ValueError, match=rf"Argument 'kv_heads': expected {declared}, "):
        transformer_blocks(model, heads=heads, kv_heads=kv_heads)


def test_kv_heads_matching_the_model_gives_the_model_partition() -> None:
    model = _built(lambda: _phi3(8, 2, 32))
    grouped = _plain(transformer_blocks(model, heads=8, kv_heads=2))
    assert grouped == _plain(transformer_blocks(model, heads=8))


def test_kv_heads_contradicting_the_config_of_separate_projections_is_refused() -> None:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    # kv_heads=1 with heads=2 fits the widths (8 query, 4 key features) but not the model
    with pytest.raises(ValueError, match=r"Argument '(kv_heads|heads)': expected (2|4)"):
        transformer_blocks(model, heads=2, kv_heads=1)
    with pytest.raises(ValueError, match=r"Argument 'kv_heads': expected 2,"):
        transformer_blocks(model, heads=4, kv_heads=1)


class Conv1D(nn.Module):
    """Named like GPT-2's ``Conv1D``: weight ``(in, out)``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))


def test_kv_heads_with_a_gpt2_style_conv1d_c_attn_must_be_heads() -> None:
    model = nn.Module()
    model.attn = nn.Module()
    model.attn.c_attn = Conv1D(4, 12)
    with pytest.raises(ValueError, match=r"Argument 'kv_heads': expected 2, "):
        transformer_blocks(model, heads=2, kv_heads=1)  # was cut 6 : 3 : 3 as q : k : v
    same = _plain(transformer_blocks(model, heads=2, kv_heads=2))
    assert same == _plain(transformer_blocks(model, heads=2))


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=8, max_position_embeddings=T,
    )  # fmt: skip
    return transformers.BertModel(config)


def _llama_mha() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=T,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _gpt_tiny() -> nn.Module:
    from nets.models import get_model

    return get_model("gpt-tiny", 256, 1, 64, n_layer=1, d_model=8, n_head=4, seed=0)


@pytest.mark.parametrize(
    ("make", "declared", "source"),
    [
        (_llama_mha, 4, r"num_attention_heads = 4 of the model's config"),
        (_bert, 4, r"attention\.self\.num_attention_heads = 4"),
        (lambda: _gpt2(n_head=4), 4, r"attn\.num_heads = 4"),
        (lambda: nn.TransformerEncoderLayer(8, 4, 8), 4, r"self_attn\.num_heads = 4"),
        (_gpt_tiny, 4, r"attn\.n_head = 4"),
        (lambda: _codegen(16, 4), 4, r"attn\.num_attention_heads = 4"),
        (_mpt, 2, r"attn\.n_heads = 2"),
    ],
)
def test_heads_other_than_the_declared_count_are_refused(
    make: Callable[[], nn.Module], declared: int, source: str
) -> None:
    torch.manual_seed(0)
    model = make()
    for heads in (declared // 2, 2 * declared):
        with pytest.raises(ValueError, match=rf"Argument 'heads': expected {declared},.*{source}"):
            transformer_blocks(model, heads=heads)
    assert transformer_blocks(model, heads=declared)


def test_heads_of_a_model_that_declares_none_split_as_asked() -> None:
    model = nn.Module()
    model.attn = nn.Module()
    for role in "qkv":
        setattr(model.attn, f"{role}_proj", nn.Linear(8, 8))
    for heads in (2, 4):
        blocks = transformer_blocks(model, heads=heads)
        assert blocks[f"attn.k_proj (k, head {heads - 1})"][1].index.numel() == 8 // heads


# ---------------------------------------------------------------------- head_slices, blocks=
@pytest.mark.parametrize(
    ("kwargs", "kind", "named"),
    [
        ({"shape": (4,), "num_heads": 2, "dim": 1}, ValueError, "dim"),
        ({"shape": (6, 2), "num_heads": 2, "dim": 2}, ValueError, "dim"),
        ({"shape": (6, 2), "num_heads": 2, "dim": -3}, ValueError, "dim"),
        ({"shape": (6, 2), "num_heads": 2, "dim": 0.0}, TypeError, "dim"),
        ({"shape": (6, 2), "num_heads": 2, "num_parts": 3, "part": 3}, ValueError, "part"),
        ({"shape": (6, 2), "num_heads": 2, "num_parts": 3, "part": -1}, ValueError, "part"),
        ({"shape": (6, 2), "num_heads": 2, "num_parts": 3, "part": 1.0}, TypeError, "part"),
        ({"shape": (6, 2), "num_heads": 2.0}, TypeError, "num_heads"),
        ({"shape": (6, 2), "num_heads": True}, TypeError, "num_heads"),
        ({"shape": (6, 2), "num_heads": 0}, ValueError, "num_heads"),
        ({"shape": (6, 2), "num_heads": 1, "num_parts": 0}, ValueError, "num_parts"),
        ({"shape": (6, 2), "num_heads": 1, "num_parts": 2.0}, TypeError, "num_parts"),
        ({"shape": 6, "num_heads": 1}, ValueError, "shape"),
    ],
)
def test_head_slices_names_each_bad_argument(
    kwargs: dict[str, Any], kind: type[Exception], named: str
) -> None:
    with pytest.raises(kind, match=rf"^Argument '{named}': expected "):
        head_slices(name="w", **kwargs)


def test_head_slices_counts_dim_from_the_end_and_reads_parts() -> None:
    last = head_slices((6, 2), "w", 2, dim=-1)
    assert [s.index.tolist() for s in last] == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]
    value = head_slices((6, 2), "w", 1, num_parts=3, part=2)
    assert [s.index.tolist() for s in value] == [[8, 9, 10, 11]]


def _net_and_data() -> tuple[nn.Module, Any]:
    net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    g = torch.Generator().manual_seed(0)
    data = (
        torch.randn(4, 2, dtype=torch.float64, generator=g),
        torch.randn(4, 1, dtype=torch.float64, generator=g),
    )
    return net, data


@pytest.mark.parametrize(
    ("bad", "kind", "detail"),
    [
        (["2.wieght"], ValueError, r"names of parameters.*received \['2\.wieght'\]"),
        ([], ValueError, r"at least one parameter; received \[\]"),
        ("9.*", ValueError, r"a pattern matching.*received '9\.\*'"),
        ([ParamSlice("2.wieght", [0])], ValueError, r"names of parameters.*'2\.wieght'"),
        (7, TypeError, r"received 7"),
    ],
)
@pytest.mark.parametrize("params", [None, ["0.weight", "2.weight"]])
def test_a_bad_block_selection_names_blocks_and_the_block(
    bad: Any, kind: type[Exception], detail: str, params: Any
) -> None:
    net, data = _net_and_data()
    blocks = {"first": ["0.*"], "bad one": bad}
    with pytest.raises(kind, match=rf"^Argument 'blocks': expected .*'bad one'.*{detail}"):
        per_block(HessianOperator, net, nn.MSELoss(), data, blocks, params=params)
