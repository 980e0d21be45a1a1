"""Channel groups through packed projections and splits: one Linear for q|k|v (split, chunk, or a
view into [.., 3, H, D] and unbind; grouped-query parts of unequal size), a packed gate|up FFN, a
concat split apart again.

The strong check everywhere: the pruned graph's output equals the unpruned model's output with the
pruned channels masked at the consumer (its input columns of those channels zeroed).
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
E, H, D = 32, 4, 8


class PackedAttention(nn.Module):
    """One Linear makes q, k and v; `how` takes them apart:
    "split": .split(E, -1) (GPT-2), "chunk": .chunk(3, -1), "slice": p[..., :E], p[..., E:2E],
    p[..., 2E:] (Phi-3), "unbind": view [B, T, 3, H, D], permute, unbind (timm ViT),
    "interleaved": view [B, T, H, 3D], split the last dim (GPT-NeoX)."""

    def __init__(self, how="split", attn="sdpa"):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.o = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.how, self.attn = how, attn

    def _heads(self, t, B, T):
        return t.reshape(B, T, H, D).transpose(1, 2)

    def forward(self, x):
        B, T, _ = x.shape
        p = self.qkv(x)
        if self.how in ("split", "chunk"):
            parts = p.split(E, dim=-1) if self.how == "split" else p.chunk(3, dim=-1)
            q, k, v = (self._heads(t, B, T) for t in parts)
        elif self.how == "slice":
            q, k, v = (self._heads(t, B, T) for t in (p[..., :E], p[..., E:2 * E], p[..., 2 * E:]))
        elif self.how == "unbind":
            q, k, v = p.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (t.transpose(1, 2) for t in p.view(B, T, H, 3 * D).split(D, dim=-1))
        if self.attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = ((q @ k.transpose(-2, -1)) / math.sqrt(D)).softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(B, T, E))


def _x(shape=(2, 5, E), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _capture(model, *args):
    return capture(model.eval(), args).root


def _group_of(gm, producer):
    return next(g for g in find_channel_groups(gm) if producer in g.producer_fqns)


def _weight(gm, fqn):
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in ir.WEIGHT_OPS and layer_fqn(n) == fqn:
            return ir.fetch_attr(gm, n.args[ir.WEIGHT_OPS[n.target][2]].target)
    raise KeyError(fqn)


def _masked_columns(model, linear, columns):
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.get_submodule(linear).weight[:, columns] = 0
    return masked


def _head_columns(heads, unit=D):
    return [c for h in heads for c in range(h * unit, (h + 1) * unit)]


def _out(y):
    return y[0] if isinstance(y, (tuple, list)) else y


def _head_rows(how, h):
    """Rows of the packed weight that belong to head h (in all three parts)."""
    if how == "interleaved":   # [H, 3D]: head h's q, k, v rows are adjacent
        return list(range(h * 3 * D, (h + 1) * 3 * D))
    return [part * E + r for part in range(3) for r in range(h * D, (h + 1) * D)]


# ---- packed q|k|v ------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["split", "chunk", "slice", "unbind", "interleaved"])
def test_packed_qkv_groups_one_head_across_its_three_parts(how):
    model = PackedAttention(how).eval()
    gm = _capture(model, _x())
    g = _group_of(gm, "qkv")
    assert g.prunable, g.reason
    assert g.channels == H and g.producer_fqns == ["qkv"] and g.consumer_fqns == ["o"]
    assert dict(g.params) == {"qkv.weight": 0, "qkv.bias": 0, "o.weight": 1}
    scores = channel_scores(gm, g)
    w = model.qkv.weight.detach()
    expected = torch.stack([w[_head_rows(how, h)].norm() for h in range(H)])
    torch.testing.assert_close(scores.float(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "matmul"])
@pytest.mark.parametrize("how", ["split", "chunk", "slice", "unbind", "interleaved"])
def test_pruning_packed_qkv_heads_equals_masking_them(how, attn):
    model = PackedAttention(how, attn).eval()
    x = _x()
    gm = _capture(model, x)
    prune_channel_group(gm, _group_of(gm, "qkv"), [0, 3])
    assert tuple(_weight(gm, "qkv").shape) == (3 * 2 * D, E)
    assert tuple(_weight(gm, "o").shape) == (E, 2 * D)
    ref = _masked_columns(model, "o", _head_columns([1, 2]))(x)
    torch.testing.assert_close(_out(gm(x)), ref, atol=1e-5, rtol=1e-5)
    gm.graph.lint()
    # the pruned rows are exactly the kept heads' rows of every part
    kept = [r for h in (0, 3) for r in _head_rows(how, h)]
    if how != "interleaved":
        kept = sorted(kept)
    torch.testing.assert_close(_weight(gm, "qkv"), model.qkv.weight[kept].detach())


@pytest.mark.parametrize("how", ["split", "chunk"])
def test_split_along_the_channel_dim_becomes_split_with_sizes(how):
    model = PackedAttention(how).eval()
    gm = _capture(model, _x())
    prune_channel_group(gm, _group_of(gm, "qkv"), [2])
    splits = [n for n in gm.graph.nodes if n.op == "call_function" and "split" in str(n.target)
              or n.target == aten.chunk.default]
    assert len(splits) == 1 and splits[0].target == aten.split_with_sizes.default
    assert list(splits[0].args[1]) == [D, D, D]
    prov = splits[0].meta[ir.FROM]
    assert prov.pass_name == "rewrite_sites" and f"[{E}, {E}, {E}] -> [{D}, {D}, {D}]" in prov.detail


def test_compile_prunes_packed_qkv_heads_and_reports_them():
    model = PackedAttention("split").eval()
    x = _x()
    sm = sparsify.compile(model, x, sparsify.Config(weight=sparsify.Channel(0.5), max_error=10.0))
    gm = sm.graph_module
    assert tuple(_weight(gm, "qkv").shape) == (3 * E // 2, E) and tuple(_weight(gm, "o").shape) == (E, E // 2)
    assert "kept 2/4 heads of 8 channels" in sm.plan.layers["qkv"].reason
    assert sm(x).shape == model(x).shape and torch.isfinite(sm(x)).all()


# ---- packed gate|up FFN ------------------------------------------------------------------------
class PackedSwiGLU(nn.Module):
    def __init__(self, dim=E, hidden=24):
        super().__init__()
        torch.manual_seed(0)
        self.gate_up, self.down = nn.Linear(dim, 2 * hidden, bias=False), nn.Linear(hidden, dim)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def test_packed_gate_up_prunes_a_hidden_unit_in_both_halves():
    model = PackedSwiGLU().eval()
    x = _x()
    gm = _capture(model, x)
    g = _group_of(gm, "gate_up")
    assert g.prunable, g.reason
    assert g.channels == 24 and g.unit == 1 and g.consumer_fqns == ["down"]
    keep = [0, 2, 3, 5, 7, 11, 13, 17, 19, 23]
    prune_channel_group(gm, g, keep)
    w = model.gate_up.weight.detach()
    torch.testing.assert_close(_weight(gm, "gate_up"), torch.cat([w[keep], w[[24 + k for k in keep]]]))
    dropped = [c for c in range(24) if c not in keep]
    torch.testing.assert_close(_out(gm(x)), _masked_columns(model, "down", dropped)(x), atol=1e-5, rtol=1e-5)


# ---- concat split apart again, and splits along other dims -------------------------------------
class CatSplit(nn.Module):
    """Two convs concatenated along channels, split back at another boundary: conv a's 4 channels
    and conv b's first 2 go to c, b's last 4 to d."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.c, self.d = nn.Conv2d(6, 5, 3, padding=1), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        left, right = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1).split([6, 4], dim=1)
        return self.c(left) + self.d(right)


def test_cat_then_split_follows_each_input_into_its_piece():
    model = CatSplit().eval()
    x = _x((2, 3, 6, 6))
    gm = _capture(model, x)
    a = _group_of(gm, "a")
    assert a.prunable, a.reason
    assert a.consumer_fqns == ["c"]
    b = _group_of(gm, "b")
    assert not b.prunable and "span several of the pieces [6, 4]" in b.reason
    prune_channel_group(gm, a, [1, 3])
    assert tuple(_weight(gm, "c").shape) == (5, 4, 3, 3)
    split = next(n for n in gm.graph.nodes if n.target == aten.split_with_sizes.default)
    assert list(split.args[1]) == [4, 4], "the first piece lost a's two pruned channels"
    ref = _masked_columns(model, "c", [0, 2])(x)
    torch.testing.assert_close(gm(x)[0] if isinstance(gm(x), tuple) else gm(x), ref, atol=1e-5, rtol=1e-5)


def test_split_along_another_dim_carries_the_channels_into_every_piece():
    class Tokens(nn.Module):   # split the tokens, treat the halves differently, join them again
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.up, self.down = nn.Linear(E, 16), nn.Linear(16, E)

        def forward(self, x):
            first, rest = self.up(x).split([2, 3], dim=1)
            return self.down(torch.cat([F.relu(first), F.gelu(rest)], dim=1))

    model = Tokens().eval()
    x = _x()
    gm = _capture(model, x)
    g = _group_of(gm, "up")
    assert g.prunable and g.consumer_fqns == ["down"], g.reason
    prune_channel_group(gm, g, list(range(0, 16, 2)))
    ref = _masked_columns(model, "down", list(range(1, 16, 2)))(x)
    torch.testing.assert_close(_out(gm(x)), ref, atol=1e-5, rtol=1e-5)


class CatSlice(CatSplit):
    """The same as CatSplit with slices: y[:, :6] to c, y[:, 6:] to d."""

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        return self.c(y[:, :6]) + self.d(y[:, 6:])


def test_cat_then_slices_move_their_bounds_past_pruned_channels():
    model = CatSlice().eval()
    x = _x((2, 3, 6, 6))
    gm = _capture(model, x)
    b = _group_of(gm, "b")
    assert not b.prunable and "cutting through them" in b.reason
    a = _group_of(gm, "a")
    assert a.prunable and a.consumer_fqns == ["c"], a.reason
    prune_channel_group(gm, a, [0, 3])
    bounds = sorted(tuple(n.args[2:4]) for n in gm.graph.nodes if n.target == aten.slice.Tensor and n.args[1] == 1)
    assert bounds == [(0, 4), (4, 8)], "the first slice lost 2 of a's channels; the second starts 2 earlier"
    ref = _masked_columns(model, "c", [1, 2])(x)
    torch.testing.assert_close(_out(gm(x)), ref, atol=1e-5, rtol=1e-5)


# ---- packed grouped-query q|k|v: parts of unequal size --------------------------------------------
class PackedGQA(nn.Module):
    """q | k | v of sizes E, E/2, E/2 in one Linear (Phi-3-medium's qkv_proj): 4 q heads share 2 k/v
    heads. `how`: "split" (split_with_sizes) or "slice" (three slices, as Phi-3 does)."""

    def __init__(self, how="split", attn="sdpa"):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.o = nn.Linear(E, 2 * E), nn.Linear(E, E)
        self.how, self.attn = how, attn

    def forward(self, x):
        B, T, _ = x.shape
        p, kv = self.qkv(x), E // 2
        if self.how == "split":
            q, k, v = p.split([E, kv, kv], dim=-1)
        else:
            q, k, v = p[..., :E], p[..., E:E + kv], p[..., E + kv:]
        q = q.view(B, T, H, D).transpose(1, 2)
        k, v = (t.view(B, T, H // 2, D).transpose(1, 2) for t in (k, v))
        if self.attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:   # repeat k/v for each of its q heads (Llama's repeat_kv)
            k, v = (t[:, :, None].expand(B, H // 2, 2, T, D).reshape(B, H, T, D) for t in (k, v))
            y = ((q @ k.transpose(-2, -1)) / math.sqrt(D)).softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(B, T, E))


@pytest.mark.parametrize("how", ["split", "slice"])
def test_packed_gqa_channel_is_a_kv_head_with_its_q_heads(how):
    gm = _capture(PackedGQA(how), _x())
    g = _group_of(gm, "qkv")
    assert g.prunable, g.reason
    assert g.channels == 2 and g.unit == D and g.weights == (2, 1, 1) and g.consumer_fqns == ["o"]
    # kv group 1: q heads 2, 3 (rows 16..31), k head 1 (rows 40..47), v head 1 (rows 56..63)
    rows = g.map_of(g.seed).entries(torch.tensor([1])).tolist()
    assert rows == [*range(2 * D, 4 * D), *range(E + D, E + 2 * D), *range(E + E // 2 + D, 2 * E)]
    assert "32+16+16" not in g.describe() and "16+8+8 entries (3 packed parts)" in g.describe()


@pytest.mark.parametrize("attn", ["sdpa", "matmul"])
@pytest.mark.parametrize("how", ["split", "slice"])
def test_pruning_a_packed_gqa_kv_group_equals_masking_its_q_heads(how, attn):
    model, x = PackedGQA(how, attn).eval(), _x()
    gm = _capture(model, x)
    prune_channel_group(gm, _group_of(gm, "qkv"), [0])
    assert tuple(_weight(gm, "qkv").shape) == (E, E) and tuple(_weight(gm, "o").shape) == (E, E // 2)
    ref = _masked_columns(model, "o", _head_columns([2, 3]))(x)   # kv group 1 served q heads 2 and 3
    torch.testing.assert_close(_out(gm(x)), ref, atol=1e-5, rtol=1e-5)
    if how == "split":
        split = next(n for n in gm.graph.nodes if n.target == aten.split_with_sizes.default)
        assert list(split.args[1]) == [E // 2, E // 4, E // 4]
    else:
        bounds = sorted(tuple(n.args[2:4]) for n in gm.graph.nodes
                        if n.target == aten.slice.Tensor and n.args[1] in (-1, 2))
        assert [(min(a, E), min(b, E)) for a, b in bounds] == [(0, 16), (16, 24), (24, E)]


def test_compile_reports_a_packed_gqa_channel_as_its_parts():
    model, x = PackedGQA().eval(), _x()
    sm = sparsify.compile(model, x, sparsify.Config(weight=sparsify.Channel(0.5), max_error=10.0))
    assert tuple(_weight(sm.graph_module, "qkv").shape) == (E, E)
    assert "kept 1/2 blocks of 16+8+8 channels (3 packed parts)" in sm.plan.layers["qkv"].reason
    assert sm(x).shape == model(x).shape and torch.isfinite(sm(x)).all()


# ---- what is still refused ----------------------------------------------------------------------
def test_split_into_pieces_sharing_one_channel_is_not_prunable():
    class Uneven(nn.Module):   # pieces 3 and 7 share no common block: one channel would be everything
        def __init__(self):
            super().__init__()
            self.p, self.a, self.b = nn.Linear(E, 10), nn.Linear(3, E), nn.Linear(7, E)

        def forward(self, x):
            u, v = self.p(x).split([3, 7], dim=-1)
            return self.a(u) + self.b(v)

    g = _group_of(_capture(Uneven(), _x()), "p")
    assert not g.prunable and "span several of the pieces [3, 7]" in g.reason


def test_unbinding_the_channel_dim_is_not_prunable():
    class Unbind(nn.Module):
        def __init__(self):
            super().__init__()
            self.p, self.o = nn.Linear(E, 3), nn.Linear(1, E)

        def forward(self, x):
            a, b, c = self.p(x).unbind(-1)
            return self.o((a * b + c)[..., None])

    gm = _capture(Unbind(), _x())
    g = _group_of(gm, "p")
    assert not g.prunable and "unbinds the channel dim" in g.reason


def test_slice_cutting_through_a_layers_channels_is_not_prunable():
    class Cut(nn.Module):
        def __init__(self):
            super().__init__()
            self.p, self.o = nn.Linear(E, 10), nn.Linear(7, E)

        def forward(self, x):
            return self.o(self.p(x)[..., 3:])

    gm = _capture(Cut(), _x())
    g = _group_of(gm, "p")
    assert not g.prunable and "slices 3..9 out of channels 0..9" in g.reason


# ---- Hugging Face GPT-2: Conv1D (addmm) with a packed c_attn split into q, k, v ----------------
@pytest.mark.slow
def test_hf_gpt2_heads_prune_and_equal_masking():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(cfg).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    gm = _capture(model, ids)
    groups = find_channel_groups(gm)
    masked = copy.deepcopy(model)
    keep = {0: [1, 3], 1: [0, 1, 2]}
    for layer, kept in keep.items():
        g = next(g for g in groups if f"h.{layer}.attn.c_attn" in g.producer_fqns)
        assert g.prunable, g.reason
        assert g.channels == 4 and g.unit == 16 and g.consumer_fqns == [f"h.{layer}.attn.c_proj"]
        prune_channel_group(gm, g, kept)
        with torch.no_grad():   # Conv1D weights are [in, out]: a head's input rows of c_proj
            for h in set(range(4)) - set(kept):
                masked.h[layer].attn.c_proj.weight[h * 16:(h + 1) * 16] = 0
    assert tuple(_weight(gm, "h.0.attn.c_attn").shape) == (64, 3 * 32)
    assert tuple(_weight(gm, "h.1.attn.c_proj").shape) == (48, 64)
    y = gm(ids)
    y = y.last_hidden_state if hasattr(y, "last_hidden_state") else _out(y)
    torch.testing.assert_close(y, masked(ids).last_hidden_state, atol=1e-4, rtol=1e-4)


# ---- Hugging Face Phi-3: packed qkv_proj taken apart by slices, packed gate_up_proj by chunk -------
@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_hf_phi3_packed_attention_and_ffn_prune_and_equal_masking(kv_heads):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=kv_heads, vocab_size=128, max_position_embeddings=64,
                                  pad_token_id=0, bos_token_id=0, eos_token_id=0, use_cache=False)
    model = transformers.Phi3Model(cfg).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    gm = _capture(model, ids)
    attn = _group_of(gm, "layers.0.self_attn.qkv_proj")
    rep = 4 // kv_heads
    assert attn.prunable and attn.channels == kv_heads and attn.unit == 16, attn.reason
    assert attn.weights == (rep, 1, 1)
    kept = [0, 2] if kv_heads == 4 else [1]   # gqa: kv group 1 and its q heads 2, 3
    prune_channel_group(gm, attn, kept)
    ffn = _group_of(gm, "layers.0.mlp.gate_up_proj")
    assert ffn.prunable and ffn.channels == 96, ffn.reason
    keep = list(range(0, 96, 3))
    prune_channel_group(gm, ffn, keep)
    assert tuple(_weight(gm, "layers.0.self_attn.qkv_proj").shape) == ((rep + 2) * 16 * len(kept), 64)
    assert tuple(_weight(gm, "layers.0.mlp.gate_up_proj").shape) == (2 * 32, 64)
    q_heads_gone = [h for h in range(4) if h // rep not in kept]
    masked = _masked_columns(model, "layers.0.self_attn.o_proj", _head_columns(q_heads_gone, 16))
    masked = _masked_columns(masked, "layers.0.mlp.down_proj", [c for c in range(96) if c not in keep])
    y = gm(ids)
    y = y.last_hidden_state if hasattr(y, "last_hidden_state") else _out(y)
    torch.testing.assert_close(y, masked(ids).last_hidden_state, atol=1e-4, rtol=1e-4)
