"""The one benchmark harness every `benchmarks/bench_*.py` uses.

- `Environment`: what the results header records (device, versions, UTC date, load average at the
  start and at the end of the run, the exact command) plus a script's own items.
- `Timer`: times the providers of one case together. CPU: `sparsify.timing.compare_ms`, the
  providers interleaved call by call, minimum of the repeats (a shared machine's load only ever
  adds time, and drift between two providers' measurements cannot decide a comparison). CUDA:
  `triton.testing.do_bench` (median, L2 flushed before every call), or with `cuda="model"` the
  back-to-back calls of `compare_ms`, as a compiled model calls the op (host launch cost counted).
- `Provider` / `run_case` / `ProviderTable`: one row per (case, pattern, provider) with its time,
  its ratio against the case's fastest baseline, its relative L2 error against a float32
  reference (WRONG above a tolerance), its status (ok / WRONG / skip: ... / error: ...) and a note.
- `Results`: the markdown results file (title, environment items, table, notes) and an optional
  JSON dump, rewritten periodically and marked INCOMPLETE while the run is in progress.
- `plot_speedup`: speedup against sparsity, skipped with a message without matplotlib.

Nothing here imports triton or sparsify at module level: a smoke run must be able to set
TRITON_INTERPRET=1 (`reexec_with_interpreter`) before triton is first imported.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import inspect
import json
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
ENV_VARS = ("TRITON_INTERPRET", "SPARSIFY_KERNELS")   # recorded in the command line when set


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

def short(e: BaseException, limit: int = 90) -> str:
    """`Type: message` on one line, cut to `limit` characters."""
    msg = " ".join(str(e).split()) or type(e).__name__
    msg = f"{type(e).__name__}: {msg}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| (relative L2), y taken to float32."""
    y = y.float()
    denom = ref.norm().item()
    return (y - ref).norm().item() / (denom if denom > 0 else 1.0)


def check(y: torch.Tensor, ref: torch.Tensor, tol: float) -> tuple[float, str]:
    """(relative L2 error, "ok" or "WRONG"); a shape mismatch raises (it would otherwise broadcast)."""
    if tuple(y.shape) != tuple(ref.shape):
        raise ValueError(f"output shape {tuple(y.shape)} != reference {tuple(ref.shape)}")
    err = rel_err(y, ref)
    return err, ("ok" if err <= tol else "WRONG")   # NaN is WRONG


def ints(s: str) -> tuple[int, ...]:
    """argparse type: comma list of ints."""
    return tuple(int(v) for v in s.split(",") if v.strip())


def floats(s: str) -> tuple[float, ...]:
    """argparse type: comma list of floats."""
    return tuple(float(v) for v in s.split(",") if v.strip())


def names(s: str) -> tuple[str, ...]:
    """argparse type: comma list of names."""
    return tuple(v.strip() for v in s.split(",") if v.strip())


def names_from(allowed: Iterable[str]) -> Callable[[str], tuple[str, ...]]:
    """argparse type: comma list of names, each one of `allowed`."""
    allowed = tuple(allowed)

    def parse(s: str) -> tuple[str, ...]:
        out = names(s)
        unknown = [v for v in out if v not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(allowed)}")
        return out
    return parse


def command_line() -> str:
    """The command as typed, relative to the repo, with TRITON_INTERPRET / SPARSIFY_KERNELS if set."""
    env = " ".join(f"{k}={os.environ[k]}" for k in ENV_VARS if k in os.environ)
    script = os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return f"{env} python {shlex.join([script] + sys.argv[1:])}".strip()


def device_slug(device: torch.device) -> str:
    """The results file stem: the CUDA device name with dashes, or sparsify's CPU name (cpu-x86_64-2t)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).strip().replace(" ", "-")
    from sparsify.timing import device_name

    return device_name(device)


def results_path(device: torch.device, suffix: str = "", out: str | None = None, smoke: bool = False,
                 no_write: bool = False) -> Path | None:
    """Where the results file goes: --out, else benchmarks/results/<device><suffix>.md; None (write
    nothing) with --no-write, and for a smoke run without --out (default files are for real runs)."""
    if no_write or (smoke and not out):
        return None
    return Path(out) if out else RESULTS / f"{device_slug(device)}{suffix}.md"


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def reexec_with_interpreter(tag: str) -> None:
    """Re-run this script with TRITON_INTERPRET=1 unless it is set: the variable must be there before
    triton is first imported, so it cannot be set from inside the run."""
    if not interpreter_on():
        print(f"[{tag}] re-executing with TRITON_INTERPRET=1", flush=True)
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, TRITON_INTERPRET="1"))


def pick_device(tag: str, requested: str | None = None, smoke: bool = False,
                cpu_needs_smoke: bool = False) -> torch.device | None:
    """CUDA when there is one (or `requested`). On CPU a smoke run re-executes itself under the Triton
    interpreter; None (after a message) where a CPU run needs --smoke and was not given it."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and cpu_needs_smoke and not smoke:
        print(f"[{tag}] no CUDA device: only --smoke runs on CPU (Triton interpreter)", file=sys.stderr)
        return None
    if device.type == "cpu" and smoke:
        reexec_with_interpreter(tag)
    return device


def import_sparsify() -> str:
    """Make `sparsify` importable; returns how. pyproject maps sparsify.codegen -> codegen/ and
    sparsify.passes -> passes/, which a plain sys.path entry cannot express: without the editable
    install, load `sparsify` with both sparsify/ and the repo root on its __path__."""
    try:
        import sparsify.codegen.kernels  # noqa: F401
        return "installed"
    except ImportError as first:
        for name in [n for n in sys.modules if n == "sparsify" or n.startswith("sparsify.")]:
            del sys.modules[name]
        spec = importlib.util.spec_from_file_location(
            "sparsify", REPO / "sparsify" / "__init__.py",
            submodule_search_locations=[str(REPO / "sparsify"), str(REPO)])
        if spec is None:
            raise first
        module = importlib.util.module_from_spec(spec)
        sys.modules["sparsify"] = module
        spec.loader.exec_module(module)
        return f"repo path fallback ({first})"


# ----------------------------------------------------------------------------------------------
# Environment block
# ----------------------------------------------------------------------------------------------

def cpu_model() -> str:
    model = platform.processor() or platform.machine()
    try:   # the processor's name, where Linux tells it
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return model


def env_info(device: torch.device) -> dict:
    """Device and versions as a flat dict (JSON-able)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    info = {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": sys.version.split()[0]}
    try:
        info["cusparselt"] = (torch.backends.cusparselt.version()
                              if torch.backends.cusparselt.is_available() else "unavailable")
    except Exception as e:  # noqa: BLE001
        info["cusparselt"] = f"? ({short(e, 40)})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = torch.cuda.get_device_name(device)
        info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(device)
        info["memory_gb"] = round(props.total_memory / 2**30, 1)
        l2 = getattr(props, "L2_cache_size", None)
        if l2:
            info["l2_mb"] = round(l2 / 2**20, 1)
    else:
        info["device"] = f"CPU ({cpu_model()}), {torch.get_num_threads()} torch threads"
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "0")
    return info


def _load(avg: Sequence[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in avg)


class Environment:
    """The results header: device, versions, date, load average (start and end), command, extras."""

    def __init__(self, device: torch.device, items: Iterable[tuple[str, Any]] = ()):
        self.device = device
        self.info = env_info(device)
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.load_start = os.getloadavg()
        self.command = command_line()
        self.extra = [(k, str(v)) for k, v in items]

    def add(self, key: str, value: Any) -> None:
        """A script's own header item (dtype, timing, kernels, what a ratio means...)."""
        self.extra.append((key, str(value)))

    def device_line(self) -> str:
        i = self.info
        if self.device.type != "cuda":
            return i["device"]
        return f"{i['device']} ({i['capability']}, {i['memory_gb']} GB, L2 {i.get('l2_mb', '?')} MB)"

    def items(self, final: bool = True) -> list[tuple[str, str]]:
        i = self.info
        out = []
        if self.device.type == "cpu" and interpreter_on():
            out.append(("WARNING", "CPU run under the Triton interpreter: its Triton timings are meaningless"))
        load = (f"start {_load(self.load_start)}, {'end' if final else 'now'} {_load(os.getloadavg())} "
                f"(1 / 5 / 15 min, {os.cpu_count()} CPUs)")
        out += [("device", self.device_line()),
                ("versions", f"torch {i['torch']}, triton {i['triton']}, CUDA {i['cuda']}, "
                             f"cuSPARSELt {i['cusparselt']}, python {i['python']}"),
                ("date (UTC)", self.started.strftime("%Y-%m-%d %H:%M")),
                ("load average", load),
                ("command", f"`{self.command}`")]
        out += self.extra
        if not final:
            out.append(("status", "INCOMPLETE (run still in progress or cut off)"))
        return out

    def as_dict(self, final: bool = True) -> dict:
        return {"info": self.info, "command": self.command, "date_utc": self.started.isoformat(),
                "load_start": list(self.load_start), "load_end" if final else "load_now": list(os.getloadavg()),
                "items": dict(self.items(final)), "complete": final}

    def banner(self) -> str:
        return (f"{self.device_line()}; torch {self.info['torch']}, triton {self.info['triton']}; "
                f"load average {_load(self.load_start)}")


# ----------------------------------------------------------------------------------------------
# Timer
# ----------------------------------------------------------------------------------------------

class Timer:
    """Times the providers of one case together: `time([fn, ...])` -> [ms or the exception, ...].

    CPU: `sparsify.timing.compare_ms(fns, repeats)`, interleaved call by call, minimum kept.
    CUDA, cuda="do_bench": `triton.testing.do_bench(warmup, rep)` median per provider, L2 flushed
    before each call (device time; part of the host launch cost hides behind the flush).
    CUDA, cuda="model": `compare_ms`, back-to-back calls between events, interleaved run by run:
    the time a compiled model pays per call, host launch cost included.
    If an interleaved measurement raises, each provider is timed alone to find which one fails.
    """

    def __init__(self, device: torch.device, cuda: str = "do_bench", warmup: int = 25, rep: int = 100,
                 repeats: int = 20):
        if cuda not in ("do_bench", "model"):
            raise ValueError(f"cuda timing {cuda!r}: expected 'do_bench' or 'model'")
        self.device, self.mode, self.repeats = device, cuda, repeats
        self._kw = {"warmup": warmup, "rep": rep}
        self._do_bench = None
        if device.type == "cuda" and cuda == "do_bench":
            from triton.testing import do_bench

            self._do_bench = do_bench
            if "return_mode" in inspect.signature(do_bench).parameters:
                self._kw["return_mode"] = "median"
            else:   # older triton: quantiles only
                self._kw["quantiles"] = [0.5]

    @property
    def meaningless(self) -> bool:
        """CPU under the Triton interpreter: the Triton providers' times mean nothing."""
        return self.device.type == "cpu" and interpreter_on()

    @property
    def description(self) -> str:
        if self._do_bench is not None:
            kw = ", ".join(f"{k}={v!r}" for k, v in self._kw.items())
            return f"triton.testing.do_bench({kw}), L2 flushed before each call, providers one after another"
        if self.device.type == "cuda":
            return ("sparsify.timing.compare_ms: back-to-back calls between CUDA events, median of 5 runs, "
                    "providers interleaved run by run; host launch cost included")
        desc = (f"sparsify.timing.compare_ms: providers interleaved call by call, minimum of {self.repeats} "
                "repeats (2 warm-up calls each); ratios are ratios of minima")
        return desc + (" -- TIMINGS MEANINGLESS (Triton interpreter)" if self.meaningless else "")

    @property
    def ms_head(self) -> str:
        return "ms (CPU interpreter, meaningless)" if self.meaningless else "ms"

    def _bench(self, fn) -> float:
        r = self._do_bench(fn, **self._kw)
        return float(r[0] if isinstance(r, (list, tuple)) else r)

    def time(self, fns: Sequence[Callable[[], Any]]) -> list:
        if not fns:
            return []
        if self._do_bench is not None:
            out = []
            for fn in fns:
                try:
                    out.append(self._bench(fn))
                except Exception as e:  # noqa: BLE001 - one provider's failure is its row
                    out.append(e)
            return out
        from sparsify.timing import compare_ms

        try:
            return list(compare_ms(list(fns), self.device, self.repeats))
        except Exception as e:  # noqa: BLE001
            if len(fns) == 1:
                return [e]
            return [self.time([fn])[0] for fn in fns]


# ----------------------------------------------------------------------------------------------
# Providers and the provider table
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Provider:
    """One way of computing a case. fn=None: not runnable here, `status` says why ("skip: ...")."""

    name: str
    fn: Callable[[], Any] | None = None
    pattern: str = "dense"
    ref: Callable[[], torch.Tensor] | None = None   # float32 reference of the output; None: not checked
    out: Callable[[Any], torch.Tensor] | None = None  # applied to the output before the check
    baseline: bool = False   # the case's ratios divide its fastest baseline by each provider's time
    status: str = "ok"
    note: str = ""
    extra: dict = dataclasses.field(default_factory=dict)   # more row fields (sparsity, ...)


def run_case(case: dict, providers: Sequence[Provider], timer: Timer, tol: float,
             time_wrong: bool = True) -> list[dict]:
    """Check every provider's output against its reference, then time the runnable ones together.

    Providers that share a `ref` callable (consecutive in the list) share one reference tensor, and
    only one reference is alive at a time. Returns one row per provider; a provider that raises gets
    "error: ..." and the others go on."""
    rows, fns, timed = [], [], []
    ref_of = ref = None
    for p in providers:
        row = dict(case, pattern=p.pattern, provider=p.name, ms=None, ratio=None, rel_err=None,
                   status=p.status if p.fn is None else "ok", note=p.note, baseline=p.baseline, **p.extra)
        rows.append(row)
        if p.fn is None:
            continue
        try:
            if p.ref is not None:
                if p.ref is not ref_of:
                    ref = None   # free the previous reference first
                    ref, ref_of = p.ref(), p.ref
                y = p.fn()
                row["rel_err"], row["status"] = check(p.out(y) if p.out else y, ref, tol)
                del y
        except Exception as e:  # noqa: BLE001 - a failing provider is a row, not the end of the run
            row["status"] = "error: " + short(e)
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
            continue
        if row["status"] == "ok" or time_wrong:
            fns.append(p.fn)
            timed.append(row)
    del ref
    for row, ms in zip(timed, timer.time(fns)):
        if isinstance(ms, BaseException):
            row["status"] = "error: " + short(ms)
        else:
            row["ms"] = ms
    base = [r["ms"] for r in rows if r["baseline"] and r["ms"] is not None]
    for r in rows:
        if base and r["ms"]:
            r["ratio"] = min(base) / r["ms"]
    return rows


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A markdown table; align: one letter per column, l or r (default l). '|' in cells becomes '/'."""
    align = align.ljust(len(headers), "l")
    lines = [markdown_row(headers), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    return "\n".join(lines + [markdown_row(row) for row in rows])


def markdown_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(v).replace("|", "/") for v in cells) + " |"


def fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def fmt_ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def fmt_err(row: dict, tol: float) -> str:
    """The rel err column: the error, **WRONG** with it, or the status of a row that did not run."""
    st = row["status"]
    if st == "WRONG":
        return f"**WRONG** {row['rel_err']:.2e} (> {tol:g})"
    if st != "ok":
        return st
    return "-" if row["rel_err"] is None else f"{row['rel_err']:.1e}"


class ProviderTable:
    """The rows of a run: case columns (e.g. shape, M), pattern, provider, ms, ratio, rel err, note."""

    def __init__(self, case_columns: Sequence[tuple[str, str]] = (("shape", "shape"),), tol: float = 2e-2,
                 ms_head: str = "ms", ratio_head: str = "vs dense"):
        self.case_columns, self.tol = list(case_columns), tol
        self.ms_head, self.ratio_head = ms_head, ratio_head
        self.rows: list[dict] = []

    def add(self, rows: Iterable[dict]) -> list[dict]:
        rows = list(rows)
        self.rows.extend(rows)
        return rows

    def line(self, row: dict) -> str:
        """One row for the progress log."""
        case = " ".join(f"{key}={row.get(key)}" for _, key in self.case_columns)
        err = "-" if row["rel_err"] is None else f"{row['rel_err']:.1e}"
        return (f"  {case} {row['pattern']} {row['provider']}: {fmt_ms(row['ms'])} ms {fmt_ratio(row['ratio'])} "
                f"err {err} [{row['status']}]")

    def markdown(self) -> str:
        heads = [h for h, _ in self.case_columns] + ["pattern", "provider", self.ms_head, self.ratio_head,
                                                     "rel err", "note"]
        align = "".join("r" if k == "M" else "l" for _, k in self.case_columns) + "llrrll"
        return markdown_table(heads, ([row.get(k, "") for _, k in self.case_columns]
                                      + [row["pattern"], row["provider"], fmt_ms(row["ms"]), fmt_ratio(row["ratio"]),
                                         fmt_err(row, self.tol), row.get("note", "")] for row in self.rows), align)

    def counts(self) -> dict:
        st = [r["status"] for r in self.rows]
        return {"WRONG": st.count("WRONG"), "errors": sum(s.startswith("error") for s in st),
                "skipped": sum(s.startswith("skip") for s in st)}

    def summary(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in self.counts().items())


# ----------------------------------------------------------------------------------------------
# Results file
# ----------------------------------------------------------------------------------------------

def render(title: str, items: Sequence[tuple[str, str]], body: str, notes: str = "") -> str:
    lines = [f"# {title}", ""] + [f"- {k}: {v}" for k, v in items] + ["", body, ""]
    return "\n".join(lines + ([notes, ""] if notes else []))


class Results:
    """The markdown results file (and JSON dump): `save(body, rows, final)`; `progress(...)` rewrites
    it at most every `every_s` seconds, marked INCOMPLETE, so a run cut off still leaves its rows."""

    def __init__(self, path: Path | str | None, title: str, env: Environment, json_path: Path | str | None = None,
                 every_s: float = 15.0):
        self.path = Path(path) if path else None
        self.json_path = Path(json_path) if json_path else None
        self.title, self.env, self.every_s = title, env, every_s
        self._last = time.time()

    def save(self, body: str, rows: Sequence[dict] = (), final: bool = True, notes: str = "") -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(render(self.title, self.env.items(final), body, notes))
        if self.json_path:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            self.json_path.write_text(json.dumps(dict(self.env.as_dict(final), rows=list(rows)), indent=1,
                                                 default=str))
        self._last = time.time()

    def progress(self, body: Callable[[], str], rows: Sequence[dict] = ()) -> None:
        if (self.path or self.json_path) and time.time() - self._last >= self.every_s:
            self.save(body(), rows, final=False)

    def written(self) -> list[str]:
        return [str(p) for p in (self.path, self.json_path) if p]

    def finish(self, tag: str, body: str, rows: Sequence[dict] = (), summary: str = "") -> None:
        """The final save, then on stdout the table, the summary and where the files went."""
        self.save(body, rows, final=True)
        print(f"\n{body}\n", flush=True)
        for line in ([summary] if summary else []) + [f"wrote {p}" for p in self.written()]:
            print(f"[{tag}] {line}", flush=True)


# ----------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------

def plot_speedup(rows: Iterable[dict], path: Path | str, title: str, label: Callable[[dict], str] | None = None,
                 ylabel: str = "speedup vs dense (>1 = faster)") -> str:
    """Ratio against sparsity, one line per `label(row)` (default: the provider); returns a message.
    Rows need `sparsity` and `ratio`; baselines and rows that did not run are left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    label = label or (lambda r: r["provider"])
    series: dict[str, list] = {}
    for r in rows:
        if r.get("ratio") is not None and r.get("sparsity") is not None and not r.get("baseline") \
                and r["status"] in ("ok", "WRONG"):
            series.setdefault(label(r), []).append((r["sparsity"], r["ratio"], r["status"] == "WRONG"))
    if not series:
        return "plot skipped: no timed sparse rows"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted(series):
        pts = sorted(series[key])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "s",
                label=key + (" [WRONG]" if any(p[2] for p in pts) else ""))
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("sparsity (fraction of weights removed)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"
