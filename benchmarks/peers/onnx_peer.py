"""The benchmark's side of a peer engine: export a model to ONNX, start onnx_worker.py under the peer's
Python, and time the peer's calls inside the benchmark's own interleaved rounds.

The peer's interpreter: `--peer-python`, else $SPARSIFY_PEER_PYTHON, else the virtualenv that
benchmarks/README.md ("DeepSparse") creates at benchmarks/.peer-venv. `find_python` returns None (and
the reason) when there is none, and the benchmark says the peer is absent instead of failing.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE.parent / ".peer-venv"


def find_python(explicit: str | None = None) -> tuple[str | None, str]:
    """(the peer interpreter, how it was found) or (None, why there is none)."""
    for source, path in (("--peer-python", explicit), ("$SPARSIFY_PEER_PYTHON", os.environ.get("SPARSIFY_PEER_PYTHON")),
                         ("benchmarks/.peer-venv", str(DEFAULT_VENV / "bin" / "python"))):
        if path:
            if Path(path).exists():
                return path, source
            if source != "benchmarks/.peer-venv":
                return None, f"{source}={path} does not exist"
    return None, "no peer interpreter (see benchmarks/README.md, 'DeepSparse')"


def export_onnx(model: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Path | str,
                output_names=("last_hidden_state",)) -> Path:
    """The model with static shapes (DeepSparse compiles for one batch size), opset 14, the
    TorchScript exporter (dynamo=False: what DeepSparse 1.8's ONNX 1.14 reads)."""
    path = Path(path)
    names = list(inputs)
    # a copy: the TorchScript exporter's tracing leaves an HF model measurably slower afterwards
    # (MiniLM in eager: 1.3-1.5x), which would tax the torch provider timed on the same object
    model = copy.deepcopy(model)
    with torch.no_grad():
        torch.onnx.export(_Positional(model, names), tuple(inputs.values()), str(path), input_names=names,
                          output_names=list(output_names), opset_version=14, dynamo=False, do_constant_folding=True)
    return path


class _Positional(torch.nn.Module):
    """model(**inputs) as a function of positional tensors returning the first output: what the
    TorchScript exporter traces (keyword inputs collide with HF's own keyword defaults)."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.names, tensors)))
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


class Peer:
    """One peer engine on one ONNX model, alive for the whole benchmark. `peer()` is one model call
    (timed by the caller, like any provider; the pipe round trip adds ~0.1 ms), and `time(n)` times n
calls inside the worker."""

    def __init__(self, python: str, engine: str, model: Path | str, batch: int, threads: int):
        self.engine = engine
        self.proc = subprocess.Popen([python, str(HERE / "onnx_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._dir = tempfile.mkdtemp(prefix="sparsify-peer-")
        self.version = self._ask({"cmd": "load", "engine": engine, "model": str(model), "batch": batch,
                                  "threads": threads})["version"]

    def _ask(self, msg: dict) -> dict:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.engine} worker exited with code {self.proc.returncode}")
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.engine} worker died (exit code {self.proc.wait()})")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.engine}: {reply.get('error')}")
        return reply

    def set_inputs(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Give the peer its inputs (in the ONNX input order) and return its outputs on them."""
        src, dst = os.path.join(self._dir, "in.npz"), os.path.join(self._dir, "out.npz")
        # the worker feeds arrays in sorted-name order: number them in the model's input order
        np.savez(src, **{f"a{i:03d}": t.numpy() for i, t in enumerate(inputs.values())})
        n = self._ask({"cmd": "run", "inputs": src, "outputs": dst})["outputs"]
        with np.load(dst) as data:
            return [torch.from_numpy(data[f"arr_{i}"]) for i in range(n)]

    def __call__(self) -> None:
        self._ask({"cmd": "time", "repeats": 1})

    def time(self, calls: int) -> list[float]:
        """ms of `calls` back-to-back calls, timed inside the worker (no pipe round trip)."""
        return self._ask({"cmd": "time", "repeats": calls})["ms"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")   # no reply to quit
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - closing is best effort
                self.proc.kill()


def available(python: str, engine: str) -> str | None:
    """None if `engine` imports under `python`, else why not."""
    module = {"deepsparse": "deepsparse", "onnxruntime": "onnxruntime"}[engine]
    r = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True,
                       env={**os.environ, "NM_DISABLE_ANALYTICS": "1"})
    if r.returncode:
        return f"{module} does not import under {python}: {r.stderr.strip().splitlines()[-1:]}"
    return None


if __name__ == "__main__":
    print(find_python(sys.argv[1] if len(sys.argv) > 1 else None))
