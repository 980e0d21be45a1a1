"""The C driver of an emitted sparse program (cpu_x86_emit.py): packs x into 16-token tiles, runs the
program's segments on the threads and applies the fused epilogue to each finished tile.

A variant is specialised like the CSR template's (cpu_csr_source.py): the layer's N and K, element
types, activation, bias, residual, where x arrives and where y goes. What it does:

- the work items are (segment, group of GT tiles of 16 tokens) pairs, segment-major, statically
  scheduled: with as many segments as threads, each thread runs one segment's code over every
  tile, so the code a core streams is its own part of the layer;
- a work item packs its group of x (token-major [M, K] through the register transpose, or
  feature-major [K, M] a row's run at a time) into fp32 tiles [GT][K][16] in its thread's part of
  the scratch (the last tile zero-padded), where the program reads them from L2;
- after a segment's tile: + bias, activation, then the stores of cpu_stores.py (+ residual, rounded
  once to the output type): feature-major per row, token-major through the VW x VW transpose.

It needs VW == 16 (AVX-512): the emitted code is AVX-512 and its tile is one zmm of tokens.
`source(...)` returns the C text; bump TEMPLATE_VERSION when the generated code changes.
"""
from __future__ import annotations

from .cpu_csr_source import _OUT_TYPES, _TYPES, check_variant, kernel_name as _csr_kernel_name
from .cpu_stores import STORES as _STORES
from .cpu_vector import ACTIVATIONS as _ACTIVATIONS, ELEMENT as _ELEMENT, HEADER as _HEADER, OUT as _OUT

TEMPLATE_VERSION = "cpu-jit-driver-3"

# pack_tiles(x, dst, M, t0, nt): x's tiles into the fp32 layout the emitted code reads; needs K_IN,
# IN_ROW, the element types and transpose() defined before it. Shared with the pair driver.
PACK = r"""/* tiles t0 .. t0 + nt of x -> dst [nt][K][16] fp32 (tokens past M are zeros, so the program reads
   whole vectors) */
static void pack_tiles(const tin* x, float* dst, int64_t M, int64_t t0, int nt) {
#if IN_ROW
  for (int g = 0; g < nt; g++, dst += (int64_t)K_IN * VW) {
    const int64_t m0 = (t0 + g) * VW;
    const int mn = M - m0 < VW ? (int)(M - m0) : VW;
    for (int k0 = 0; k0 < K_IN; k0 += VW) {
      int kn = K_IN - k0 < VW ? K_IN - k0 : VW;
      if (mn == VW && kn == VW) {
        vf r[VW];
        for (int m = 0; m < VW; m++) r[m] = vload_in(x + (m0 + m) * K_IN + k0);
        transpose(r);
        for (int kk = 0; kk < VW; kk++) memcpy(dst + (int64_t)(k0 + kk) * VW, &r[kk], sizeof(vf));
        continue;
      }
      for (int kk = 0; kk < kn; kk++)
        for (int m = 0; m < VW; m++)
          dst[(int64_t)(k0 + kk) * VW + m] = m < mn ? in_(x[(m0 + m) * K_IN + k0 + kk]) : 0.f;
    }
  }
#else
  /* a row of x^T holds the group's tokens side by side: read each row's run once, for all tiles
     (tile by tile, every tile touched K rows ~M * 4 bytes apart again) */
  const int64_t m0 = t0 * VW;
  const int cnt = M - m0 < (int64_t)nt * VW ? (int)(M - m0) : nt * VW;
  for (int k = 0; k < K_IN; k++) {
    const tin* src = x + (int64_t)k * M + m0;
    int g = 0;
    for (; (g + 1) * VW <= cnt; g++) {
      vf v = vload_in(src + g * VW);
      memcpy(dst + ((int64_t)g * K_IN + k) * VW, &v, sizeof v);
    }
    for (; g < nt; g++)
      for (int m = 0; m < VW; m++)
        dst[((int64_t)g * K_IN + k) * VW + m] = g * VW + m < cnt ? in_(src[g * VW + m]) : 0.f;
  }
#endif
}
"""

_BODY = r"""
#if VW != 16
#error "emitted sparse programs are AVX-512: the driver needs 16-lane vectors"
#endif
#define N_OUT {n}
#define K_IN {k}
#define IN_ROW {in_row}
#define OUT_ROW {out_row}
#define HAS_RES {has_res}
#define RB VW
#define BIAS(n) {bias_n}
static inline vf act_(vf v) {{ {act} }}
{stores}
typedef void (*segment_fn)(const float* x_tile, const float* values, float* out, int64_t ntiles);

{pack}
/* Tiles per work item: a feature-major row then receives GT * 16 adjacent tokens (one 16-token
   tile per row was 64 bytes to each of N rows far apart, +17% on 768 -> 3072 at 2048 tokens) */
#define GT {gt}

/* y = epilogue(W @ x^T) by the program: seg[4 s ..] = (code address, values offset, first row, end
   row) of segment s; x and y in the layouts of IN_ROW / OUT_ROW; scratch: per thread GT * 16 * K
   floats for a work item's x tiles then GT * 16 * maxrows for its products (maxrows: the most rows
   of a segment; 64-byte aligned). Each work item packs its own tiles into its thread's part of
   scratch, where the program reads them from L2: a whole-x pack before the products wrote and read
   back x through memory (25 MB at 3072 features x 2048 tokens). With as many segments as threads
   every thread packs every tile, a repeat that costs less than that memory round trip. */
void {name}(const int64_t* seg, int nseg, const float* values, const tin* x, const tin* bias,
            const tin* res, tout* y, int64_t M, int nthreads, float* scratch) {{
  const int64_t T = (M + VW - 1) / VW, G = (T + GT - 1) / GT;
  int maxrows = 1;
  for (int s = 0; s < nseg; s++) if (seg[4 * s + 3] - seg[4 * s + 2] > maxrows) maxrows = (int)(seg[4 * s + 3] - seg[4 * s + 2]);
  const int64_t per_thread = (int64_t)GT * VW * (K_IN + maxrows);
  (void)bias;
  #pragma omp parallel num_threads(nthreads)
  {{
    float* xs = scratch + omp_get_thread_num() * per_thread;
    float* buf = xs + (int64_t)GT * VW * K_IN;
    int64_t packed = -1;   /* the group whose tiles xs holds */
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < (int64_t)nseg * G; i++) {{
      const int64_t* e = seg + 4 * (i / G);
      int64_t g0 = i % G, t0 = g0 * GT, m0 = t0 * VW;
      int r0 = (int)e[2], r1 = (int)e[3], rows = r1 - r0;
      int nt = T - t0 < GT ? (int)(T - t0) : GT, cnt = M - m0 < GT * VW ? (int)(M - m0) : GT * VW;
      if (g0 != packed) {{
        pack_tiles(x, xs, M, t0, nt);
        packed = g0;
      }}
      ((segment_fn)(intptr_t)e[0])(xs, values + e[1], buf, nt);
      /* buf: [tile][row][16] */
      for (int g = 0; g < nt; g++)
        for (int j = 0; j < rows; j++) {{
          float* a = buf + ((int64_t)g * rows + j) * VW;
          vf v = act_(vload(a) + BIAS(r0 + j));
          memcpy(a, &v, sizeof v);
        }}
#if OUT_ROW
      for (int g = 0; g < nt; g++) {{
        int c = cnt - g * VW < VW ? cnt - g * VW : VW;
        for (int n0 = r0; n0 < r1; n0 += RB)
          store_tm(n0, r1 - n0 < RB ? r1 - n0 : RB, m0 + g * VW, c, buf + ((int64_t)g * rows + n0 - r0) * VW, res, y);
      }}
#else
      for (int j = 0; j < rows; j++) {{
        float a[GT * VW];
        for (int g = 0; g < nt; g++) memcpy(a + g * VW, buf + ((int64_t)g * rows + j) * VW, sizeof(vf));
        store_fm(r0 + j, m0, cnt, a, res, y + (int64_t)(r0 + j) * M + m0);
      }}
#endif
    }}
  }}
}}
"""


GROUP_TILES = 4   # GT: tiles per work item


def scratch_floats(k: int, max_rows: int, nthreads: int) -> int:
    """The scratch a driver of a K-input layer needs, whose longest segment has max_rows rows."""
    return nthreads * GROUP_TILES * 16 * (k + max_rows)


def kernel_name(*variant) -> str:
    return "jit" + _csr_kernel_name(*variant)[3:]


def source(n: int, k: int, dtype: str, out_dtype: str, activation: str, has_bias: bool, has_residual: bool,
           in_row: bool, out_row: bool) -> tuple[str, str]:
    """(C source, function name) of the driver of a [n, k] layer's program; arguments as
    cpu_csr_source.source's."""
    check_variant(dtype, out_dtype, activation)
    name = kernel_name(n, k, dtype, out_dtype, activation, has_bias, has_residual, in_row, out_row)
    body = _BODY.format(n=n, k=k, in_row=int(in_row), out_row=int(out_row), act=_ACTIVATIONS[activation],
                        has_res=int(has_residual), stores=_STORES, pack=PACK, name=name, gt=GROUP_TILES,
                        bias_n="in_(bias[n])" if has_bias else "0.f")
    text = (f"/* sparsify emitted-program driver {name} (template {TEMPLATE_VERSION}) */\n#define NV 1\n"
            + _HEADER + _ELEMENT[_TYPES[dtype]] + _OUT[_OUT_TYPES[out_dtype]] + body)
    return text, name
