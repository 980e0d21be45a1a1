"""Hugging Face models from small configs (random weights, no downloads): capture and compile.

For each of GPT-2, Llama, BERT, ViT, ResNet and ConvNeXt:
  * a Dense config compiles the whole model by torch.export, the plan names its Linear / Conv layers
    by module fqn, and the compiled model's outputs equal the eager model's;
  * a second call with a different batch / sequence length (text models) or batch (vision models)
    re-captures and still gives the eager result;
  * for GPT-2 and ResNet, Unstructured(0.5) with max_error=0.5 compiles, runs and keeps the model error
    in budget, with a status and a reason for every layer.

`sparsify.compile` wall time per model is printed at the end of the module (run pytest with -s).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparsify  # noqa: E402
from sparsify.metrics import float_leaves as _float_leaves  # noqa: E402
from sparsify.plan import DENSE, FORCED, ROLLED_BACK, SPARSE  # noqa: E402

pytestmark = pytest.mark.slow

ATOL = 1e-5
VOCAB = 128


# ---- model zoo ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], object]             # seed -> example inputs (tensor / tuple / dict)
    other_inputs: Callable[[int], object]       # a different batch / sequence length
    expected_layers: tuple[str, ...]            # fqns that must appear in the plan (besides every
                                                # Linear / Conv2d / Conv1D module of the model)
    expected_ops: dict                          # fqn -> op the plan must record for it


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _pixels(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg)


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return BertModel(cfg)


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=128, num_labels=10)
    cfg._attn_implementation = "eager"
    return ViTForImageClassification(cfg)


def _resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                       layer_type="basic", num_labels=10)
    return ResNetForImageClassification(cfg)


def _convnext():
    from transformers import ConvNextConfig, ConvNextModel

    cfg = ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                         image_size=32)
    return ConvNextModel(cfg)


CASES = {
    "gpt2": Case(
        "gpt2", _gpt2,
        lambda s: {"input_ids": _ids(2, 16, s)},
        lambda s: {"input_ids": _ids(3, 9, s)},
        # GPT-2's Conv1D is aten.addmm on a (in, out) weight; the plan still names the module.
        ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
         "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj", "lm_head"),
        {"transformer.h.0.mlp.c_fc": "addmm", "transformer.h.0.attn.c_attn": "addmm", "lm_head": "linear"},
    ),
    "llama": Case(
        "llama", _llama,
        lambda s: {"input_ids": _ids(2, 16, s), "use_cache": False},
        lambda s: {"input_ids": _ids(1, 11, s), "use_cache": False},
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
         "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
         "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"),
        {"model.layers.0.self_attn.q_proj": "linear", "model.layers.0.mlp.down_proj": "linear"},
    ),
    "bert": Case(
        "bert", _bert,
        lambda s: {"input_ids": _ids(2, 16, s), "attention_mask": torch.ones(2, 16, dtype=torch.long)},
        lambda s: {"input_ids": _ids(3, 7, s), "attention_mask": torch.ones(3, 7, dtype=torch.long)},
        ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
         "encoder.layer.0.attention.self.value", "encoder.layer.0.attention.output.dense",
         "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense",
         "encoder.layer.1.output.dense", "pooler.dense"),
        {"encoder.layer.0.intermediate.dense": "linear"},
    ),
    "vit": Case(
        "vit", _vit,
        lambda s: _pixels(2, 3, 32, s),
        lambda s: _pixels(3, 3, 32, s),
        # transformers 5 names: vit.layers.N.attention.{q,k,v,o}_proj, vit.layers.N.mlp.fc{1,2}
        ("vit.embeddings.patch_embeddings.projection", "vit.layers.0.attention.q_proj",
         "vit.layers.0.attention.o_proj", "vit.layers.0.mlp.fc1", "vit.layers.1.mlp.fc2", "classifier"),
        {"vit.embeddings.patch_embeddings.projection": "conv2d", "classifier": "linear"},
    ),
    "resnet": Case(
        "resnet", _resnet,
        lambda s: _pixels(2, 3, 32, s),
        lambda s: _pixels(1, 3, 32, s),
        ("resnet.embedder.embedder.convolution", "resnet.encoder.stages.0.layers.0.layer.0.convolution",
         "resnet.encoder.stages.0.layers.0.layer.1.convolution", "resnet.encoder.stages.1.layers.0.shortcut.convolution",
         "classifier.1"),
        {"resnet.embedder.embedder.convolution": "conv2d", "classifier.1": "linear"},
    ),
    "convnext": Case(
        "convnext", _convnext,
        lambda s: _pixels(2, 3, 32, s),
        lambda s: _pixels(3, 3, 32, s),
        ("embeddings.patch_embeddings", "encoder.stages.0.layers.0.dwconv", "encoder.stages.0.layers.0.pwconv1",
         "encoder.stages.0.layers.0.pwconv2", "encoder.stages.1.downsampling_layer.1",
         "encoder.stages.1.layers.0.pwconv2"),
        {"encoder.stages.0.layers.0.dwconv": "conv2d", "encoder.stages.0.layers.0.pwconv1": "linear"},
    ),
}


# ---- helpers --------------------------------------------------------------------------------------

def _call(model, inputs):
    with torch.no_grad():
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, tuple):
            return model(*inputs)
        return model(inputs)


def _max_diff(ref, out) -> float:
    r, o = _float_leaves(ref), _float_leaves(out)
    assert r, "the eager model returned no floating tensors"
    assert len(r) == len(o), f"compiled model returned {len(o)} floating tensors, eager {len(r)}"
    worst = 0.0
    for a, b in zip(r, o):
        assert a.shape == b.shape, f"shape {tuple(b.shape)} != eager {tuple(a.shape)}"
        diff = float((a.double() - b.double()).abs().max())
        rel = diff / max(float(a.double().abs().max()), 1e-30)
        worst = max(worst, min(diff, rel))
    return worst


@pytest.fixture(scope="module")
def timings():
    """(wall time of the sparsify.compile call, SparseModule.compile_seconds) per (model, config);
    printed when the module's tests are done."""
    times: dict[str, tuple[float, float]] = {}
    yield times
    if times:
        print(f"\n\nsparsify.compile per Hugging Face model ({torch.get_num_threads()} CPU threads):")
        print(f"  {'model / config':<32s} {'wall s':>7s} {'compile_seconds':>16s}")
        for key, (wall, cs) in times.items():
            print(f"  {key:<32s} {wall:7.2f} {cs:16.2f}")


def _compile(timings, key, model, x, cfg):
    t0 = time.perf_counter()
    sm = sparsify.compile(model, example_inputs=x, config=cfg)
    timings[key] = (time.perf_counter() - t0, sm.compile_seconds)
    return sm


def _weight_modules(model: torch.nn.Module) -> list[str]:
    """fqns of the model's Linear, Conv2d and HF Conv1D modules: each must be a layer in the plan."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Conv2d, Conv1D)
    return [name for name, m in model.named_modules() if isinstance(m, kinds)]


def _build(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    return case.build().eval()


# ---- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_dense_capture_and_recapture(name, timings):
    case = CASES[name]
    model = _build(case)
    x = case.inputs(1)
    ref = _call(model, x)

    sm = _compile(timings, f"{name} Dense", model, x, sparsify.Config(weight=sparsify.Dense()))
    print(f"\n[{name}] Dense: compile {sm.compile_seconds:.2f} s, {len(sm.plan)} layers")

    # (a) the whole model was captured by torch.export, and the plan names its layers by module fqn
    cap = sm.capture_info
    assert cap.whole, f"not captured whole: {[(f.prefix, f.reason) for f in cap.failures]}"
    assert cap.parts[0].method == "export"
    assert not cap.failures
    modules = _weight_modules(model)
    assert set(case.expected_layers) <= set(modules), "test zoo out of date with transformers"
    missing = [f for f in modules if f not in sm.plan]
    assert not missing, f"{missing} not in the plan; plan: {list(sm.plan)}"
    for fqn, op in case.expected_ops.items():
        assert sm.plan[fqn].op == op, f"{fqn}: op {sm.plan[fqn].op}, expected {op}"
    for fqn, lp in sm.plan.items():
        assert lp.status == DENSE and lp.reason, (fqn, lp.status, lp.reason)
    assert sm.plan.model_error is not None and sm.plan.model_error <= 1e-6
    assert name and "captured: <model> (export)" in sm.report()

    out = _call(sm, x)
    assert type(out) is type(ref)
    assert _max_diff(ref, out) <= ATOL
    # With nothing sparse, the SparseModule may run the user's module itself; the captured graph
    # must be exact on its own too.
    assert _max_diff(ref, _call(sm.graph_module, x)) <= ATOL

    # (b) a different batch / sequence length: captured again, the plan reused, still exact
    x2 = case.other_inputs(2)
    ref2 = _call(model, x2)
    n_before = len(sm._compiled)
    out2 = _call(sm, x2)
    assert len(sm._compiled) == n_before + 1, "a new input shape should be captured again"
    assert _max_diff(ref2, out2) <= ATOL
    cap2 = list(sm._compiled.values())[-1]
    assert cap2.whole and cap2.parts[0].method == "export"
    assert _max_diff(ref2, _call(cap2.parts[0].gm, x2)) <= ATOL
    # and the first signature still runs from its cache
    assert _max_diff(ref, _call(sm, x)) <= ATOL
    assert len(sm._compiled) == n_before + 1


def _sparse_ops(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("sparsify.")}


def _grow_batch(case: Case, x, seed: int):
    """The example inputs with extra rows appended along the batch dimension (same sequence length)."""
    if isinstance(x, torch.Tensor):
        return torch.cat([x, case.inputs(seed)])
    extra = case.inputs(seed)
    return {k: torch.cat([v, extra[k]]) if isinstance(v, torch.Tensor) else v for k, v in x.items()}


def _first_rows(out, n: int) -> list[torch.Tensor]:
    return [t[:n] for t in _float_leaves(out)]


# GPT-2 (Conv1D as addmm) and ViT (Linear) have layers a weight-sparse kernel serves; ResNet is convs
# (csr_conv_torch where it is measured faster, else dense with a reason) plus a Linear classifier. force=True makes the layers sparse although on
# CPU they are slower than dense, so the sparse ops really run inside the Hugging Face graphs.
@pytest.mark.parametrize("force", [False, True], ids=["measured", "forced"])
@pytest.mark.parametrize("name", ["gpt2", "vit", "resnet"])
def test_unstructured_within_budget(name, force, timings, monkeypatch):
    monkeypatch.setenv("SPARSIFY_NO_COST_CACHE", "1")  # fresh timings; CI leaves no cost cache behind
    case = CASES[name]
    model = _build(case)
    x = case.inputs(1)
    ref = _call(model, x)

    cfg = sparsify.Config(weight=sparsify.Unstructured(0.5), max_error=0.5, timing_repeats=3, force=force)
    key = f"{name} Unstructured(0.5)" + (" force" if force else "")
    sm = _compile(timings, key, model, x, cfg)
    print(f"\n[{key}]: compile {sm.compile_seconds:.2f} s, "
          f"{len(sm.plan.sparse_layers())}/{len(sm.plan)} sparse, model error {sm.plan.model_error:.3g}")

    assert sm.capture_info.whole
    assert sm.plan.model_error is not None and sm.plan.model_error <= 0.5
    for fqn in _weight_modules(model):
        assert fqn in sm.plan
    for fqn, lp in sm.plan.items():
        assert lp.status in (SPARSE, DENSE, ROLLED_BACK, FORCED), (fqn, lp.status)
        assert isinstance(lp.reason, str) and lp.reason.strip(), f"{fqn}: empty reason"
        if lp.op == "conv2d":   # unstructured conv has one kernel: im2col + CSR (csr_conv_torch)
            assert lp.status in (DENSE, ROLLED_BACK) or lp.kernel == "csr_conv_torch", (fqn, lp.reason)
        if lp.status in (SPARSE, FORCED):
            assert lp.kernel != "dense" and lp.sparsity == pytest.approx(0.5, abs=0.02)
    if force:
        assert sm.plan.sparse_layers(), "force=True should keep the explicit pattern on linear layers"
        assert _sparse_ops(sm.graph_module), "sparse layers in the plan but no sparse op in the graph"
        assert isinstance(sm.capture_info.root, torch.fx.GraphModule)
    else:
        assert bool(sm.plan.sparse_layers()) == bool(_sparse_ops(sm.graph_module))

    out = _call(sm, x)
    assert type(out) is type(ref)
    assert all(torch.isfinite(t).all() for t in _float_leaves(out))
    # The model error in the plan is what the compiled model really does on the example input.
    from sparsify.metrics import output_error

    err = output_error([ref], [out])
    assert err <= 0.5
    assert abs(err - sm.plan.model_error) <= 1e-5 + 1e-3 * sm.plan.model_error
    report = sm.report()
    for fqn in sm.plan:
        assert fqn[:40] in report

    # A larger batch is captured again and gets the same plan: its first rows equal the first call's.
    x2 = _grow_batch(case, x, seed=3)
    out2 = _call(sm, x2)
    assert len(sm._compiled) == 2
    if sm.plan.sparse_layers():
        new_gm = list(sm._compiled.values())[1].parts[0].gm
        assert _sparse_ops(new_gm) == _sparse_ops(sm.graph_module)
    n = next(iter(_float_leaves(out))).shape[0]
    for a, b in zip(_first_rows(out, n), _first_rows(out2, n)):
        assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(a.abs().max()))


def test_resnet_batchnorm_folds_exactly_and_relus_fuse_into_sparse_convs():
    """HF ResNet's conv -> BatchNorm -> ReLU: with real (non-default) BN statistics the folded graph
    computes what eager does, and forced block-sparse convs take the following ReLU into their kernel."""
    from sparsify import passes_loader
    from sparsify.capture import capture
    from sparsify.codegen import runtime
    from sparsify.pipeline import PassContext, Pipeline

    model = _build(CASES["resnet"])
    gen = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=gen))
            m.bias.data.copy_(torch.randn(c, generator=gen))
    x = CASES["resnet"].inputs(1)
    ref = _call(model, x)

    passes_loader.load()
    gm = capture(model, (x,)).root
    ctx = PassContext(sparsify.Config(weight=sparsify.Dense()))
    gm = Pipeline(["fold_batchnorm"]).run(gm, ctx)
    assert "batch_norm" not in gm.code, ctx.state.notes_of("fold_batchnorm")
    assert _max_diff(ref, _call(gm, x)) <= 1e-4

    cfg = sparsify.Config(weight=sparsify.Block(16, 0.5), force=True, kernels=("bsr_conv_triton",),
                          max_error=10.0, timing_repeats=1, check_model_speed=False)
    with runtime.force_triton():
        sm = sparsify.compile(model, example_inputs=x, config=cfg)
        out = _call(sm, x)
    convs = [n for n in sm.graph_module.graph.nodes if str(n.target) == "sparsify.bsr_conv2d.default"]
    assert convs and any(sparsify.ir.op_arg(n, "activation")[1] == "relu" for n in convs)
    assert all(torch.isfinite(t).all() for t in _float_leaves(out))
    from sparsify.metrics import output_error

    assert abs(output_error([ref], [out]) - sm.plan.model_error) <= 1e-4


def test_opt_with_its_default_cache_has_its_decoder_layers_planned():
    """HF OPT returns a DynamicCache by default, which export cannot take: the model falls back to
    per-child capture, through the never-called `decoder.layers` ModuleList to the layers' Linears."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=64)
    model = OPTForCausalLM(cfg).eval()
    ids = _ids(2, 9, 0)
    sm = sparsify.compile(model, (ids,), sparsify.Config(weight=sparsify.Unstructured(0.5), force=True,
                                                          max_error=10.0, check_model_speed=False, timing_repeats=1))
    planned = {lp.fqn for lp in sm.plan.sparse_layers()}
    assert {"model.decoder.layers.0.fc1", "model.decoder.layers.1.fc2",
            "model.decoder.layers.0.self_attn.q_proj"} <= planned
    with torch.no_grad():
        out, ref = sm(ids), model(ids)
    assert type(out) is type(ref) and out.logits.shape == ref.logits.shape


def test_an_output_selection_applies_to_the_model_not_to_a_part_captured_alone():
    """GPT-2 with SDPA attention is captured in parts; Config.output names the model's output
    (last_hidden_state), which a part's tensor output does not have: each part is judged on its own
    outputs, the model on the selected one."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64)).eval()
    x = {"input_ids": torch.randint(0, VOCAB, (2, 16))}
    cfg = sparsify.Config(weight=sparsify.Unstructured(0.5), output="last_hidden_state", force=True, max_error=10.0,
                          kernels=("csr_torch",), timing_repeats=1, check_model_speed=False)
    sm = sparsify.compile(model, x, cfg, progress=False)
    assert not sm.capture_info.whole and sm.plan.sparse_layers()
    with torch.no_grad():
        out, ref = sm(**x).last_hidden_state, model(**x).last_hidden_state
    assert torch.isfinite(out).all() and out.shape == ref.shape
