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
- a row does a group of full tiles (as many as fit 512 KB of packed x, at most 4) before the next
  row, so its nonzeros come from memory once per group, not once per tile;
- wide inputs and batches (by default K >= 2048 and 512 tokens or more, where it was measured to
  pay): the full tiles go K block by K block (KB = 512), each row's running sums kept in a
  per-thread buffer, so the x^T rows a block reads stay in cache;
- the tail of the tokens in tiles of 2 and 1 vectors, then scalar; one token (M == 1) is a sparse
  dot product per row;
- the epilogue on the finished tile: + bias (the accumulator's start), activation, + residual
  (token-major [M, N]), rounded once to the output type at the store; a token-major store gathers
  RB = VW rows' activated tiles in a small buffer and transposes them VW x VW in registers, so each
  token receives RB adjacent values and its residual is read as one vector (strided scalar stores
  and residual reads were a third of a 90% layer's time at 768 -> 3072 and 2048 tokens).

`source(...)` returns the C text; codegen/cpu_build.py builds and caches it. Bump TEMPLATE_VERSION
when the generated code changes: it is part of every generated kernel's cost-cache key.
"""
from __future__ import annotations

from .cpu_stores import STORES as _STORES
from .cpu_vector import ACTIVATIONS as _ACTIVATIONS, ELEMENT as _ELEMENT, HEADER as _HEADER, OUT as _OUT

TEMPLATE_VERSION = "cpu-csr-11"

_TYPES = {"float32": "f32", "bfloat16": "bf16"}                 # inputs (x, values, bias, residual)
_OUT_TYPES = {**_TYPES, "float16": "f16"}                        # outputs: also a cast to fp16

_BODY = r"""
#define N_OUT {n}
#define K_IN {k}
#define IN_ROW {in_row}
#define OUT_ROW {out_row}
#define PD 4           /* x prefetch distance in nonzeros: 2-4 measured best, 8 worse */
#define WPD 128        /* weight prefetch distance in nonzeros, one request per 16 (a cache line of col) */
#define HAS_RES {has_res}
#define RB VW          /* token-major stores: rows per block, a VW x VW block transposed in registers */
static inline vf act_(vf v) {{ {act} }}
{stores}/* one token's values of the rows n0 .. n0 + cnt (cnt <= MT), in s[]: the epilogue, stored to dst */
static inline void finish1(int n0, int cnt, float* s, const tin* res, tout* dst) {{
  (void)res; (void)n0;
  acts(s, s, cnt);
  for (int j = 0; j < cnt; j++) {{
    float v = s[j];
#if HAS_RES
    v += in_(res[n0 + j]);
#endif
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
                           const float* xt, float b, float* out, int32_t plim) {{ \
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
  for (int i = 0; i < W; i++) {{ vf v = act_(acc[i]); memcpy(out + VW * i, &v, sizeof v); }} \
}}
TILE(NV)
TILE(2)
TILE(1)

static inline void tileS(int n, int cnt, const int32_t* rp, const int32_t* col, const tin* val,
                         const float* xt, float b, float* out, int32_t plim) {{
  float acc[VW];
  (void)plim;
  for (int t = 0; t < VW; t++) acc[t] = b;
  for (int32_t p = rp[n]; p < rp[n + 1]; p++) {{
    float w = in_(val[p]);
    const float* xr = xt + (int64_t)col[p] * cnt;
    for (int t = 0; t < cnt; t++) acc[t] += w * xr[t];
  }}
  acts(acc, out, VW);
}}

static int row_at(const int32_t* rp, int64_t target) {{   /* first row whose start is >= target */
  int lo = 0, hi = N_OUT;
  while (lo < hi) {{ int mid = (lo + hi) / 2; if (rp[mid] < target) lo = mid + 1; else hi = mid; }}
  return lo;
}}

/* x (feature-major [K, M], or token-major [M, K] with IN_ROW) -> the packed tiles in xs, inside the
   parallel region; threads split K. Token-major input moves in VW x VW blocks (a register
   transpose where the block is whole), so both sides of a block stay in cache (torch's
   x.t().contiguous() runs at ~2.5 GB/s here, which would cost more than the sparse product of a
   90% layer). */
static void pack_in(const tin* x, float* xs, int64_t M) {{
  #pragma omp for schedule(static)
  for (int k0 = 0; k0 < K_IN; k0 += VW) {{
    int kn = K_IN - k0 < VW ? K_IN - k0 : VW;
    for (int64_t m0 = 0; m0 < M;) {{
      int w = tile_width(m0, M);
      float* dst = xs + (int64_t)K_IN * m0;
#if IN_ROW
      for (int mb = 0; mb < w; mb += VW) {{
        int mn = w - mb < VW ? w - mb : VW;
        if (mn == VW && kn == VW) {{   /* a whole VW x VW block: one register transpose */
          vf r[VW];
          for (int m = 0; m < VW; m++) r[m] = vload_in(x + (m0 + mb + m) * K_IN + k0);
          transpose(r);
          for (int k = 0; k < VW; k++) memcpy(dst + (int64_t)(k0 + k) * w + mb, &r[k], sizeof(vf));
          continue;
        }}
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
   through ROWS, with FROM_YACC (the finished sums) as its tile function. */
/* Where it pays, measured with the weights cold as a model's layers find them (benchmarks/
   bench_csr_kblock.py, results/cpu-x86_64-2t-csr-kblock.md), KB 512 against none on BERT-base
   shapes: 0.80-0.86x at 128 tokens; at 512 and 2048 tokens 0.96-0.99x with K = 768, 1.05-1.13x
   with K = 3072. So by default only K >= 2048 at 512 tokens or more; `source(kb=...)` builds a
   block size for every K > KB and two full tiles or more (what the benchmark compares). */
#ifndef KB
#define KB 512
#define KB_MIN_K 2048
#define KB_MIN_M (8 * MT)
#endif
#ifndef KB_MIN_K
#define KB_MIN_K (KB + 1)
#define KB_MIN_M (2 * MT)
#endif
#define FROM_YACC(n, CNT, rp, col, val, xt, b, out, plim) acts(yacc + (int64_t)((n) - r0) * MT, out, CNT)
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
  ROWS(FROM_YACC, MT, 1)

/* the rows [r0, r1) for the G tiles of `cnt` tokens from m0, with one tile function (the activated
   sums into fb), then the stores. A row (or block of rows) does its G tiles one after another, so
   its nonzeros come from memory once for G tiles, from L1 for the others: a layer's weights do
   not stay in the outer caches between calls (BERT-base at 90% streams 68 MB), and at 128 tokens
   two tiles each streaming them cost twice the traffic. */
#if OUT_ROW
#define ROWS(TILEFN, CNT, G) \
  for (int n0 = r0; n0 < r1; n0 += RB) {{ \
    int nr = r1 - n0 < RB ? r1 - n0 : RB; \
    for (int gi = 0; gi < (G); gi++) {{ \
      int64_t mg = m0 + (int64_t)gi * (CNT); \
      const float* xt = scratch + K_IN * mg; \
      for (int j = 0; j < nr; j++) TILEFN(n0 + j, CNT, rp, col, val, xt, BIAS(n0 + j), fb + j * MT, plim); \
      store_tm(n0, nr, mg, CNT, fb, res, y); \
    }} \
  }}
#else
#define ROWS(TILEFN, CNT, G) \
  for (int n = r0; n < r1; n++) \
    for (int gi = 0; gi < (G); gi++) {{ \
      int64_t mg = m0 + (int64_t)gi * (CNT); \
      const float* xt = scratch + K_IN * mg; \
      TILEFN(n, CNT, rp, col, val, xt, BIAS(n), fb, plim); \
      store_fm(n, mg, CNT, fb, res, y + (int64_t)n * M + mg); \
    }}
#endif
/* full tiles per group: as many as fit XS_BUDGET of packed x (it stays in L2 while the rows pass) */
#ifndef XS_BUDGET
#define XS_BUDGET (512 * 1024)
#endif
#define TG_FIT (XS_BUDGET / (K_IN * MT * 4))
#define TG (TG_FIT < 1 ? 1 : TG_FIT > 4 ? 4 : TG_FIT)
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
    float fb[RB * MT] __attribute__((aligned(64)));
    int64_t m0 = 0;
#if KB
    if (K_IN >= KB_MIN_K && K_IN > KB && M >= KB_MIN_M) {{   /* wide batches: the K-blocked pass */
      int nr = r1 - r0;
      int32_t* cur = (int32_t*)malloc(sizeof(int32_t) * (nr > 0 ? nr : 1));
      float* yacc = (float*)aligned_alloc(64, sizeof(float) * MT * (nr > 0 ? nr : 1));
      if (cur && yacc)   /* else (no memory) the plain pass below does these tiles */
        for (; m0 + MT <= M; m0 += MT) {{ const float* xt = scratch + K_IN * m0; KROWS }}
      free(cur); free(yacc);
    }}
#endif
    while (m0 + MT <= M) {{ int g = (M - m0) / MT < TG ? (int)((M - m0) / MT) : TG; ROWS(tileNV, MT, g) m0 += (int64_t)g * MT; }}
    for (; m0 + 2 * VW <= M; m0 += 2 * VW) {{ ROWS(tile2, 2 * VW, 1) }}
    for (; m0 + VW <= M; m0 += VW) {{ ROWS(tile1, VW, 1) }}
    if (m0 < M) {{ int rest = (int)(M - m0); ROWS(tileS, rest, 1) }}
  }}
}}
"""


def check_variant(dtype: str, out_dtype: str, activation: str) -> None:
    """The element types and activation a generated linear kernel (this template's or the emitted
    program's driver) can be built for."""
    if dtype not in _TYPES or out_dtype not in _OUT_TYPES:
        raise ValueError(f"generated CPU kernels take {sorted(_TYPES)} and store {sorted(_OUT_TYPES)}, "
                         f"got {dtype} -> {out_dtype}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(_ACTIVATIONS)}")


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
    check_variant(dtype, out_dtype, activation)
    name = kernel_name(n, k, dtype, out_dtype, activation, has_bias, has_residual, in_row, out_row)
    if nv is not None:
        name += f"_nv{nv}"
    if kb is not None:
        name += f"_kb{kb}"
    body = _BODY.format(n=n, k=k, in_row=int(in_row), out_row=int(out_row), act=_ACTIVATIONS[activation],
                        has_res=int(has_residual), stores=_STORES, name=name,
                        bias_n="in_(bias[n])" if has_bias else "0.f")
    text = (f"/* sparsify generated kernel {name} (template {TEMPLATE_VERSION}) */\n"
            + (f"#define NV {nv}\n" if nv is not None else "") + (f"#define KB {kb}\n" if kb is not None else "")
            + _HEADER
            + _ELEMENT[_TYPES[dtype]] + _OUT[_OUT_TYPES[out_dtype]] + body)
    return text, name
