"""A peer engine in its own interpreter (DeepSparse, onnxruntime), driven over stdin/stdout.

DeepSparse 1.8 needs numpy<2 and onnx<1.15, which cannot share an environment with this project, so
bench_cpu.py starts this file under the peer's Python (see benchmarks/README.md, "DeepSparse") and
sends it one JSON command per line; each answer is one JSON line. Keeping the process alive lets the
benchmark interleave the peer's rounds with its own, as for in-process providers.

    {"cmd": "load", "engine": "deepsparse"|"onnxruntime", "model": path.onnx, "batch": 1, "threads": 2}
    {"cmd": "run", "inputs": path.npz, "outputs": path.npz}   # one call; outputs saved for the check
    {"cmd": "time", "repeats": 5}                             # -> {"ms": [...]} of back-to-back calls
    {"cmd": "quit"}

This file imports only numpy and the peer; it never imports torch or sparsify.
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")   # DeepSparse phones home otherwise

import numpy as np  # noqa: E402


class Engine:
    def __init__(self, engine: str, model: str, batch: int, threads: int):
        self.kind = engine
        if engine == "deepsparse":
            import deepsparse

            self.version = deepsparse.__version__
            self.engine = deepsparse.compile_model(model, batch_size=batch, num_cores=threads)
            self.names = None
        elif engine == "onnxruntime":
            import onnxruntime as ort

            self.version = ort.__version__
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            self.engine = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
            self.names = [i.name for i in self.engine.get_inputs()]
        else:
            raise ValueError(f"unknown engine {engine!r}: deepsparse or onnxruntime")
        self.inputs: list[np.ndarray] | None = None

    def __call__(self):
        if self.names is None:
            return self.engine.run(self.inputs)
        return self.engine.run(None, dict(zip(self.names, self.inputs)))


def serve() -> None:
    # the peers print banners and logs on stdout (C++ code included): the protocol gets a private
    # copy of fd 1, and fd 1 becomes stderr
    reply_to = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    engine = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            cmd = msg["cmd"]
            if cmd == "quit":
                break
            if cmd == "load":
                engine = Engine(msg["engine"], msg["model"], msg["batch"], msg["threads"])
                reply = {"ok": True, "version": engine.version}
            elif engine is None:
                raise RuntimeError(f"{cmd!r} before 'load'")
            elif cmd == "run":
                data = np.load(msg["inputs"])
                engine.inputs = [np.ascontiguousarray(data[k]) for k in sorted(data.files)]
                out = engine()
                np.savez(msg["outputs"], *out)
                reply = {"ok": True, "outputs": len(out)}
            elif cmd == "time":
                ms = []
                for _ in range(int(msg["repeats"])):
                    t0 = time.perf_counter()
                    engine()
                    ms.append((time.perf_counter() - t0) * 1e3)
                reply = {"ok": True, "ms": ms}
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception as e:   # the benchmark shows the peer's error in its table
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply_to.write(json.dumps(reply) + "\n")
        reply_to.flush()


if __name__ == "__main__":
    serve()
