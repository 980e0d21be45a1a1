"""Channel groups in units of whole attention heads, and the channel family's rewrite on them.

The strong check everywhere: the pruned graph's output equals the unpruned model's output with the
pruned heads masked, i.e. the output projection's input columns of those heads zeroed (each head
only reaches the rest of the model through those columns).
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify
from sparsify import ir
from sparsify.capture import capture
from sparsify.passes.families.channel.groups import find_channel_groups, layer_fqn
from sparsify.passes.families.channel.prune import channel_scores, prune_channel_group

aten = torch.ops.aten


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat([-x2, x1], dim=-1)


class MHA(nn.Module):
    """q, k, v, o Linears; heads split by view, joined by reshape.

    attn: "sdpa" (F.scaled_dot_product_attention) or "matmul" (q @ k^T / sqrt(d), softmax, @ v).
    kv_heads < heads: grouped-query attention, by SDPA's enable_gqa or by repeating k/v (Llama's
    repeat_kv: expand + reshape). rotary: rotary position embedding on q and k (within a head).
    """

    def __init__(self, dim=32, heads=4, kv_heads=None, attn="sdpa", rotary=False, gqa_by_repeat=False):
        super().__init__()
        torch.manual_seed(0)
        self.h, self.kv = heads, kv_heads or heads
        self.d = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, self.kv * self.d)
        self.v = nn.Linear(dim, self.kv * self.d)
        self.o = nn.Linear(dim, dim)
        self.attn, self.rotary, self.gqa_by_repeat = attn, rotary, gqa_by_repeat

    def _rope(self, t, T):
        pos = torch.arange(T, dtype=torch.float32)[:, None]
        freq = pos / 10000 ** (torch.arange(0, self.d, 2, dtype=torch.float32) / self.d)
        emb = torch.cat([freq, freq], dim=-1)
        return t * emb.cos() + _rotate_half(t) * emb.sin()

    def _repeat_kv(self, t):
        B, H, T, D = t.shape
        rep = self.h // H
        return t[:, :, None, :, :].expand(B, H, rep, T, D).reshape(B, H * rep, T, D)

    def forward(self, x):
        B, T, E = x.shape
        q = self.q(x).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(B, T, self.kv, self.d).transpose(1, 2)
        v = self.v(x).view(B, T, self.kv, self.d).transpose(1, 2)
        if self.rotary:
            q, k = self._rope(q, T), self._rope(k, T)
        if self.gqa_by_repeat:
            k, v = self._repeat_kv(k), self._repeat_kv(v)
        if self.attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.kv != self.h and not self.gqa_by_repeat)
        else:
            y = ((q @ k.transpose(-2, -1)) / math.sqrt(self.d)).softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(B, T, E))


def _x(shape=(2, 5, 32), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _capture(model, *args):
    return capture(model.eval(), args).root


def _group_of(groups, producer):
    return next(g for g in groups if producer in g.producer_fqns)


def _weight(gm, fqn):
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in ir.WEIGHT_OPS and layer_fqn(n) == fqn:
            return ir.fetch_attr(gm, n.args[ir.WEIGHT_OPS[n.target][2]].target)
    raise KeyError(fqn)


def _masked(model, linear, dropped, unit):
    """A copy of `model` whose `linear` ignores input blocks `dropped` (of `unit` features each)."""
    masked = copy.deepcopy(model)
    w = masked.get_submodule(linear).weight
    with torch.no_grad():
        for j in dropped:
            w[:, j * unit:(j + 1) * unit] = 0
    return masked


def _out(y):
    return y[0] if isinstance(y, (tuple, list)) else y


# ---- the group ------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "matmul"])
def test_heads_couple_q_k_v_and_the_output_projection(attn):
    model = MHA(attn=attn).eval()
    gm = _capture(model, _x())
    groups = find_channel_groups(gm)
    g = _group_of(groups, "q")
    assert g.prunable, g.reason
    assert g.channels == 4 and g.unit == 8, "one group channel = one head of head_dim 8"
    assert set(g.producer_fqns) == {"q", "k", "v"} and g.consumer_fqns == ["o"]
    params = dict(g.params)
    assert params["q.weight"] == params["k.weight"] == params["v.weight"] == 0 and params["o.weight"] == 1
    assert not any(set(gg.producer_fqns) & {"k", "v"} for gg in groups if gg is not g)
    scores = channel_scores(gm, g)
    w = torch.cat([model.q.weight, model.k.weight, model.v.weight], 0).detach()
    by_head = [sum(model.get_submodule(p).weight[h * 8:(h + 1) * 8].detach().norm() for p in "qkv")
               for h in range(4)]
    assert w.shape == (96, 32)
    torch.testing.assert_close(scores.float(), torch.stack(by_head), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "matmul"])
def test_pruning_heads_equals_masking_them(attn):
    model = MHA(attn=attn).eval()
    x = _x()
    gm = _capture(model, x)
    g = _group_of(find_channel_groups(gm), "q")
    prune_channel_group(gm, g, [1, 3])
    for fqn in "qkv":
        assert tuple(_weight(gm, fqn).shape) == (16, 32)
    assert tuple(_weight(gm, "o").shape) == (32, 16)
    views = [list(n.args[1]) for n in gm.graph.nodes if n.target in (aten.view.default, aten.reshape.default)]
    assert views == [[2, 5, 2, 8]] * 3 + [[2, 5, 16]], "H -> H' in the head split, H*D -> H'*D in the join"
    ref = _masked(model, "o", dropped=[0, 2], unit=8)(x)
    torch.testing.assert_close(_out(gm(x)), ref, atol=1e-5, rtol=1e-5)
    gm.graph.lint()


def test_rotary_embedding_stays_within_a_head():
    model = MHA(rotary=True).eval()
    x = _x()
    gm = _capture(model, x)
    g = _group_of(find_channel_groups(gm), "q")
    assert g.prunable and g.unit == 8, g.reason
    prune_channel_group(gm, g, [0, 3])
    torch.testing.assert_close(_out(gm(x)), _masked(model, "o", [1, 2], 8)(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("by_repeat", [False, True], ids=["enable_gqa", "repeat_kv"])
def test_grouped_query_attention_prunes_whole_kv_groups(by_repeat):
    # 4 q heads share 2 k/v heads: a group channel is one k/v head with its 2 q heads
    model = MHA(heads=4, kv_heads=2, gqa_by_repeat=by_repeat, attn="matmul" if by_repeat else "sdpa").eval()
    x = _x()
    gm = _capture(model, x)
    g = _group_of(find_channel_groups(gm), "q")
    assert g.prunable, g.reason
    assert g.channels == 2 and set(g.producer_fqns) == {"q", "k", "v"}
    prune_channel_group(gm, g, [1])
    assert tuple(_weight(gm, "q").shape) == (16, 32) and tuple(_weight(gm, "k").shape) == (8, 32)
    assert tuple(_weight(gm, "o").shape) == (32, 16)
    torch.testing.assert_close(_out(gm(x)), _masked(model, "o", [0, 1], 8)(x), atol=1e-5, rtol=1e-5)


# ---- what is still refused -------------------------------------------------------------------------
def test_single_head_attention_contracting_the_channels_is_not_prunable():
    class OneHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            a = (self.q(x) @ self.k(x).transpose(1, 2)).softmax(-1)
            return self.o(a @ self.v(x))

    gm = _capture(OneHead(), _x((2, 5, 16)))
    groups = find_channel_groups(gm)
    g = _group_of(groups, "q")
    assert not g.prunable and "is contracted by aten.matmul" in g.reason
    v = _group_of(groups, "v")
    assert v.prunable and v.consumer_fqns == ["o"], "v's features pass through a @ v unchanged"


# ---- through compile, and Hugging Face models -------------------------------------------------------
def test_compile_with_channel_pattern_prunes_heads():
    model = MHA().eval()
    x = _x()
    ref = model(x)
    sm = sparsify.compile(model, x, sparsify.Config(weight=sparsify.Channel(0.5), max_error=10.0))
    y = sm(x)
    assert y.shape == ref.shape and torch.isfinite(y).all()
    gm = sm.graph_module
    assert tuple(_weight(gm, "q").shape) == (16, 32) and tuple(_weight(gm, "o").shape) == (32, 16)
    for fqn in "qkv":
        assert "kept 2/4 heads of 8 channels" in sm.plan[fqn].reason   # the group of q, k and v


def _hf(name):
    transformers = pytest.importorskip("transformers")
    if name == "bert":
        cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, vocab_size=128, max_position_embeddings=64,
                                      pad_token_id=0)
        cfg._attn_implementation = "eager"
        model = transformers.BertModel(cfg)
        ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
        return (model.eval(), (ids,), ["encoder.layer.{}.attention.self." + p for p in ("query", "key", "value")],
                "encoder.layer.{}.attention.output.dense")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    model = transformers.ViTModel(cfg, add_pooling_layer=False)
    return (model.eval(), (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),),
            ["layers.{}.attention." + p for p in ("q_proj", "k_proj", "v_proj")], "layers.{}.attention.o_proj")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "vit"])
def test_hf_attention_heads_prune_and_equal_masking(name):
    model, args, qkv, out = _hf(name)
    gm = _capture(model, *args)
    groups = find_channel_groups(gm)
    masked = model
    dropped = {0: [0, 2], 1: [3]}
    for layer, drop in dropped.items():
        g = _group_of(groups, qkv[0].format(layer))
        assert g.prunable, g.reason
        assert g.channels == 4 and g.unit == 16
        assert set(g.producer_fqns) == {p.format(layer) for p in qkv}
        assert g.consumer_fqns == [out.format(layer)]
        prune_channel_group(gm, g, [h for h in range(4) if h not in drop])
        masked = _masked(masked, out.format(layer), drop, 16)
    assert tuple(_weight(gm, qkv[1].format(0)).shape) == (32, 64)
    assert tuple(_weight(gm, out.format(1)).shape) == (64, 48)
    ref_gm = _capture(masked, *args)
    y, ref = gm(*args), ref_gm(*args)
    for a, b in zip(y if isinstance(y, tuple) else (y,), ref if isinstance(ref, tuple) else (ref,)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
