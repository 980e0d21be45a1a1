"""The CPU code generator for sparse-weight x dense-activation kernels: C source per kernel variant.

A variant is specialised to a layer's shape (N, K are constants), its element types (fp32, or bf16
stored and converted to fp32 in registers), its fused epilogue (bias, activation, residual, output
dtype) and where it stores (feature-major y^T [N, M] or token-major y [M, N]). What the code does:

- tokens along the vector lanes: x arrives feature-major, x^T [K, M], so one nonzero W[n, j] is a
  broadcast times the contiguous tokens x^T[j, m0 : m0 + MT], accumulated in registers (GCC vector
  types, VW lanes: 16 with AVX-512, 8 with AVX2) for MT = NV * VW tokens at a time;
- threads over output rows, each thread a contiguous run of rows with about nnz / threads nonzeros
  (a binary search on the row pointers), token tiles outermost so the x^T slice of a tile stays in
  cache while the rows stream through;
- the tail of the tokens in tiles of 2 and 1 vectors, then scalar; one token (M == 1) is a sparse
  dot product per row;
- the epilogue on the finished tile: + bias (the accumulator's start), activation, + residual
  (token-major [M, N]), rounded once to the output type at the store; a token-major store gathers
  RB rows' tiles in a small buffer first, so each token receives RB adjacent values, not a scatter.

`source(...)` returns the C text; codegen/cpu_build.py builds and caches it. Bump TEMPLATE_VERSION
when the generated code changes: it is part of every generated kernel's cost-cache key.
"""
from __future__ import annotations

TEMPLATE_VERSION = "cpu-csr-3"

_TYPES = {"float32": ("float", "f32"), "bfloat16": ("uint16_t", "bf16")}

_ACTIVATIONS = {
    "none": "return v;",
    "relu": "return v > 0.f ? v : 0.f;",
    "gelu": "return 0.5f * v * (1.f + erf_(v * 0.70710678118654752f));",
    "gelu_tanh": "return 0.5f * v * (1.f + tanh_(0.7978845608028654f * (v + 0.044715f * v * v * v)));",
    "silu": "return v / (1.f + expf(fminf(-v, 80.f)));",
}

_HEADER = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>

#if defined(__AVX512F__)
#define VW 16
#define NV 4
#elif defined(__AVX__)
#define VW 8
#define NV 8
#else
#define VW 4
#define NV 8
#endif
#define MT (NV * VW)
typedef float vf __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));

/* erf: Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7); tanh through exp: both vectorise with expf */
static inline float erf_(float x) {
  float s = x < 0.f ? -1.f : 1.f, a = fabsf(x), t = 1.f / (1.f + 0.3275911f * a);
  float y = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  return s * (1.f - y * expf(-a * a));
}
/* -ffast-math assumes no infinities: the exponents are clamped where the result has saturated */
static inline float tanh_(float x) { x = fminf(fmaxf(x, -15.f), 15.f); return 1.f - 2.f / (expf(2.f * x) + 1.f); }
"""

_ELEMENT = {
    "f32": r"""
typedef float tin;
static inline float in_(tin v) { return v; }
static inline vf vin_(const tin* p) { vf f; memcpy(&f, p, sizeof f); return f; }
""",
    "bf16": r"""
typedef uint16_t tin;
static inline float in_(tin v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline vf vin_(const tin* p) {
  vh h; memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  vf f; memcpy(&f, &u, sizeof f); return f;
}
""",
}

_OUT = {
    "f32": "typedef float tout;\nstatic inline tout out_(float f) { return f; }\n",
    "bf16": r"""typedef uint16_t tout;
static inline tout out_(float f) {   /* round to nearest even, once, at the store */
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (tout)((u >> 16) | 0x40);   /* a NaN stays a NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (tout)(u >> 16);
}
""",
}

_BODY = r"""
#define N_OUT {n}
#define OUT_ROW {out_row}
#define RB 16          /* token-major stores: rows gathered per block, so a token gets RB adjacent values */
static inline float act_(float v) {{ {act} }}

/* the epilogue of `cnt` tokens from m0 of row n, their sums in acc[]: stored to dst[t * stride] */
static inline void finish(int n, int64_t m0, int cnt, float* acc, const tin* res, tout* dst, int stride) {{
  #pragma omp simd
  for (int t = 0; t < cnt; t++) {{
    float v = act_(acc[t]);
    {residual}
    dst[t * stride] = out_(v);
  }}
}}

#define TILE(W) \
static inline void tile##W(int n, int64_t m0, int cnt, const int32_t* rp, const int32_t* col, const tin* val, \
                           const tin* x, float b, const tin* res, tout* dst, int stride, int64_t M) {{ \
  vf acc[W]; \
  for (int i = 0; i < W; i++) acc[i] = (vf){{0}} + b; \
  for (int32_t p = rp[n]; p < rp[n + 1]; p++) {{ \
    vf w = (vf){{0}} + in_(val[p]); \
    const tin* xr = x + (int64_t)col[p] * M + m0; \
    for (int i = 0; i < W; i++) acc[i] += w * vin_(xr + VW * i); \
  }} \
  float out[W * VW]; memcpy(out, acc, sizeof out); \
  finish(n, m0, W * VW, out, res, dst, stride); \
}}
TILE(NV)
TILE(2)
TILE(1)

static inline void tileS(int n, int64_t m0, int cnt, const int32_t* rp, const int32_t* col, const tin* val,
                         const tin* x, float b, const tin* res, tout* dst, int stride, int64_t M) {{
  float acc[VW];
  for (int t = 0; t < cnt; t++) acc[t] = b;
  for (int32_t p = rp[n]; p < rp[n + 1]; p++) {{
    float w = in_(val[p]);
    const tin* xr = x + (int64_t)col[p] * M + m0;
    for (int t = 0; t < cnt; t++) acc[t] += w * in_(xr[t]);
  }}
  finish(n, m0, cnt, acc, res, dst, stride);
}}

static int row_at(const int32_t* rp, int64_t target) {{   /* first row whose start is >= target */
  int lo = 0, hi = N_OUT;
  while (lo < hi) {{ int mid = (lo + hi) / 2; if (rp[mid] < target) lo = mid + 1; else hi = mid; }}
  return lo;
}}

/* the rows [r0, r1) for the `cnt` tokens from m0, with one tile function */
#if OUT_ROW
#define ROWS(TILEFN, CNT) \
  for (int n0 = r0; n0 < r1; n0 += RB) {{ \
    int nr = r1 - n0 < RB ? r1 - n0 : RB; \
    for (int j = 0; j < nr; j++) TILEFN(n0 + j, m0, CNT, rp, col, val, x, BIAS(n0 + j), res, buf + j, RB, M); \
    for (int t = 0; t < (CNT); t++) memcpy(y + (m0 + t) * N_OUT + n0, buf + t * RB, nr * sizeof(tout)); \
  }}
#else
#define ROWS(TILEFN, CNT) \
  for (int n = r0; n < r1; n++) TILEFN(n, m0, CNT, rp, col, val, x, BIAS(n), res, y + (int64_t)n * M + m0, 1, M);
#endif
#define BIAS(n) {bias_n}

/* y = epilogue(W @ x^T): x [K, M] feature-major; y feature-major [N, M], or token-major [M, N] */
void {name}(const int32_t* rp, const int32_t* col, const tin* val, const tin* x, const tin* bias,
            const tin* res, tout* y, int64_t M, int nthreads) {{
  if (M == 1) {{
    #pragma omp parallel for num_threads(nthreads) schedule(dynamic, 64)
    for (int n = 0; n < N_OUT; n++) {{
      float s = BIAS(n);
      for (int32_t p = rp[n]; p < rp[n + 1]; p++) s += in_(val[p]) * in_(x[col[p]]);
      finish(n, 0, 1, &s, res, y + n, 1);
    }}
    return;
  }}
  #pragma omp parallel num_threads(nthreads)
  {{
    int T = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t nnz = rp[N_OUT];
    int r0 = t == 0 ? 0 : row_at(rp, nnz * t / T), r1 = t == T - 1 ? N_OUT : row_at(rp, nnz * (t + 1) / T);
    tout buf[MT * RB];
    (void)buf;
    int64_t m0 = 0;
    for (; m0 + MT <= M; m0 += MT) {{ ROWS(tileNV, MT) }}
    for (; m0 + 2 * VW <= M; m0 += 2 * VW) {{ ROWS(tile2, 2 * VW) }}
    for (; m0 + VW <= M; m0 += VW) {{ ROWS(tile1, VW) }}
    if (m0 < M) {{ int rest = (int)(M - m0); ROWS(tileS, rest) }}
  }}
}}
"""


def kernel_name(n: int, k: int, dtype: str, out_dtype: str, activation: str, has_bias: bool, has_residual: bool,
                out_row: bool) -> str:
    return (f"csr_{n}x{k}_{_TYPES[dtype][1]}_{_TYPES[out_dtype][1]}_{activation}"
            f"{'_b' if has_bias else ''}{'_r' if has_residual else ''}{'_row' if out_row else '_fm'}")


def source(n: int, k: int, dtype: str, out_dtype: str, activation: str, has_bias: bool, has_residual: bool,
           out_row: bool) -> tuple[str, str]:
    """(C source, function name) of y = epilogue(W @ x^T) for a [n, k] CSR weight.

    dtype: of x, the values, bias and residual ("float32" / "bfloat16"); out_dtype: of y. out_row:
    store token-major y [M, n] (else feature-major y^T [n, M])."""
    if dtype not in _TYPES or out_dtype not in _TYPES:
        raise ValueError(f"generated CPU kernels take {sorted(_TYPES)}, got {dtype} -> {out_dtype}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(_ACTIVATIONS)}")
    name = kernel_name(n, k, dtype, out_dtype, activation, has_bias, has_residual, out_row)
    residual = "v += in_(res[(m0 + t) * N_OUT + n]);" if has_residual else ""
    body = _BODY.format(n=n, act=_ACTIVATIONS[activation], residual=residual, name=name, out_row=int(out_row),
                        bias_n="in_(bias[n])" if has_bias else "0.f")
    # a comment naming the variant and K: K is not needed by the code, but a layer of another K must
    # not share a cached build whose name says otherwise
    text = (f"/* sparsify generated kernel {name} (K={k}, template {TEMPLATE_VERSION}) */\n" + _HEADER
            + _ELEMENT[_TYPES[dtype][1]] + _OUT[_TYPES[out_dtype][1]] + body)
    return text, name
