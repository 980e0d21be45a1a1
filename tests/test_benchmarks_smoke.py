"""The benchmark scripts still run (tiny shapes; on CPU through the Triton interpreter): no timings judged."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_bench_conv_smoke_runs_every_provider_correctly(tmp_path, capsys):
    import bench_conv

    out = tmp_path / "conv.md"
    rc = bench_conv.main(["--smoke", "--blocks", "32", "--densities", "0.5", "--repeats", "1", "--out", str(out)])
    text = out.read_text()
    assert rc == 0, text
    for provider in ("dense-cl", "sparsify-bsr", "sparsify-nm"):
        assert provider in text
    assert "WRONG" not in text and "error:" not in text


def test_bench_linear_help_lists_the_providers(capsys):
    import bench_linear

    with pytest.raises(SystemExit):
        bench_linear.parse_args(["--help"])
    assert "sparsify-bsr" in capsys.readouterr().out
