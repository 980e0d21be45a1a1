"""The CPU code generator for activation-sparse FFN blocks: C source per block variant.

A variant is specialised to the block's sizes (D in, F hidden, D out are constants), its mode
(ungated, gated, predicted: codegen/kernels/_ffn_common.py), its activation, element type (fp32, or
bf16 weights read as fp32) and fused epilogue (down bias, activation, residual, output dtype). One
call runs two phases in one OpenMP region, a barrier between them:

1. hidden units: threads split F; for each unit f, the dot products of its gate (or up) row with
   the M tokens (4 tokens share each weight vector load), the activation, the threshold. A unit no
   token keeps is dropped right there: in gated mode its up row is never read, in predicted mode
   (the predictor's logits arrive from the host) neither is its up row. A kept unit's M values go
   into a compacted list (its index, then its M values), per thread, in order of f.
2. the down projection over the kept units only: threads split the output columns; each streams,
   for every kept unit, the unit's row of w_down_t [F, D out] (contiguous: the kept rows are whole
   rows) over its columns, into accumulators of at most 16 KB (L1) per column chunk; then the
   epilogue and the store.

Bytes read: the gate (or up) rows in full, the up rows of kept units (gated, predicted), the down
rows of kept units; that is where the time goes at small batch, so that is what the sparsity saves.

`source(...)` returns the C text; codegen/cpu_build.py builds and caches it. Bump TEMPLATE_VERSION
when the generated code changes: it is part of the FFN kernel's cost-cache key.
"""
from __future__ import annotations

from .cpu_vector import ACTIVATIONS as _EPILOGUE_ACTIVATIONS, ELEMENT, HEADER, OUT

TEMPLATE_VERSION = "cpu-ffn-2"

_TYPES = {"float32": "f32", "bfloat16": "bf16"}
_OUT_TYPES = {**_TYPES, "float16": "f16"}
# the op's modes, and "input": the down projection alone over a given h (what TEAL does to a linear's
# input), y = h' @ w_down_t with h' = h where |h| > threshold
MODES = ("ungated", "gated", "predicted", "topk", "gated_topk", "input")

_HIDDEN_ACTIVATIONS = {   # scalar: F values per token, a small part of the block's time
    "none": "return v;",
    "relu": "return v > 0.f ? v : 0.f;",
    "relu2": "float r = v > 0.f ? v : 0.f; return r * r;",
    "gelu": "return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));",
    "gelu_tanh": "return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));",
    "silu": "return v / (1.f + expf(-v));",
}

_BODY = r"""
#define D_IN {d}
#define F_HID {f}
#define D_OUT {dout}
#define GATED {gated}
#define PREDICTED {predicted}
#define INPUT {input}
#define TOPK {topk}     /* per-token threshold mean + c * std of |s| over the units: a pass over them first */   /* the down projection alone: x is the hidden activation h [M, F_HID] */
#define HAS_BUP {has_bup}
#define HAS_BGATE {has_bgate}
#define HAS_BIAS {has_bias}
#define HAS_RES {has_res}
#define ACC_FLOATS 4096   /* phase 2 accumulators per chunk: 16 KB, in L1 */

static inline float hact(float v) {{ {hact} }}
static inline vf eact(vf v) {{ {eact} }}

static inline vf loadw(const tin* p) {{
#if {bf16}
  typedef uint16_t vh __attribute__((vector_size(VW * 2)));
  typedef uint32_t vu __attribute__((vector_size(VW * 4)));
  vh h; memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
#else
  vf v; memcpy(&v, p, sizeof v); return v;
#endif
}}
static inline vf loadf(const float* p) {{ vf v; memcpy(&v, p, sizeof v); return v; }}
static inline float hsum(vf v) {{ float s = 0.f; for (int i = 0; i < VW; i++) s += v[i]; return s; }}

/* out[t] = w . x[t] for the m tokens of x (fp32, token-major [m, D_IN]); 4 tokens share each
   weight vector, so a row is read from cache once per 4 tokens */
static void dots(const tin* w, const float* x, int64_t m, float* out) {{
  int64_t t = 0;
  for (; t + 4 <= m; t += 4) {{
    const float *x0 = x + t * D_IN, *x1 = x0 + D_IN, *x2 = x1 + D_IN, *x3 = x2 + D_IN;
    vf a0 = {{0}}, a1 = {{0}}, a2 = {{0}}, a3 = {{0}};
    int k = 0;
    for (; k + VW <= D_IN; k += VW) {{
      vf wv = loadw(w + k);
      a0 += wv * loadf(x0 + k); a1 += wv * loadf(x1 + k); a2 += wv * loadf(x2 + k); a3 += wv * loadf(x3 + k);
    }}
    float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (; k < D_IN; k++) {{ float wk = in_(w[k]); s0 += wk * x0[k]; s1 += wk * x1[k]; s2 += wk * x2[k]; s3 += wk * x3[k]; }}
    out[t] = s0; out[t + 1] = s1; out[t + 2] = s2; out[t + 3] = s3;
  }}
  for (; t < m; t++) {{
    const float* xr = x + t * D_IN;
    vf a0 = {{0}}, a1 = {{0}}, a2 = {{0}}, a3 = {{0}};
    int k = 0;
    for (; k + 4 * VW <= D_IN; k += 4 * VW) {{
      a0 += loadw(w + k) * loadf(xr + k); a1 += loadw(w + k + VW) * loadf(xr + k + VW);
      a2 += loadw(w + k + 2 * VW) * loadf(xr + k + 2 * VW); a3 += loadw(w + k + 3 * VW) * loadf(xr + k + 3 * VW);
    }}
    for (; k + VW <= D_IN; k += VW) a0 += loadw(w + k) * loadf(xr + k);
    float s = hsum((a0 + a1) + (a2 + a3));
    for (; k < D_IN; k++) s += in_(w[k]) * xr[k];
    out[t] = s;
  }}
}}

/* x: fp32 [M, D_IN]; w_up, w_gate: [F_HID, D_IN]; w_down_t: [F_HID, D_OUT]; thr: fp32 [F_HID];
   logits: fp32 [M, F_HID] (predicted) or NULL; res: [M, D_OUT]; y: [M, D_OUT].
   Scratch: idx int32 [F_HID], hv fp32 [F_HID * M] (kept units' values), cnt int32 [threads],
   acc fp32 [threads * ACC_FLOATS], tmp fp32 [threads * 2 * M], and for top-k stat fp64
   [threads * 2 * M] and theta fp32 [2 * M]. kept[0] gets the number of units read. */
void {name}(const float* x, const tin* w_up, const tin* b_up, const tin* w_gate, const tin* b_gate,
            const tin* w_down_t, const float* thr, const float* logits, const tin* bias, const tin* res,
            tout* y, int64_t M, int nthreads, int32_t* idx, float* hv, int32_t* cnt, float* accbuf,
            float* tmp, int32_t* kept, double* stat, float* theta_mean) {{
  #pragma omp parallel num_threads(nthreads)
  {{
    int T = omp_get_num_threads(), th = omp_get_thread_num();
    /* ---- phase 1: the hidden units of this thread, compacted ---- */
    int f0 = (int)((int64_t)F_HID * th / T), f1 = (int)((int64_t)F_HID * (th + 1) / T);
    float* s = tmp + (int64_t)th * 2 * M;
    float* u = s + M;
    int32_t c = 0;
#if TOPK
    /* 1a: every unit's |s| per token into hv (row f), and this thread's sums of |s| and |s|^2 */
    double* st = stat + (int64_t)th * 2 * M;
    for (int64_t t = 0; t < 2 * M; t++) st[t] = 0.0;
    for (int f = f0; f < f1; f++) {{
      float* row = hv + (int64_t)f * M;
#if GATED
      dots(w_gate + (int64_t)f * D_IN, x, M, row);
      for (int64_t t = 0; t < M; t++) row[t] = hact(row[t] + (HAS_BGATE ? in_(b_gate[f]) : 0.f));
#else
      dots(w_up + (int64_t)f * D_IN, x, M, row);
      for (int64_t t = 0; t < M; t++) row[t] = hact(row[t] + (HAS_BUP ? in_(b_up[f]) : 0.f));
#endif
      for (int64_t t = 0; t < M; t++) {{ double a = fabsf(row[t]); st[t] += a; st[M + t] += a * a; }}
    }}
    #pragma omp barrier
    float* cut = theta_mean + 0;   /* per token: mean, then std, from every thread's sums */
    #pragma omp single
    {{
      for (int64_t t = 0; t < M; t++) {{
        double s1 = 0, s2 = 0;
        for (int i = 0; i < T; i++) {{ s1 += stat[(int64_t)i * 2 * M + t]; s2 += stat[(int64_t)i * 2 * M + M + t]; }}
        double mean = s1 / F_HID, var = s2 / F_HID - mean * mean;
        cut[t] = (float)mean; cut[M + t] = (float)sqrt(var > 0 ? var : 0);
      }}
    }}
    /* 1b: keep the units above the token's cut, compacting in place (slot c <= f within the thread) */
    for (int f = f0; f < f1; f++) {{
      const float* row = hv + (int64_t)f * M;
      float* hrow = hv + ((int64_t)f0 + c) * M;
      int any = 0;
      for (int64_t t = 0; t < M; t++) {{
        float a = row[t];
        int keep = fabsf(a) > cut[t] + thr[f] * cut[M + t];
        s[t] = keep ? a : 0.f;
        any |= keep;
      }}
      if (!any) continue;
#if GATED
      dots(w_up + (int64_t)f * D_IN, x, M, u);
      for (int64_t t = 0; t < M; t++) hrow[t] = s[t] * (u[t] + (HAS_BUP ? in_(b_up[f]) : 0.f));
#else
      for (int64_t t = 0; t < M; t++) hrow[t] = s[t];
#endif
      idx[f0 + c] = f;
      c++;
    }}
#else
    for (int f = f0; f < f1; f++) {{
      float* hrow = hv + ((int64_t)f0 + c) * M;   /* the next free slot of this thread's list */
      int any = 0;
#if PREDICTED
      for (int64_t t = 0; t < M; t++) any |= logits[t * F_HID + f] > 0.f;
      if (!any) continue;
      any = 0;
#endif
#if INPUT
      for (int64_t t = 0; t < M; t++) s[t] = x[t * F_HID + f];
#elif GATED
      dots(w_gate + (int64_t)f * D_IN, x, M, s);
#else
      dots(w_up + (int64_t)f * D_IN, x, M, s);
#endif
      float th_f = thr[f];
      for (int64_t t = 0; t < M; t++) {{
#if INPUT
        float a = s[t];
#elif GATED
        float a = hact(s[t] + (HAS_BGATE ? in_(b_gate[f]) : 0.f));
#else
        float a = hact(s[t] + (HAS_BUP ? in_(b_up[f]) : 0.f));
#endif
        int keep = fabsf(a) > th_f;
#if PREDICTED
        keep = keep && logits[t * F_HID + f] > 0.f;
#endif
        s[t] = keep ? a : 0.f;
        any |= keep;
      }}
      if (!any) continue;
#if GATED
      dots(w_up + (int64_t)f * D_IN, x, M, u);
      for (int64_t t = 0; t < M; t++) hrow[t] = s[t] * (u[t] + (HAS_BUP ? in_(b_up[f]) : 0.f));
#else
      for (int64_t t = 0; t < M; t++) hrow[t] = s[t];
#endif
      idx[f0 + c] = f;
      c++;
    }}
#endif
    cnt[th] = c;
    #pragma omp barrier
    #pragma omp single
    {{ int32_t total = 0; for (int i = 0; i < T; i++) total += cnt[i]; kept[0] = total; }}
    /* ---- phase 2: y[:, cols] over the kept units' rows of w_down_t ---- */
    int nvec = (D_OUT + VW - 1) / VW;
    int c0 = (int)((int64_t)nvec * th / T) * VW, c1 = (int)((int64_t)nvec * (th + 1) / T) * VW;
    if (c1 > D_OUT) c1 = D_OUT;
    int chunk = (int)(ACC_FLOATS / M) / VW * VW;
    if (chunk < VW) chunk = VW;
    float* acc = accbuf + (int64_t)th * ACC_FLOATS;
    for (int cs = c0; cs < c1; cs += chunk) {{
      int ce = cs + chunk < c1 ? cs + chunk : c1;
      int width = ce - cs, wv = width / VW * VW;
      for (int64_t t = 0; t < M; t++)
        for (int j = 0; j < width; j++) acc[t * width + j] = HAS_BIAS ? in_(bias[cs + j]) : 0.f;
      for (int src = 0; src < T; src++) {{
        int g0 = (int)((int64_t)F_HID * src / T);
        const int32_t* ids = idx + g0;
        const float* hs = hv + (int64_t)g0 * M;
        int n = cnt[src];
        for (int j = 0; j < n; j++) {{
          const tin* w = w_down_t + (int64_t)ids[j] * D_OUT + cs;
          if (j + 2 < n) {{   /* the row after next, at these columns: rows jump, the prefetcher does not follow */
            const tin* wn = w_down_t + (int64_t)ids[j + 2] * D_OUT + cs;
            for (int k = 0; k < width; k += 64 / sizeof(tin)) __builtin_prefetch(wn + k, 0, 0);
          }}
          for (int64_t t = 0; t < M; t++) {{
            float h = hs[(int64_t)j * M + t];
            if (h == 0.f) continue;
            float* a = acc + t * width;
            int k = 0;
            for (; k < wv; k += VW) {{ vf av = loadf(a + k); av += h * loadw(w + k); memcpy(a + k, &av, sizeof av); }}
            for (; k < width; k++) a[k] += h * in_(w[k]);
          }}
        }}
      }}
      for (int64_t t = 0; t < M; t++) {{
        float* a = acc + t * width;
        int k = 0;
        for (; k < wv; k += VW) {{ vf av = eact(loadf(a + k)); memcpy(a + k, &av, sizeof av); }}
        for (; k < width; k++) {{ vf av = eact((vf){{0}} + a[k]); a[k] = av[0]; }}
        tout* dst = y + t * D_OUT + cs;
        for (int j = 0; j < width; j++) {{
          float v = a[j];
#if HAS_RES
          v += in_(res[t * D_OUT + cs + j]);
#endif
          dst[j] = out_(v);
        }}
      }}
    }}
  }}
}}
"""


def kernel_name(d: int, f: int, dout: int, mode: str, act: str, dtype: str, out_dtype: str, has_bup: bool,
                has_bgate: bool, has_bias: bool, has_res: bool, activation: str) -> str:
    return (f"ffn_{d}x{f}x{dout}_{mode}_{act}_{_TYPES[dtype]}_{_OUT_TYPES[out_dtype]}"
            f"{'_bu' if has_bup else ''}{'_bg' if has_bgate else ''}{'_b' if has_bias else ''}"
            f"{'_r' if has_res else ''}_{activation}")


def source(d: int, f: int, dout: int, mode: str, act: str, dtype: str, out_dtype: str, has_bup: bool,
           has_bgate: bool, has_bias: bool, has_res: bool, activation: str = "none") -> tuple[str, str]:
    """(C source, function name) of one FFN block variant (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"FFN mode must be one of {MODES}, got {mode!r}")
    if act not in _HIDDEN_ACTIVATIONS and not (mode == "input" and act == "none"):
        raise ValueError(f"FFN activation must be one of {sorted(_HIDDEN_ACTIVATIONS)}, got {act!r}")
    if activation not in _EPILOGUE_ACTIVATIONS:
        raise ValueError(f"epilogue activation must be one of {sorted(_EPILOGUE_ACTIVATIONS)}, got {activation!r}")
    if dtype not in _TYPES or out_dtype not in _OUT_TYPES:
        raise ValueError(f"generated FFN kernels take {sorted(_TYPES)} and store {sorted(_OUT_TYPES)}, "
                         f"got {dtype} -> {out_dtype}")
    name = kernel_name(d, f, dout, mode, act, dtype, out_dtype, has_bup, has_bgate, has_bias, has_res, activation)
    body = _BODY.format(d=d, f=f, dout=dout, gated=int(mode in ("gated", "gated_topk")), topk=int(mode in ("topk", "gated_topk")), predicted=int(mode == "predicted"), input=int(mode == "input"),
                        has_bup=int(has_bup), has_bgate=int(has_bgate), has_bias=int(has_bias), has_res=int(has_res),
                        hact=_HIDDEN_ACTIVATIONS[act], eact=_EPILOGUE_ACTIVATIONS[activation],
                        bf16=int(dtype == "bfloat16"), name=name)
    text = (f"/* sparsify generated kernel {name} (template {TEMPLATE_VERSION}) */\n" + HEADER
            + ELEMENT[_TYPES[dtype]] + OUT[_OUT_TYPES[out_dtype]] + body)
    return text, name
