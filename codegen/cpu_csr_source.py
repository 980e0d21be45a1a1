"""The CPU code generator for sparse-weight x dense-activation kernels: C source per kernel variant.

A variant is specialised to a layer's shape (N, K are constants), its element types (fp32, or bf16
stored: x is converted once into fp32 token tiles, a weight value as it is read), its fused epilogue (bias, activation, residual, output
dtype) and where it stores (feature-major y^T [N, M] or token-major y [M, N]). What the code does:

- tokens along the vector lanes: x arrives feature-major, x^T [K, M], so one nonzero W[n, j] is a
  broadcast times the contiguous tokens x^T[j, m0 : m0 + MT], accumulated in registers (GCC vector
  types, VW lanes: 16 with AVX-512, 8 with AVX2) for MT = NV * VW tokens at a time;
- threads over output rows, each thread a contiguous run of rows with about nnz / threads nonzeros
  (a binary search on the row pointers), token tiles outermost so the x^T slice of a tile stays in
  cache while the rows stream through;
- wide batches (K > KB = 512 and at least two full tiles): the full tiles go K block by K block, each
  row's running sums kept in a per-thread buffer, so the x^T rows a block reads stay in cache;
- the tail of the tokens in tiles of 2 and 1 vectors, then scalar; one token (M == 1) is a sparse
  dot product per row;
- the epilogue on the finished tile: + bias (the accumulator's start), activation, + residual
  (token-major [M, N]), rounded once to the output type at the store; a token-major store gathers
  RB rows' tiles in a small buffer first, so each token receives RB adjacent values, not a scatter.

`source(...)` returns the C text; codegen/cpu_build.py builds and caches it. Bump TEMPLATE_VERSION
when the generated code changes: it is part of every generated kernel's cost-cache key.
"""
from __future__ import annotations

from .cpu_vector import ACTIVATIONS as _ACTIVATIONS, ELEMENT as _ELEMENT, HEADER as _HEADER, OUT as _OUT

TEMPLATE_VERSION = "cpu-csr-10"

_TYPES = {"float32": "f32", "bfloat16": "bf16"}                 # inputs (x, values, bias, residual)
_OUT_TYPES = {**_TYPES, "float16": "f16"}                        # outputs: also a cast to fp16

_BODY = r"""
#define N_OUT {n}
#define K_IN {k}
#define IN_ROW {in_row}
#define OUT_ROW {out_row}
#define PD 4           /* x prefetch distance in nonzeros: 2-4 measured best, 8 worse */
#define WPD 128        /* weight prefetch distance in nonzeros, one request per 16 (a cache line of col) */
#define RB 16          /* token-major stores: rows gathered per block, so a token gets RB adjacent values */
static inline vf act_(vf v) {{ {act} }}

/* the epilogue of `cnt` tokens from m0 of row n, their sums in acc[] (room for a whole number of
   vectors): the activation, the residual, stored to dst[t * stride] */
static inline void finish(int n, int64_t m0, int cnt, float* acc, const tin* res, tout* dst, int stride) {{
  for (int i = 0; i < cnt; i += VW) {{
    vf v; memcpy(&v, acc + i, sizeof v); v = act_(v); memcpy(acc + i, &v, sizeof v);
  }}
  #pragma omp simd
  for (int t = 0; t < cnt; t++) {{
    float v = acc[t];
    {residual}
    dst[t * stride] = out_(v);
  }}
}}

/* one token's values of the rows n0 .. n0 + cnt (cnt <= MT), in s[]: the epilogue, stored to dst */
static inline void finish1(int n0, int cnt, float* s, const tin* res, tout* dst) {{
  for (int i = 0; i < cnt; i += VW) {{
    vf v; memcpy(&v, s + i, sizeof v); v = act_(v); memcpy(s + i, &v, sizeof v);
  }}
  for (int j = 0; j < cnt; j++) {{
    float v = s[j];
    {residual1}
    dst[j] = out_(v);
  }}
}}

/* The tokens go in tiles: MT wide, then 2 * VW, VW, and the rest. The tile of w tokens from m0 is
   packed as [K][w] at xs + K * m0 (pack_in), so the x^T row a nonzero reads is w contiguous values,
   and a tile's K rows are one contiguous run: strided rows of a wide x^T ([K, M] with M * 4 bytes
   between rows) collide in the same cache sets and do not stay in L2. */
static inline int tile_width(int64_t m0, int64_t M) {{
  return m0 + MT <= M ? MT : m0 + 2 * VW <= M ? 2 * VW : m0 + VW <= M ? VW : (int)(M - m0);
}}

/* one nonzero's update of W vectors: acc += w * xt[col, 0 : W * VW] (the tiles are fp32 whatever
   x's type: pack_in converts once, not once per nonzero) */
#define STEP(W) {{ \
    vf w = (vf){{0}} + in_(val[p]); \
    const float* xr = xt + (int64_t)col[p] * (W * VW); \
    for (int i = 0; i < W; i++) {{ vf v; memcpy(&v, xr + VW * i, sizeof v); acc[i] += w * v; }} \
  }}
/* The x^T rows a tile reads are scattered over K (one per nonzero), which the hardware prefetcher
   does not follow: the row PD nonzeros ahead (this row's or the next row's) is requested now, for p
   below `plim` = nnz - PD so that col[p + PD] exists. The weight stream is requested WPD ahead
   without keeping it in the outer caches (it is read once per tile; x's tile is what must stay). */
#define TILE(W) \
static inline void tile##W(int n, int cnt, const int32_t* rp, const int32_t* col, const tin* val, \
                           const float* xt, float b, const tin* res, int64_t m0, tout* dst, int stride, int32_t plim) {{ \
  vf acc[W]; \
  for (int i = 0; i < W; i++) acc[i] = (vf){{0}} + b; \
  int32_t p = rp[n], pe = rp[n + 1], pm = pe < plim ? pe : plim; \
  for (; p < pm; p++) {{ \
    const char* ahead = (const char*)(xt + (int64_t)col[p + PD] * (W * VW)); \
    for (int l = 0; l < (int)(W * VW * sizeof(float)); l += 64) __builtin_prefetch(ahead + l); \
    if ((p & 15) == 0) {{ __builtin_prefetch(val + p + WPD, 0, 0); __builtin_prefetch(col + p + WPD, 0, 0); }} \
    STEP(W) \
  }} \
  for (; p < pe; p++) STEP(W) \
  float out[W * VW]; memcpy(out, acc, sizeof out); \
  finish(n, m0, W * VW, out, res, dst, stride); \
}}
TILE(NV)
TILE(2)
TILE(1)

static inline void tileS(int n, int cnt, const int32_t* rp, const int32_t* col, const tin* val,
                         const float* xt, float b, const tin* res, int64_t m0, tout* dst, int stride, int32_t plim) {{
  float acc[VW];
  (void)plim;
  for (int t = 0; t < cnt; t++) acc[t] = b;
  for (int32_t p = rp[n]; p < rp[n + 1]; p++) {{
    float w = in_(val[p]);
    const float* xr = xt + (int64_t)col[p] * cnt;
    for (int t = 0; t < cnt; t++) acc[t] += w * xr[t];
  }}
  finish(n, m0, cnt, acc, res, dst, stride);
}}

static int row_at(const int32_t* rp, int64_t target) {{   /* first row whose start is >= target */
  int lo = 0, hi = N_OUT;
  while (lo < hi) {{ int mid = (lo + hi) / 2; if (rp[mid] < target) lo = mid + 1; else hi = mid; }}
  return lo;
}}

/* x (feature-major [K, M], or token-major [M, K] with IN_ROW) -> the packed tiles in xs, inside the
   parallel region; threads split K. Token-major input moves in 16 x 16 blocks, so both sides of a
   block stay in cache (torch's x.t().contiguous() runs at ~2.5 GB/s here, which would cost more
   than the sparse product of a 90% layer). */
static void pack_in(const tin* x, float* xs, int64_t M) {{
  #pragma omp for schedule(static)
  for (int k0 = 0; k0 < K_IN; k0 += 16) {{
    int kn = K_IN - k0 < 16 ? K_IN - k0 : 16;
    for (int64_t m0 = 0; m0 < M;) {{
      int w = tile_width(m0, M);
      float* dst = xs + (int64_t)K_IN * m0;
#if IN_ROW
      for (int mb = 0; mb < w; mb += 16) {{
        int mn = w - mb < 16 ? w - mb : 16;
        for (int k = k0; k < k0 + kn; k++)
          for (int m = 0; m < mn; m++) dst[(int64_t)k * w + mb + m] = in_(x[(m0 + mb + m) * K_IN + k]);
      }}
#else
      for (int k = k0; k < k0 + kn; k++)
        for (int m = 0; m < w; m++) dst[(int64_t)k * w + m] = in_(x[(int64_t)k * M + m0 + m]);
#endif
      m0 += w;
    }}
  }}
}}

/* K-blocked full tiles: the x^T rows of one K block (KB x MT floats, 128 KB) stay in L2 while every
   row of the thread adds its nonzeros of that block to its running sums (yacc, streamed in order);
   cur[] is each row's position in its (column-sorted) nonzeros. Then the epilogue and the stores
   through ROWS, with FROM_YACC as its tile function. */
#ifndef KB
#define KB 512   /* against none on BERT-base shapes at M 128-2048: 1.02-1.15x (benchmarks/bench_csr_kblock.py); 32-64 were slower */
#endif
#define KB_MIN_M (2 * MT)
#define FROM_YACC(n, CNT, rp, col, val, xt, b, res, m0, dst, stride, plim) \
  finish(n, m0, CNT, yacc + (int64_t)((n) - r0) * MT, res, dst, stride)
#define KROWS \
  for (int n = r0; n < r1; n++) {{ cur[n - r0] = rp[n]; float b = BIAS(n); for (int t = 0; t < MT; t++) yacc[(int64_t)(n - r0) * MT + t] = b; }} \
  for (int k0 = 0; k0 < K_IN; k0 += KB) {{ \
    int32_t kend = k0 + KB; \
    for (int n = r0; n < r1; n++) {{ \
      float* ya = yacc + (int64_t)(n - r0) * MT; \
      vf acc[NV]; memcpy(acc, ya, sizeof acc); \
      int32_t p = cur[n - r0], pe = rp[n + 1]; \
      for (; p < pe && col[p] < kend; p++) STEP(NV) \
      cur[n - r0] = p; memcpy(ya, acc, sizeof acc); \
    }} \
  }} \
  ROWS(FROM_YACC, MT)

/* the rows [r0, r1) for the `cnt` tokens of the tile at m0, with one tile function */
#if OUT_ROW
#define ROWS(TILEFN, CNT) \
  for (int n0 = r0; n0 < r1; n0 += RB) {{ \
    int nr = r1 - n0 < RB ? r1 - n0 : RB; \
    for (int j = 0; j < nr; j++) TILEFN(n0 + j, CNT, rp, col, val, xt, BIAS(n0 + j), res, m0, buf + j, RB, plim); \
    for (int t = 0; t < (CNT); t++) memcpy(y + (m0 + t) * N_OUT + n0, buf + t * RB, nr * sizeof(tout)); \
  }}
#else
#define ROWS(TILEFN, CNT) \
  for (int n = r0; n < r1; n++) TILEFN(n, CNT, rp, col, val, xt, BIAS(n), res, m0, y + (int64_t)n * M + m0, 1, plim);
#endif
#define BIAS(n) {bias_n}

/* y = epilogue(W @ x^T): x feature-major [K, M], or token-major [M, K] (IN_ROW); y feature-major
   [N, M], or token-major [M, N] (OUT_ROW); scratch: K * M floats for the packed tiles */
void {name}(const int32_t* rp, const int32_t* col, const tin* val, const tin* x, const tin* bias,
            const tin* res, tout* y, int64_t M, int nthreads, float* scratch) {{
  if (M == 1) {{   /* one token: x is the same vector in both layouts */
    #pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int n0 = 0; n0 < N_OUT; n0 += MT) {{   /* MT rows at a time: the epilogue on whole vectors */
      int nr = N_OUT - n0 < MT ? N_OUT - n0 : MT;
      float s[MT];
      for (int j = 0; j < nr; j++) {{
        int n = n0 + j;
        float a = BIAS(n);
        for (int32_t p = rp[n]; p < rp[n + 1]; p++) a += in_(val[p]) * in_(x[col[p]]);
        s[j] = a;
      }}
      finish1(n0, nr, s, res, y + n0);
    }}
    return;
  }}
  #pragma omp parallel num_threads(nthreads)
  {{
    pack_in(x, scratch, M);   /* ends in the barrier of its omp for */
    int T = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t nnz = rp[N_OUT];
    int32_t plim = (int32_t)(nnz - PD);
    int r0 = t == 0 ? 0 : row_at(rp, nnz * t / T), r1 = t == T - 1 ? N_OUT : row_at(rp, nnz * (t + 1) / T);
    tout buf[MT * RB];
    (void)buf;
    int64_t m0 = 0;
    const float* xt;
#if KB
    if (K_IN > KB && M >= KB_MIN_M) {{   /* wide batches: the K-blocked pass over the full tiles */
      int nr = r1 - r0;
      int32_t* cur = (int32_t*)malloc(sizeof(int32_t) * (nr > 0 ? nr : 1));
      float* yacc = (float*)aligned_alloc(64, sizeof(float) * MT * (nr > 0 ? nr : 1));
      if (cur && yacc)   /* else (no memory) the plain pass below does these tiles */
        for (; m0 + MT <= M; m0 += MT) {{ xt = scratch + K_IN * m0; KROWS }}
      free(cur); free(yacc);
    }}
#endif
    for (; m0 + MT <= M; m0 += MT) {{ xt = scratch + K_IN * m0; ROWS(tileNV, MT) }}
    for (; m0 + 2 * VW <= M; m0 += 2 * VW) {{ xt = scratch + K_IN * m0; ROWS(tile2, 2 * VW) }}
    for (; m0 + VW <= M; m0 += VW) {{ xt = scratch + K_IN * m0; ROWS(tile1, VW) }}
    if (m0 < M) {{ int rest = (int)(M - m0); xt = scratch + K_IN * m0; ROWS(tileS, rest) }}
  }}
}}
"""


def kernel_name(n: int, k: int, dtype: str, out_dtype: str, activation: str, has_bias: bool, has_residual: bool,
                in_row: bool, out_row: bool) -> str:
    return (f"csr_{n}x{k}_{_TYPES[dtype]}_{_OUT_TYPES[out_dtype]}_{activation}"
            f"{'_b' if has_bias else ''}{'_r' if has_residual else ''}"
            f"_{'row' if in_row else 'fm'}{'row' if out_row else 'fm'}")


def source(n: int, k: int, dtype: str, out_dtype: str, activation: str, has_bias: bool, has_residual: bool,
           in_row: bool, out_row: bool, nv: int | None = None, kb: int | None = None) -> tuple[str, str]:
    """(C source, function name) of y = epilogue(W @ x^T) for a [n, k] CSR weight.

    dtype: of x, the values, bias and residual ("float32" / "bfloat16"); out_dtype: of y. in_row: x
    arrives token-major [M, k] (else feature-major x^T [k, M]); out_row: store token-major y [M, n]
    (else feature-major y^T [n, M]). The function's last argument is a float32 [k, M] scratch for the
    packed token tiles (unused for M == 1)."""
    if dtype not in _TYPES or out_dtype not in _OUT_TYPES:
        raise ValueError(f"generated CPU kernels take {sorted(_TYPES)} and store {sorted(_OUT_TYPES)}, "
                         f"got {dtype} -> {out_dtype}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(_ACTIVATIONS)}")
    name = kernel_name(n, k, dtype, out_dtype, activation, has_bias, has_residual, in_row, out_row)
    if nv is not None:
        name += f"_nv{nv}"
    if kb is not None:
        name += f"_kb{kb}"
    residual = "v += in_(res[(m0 + t) * N_OUT + n]);" if has_residual else ""
    residual1 = "v += in_(res[n0 + j]);" if has_residual else ""
    body = _BODY.format(n=n, k=k, in_row=int(in_row), out_row=int(out_row), act=_ACTIVATIONS[activation],
                        residual=residual, residual1=residual1, name=name, bias_n="in_(bias[n])" if has_bias else "0.f")
    text = (f"/* sparsify generated kernel {name} (template {TEMPLATE_VERSION}) */\n"
            + (f"#define NV {nv}\n" if nv is not None else "") + (f"#define KB {kb}\n" if kb is not None else "")
            + _HEADER
            + _ELEMENT[_TYPES[dtype]] + _OUT[_OUT_TYPES[out_dtype]] + body)
    return text, name
