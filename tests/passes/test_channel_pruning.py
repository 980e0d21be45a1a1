"""Channel groups (dependency graph of coupled channels) and the channel family that prunes them."""
import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify
from sparsify import ir
from sparsify.capture import capture
from sparsify.metrics import rel_l2
from sparsify.passes.families.channel import family as channel_family
from sparsify.passes.families.channel.groups import find_channel_groups
from sparsify.passes.families.channel.index_map import IndexMap
from sparsify.passes.families.channel.prune import channel_scores, prune_channel_group


# ---- models -----------------------------------------------------------------------------------
def _randomize_bn(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.rand(c, generator=g) - 0.5
            m.running_mean = torch.rand(c, generator=g) - 0.5
            m.running_var = torch.rand(c, generator=g) + 0.5
    return model


class ResNetish(nn.Module):
    """stem conv-bn-relu; block conv1-bn1-relu-conv2-bn2 + identity; conv3; global pool + linear."""

    def __init__(self, c=8, c3=16, classes=10):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c3, 1)
        self.head = nn.Linear(c3, classes)
        _randomize_bn(self)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = F.relu(x + y)
        x = F.relu(self.conv3(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


class MobileNetish(nn.Module):
    """pointwise 1x1 -> depthwise 3x3 (groups=C) -> pointwise 1x1 -> pool -> linear."""

    def __init__(self, c=8, hidden=16):
        super().__init__()
        torch.manual_seed(0)
        self.pw1 = nn.Conv2d(c, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.pw2 = nn.Conv2d(hidden, c, 1)
        self.head = nn.Linear(c, 4)
        _randomize_bn(self)

    def forward(self, x):
        y = F.relu6(self.bn1(self.pw1(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        y = self.pw2(y)
        return self.head(y.mean((2, 3)))


def _x(shape=(2, 3, 8, 8), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _capture(model, x):
    return capture(model.eval(), (x,)).root


def _nparams(module):
    return sum(p.numel() for p in module.parameters())


def _group_of(groups, producer):
    return next(g for g in groups if producer in g.producer_fqns)


def _ctx(config, x):
    return sparsify.PassContext(config, calibration=[((x,), {})])


_PRUNE = ["find_sites", "calibrate", "plan_sites", "rewrite_sites"]


def _prune(gm, ctx):
    """Plan and rewrite, the way compile does it (without rollback): the channel family prunes."""
    return sparsify.Pipeline(_PRUNE).run(gm, ctx)


def _plan_of(ctx, fqn):
    """The channel plan of the group that layer `fqn` produces."""
    return next(lp for lp in ctx.state.plans.values() if lp.family == "channel" and fqn in lp.members)


def _pruned(ctx):
    return {lp.fqn: lp for lp in ctx.state.plans.values() if lp.status == "pruned"}


# ---- (1) ResNet-style block ---------------------------------------------------------------------
def test_resnet_groups_couple_residual_bn_and_head():
    x = _x()
    gm = _capture(ResNetish(), x)
    groups = find_channel_groups(gm)

    res = _group_of(groups, "stem")
    assert set(res.producer_fqns) == {"stem", "conv2"}, "residual add couples conv2's outputs with the stem's"
    assert set(res.consumer_fqns) == {"conv1", "conv3"}
    assert res.prunable and res.channels == 8
    params = dict(res.params)
    for bn in ("bn0", "bn2"):
        for p in ("weight", "bias", "running_mean", "running_var"):
            assert params[f"{bn}.{p}"] == 0
    assert params["stem.weight"] == 0 and params["conv2.weight"] == 0
    assert params["conv1.weight"] == 1 and params["conv3.weight"] == 1
    assert {"bn0", "bn2"} <= set(res.fqns)

    inner = _group_of(groups, "conv1")
    assert inner.prunable and inner.consumer_fqns == ["conv2"]
    assert {t for t, _ in inner.params} >= {"bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"}

    last = _group_of(groups, "conv3")
    assert last.prunable and last.consumer_fqns == ["head"]
    assert ("head.weight", 1) in last.params and ("conv3.bias", 0) in last.params

    head = _group_of(groups, "head")
    assert not head.prunable and "graph output" in head.reason
    assert len(groups) == 4


def test_resnet_prune_half_shrinks_and_runs_without_touching_the_model():
    model = ResNetish().eval()
    x = _x()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(x)
    gm = _capture(model, x)
    n0 = _nparams(gm)
    groups = find_channel_groups(gm)
    for g in groups:
        if g.prunable:
            k = max(1, round(0.5 * g.channels))
            prune_channel_group(gm, g, channel_scores(gm, g).topk(k).indices)
    y = gm(x)
    assert y.shape == ref.shape
    assert torch.isfinite(y).all()
    assert _nparams(gm) < n0
    assert ir.fetch_attr(gm, _weight_target(gm, "conv1")).shape == (4, 4, 3, 3)
    assert ir.fetch_attr(gm, _weight_target(gm, "conv3")).shape == (8, 4, 1, 1)
    assert ir.fetch_attr(gm, _weight_target(gm, "head")).shape == (10, 8)
    # the user's model and its tensors are untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    assert torch.equal(model(x), ref)
    # meta["val"] follows the new shapes
    for n in gm.graph.nodes:
        if n.op == "get_attr" and isinstance(n.meta.get("val"), torch.Tensor):
            assert tuple(n.meta["val"].shape) == tuple(ir.fetch_attr(gm, n.target).shape), n.name
    gm.graph.lint()


def _weight_target(gm, fqn):
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in ir.WEIGHT_OPS:
            w = n.args[ir.WEIGHT_OPS[n.target][2]]
            if n.meta.get(ir.FQN) == fqn:
                return w.target
    raise KeyError(fqn)


def test_keep_all_channels_is_exact():
    model = ResNetish().eval()
    x = _x()
    ref = model(x)
    gm = _capture(model, x)
    for g in find_channel_groups(gm):
        if g.prunable:
            info = prune_channel_group(gm, g, torch.arange(g.channels))
            assert info["kept"] == info["channels"]
    assert torch.equal(gm(x), ref)


def test_pruning_all_zero_channels_is_exact():
    model = ResNetish().eval()
    dead = [1, 4, 6]
    with torch.no_grad():
        model.conv1.weight[dead] = 0
        model.bn1.bias[dead] = 0
        model.bn1.running_mean[dead] = 0   # bn1 output there is exactly 0 -> relu 0
    x = _x()
    ref = model(x)
    gm = _capture(model, x)
    group = _group_of(find_channel_groups(gm), "conv1")
    scores = channel_scores(gm, group)
    assert torch.all(scores[dead] == 0) and torch.all(scores[[0, 2, 3, 5, 7]] > 0)
    live = scores.topk(group.channels - len(dead)).indices
    assert sorted(live.tolist()) == [0, 2, 3, 5, 7]
    prune_channel_group(gm, group, live)
    assert ir.fetch_attr(gm, _weight_target(gm, "conv2")).shape == (8, 5, 3, 3)
    torch.testing.assert_close(gm(x), ref, atol=1e-5, rtol=1e-5)


def test_prune_channel_group_rejects_bad_input():
    gm = _capture(ResNetish(), _x())
    groups = find_channel_groups(gm)
    with pytest.raises(ValueError, match="not prunable"):
        prune_channel_group(gm, _group_of(groups, "head"), [0])
    with pytest.raises(ValueError, match="at least one"):
        prune_channel_group(gm, _group_of(groups, "conv1"), [])
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        prune_channel_group(gm, _group_of(groups, "conv1"), [0, 8])


# ---- (2) what the walk refuses ------------------------------------------------------------------
class ViewHead(nn.Module):
    def __init__(self, keep_channel_view=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.keep_channel_view = keep_channel_view
        self.fc = nn.Linear(8 if keep_channel_view else 8 * 4 * 4, 5)

    def forward(self, x):
        y = F.relu(self.conv(x))
        if self.keep_channel_view:
            y = y.mean((2, 3)).reshape(-1, 8)   # keeps the channel dim: followed, size rewritten
        else:
            y = y.view(y.shape[0], -1)          # merges C, H, W
        return self.fc(y)


class CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        return self.fc(F.relu(self.c(y)).mean((2, 3)))


def test_view_that_merges_channels_with_spatial_dims_is_followed_in_blocks():
    # [B, 8, 4, 4] -> [B, 128] -> fc: channel c is fc's input columns 16c .. 16c+15
    x = _x((2, 3, 4, 4))
    model = ViewHead().eval()
    gm = _capture(model, x)
    group = _group_of(find_channel_groups(gm), "conv")
    assert group.prunable, group.reason
    assert group.consumer_fqns == ["fc"] and group.unit == 1
    prune_channel_group(gm, group, [0, 2, 3, 7])
    assert ir.fetch_attr(gm, _weight_target(gm, "fc")).shape == (5, 64)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for c in (1, 4, 5, 6):
            masked.fc.weight[:, 16 * c:16 * (c + 1)] = 0
    torch.testing.assert_close(gm(x), masked(x), atol=1e-5, rtol=1e-5)


def test_view_that_merges_the_channel_dim_with_the_batch_is_not_prunable():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(16, 5)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).reshape(-1, 16))   # [B, 8, 4, 4] -> [B*8, 16]

    x = _x((2, 3, 4, 4))
    gm = _capture(M(), x)
    group = _group_of(find_channel_groups(gm), "conv")
    assert not group.prunable
    assert re.search(r"channel dim flows into aten\.(view|reshape|_unsafe_view)\S* at node \w+", group.reason)
    assert "merges or splits" in group.reason

    ctx = _ctx(sparsify.Config(weight=sparsify.Channel(0.5)), x)
    gm = _prune(gm, ctx)
    assert "merges or splits" in _plan_of(ctx, "conv").reason
    assert ir.fetch_attr(gm, "conv.weight").shape == (8, 3, 3, 3)


def test_view_that_keeps_the_channel_dim_is_followed_and_rewritten():
    x = _x((2, 3, 4, 4))
    model = ViewHead(keep_channel_view=True).eval()
    gm = _capture(model, x)
    group = _group_of(find_channel_groups(gm), "conv")
    assert group.prunable, group.reason
    assert group.consumer_fqns == ["fc"]
    prune_channel_group(gm, group, [0, 2, 3, 7])
    view = next(n for n, _ in group.slots if n.op == "call_function"
                and n.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default))
    assert 4 in list(view.args[1]) and 8 not in list(view.args[1])
    assert gm(x).shape == (2, 5)


def _mask_inputs(model, layer, columns=None, **more):
    """A copy of `model` whose layers ignore the given input channels (zeroed weight columns):
    `layer`, `columns` and any further `layer=columns`."""
    masked = copy.deepcopy(model)
    todo = {**({layer: columns} if columns is not None else {}), **more}
    with torch.no_grad():
        for name, cols in todo.items():
            masked.get_submodule(name).weight[:, cols] = 0
    return masked


def test_cat_along_channels_keeps_one_group_per_input_at_its_offset():
    x = _x((2, 3, 4, 4))
    model = CatNet().eval()
    gm = _capture(model, x)
    groups = find_channel_groups(gm)
    a, b = _group_of(groups, "a"), _group_of(groups, "b")
    assert a is not b and a.prunable and b.prunable, (a.reason, b.reason)
    assert (a.channels, b.channels) == (4, 6)
    assert a.consumer_fqns == b.consumer_fqns == ["c"]
    assert dict(a.params)["c.weight"] == 1 and dict(b.params)["c.weight"] == 1
    cat = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.cat.default)
    assert a.map_of(cat) == IndexMap.block(0, 1) and b.map_of(cat) == IndexMap.block(4, 1), "b's channels start after a's 4"
    assert _group_of(groups, "c").prunable   # after the cat, c's own outputs are fine


@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_pruning_cat_inputs_equals_masking_the_consumer_columns(order):
    # the second prune must see the first one's shift of the consumer's columns, in either order
    x = _x((2, 3, 4, 4))
    model = CatNet().eval()
    gm = _capture(model, x)
    groups = find_channel_groups(gm)
    keep = {"a": [0, 2], "b": [1, 3, 5]}
    for name in (["a", "b"] if order == "a_first" else ["b", "a"]):
        prune_channel_group(gm, _group_of(groups, name), keep[name])
    assert ir.fetch_attr(gm, _weight_target(gm, "c")).shape == (8, 5, 3, 3)
    assert ir.fetch_attr(gm, _weight_target(gm, "b")).shape == (3, 3, 1, 1)
    ref = _mask_inputs(model, "c", [1, 3, 4 + 0, 4 + 2, 4 + 4])(x)
    torch.testing.assert_close(gm(x), ref, atol=1e-5, rtol=1e-5)
    gm.graph.lint()


class DenseLinear(nn.Module):
    """DenseNet-style growth on the last dim: x1 = [x0, f1(x0)], x2 = [x1, f2(x1)] -> head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.f1, self.f2 = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(10, 3)
        self.head = nn.Linear(13, 2)

    def forward(self, x):
        x0 = F.gelu(self.stem(x))
        x1 = torch.cat([x0, F.gelu(self.f1(x0))], -1)
        x2 = torch.cat([x1, F.gelu(self.f2(x1))], -1)
        return self.head(x2)


def test_nested_concat_of_linears_maps_offsets_through_every_cat():
    x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(2))
    model = DenseLinear().eval()
    gm = _capture(model, x)
    groups = find_channel_groups(gm)
    stem, f1, f2 = (_group_of(groups, p) for p in ("stem", "f1", "f2"))
    assert set(stem.consumer_fqns) == {"f1", "f2", "head"}
    assert set(f1.consumer_fqns) == {"f2", "head"} and f2.consumer_fqns == ["head"]
    for g, (p, keep) in zip((f2, stem, f1), (("f2", [2]), ("stem", [0, 1, 5]), ("f1", [1, 3]))):
        assert g.prunable, g.reason
        prune_channel_group(gm, g, keep)
    # dropped: stem 2,3,4 -> cols 2,3,4 of f1, f2, head; f1 0,2 -> cols 6,8 of f2, head;
    # f2 0,1 -> head cols 10,11
    assert ir.fetch_attr(gm, _weight_target(gm, "head")).shape == (2, 6)
    assert ir.fetch_attr(gm, _weight_target(gm, "f2")).shape == (1, 5)
    ref = _mask_inputs(model, None, f1=[2, 3, 4], f2=[2, 3, 4, 6, 8], head=[2, 3, 4, 6, 8, 10, 11])(x)
    torch.testing.assert_close(gm(x), ref, atol=1e-5, rtol=1e-5)

    ctx = _ctx(sparsify.Config(weight=sparsify.Channel(0.5)), x)
    gm = _prune(_capture(model, x), ctx)
    assert {"stem", "f1", "f2"} <= set(_pruned(ctx))
    assert gm(x).shape == (3, 7, 2)


@pytest.mark.parametrize("dim", [0, 2], ids=["batch", "spatial"])
def test_cat_along_a_non_channel_dim_couples_its_inputs(dim):
    class M(CatNet):
        def __init__(self):
            super().__init__()
            self.b = nn.Conv2d(3, 4, 1)
            self.c = nn.Conv2d(4, 8, 3, padding=1)

        def forward(self, x):
            y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=dim)
            return self.fc(F.relu(self.c(y)).mean((2, 3)))

    x = _x((2, 3, 4, 4))
    model = M().eval()
    gm = _capture(model, x)
    g = _group_of(find_channel_groups(gm), "a")
    assert g.prunable, g.reason
    assert set(g.producer_fqns) == {"a", "b"} and g.consumer_fqns == ["c"]
    prune_channel_group(gm, g, [1, 2])
    torch.testing.assert_close(gm(x), _mask_inputs(model, "c", [0, 3])(x), atol=1e-5, rtol=1e-5)


def test_cat_still_refused_where_channels_cannot_be_kept_apart():
    class Twice(CatNet):   # the same tensor twice: its channels sit at two offsets
        def forward(self, x):
            a = F.relu(self.a(x))
            return torch.cat([a, a, F.relu(self.b(x))[:, :2]], dim=1).sum()

    gm = _capture(Twice(), _x((2, 3, 4, 4)))
    g = _group_of(find_channel_groups(gm), "a")
    assert not g.prunable and re.search(r"relu\w* is concatenated 2 times by aten\.cat", g.reason)

    class Residual(CatNet):   # a full-width residual meets the concat: p's channels span both inputs
        def __init__(self):
            super().__init__()
            self.p = nn.Conv2d(3, 10, 1)

        def forward(self, x):
            p = self.p(x)
            y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1) + p
            return self.fc(F.relu(self.c(y)).mean((2, 3)))

    gm = _capture(Residual(), _x((2, 3, 4, 4)))
    g = _group_of(find_channel_groups(gm), "p")
    assert not g.prunable and "span several of its inputs" in g.reason


def test_channel_from_a_graph_input_is_not_prunable():
    # fc2's outputs are added to the input x: a residual whose other side is a placeholder
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2, self.out = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.fc2(F.gelu(self.fc1(x))) + x)

    gm = _capture(M(), torch.randn(3, 8))
    groups = find_channel_groups(gm)
    g2 = _group_of(groups, "fc2")
    assert not g2.prunable and "placeholder x" in g2.reason
    g1 = _group_of(groups, "fc1")
    assert g1.prunable and g1.consumer_fqns == ["fc2"]


def test_grouped_conv_is_not_prunable():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)

        def forward(self, x):
            return self.g(self.a(x)).sum()

    gm = _capture(M(), _x((1, 3, 4, 4)))
    g = _group_of(find_channel_groups(gm), "a")
    assert not g.prunable and "grouped conv" in g.reason and "groups=2" in g.reason


# ---- (3) depthwise coupling ---------------------------------------------------------------------
def test_depthwise_conv_couples_its_input_and_output_channels():
    x = _x((2, 8, 6, 6))
    model = MobileNetish().eval()
    ref = model(x)
    gm = _capture(model, x)
    groups = find_channel_groups(gm)
    g = _group_of(groups, "pw1")
    assert g.prunable, g.reason
    assert g.producer_fqns == ["pw1"] and g.consumer_fqns == ["pw2"]
    assert [r for _, r in g.others].count("depthwise") == 1
    assert set(g.layer_fqns) == {"pw1", "dw", "pw2"}
    params = dict(g.params)
    assert params["dw.weight"] == 0 and params["pw2.weight"] == 1
    assert all(params[f"{bn}.{p}"] == 0 for bn in ("bn1", "bn2") for p in ("weight", "running_var"))
    assert "dw" not in {f for gg in groups for f in gg.producer_fqns}, "a depthwise conv produces no group"

    full = prune_channel_group(gm, g, torch.arange(16))
    assert full["kept"] == 16 and torch.equal(gm(x), ref)

    gm = _capture(model, x)
    g = _group_of(find_channel_groups(gm), "pw1")
    prune_channel_group(gm, g, torch.arange(0, 16, 2))
    dw_node = next(n for n in gm.graph.nodes if n.meta.get(ir.FQN) == "dw" and n.op == "call_function")
    assert dw_node.args[6] == 8
    assert ir.fetch_attr(gm, dw_node.args[1].target).shape == (8, 1, 3, 3)
    assert ir.fetch_attr(gm, _weight_target(gm, "pw2")).shape == (8, 8, 1, 1)
    assert gm(x).shape == ref.shape


# ---- (4) through the Pipeline ---------------------------------------------------------------------
def test_channel_family_in_a_pipeline():
    model = ResNetish().eval()
    x = _x()
    ref = model(x)
    gm = _capture(model, x)
    n0 = _nparams(gm)
    ctx = _ctx(sparsify.Config(weight=sparsify.Channel(0.5)), x)
    gm = _prune(gm, ctx)
    y = gm(x)
    assert y.shape == ref.shape and torch.isfinite(y).all()
    n1 = _nparams(gm)
    assert n1 < n0
    refused = {lp.fqn: lp.reason for lp in ctx.state.plans.values() if lp.status == "dense"}
    assert refused == {"head": "channel pruning not applied: channel dim reaches the graph output (via node linear)"}
    assert len(_pruned(ctx)["conv1"].params["keep"]) == 4
    assert len(_plan_of(ctx, "conv3").params["keep"]) == 8
    # LayerInfo and provenance follow the rewrite
    layers = {n.meta[ir.LAYER].fqn: n for n in ir.layer_nodes(gm)}
    assert layers["conv3"].meta[ir.LAYER].weight_shape == (8, 4, 1, 1)
    assert layers["head"].meta[ir.LAYER].weight_shape == (10, 8)
    w = layers["conv1"].args[1]
    prov = w.meta[ir.FROM]
    assert prov.pass_name == "rewrite_sites" and prov.rule == "channel_group" and prov.fqn == "conv1"
    assert "kept 4/8 channels" in prov.detail
    # the rewrite a second time changes nothing (idempotent)
    again = sparsify.Pipeline(["find_sites", "rewrite_sites"]).run(gm, ctx, available={"plan"})
    assert _nparams(again) == n1 and torch.equal(again(x), y)


def test_pass_respects_per_layer_patterns_and_keep_one():
    model = ResNetish().eval()
    x = _x()
    ref = model(x)
    gm = _capture(model, x)
    ctx = _ctx(sparsify.Config(weight=sparsify.Channel(1.0)), x)
    gm = _prune(gm, ctx)
    assert torch.equal(gm(x), ref)

    # only conv1/conv2 ask for channels: the conv1 group is pruned, the residual one is refused
    dead = [1, 4, 6]
    with torch.no_grad():
        model.conv1.weight[dead] = 0
        model.bn1.bias[dead] = 0
        model.bn1.running_mean[dead] = 0
    ref = model(x)
    gm = _capture(model, x)
    cfg = sparsify.Config(weight=sparsify.Dense(), overrides=(("conv1", sparsify.Channel(5 / 8)),
                                                               ("conv2", sparsify.Channel(5 / 8))))
    ctx = _ctx(cfg, x)
    gm = _prune(gm, ctx)
    assert list(_pruned(ctx)) == ["conv1"]
    assert "member layer stem has weight pattern Dense()" in _plan_of(ctx, "conv2").reason
    torch.testing.assert_close(gm(x), ref, atol=1e-5, rtol=1e-5)


def test_report_states_the_output_error_where_pruned_channels_are_read():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2, self.out = nn.Linear(12, 16), nn.Linear(16, 12), nn.Linear(12, 3)

        def forward(self, x):
            return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))

    model = MLP().eval()
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(3))
    # every member of a group must ask for Channel: fc2's group includes its consumer `out`
    cfg = sparsify.Config(weight=sparsify.Channel(0.5), max_error=10.0)
    sm = sparsify.compile(model, x, cfg)
    assert "reaches the graph output" in sm.plan.layers["out"].reason
    # the expected numbers: mask what was pruned in a copy, compare the consumers' outputs
    kept1 = torch.sort(model.fc1.weight.detach().norm(dim=1).topk(8).indices).values
    # fc2's rows are scored as they are after fc1's group was pruned (without fc1's dropped columns)
    kept2 = torch.sort(model.fc2.weight.detach()[:, kept1].norm(dim=1).topk(6).indices).values
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.fc2.weight[:, [c for c in range(16) if c not in kept1]] = 0
        masked.out.weight[:, [c for c in range(12) if c not in kept2]] = 0
    with torch.no_grad():
        h, hm = F.relu(model.fc1(x)), F.relu(masked.fc1(x))
        expected = {"fc1": rel_l2(masked.fc2(hm), model.fc2(h)),
                    "fc2": rel_l2(masked.out(F.relu(masked.fc2(hm))), model.out(F.relu(model.fc2(h))))}
    for fqn, consumer in (("fc1", "fc2"), ("fc2", "out")):
        lp = sm.plan.layers[fqn]
        assert lp.status == "pruned"
        assert lp.layer_error == pytest.approx(expected[fqn], rel=1e-4)
        assert f"output error of {consumer}, which reads these channels" in lp.reason
    assert sm.plan.layers["out"].layer_error is None
    torch.testing.assert_close(sm(x), masked(x), atol=1e-5, rtol=1e-5)


def test_addmm_transposed_weight_is_sliced_on_the_right_dims():
    class Conv1DMLP(nn.Module):   # HF Conv1D style: weights stored (in, out)
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.w1, self.b1 = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(16))
            self.w2, self.b2 = nn.Parameter(torch.randn(16, 4)), nn.Parameter(torch.randn(4))

        def forward(self, x):
            return torch.addmm(self.b2, F.gelu(torch.addmm(self.b1, x, self.w1)), self.w2)

    x = torch.randn(5, 8)
    model = Conv1DMLP()
    ref = model(x)
    gm = _capture(model, x)
    g = next(g for g in find_channel_groups(gm) if g.channels == 16)
    assert g.prunable and dict(g.params) == {"w1": 1, "b1": 0, "w2": 0}
    prune_channel_group(gm, g, torch.arange(16))
    assert torch.equal(gm(x), ref)
    gm = _capture(model, x)
    g = next(g for g in find_channel_groups(gm) if g.channels == 16)
    prune_channel_group(gm, g, [1, 3, 5])
    w1 = [n for n, d in g.slots if n.op == "get_attr" and n.meta.get(ir.FQN) == ""]
    shapes = sorted(tuple(ir.fetch_attr(gm, n.target).shape) for n in w1)
    assert shapes == [(3,), (3, 4), (8, 3)]
    assert gm(x).shape == (5, 4)


class ConvNeXtish(nn.Module):
    """stem conv; block: depthwise 7x7 -> permute -> LayerNorm -> Linear -> GELU -> Linear ->
    layer scale gamma (per channel) -> permute back -> * 0.5 * spatial mask -> + residual; head."""

    def __init__(self, c=8, hw=6):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.register_buffer("mask", (torch.rand(1, 1, hw, hw) > 0.3).float())
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y))))
        y = (self.gamma * y).permute(0, 3, 1, 2)
        x = x + y * 0.5 * self.mask
        return self.head(x.mean((2, 3)))


def test_convnext_block_couples_permute_layernorm_layer_scale_and_residual():
    x = _x((2, 3, 12, 12))
    model = ConvNeXtish().eval()
    ref = model(x)
    gm = _capture(model, x)
    g = _group_of(find_channel_groups(gm), "stem")
    assert g.prunable, g.reason
    assert set(g.producer_fqns) == {"stem", "pw2"} and set(g.consumer_fqns) == {"pw1", "head"}
    params = dict(g.params)
    assert params["gamma"] == 0 and params["norm.weight"] == 0 and params["dw.weight"] == 0
    assert "mask" not in params, "a mask broadcast over the channels is not sliced"
    assert {"norm", "dw"} <= set(g.fqns)

    prune_channel_group(gm, g, torch.arange(8))
    assert torch.equal(gm(x), ref)

    gm = _capture(model, x)
    ctx = _ctx(sparsify.Config(weight=sparsify.Channel(0.5)), x)
    gm = _prune(gm, ctx)
    assert gm(x).shape == ref.shape
    layers = {n.meta[ir.LAYER].fqn: n.meta[ir.LAYER] for n in ir.layer_nodes(gm)}
    assert layers["stem"].weight_shape == (4, 3, 2, 2) and layers["stem"].output_shape == (2, 4, 6, 6)
    assert layers["dw"].weight_shape == (4, 1, 7, 7) and layers["dw"].conv_params["groups"] == 4
    assert layers["pw1"].weight_shape == (16, 4) and layers["pw2"].weight_shape == (4, 16)
    assert layers["head"].weight_shape == (3, 4)
    ln = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.layer_norm.default)
    assert list(ln.args[1]) == [4]


def test_channel_family_costs_nothing_when_no_layer_asks_for_channels(monkeypatch):
    # the family is registered for every compile: without Channel patterns it must walk no group and run
    # no forward
    runs = []
    monkeypatch.setattr(channel_family, "node_values", lambda *a, **k: runs.append(a) or {})
    monkeypatch.setattr(channel_family, "find_channel_groups", lambda *a, **k: runs.append(a) or [])
    x = _x()
    gm = _capture(ResNetish().eval(), x)
    _prune(gm, _ctx(sparsify.Config(), x))
    assert runs == []
