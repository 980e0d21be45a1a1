"""The C driver of two emitted sparse programs run back to back on each 16-token tile: y =
epi_b(W_b @ act_a(W_a @ x^T + b_a)), the hidden activation never leaving the core's L2.

Two consecutive sparse layers (a BERT FFN: 768 -> 3072, GELU, 3072 -> 768 + residual) run as two
ops write the hidden activation to memory and read it back: at 2048 tokens 25 MB each way, and a
token-major store (a transpose) and a pack (another) around it. Here a thread takes one tile of x
at a time, packs it, runs every segment of the first program into a [N_MID][16] buffer (which is
exactly the x tile the second program reads), applies the first epilogue there, runs the second
program into a [N_OUT][16] buffer and stores that token-major with the second epilogue. The
threads split the tiles, not the rows: each runs both programs whole (the code streams from L3
either way at this size: one segment of a BERT-base FFN layer is ~1.3 MB of code and values).

At few tiles (ROW_SPLIT_BELOW per thread or fewer) the threads split the rows instead (see
rows_split below). The pass that makes this op times it against the two ops and keeps the faster. x is token-major ("row"), y token-major; the hidden activation is
fp32 (two separate ops round it to x's dtype in between, so the pair is fused only for fp32 x).
`source(...)` returns the C text; bump TEMPLATE_VERSION when the generated code changes.
"""
from __future__ import annotations

from .cpu_csr_source import _OUT_TYPES, _TYPES, check_variant, kernel_name as _csr_kernel_name
from .cpu_jit_source import PACK as _PACK
from .cpu_stores import STORES as _STORES
from .cpu_vector import ACTIVATIONS as _ACTIVATIONS, ELEMENT as _ELEMENT, HEADER as _HEADER, OUT as _OUT

TEMPLATE_VERSION = "cpu-jit-pair-2"

_BODY = r"""
#if VW != 16
#error "emitted sparse programs are AVX-512: the driver needs 16-lane vectors"
#endif
#define K_IN {k}
#define N_MID {n_mid}
#define N_OUT {n}
#define IN_ROW 1
#define HAS_RES {has_res}
#define RB VW
#define ROW_SPLIT_BELOW {row_split}
#define BIAS_A(n) {bias_a}
#define BIAS_B(n) {bias_b}
static inline vf act_mid(vf v) {{ {act_a} }}
static inline vf act_(vf v) {{ {act_b} }}
{stores}
typedef void (*segment_fn)(const float* x_tile, const float* values, float* out, int64_t ntiles);
{pack}

/* one program's segments over one packed tile: each writes its rows' [rows][16] products in place */
static inline void run_program(const int64_t* seg, int nseg, const float* values, const float* xt, float* out) {{
  for (int s = 0; s < nseg; s++) {{
    const int64_t* e = seg + 4 * s;
    ((segment_fn)(intptr_t)e[0])(xt, values + e[1], out + e[2] * VW, 1);
  }}
}}

/* Few tiles (ROW_SPLIT_BELOW * threads or fewer): the threads split the rows instead, like two ops
   do, with the hidden activation handed over in tiles: pack every tile; each thread runs its
   segments of the first program over every tile (+ bias, activation of its rows); a barrier; the
   same with the second program (+ epilogue, token-major store of its rows). Each core then streams
   its part of the code, not all of it: with the weights coming from memory (six BERT-base FFNs
   cycled, more than the L3 holds), at 128 tokens tile-split was 7% slower than two ops, this 9%
   faster; at 256 tokens this ~5% faster, tile-split even; at 512 tile-split wins. */
static void rows_split(const int64_t* seg_a, int nseg_a, const float* values_a, const int64_t* seg_b, int nseg_b,
                       const float* values_b, const tin* x, const tin* bias_a, const tin* bias_b, const tin* res,
                       tout* y, int64_t M, int64_t T, int nthreads, float* scratch) {{
  float* xs = scratch;                              /* [T][K_IN][16] */
  float* hs = xs + T * VW * K_IN;                   /* [T][N_MID][16] */
  float* os = hs + T * VW * N_MID;                  /* [T][N_OUT][16] */
  (void)bias_a; (void)bias_b;
  #pragma omp parallel num_threads(nthreads)
  {{
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) pack_tiles(x, xs + t * VW * K_IN, M, t, 1);
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < (int64_t)nseg_a * T; i++) {{
      const int64_t* e = seg_a + 4 * (i / T);
      const int64_t t = i % T;
      float* h = hs + t * VW * N_MID;
      ((segment_fn)(intptr_t)e[0])(xs + t * VW * K_IN, values_a + e[1], h + e[2] * VW, 1);
      for (int64_t n = e[2]; n < e[3]; n++) {{
        vf v = act_mid(vload(h + n * VW) + BIAS_A(n));
        memcpy(h + n * VW, &v, sizeof v);
      }}
    }}
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < (int64_t)nseg_b * T; i++) {{
      const int64_t* e = seg_b + 4 * (i / T);
      const int64_t t = i % T, m0 = t * VW;
      const int cnt = M - m0 < VW ? (int)(M - m0) : VW;
      float* o = os + t * VW * N_OUT;
      ((segment_fn)(intptr_t)e[0])(hs + t * VW * N_MID, values_b + e[1], o + e[2] * VW, 1);
      for (int64_t n = e[2]; n < e[3]; n++) {{
        vf v = act_(vload(o + n * VW) + BIAS_B(n));
        memcpy(o + n * VW, &v, sizeof v);
      }}
      for (int64_t n0 = e[2]; n0 < e[3]; n0 += RB)
        store_tm((int)n0, e[3] - n0 < RB ? (int)(e[3] - n0) : RB, m0, cnt, o + n0 * VW, res, y);
    }}
  }}
}}

/* seg_a / seg_b: the programs' segment tables (code address, values offset, first row, end row);
   scratch: scratch_floats() of the Python side (per thread 16 * (K_IN + N_MID + N_OUT) floats, or
   that per tile when the rows are split), 64-byte aligned */
void {name}(const int64_t* seg_a, int nseg_a, const float* values_a, const int64_t* seg_b, int nseg_b,
            const float* values_b, const tin* x, const tin* bias_a, const tin* bias_b, const tin* res, tout* y,
            int64_t M, int nthreads, float* scratch) {{
  const int64_t T = (M + VW - 1) / VW, per_thread = (int64_t)VW * (K_IN + N_MID + N_OUT);
  if (T <= (int64_t)ROW_SPLIT_BELOW * nthreads) {{
    rows_split(seg_a, nseg_a, values_a, seg_b, nseg_b, values_b, x, bias_a, bias_b, res, y, M, T, nthreads, scratch);
    return;
  }}
  (void)bias_a; (void)bias_b;
  #pragma omp parallel num_threads(nthreads)
  {{
    float* xs = scratch + omp_get_thread_num() * per_thread;
    float* hs = xs + (int64_t)VW * K_IN;
    float* os = hs + (int64_t)VW * N_MID;
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {{
      const int64_t m0 = t * VW;
      const int cnt = M - m0 < VW ? (int)(M - m0) : VW;
      pack_tiles(x, xs, M, t, 1);
      run_program(seg_a, nseg_a, values_a, xs, hs);
      for (int n = 0; n < N_MID; n++) {{
        vf v = act_mid(vload(hs + (int64_t)n * VW) + BIAS_A(n));
        memcpy(hs + (int64_t)n * VW, &v, sizeof v);
      }}
      run_program(seg_b, nseg_b, values_b, hs, os);
      for (int n = 0; n < N_OUT; n++) {{
        vf v = act_(vload(os + (int64_t)n * VW) + BIAS_B(n));
        memcpy(os + (int64_t)n * VW, &v, sizeof v);
      }}
      for (int n0 = 0; n0 < N_OUT; n0 += RB)
        store_tm(n0, N_OUT - n0 < RB ? N_OUT - n0 : RB, m0, cnt, os + (int64_t)n0 * VW, res, y);
    }}
  }}
}}
"""


ROW_SPLIT_BELOW = 8   # tiles per thread at or below which the threads split rows, not tiles (M <= 256 at 2 threads)


def scratch_floats(k: int, n_mid: int, n: int, nthreads: int, m: int) -> int:
    tiles = -(-m // 16)
    return 16 * (k + n_mid + n) * (tiles if tiles <= ROW_SPLIT_BELOW * nthreads else nthreads)


def kernel_name(k: int, n_mid: int, n: int, dtype: str, out_dtype: str, act_a: str, act_b: str, bias_a: bool,
                bias_b: bool, has_residual: bool) -> str:
    return (f"jitpair{n_mid}" + _csr_kernel_name(n, k, dtype, out_dtype, act_b, bias_b, has_residual, True, True)[3:]
            + f"_{act_a}{int(bias_a)}")


def source(k: int, n_mid: int, n: int, dtype: str, out_dtype: str, act_a: str, act_b: str, bias_a: bool,
           bias_b: bool, has_residual: bool) -> tuple[str, str]:
    """(C source, function name) of the driver of a [n_mid, k] layer followed by an [n, n_mid] one;
    element types as cpu_csr_source.source's, the hidden activation fp32."""
    check_variant(dtype, out_dtype, act_a)
    check_variant(dtype, out_dtype, act_b)
    name = kernel_name(k, n_mid, n, dtype, out_dtype, act_a, act_b, bias_a, bias_b, has_residual)
    body = _BODY.format(k=k, n_mid=n_mid, n=n, has_res=int(has_residual), act_a=_ACTIVATIONS[act_a],
                        act_b=_ACTIVATIONS[act_b], stores=_STORES, pack=_PACK, name=name, row_split=ROW_SPLIT_BELOW,
                        bias_a="in_(bias_a[n])" if bias_a else "0.f", bias_b="in_(bias_b[n])" if bias_b else "0.f")
    text = (f"/* sparsify emitted-program pair driver {name} (template {TEMPLATE_VERSION}) */\n#define NV 1\n"
            + _HEADER + _ELEMENT[_TYPES[dtype]] + _OUT[_OUT_TYPES[out_dtype]] + body)
    return text, name
