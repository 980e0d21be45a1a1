"""The report: what was done to each site (a layer, a channel group, ...), the numbers behind it, and why."""
from __future__ import annotations

from .plan import Plan


def _ms(v):
    return "-" if v is None else f"{v:.4f}"


def _shape(s):
    return "?" if s is None else "x".join(str(d) for d in s)


def plan_table(plan: Plan) -> str:
    header = ("site", "family", "op", "in->out", "pattern", "kernel", "sparsity", "dense ms", "sparse ms",
              "speedup", "layer err", "status")
    rows = []
    for lp in plan.layers.values():
        speed = lp.speedup
        rows.append((lp.fqn, lp.family, lp.op, f"{_shape(lp.input_shape)}->{_shape(lp.output_shape)}",
                     lp.pattern.describe() if lp.status != "dense" else "Dense",
                     lp.kernel if lp.status != "dense" else "-",
                     f"{lp.sparsity:.2f}", _ms(lp.dense_ms), _ms(lp.sparse_ms),
                     "-" if speed is None else f"{speed:.2f}x",
                     "-" if lp.layer_error is None else f"{lp.layer_error:.2e}", lp.status))
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    widths[0] = min(widths[0], 48)
    widths[4] = min(widths[4], 44)
    line = lambda r: "  ".join(str(c)[:w].ljust(w) for c, w in zip(r, widths))
    out = [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    out.append("")
    out.append("reasons:")
    for lp in plan.layers.values():
        out.append(f"  {lp.fqn}: {lp.reason}")
    if plan.model_error is not None:
        out.append(f"model output error vs dense ({plan.error_measure}, calibration data): {plan.model_error:.3e}")
    if plan.model_dense_ms is not None:
        ratio = plan.model_speedup or plan.model_dense_ms / plan.model_sparse_ms
        out.append(f"end to end (first calibration batch, interleaved): dense {plan.model_dense_ms:.4f} ms, "
                   f"compiled {plan.model_sparse_ms:.4f} ms ({ratio:.2f}x)")
    for note in plan.notes:
        out.append(f"note: {note}")
    return "\n".join(out)


def format_report(sm) -> str:
    cap = sm._need_compiled()
    lines = ["sparsify report", "=" * 15]
    lines.append(f"device: {sm.device}   max_error: {sm.config.max_error}   "
                 f"compile: {sm.compile_seconds:.2f} s" if sm.compile_seconds else f"device: {sm.device}")
    how = ", ".join(f"{p.prefix or '<model>'} ({p.method})" for p in cap.parts)
    lines.append(f"captured: {how}")
    lines.append("inference-only: runs in eval mode (your model is not changed); sparse ops have no backward; "
                 "a plain attribute the forward reads, changed later, triggers a new capture")
    for f in cap.failures:
        lines.append(f"  not captured: {f.prefix or '<model>'}: {f.reason}")
    sparse = sm.plan.sparse_layers()
    total_dense = sum(lp.dense_ms or 0 for lp in sm.plan.layers.values())
    total_sparse = sum((lp.sparse_ms if lp in sparse else lp.dense_ms) or 0 for lp in sm.plan.layers.values())
    lines.append(f"sites: {len(sm.plan)}, changed: {len(sparse)}; sum of planned site times: dense "
                 f"{total_dense:.3f} ms -> {total_sparse:.3f} ms")
    if sm.pass_seconds:
        lines.append("pass time: " + ", ".join(f"{k} {v:.2f}s" for k, v in sm.pass_seconds.items()))
    if sm.rule_counts:
        lines.append("rewrite rule matches: " + ", ".join(f"{k}={v}" for k, v in sm.rule_counts.items()))
    for state in sm._state.values():
        for note in state.notes:
            lines.append(f"note: {note}")
    lines.append("")
    lines.append(plan_table(sm.plan))
    return "\n".join(lines)
