import pytest

import sparsify
from sparsify import Config, ConfigError, PatternError
from sparsify.patterns import (NM, Block, BlockMask, Channel, Dense, SlidingWindow, TopK, Unstructured,
                               all_pattern_kinds, pattern_from_dict)
from tests.helpers import MLP, mlp_input


@pytest.mark.parametrize("make, words", [
    (lambda: Unstructured(1.5), "sparsity=1.5"),
    (lambda: Unstructured(-0.1), "sparsity=-0.1"),
    (lambda: NM(3, 2), "NM(3, 2)"),
    (lambda: NM(0, 4), "NM(0, 4)"),
    (lambda: NM(2, 32), "m must be"),
    (lambda: Block(0), "block"),
    (lambda: Block(24), "power of two"),
    (lambda: Block(32, 0.0), "density"),
    (lambda: Channel(1.5), "keep"),
    (lambda: TopK(), "exactly one"),
    (lambda: SlidingWindow(0), "window"),
    (lambda: BlockMask(64), "exactly one"),
    (lambda: Unstructured(0.5, criterion="taylor"), "criterion"),
])
def test_invalid_patterns_raise_naming_the_argument(make, words):
    with pytest.raises(PatternError, match=words.replace("(", r"\(").replace(")", r"\)")):
        make()


@pytest.mark.parametrize("kw, words", [
    ({"max_error": -1}, "max_error"),
    ({"weight": "2:4"}, "Config.weight"),
    ({"weight": sparsify.Causal()}, "attention pattern"),
    ({"dtype": "float8"}, "Config.dtype"),
    ({"device": "tpu9"}, "Config.device"),
    ({"overrides": [("fc1", "dense")]}, "overrides"),
    ({"timing_repeats": 0}, "timing_repeats"),
])
def test_invalid_config_raises_naming_the_field(kw, words):
    with pytest.raises(ConfigError, match=words):
        Config(**kw)


def test_override_that_matches_nothing_is_an_error():
    cfg = Config(weight=Dense(), overrides={"encoder.*.fc9": Unstructured(0.5)}, timing_repeats=1)
    with pytest.raises(ConfigError, match=r"'encoder\.\*\.fc9' matches no layer"):
        sparsify.compile(MLP(), (mlp_input(),), cfg)


def test_first_matching_override_wins():
    cfg = Config(weight=Dense(), overrides=(("fc*", NM(2, 4)), ("fc1", Block(16, 0.5))))
    assert cfg.pattern_for("fc1", "weight") == (NM(2, 4), "override 'fc*'")
    assert cfg.pattern_for("out", "weight") == (Dense(), "config.weight")


def test_patterns_and_config_round_trip_through_dicts():
    for kind in all_pattern_kinds():
        cls = sparsify.patterns.registered_patterns()[kind]
        p = cls(k=3) if cls is TopK else cls(topk=2) if cls is BlockMask else cls()
        assert pattern_from_dict(p.to_dict()) == p
    cfg = Config(weight=Block(64, 0.1), max_error=0.01, overrides={"a.*": NM(2, 4)}, dtype="float16",
                 candidates=(NM(2, 4), Unstructured(0.8)))
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown fields"):
        Config.from_dict({**cfg.to_dict(), "speed": "max"})
    with pytest.raises(PatternError, match="unknown pattern kind"):
        pattern_from_dict({"kind": "Magic"})


def test_compile_rejects_non_module_and_bad_config():
    with pytest.raises(TypeError, match="nn.Module"):
        sparsify.compile(lambda x: x)
    with pytest.raises(TypeError, match="sparsify.Config"):
        sparsify.compile(MLP(), config={"weight": "auto"})
