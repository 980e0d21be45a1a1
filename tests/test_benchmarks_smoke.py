"""The benchmark scripts still run (tiny shapes; on CPU through the Triton interpreter), and the
shared harness renders what it is given: no timings judged."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import harness as H  # noqa: E402
from sparsify.codegen import cpu_build  # noqa: E402


class FixedTimer:
    """A stand-in for harness.Timer: fixed times per call, exceptions for the names in `fail`."""

    def __init__(self, times, fail=()):
        self.times, self.fail, self.calls = times, fail, []

    def time(self, fns):
        self.calls.append(len(fns))
        return [RuntimeError("boom") if fn.__name__ in self.fail else self.times[fn.__name__] for fn in fns]


def _fn(name, value):
    def f():
        return value
    f.__name__ = name
    return f


def test_run_case_checks_times_and_divides_by_the_best_baseline():
    ref = torch.ones(2, 3)
    refs = [0, 0]

    def ref_fn():
        refs[0] += 1
        return ref
    provs = [H.Provider("dense-a", _fn("a", None), baseline=True),
             H.Provider("dense-b", _fn("b", None), baseline=True),
             H.Provider("good", _fn("good", ref.clone()), "p", ref=ref_fn, extra={"sparsity": 0.5}),
             H.Provider("wrong", _fn("wrong", 2 * ref), "p", ref=ref_fn),
             H.Provider("shape", _fn("shape", ref.t()), "p", ref=ref_fn),
             H.Provider("fails-timing", _fn("late", ref.clone()), "p", ref=ref_fn),
             H.Provider("skipped", None, "p", status="skip: needs CUDA")]
    timer = FixedTimer({"a": 2.0, "b": 1.0, "good": 0.5, "wrong": 4.0}, fail=("late",))
    rows = H.run_case({"shape": "s", "M": 1}, provs, timer, tol=1e-3)
    by = {r["provider"]: r for r in rows}
    assert refs[0] == 1                       # one reference for the providers that share it
    assert timer.calls == [5]                 # everything runnable timed together, in one call
    assert by["dense-a"]["ratio"] == 0.5 and by["dense-b"]["ratio"] == 1.0
    assert by["good"]["status"] == "ok" and by["good"]["ratio"] == 2.0 and by["good"]["sparsity"] == 0.5
    assert by["wrong"]["status"] == "WRONG" and by["wrong"]["ms"] == 4.0
    assert by["shape"]["status"].startswith("error: ValueError: output shape")
    assert by["fails-timing"]["status"] == "error: RuntimeError: boom" and by["fails-timing"]["ms"] is None
    assert by["skipped"]["status"] == "skip: needs CUDA" and by["skipped"]["ms"] is None
    rows = H.run_case({"shape": "s"}, provs[:4], FixedTimer({"a": 2.0, "b": 1.0, "good": 0.5}), 1e-3,
                      time_wrong=False)
    assert rows[3]["status"] == "WRONG" and rows[3]["ms"] is None


def test_provider_table_markdown_marks_wrong_skip_and_error():
    table = H.ProviderTable([("shape (K->N)", "shape"), ("M", "M")], tol=0.01, ms_head="ms")
    base = dict(shape="8->8", M=4, pattern="p", ms=None, ratio=None, rel_err=None, note="", baseline=False)
    table.add([dict(base, provider="dense", ms=1.0, ratio=1.0, status="ok", baseline=True, note="a|b"),
               dict(base, provider="x", ms=2.0, ratio=0.5, rel_err=0.5, status="WRONG"),
               dict(base, provider="y", status="skip: needs CUDA"),
               dict(base, provider="z", status="error: ValueError: bad")])
    md = table.markdown().splitlines()
    assert md[0] == "| shape (K->N) | M | pattern | provider | ms | vs dense | rel err | note |"
    assert md[1] == "|---|---:|---|---|---:|---:|---|---|"
    assert md[2] == "| 8->8 | 4 | p | dense | 1.0000 | 1.00x | - | a/b |"
    assert "**WRONG** 5.00e-01 (> 0.01)" in md[3] and "skip: needs CUDA" in md[4] and "error: ValueError" in md[5]
    assert table.counts() == {"WRONG": 1, "errors": 1, "skipped": 1}
    assert "WRONG" in table.line(table.rows[1])


def test_environment_and_results_file_record_load_average_and_incomplete(tmp_path):
    env = H.Environment(torch.device("cpu"), [("dtype", "float32")])
    items = dict(env.items(final=False))
    assert {"device", "versions", "date (UTC)", "load average", "command", "dtype"} <= set(items)
    assert items["load average"].startswith("start ") and " now " in items["load average"]
    assert items["status"].startswith("INCOMPLETE")
    final = dict(env.items(final=True))
    assert "status" not in final and " end " in final["load average"]

    md, js = tmp_path / "r.md", tmp_path / "r.json"
    results = H.Results(md, "title", env, js, every_s=0)
    results.progress(lambda: H.markdown_table(["a", "b"], [[1, 2]], "lr"), [{"a": 1}])
    assert "INCOMPLETE" in md.read_text() and json.loads(js.read_text())["complete"] is False
    results.save("body", [{"a": 1}], final=True)
    text = md.read_text()
    assert text.startswith("# title\n") and "INCOMPLETE" not in text and "- load average: start " in text
    data = json.loads(js.read_text())
    assert data["complete"] is True and data["rows"] == [{"a": 1}] and "load_end" in data


def test_timer_cpu_interleaves_and_isolates_a_failing_provider():
    timer = H.Timer(torch.device("cpu"), repeats=2)

    def bad():
        raise RuntimeError("no")
    out = timer.time([lambda: None, bad, lambda: None])
    assert isinstance(out[0], float) and isinstance(out[1], RuntimeError) and isinstance(out[2], float)
    assert "compare_ms" in timer.description


def test_bench_conv_smoke_runs_every_provider_correctly(tmp_path, capsys):
    import bench_conv

    out = tmp_path / "conv.md"
    rc = bench_conv.main(["--smoke", "--blocks", "32", "--densities", "0.5", "--repeats", "1", "--out", str(out)])
    text = out.read_text()
    assert rc == 0, text
    for provider in ("dense-cl", "sparsify-bsr", "sparsify-nm", "sparsify-csr"):
        assert provider in text
    assert "**WRONG**" not in text and "error:" not in text and "- load average: start" in text


def test_bench_linear_help_lists_the_providers(capsys):
    import bench_linear

    with pytest.raises(SystemExit):
        bench_linear.parse_args(["--help"])
    assert "sparsify-bsr" in capsys.readouterr().out


def test_bench_linear_smoke_runs_and_the_sparsify_kernels_are_right(tmp_path, capsys):
    import bench_linear

    out, js = tmp_path / "linear.md", tmp_path / "linear.json"
    rc = bench_linear.main(["--smoke", "--M", "16", "--blocks", "32", "--densities", "0.5", "--repeats", "1",
                            "--dtype", "float32", "--out", str(out), "--json", str(js), "--no-plot"])
    text = out.read_text()
    assert rc == 0, text
    rows = {r["provider"]: r for r in json.loads(js.read_text())["rows"]}
    for provider in ("sparsify-nm", "sparsify-bsr", "sparsify-sell", "torch-bsr", "torch-csr"):
        assert rows[provider]["status"] == "ok", rows[provider]
    assert rows["dense"]["ratio"] == 1.0 and "**WRONG**" not in text and "INCOMPLETE" not in text


def test_bench_compile_writes_its_table_with_the_header(tmp_path, capsys):
    pytest.importorskip("transformers")
    import bench_compile

    out = tmp_path / "compile.md"
    assert bench_compile.main(["--models", "resnet", "--configs", "dense", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| resnet | dense |" in text and "- load average: start" in text
    assert "| resnet | dense |" in capsys.readouterr().out


def test_bench_cpu_smoke_runs_every_provider_correctly(tmp_path):
    import bench_cpu

    out = tmp_path / "cpu.md"
    assert bench_cpu.main(["--smoke", "--dtypes", "float32,bfloat16", "--out", str(out)]) == 0
    text = out.read_text()
    for provider in ("torch-csr", "sparsify-csr", "sparsify-csr-fm", "sparsify-bsr-blocks", "demo LM",
                     "sparsify-cpu", "sparsify-cpu-fm", "| bfloat16 |", "sparsify-cpu stacked"):
        assert provider in text
    assert "**WRONG**" not in text and "error:" not in text and "load average" in text


@pytest.mark.skipif(cpu_build.compiler() is not None, reason="no C compiler")
def test_bench_csr_kblock_smoke_checks_every_block_size(tmp_path):
    import bench_csr_kblock

    out = tmp_path / "kblock.md"
    assert bench_csr_kblock.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| 600->24 | 130 | 512 |" in text and "| 600->24 | 130 | 0 |" in text and "load average" in text


def test_bench_cpu_models_smoke_compiles_and_says_when_a_peer_is_absent(tmp_path, monkeypatch):
    import bench_cpu_models

    out = tmp_path / "models.md"
    monkeypatch.delenv("SPARSIFY_PEER_PYTHON", raising=False)
    rc = bench_cpu_models.main(["--smoke", "--models", "bert-b1", "--rounds", "1", "--calls", "1",
                                "--peer-python", str(tmp_path / "no-such-python"), "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    assert "| bert-b1 | 1x16 | sparsify |" in text and "| bert-b1 | 1x16 | torch dense |" in text
    assert "| deepsparse | - | - | - | - | absent: --peer-python=" in text and "load average" in text


def test_bench_ffn_smoke_runs_every_provider_correctly(tmp_path):
    import bench_ffn

    out = tmp_path / "ffn.md"
    assert bench_ffn.main(["--smoke", "--repeats", "1", "--out", str(out)]) == 0
    text = out.read_text()
    for provider in ("torch-gather", "torch-embedding_bag", "sparsify-cpu", "sparsify-cpu-predicted"):
        assert f"| {provider} |" in text
    assert "WRONG" not in text.split("| note |")[1].split("Notes:")[0]


def test_bench_ffn_gpu_cases_run_under_the_interpreter(tmp_path):
    import bench_ffn

    out = tmp_path / "ffn-gpu.md"
    assert bench_ffn.main(["--gpu", "--smoke", "--repeats", "1", "--out", str(out)]) == 0
    assert "| sparsify-triton |" in out.read_text()
