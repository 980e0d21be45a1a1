"""The generated CPU kernel of scaled dot-product attention: out = softmax(q k^T * scale + mask) v per
(batch, head), fp32, specialised to the head size D (a multiple of 32), the mask's presence and
causality.

Why our own: torch's CPU flash attention ran BERT-base's attention (16 x 12 heads, 128 tokens,
D = 64) at ~47 GFLOP/s on this 2-core Zen 4, a quarter of the model's time once its linear layers
were sparse. Here a thread takes one (batch, head) at a time: k transposed once into its scratch
([D][L], L padded to 32 keys with zeros), then 8 query rows at a time: their scores S[8][L] by the
8 x 32 register-tile product (16 accumulators, 2 loads of k^T and 8 broadcasts of q per 16 FMAs),
scale, + mask, -inf past L (and above the diagonal when causal), softmax by rows (the max, vexp,
the sum), then P v by the same 8 x 32 product over D in halves of 32, divided by the row sums at
the store. q, k, v, mask and out are read and written through their strides (the last dimension
contiguous): the heads of a packed q|k|v projection are views, not copies.

The mask is additive fp32 or bool (True: attend), broadcast over any of its leading dims (stride 0);
a row that attends to no key is zeros, as torch's. `source(...)` returns
the C text; bump TEMPLATE_VERSION when the generated code changes.
"""
from __future__ import annotations

from .cpu_stores import _transpose_source
from .cpu_vector import HEADER as _HEADER

TEMPLATE_VERSION = "cpu-attention-1"
QUERY_ROWS, KEY_BLOCK = 8, 32

_BODY = r"""
#if VW != 16
#error "the attention kernel is written for 16-lane vectors (AVX-512)"
#endif
#define D {d}
#define HAS_MASK {has_mask}
#define CAUSAL {causal}
#define MASK_BYTES {mask_bytes}   /* fp32 additive mask (HAS_MASK 1) or bool (2); its strides count elements */
#include <float.h>
#define QR {qr}
#define KB {kb}

static inline vf vld(const float* p) {{ vf v; memcpy(&v, p, sizeof v); return v; }}
static inline void vst(float* p, vf v) {{ memcpy(p, &v, sizeof v); }}
{transpose}
/* acc[r][0..1] += sum_k A[r][k] * B[k][0 .. 32), r < 8 (A rows lda apart, B rows ldb apart) */
static inline void mk8x32(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t K, vf acc[QR][2]) {{
  for (int64_t k = 0; k < K; k++) {{
    vf b0 = vld(B + k * ldb), b1 = vld(B + k * ldb + VW);
    for (int r = 0; r < QR; r++) {{
      vf a = vsplat(A[r * lda + k]);
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }}
  }}
}}

/* strides in floats: [batch, head, row] of q, k, v, mask, out (the last dimension contiguous) */
void {name}(const float* q, const float* k, const float* v, const void* mask, float* out,
            int64_t B, int64_t H, int64_t S, int64_t L, const int64_t* st, float scale, int nthreads,
            float* scratch) {{
  const int64_t L32 = (L + KB - 1) / KB * KB;
  const int64_t per_thread = (int64_t)D * L32 + (int64_t)QR * L32 + (int64_t)QR * D;
  #pragma omp parallel num_threads(nthreads)
  {{
    float* kt = scratch + omp_get_thread_num() * per_thread;   /* [D][L32] */
    float* p = kt + (int64_t)D * L32;                           /* [QR][L32] scores, then probabilities */
    float* qb = p + (int64_t)QR * L32;                          /* [QR][D] a zero-padded tail of q rows */
    #pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {{
      const int64_t b = bh / H, h = bh % H;
      const float* qh = q + b * st[0] + h * st[1];
      const float* kh = k + b * st[3] + h * st[4];
      const float* vh = v + b * st[6] + h * st[7];
      const char* mh = HAS_MASK ? (const char*)mask + (b * st[9] + h * st[10]) * MASK_BYTES : 0;
      float* oh = out + b * st[12] + h * st[13];
      for (int64_t j0 = 0; j0 < L32; j0 += VW)     /* k^T by 16 x 16 register transposes */
        for (int d0 = 0; d0 < D; d0 += VW) {{
          vf r[VW];
          for (int jj = 0; jj < VW; jj++) r[jj] = j0 + jj < L ? vld(kh + (j0 + jj) * st[5] + d0) : vsplat(0.f);
          transpose(r);
          for (int dd = 0; dd < VW; dd++) vst(kt + (int64_t)(d0 + dd) * L32 + j0, r[dd]);
        }}
      for (int64_t i0 = 0; i0 < S; i0 += QR) {{
        const int rows = S - i0 < QR ? (int)(S - i0) : QR;
        const float* qa = qh + i0 * st[2];
        int64_t lda = st[2];
        if (rows < QR) {{
          memset(qb, 0, sizeof(float) * QR * D);
          for (int r = 0; r < rows; r++) memcpy(qb + r * D, qa + r * st[2], sizeof(float) * D);
          qa = qb; lda = D;
        }}
        for (int64_t j0 = 0; j0 < L32; j0 += KB) {{
          vf acc[QR][2] = {{{{0}}}};
          mk8x32(qa, lda, kt + j0, L32, D, acc);
          for (int r = 0; r < QR; r++) {{ vst(p + r * L32 + j0, acc[r][0] * scale); vst(p + r * L32 + j0 + VW, acc[r][1] * scale); }}
        }}
        float inv[QR];
        for (int r = 0; r < QR; r++) {{
          float* pr = p + r * L32;
          const int64_t i = i0 + r;
          inv[r] = 0.f;
          if (r >= rows) continue;            /* a padded row: its products are not stored */
          int64_t end = L, kept = 0;
#if CAUSAL
          end = i + 1 < L ? i + 1 : L;        /* top-left aligned, as torch's is_causal */
#endif
          /* a key the mask excludes (-inf, or false) scores -FLT_MAX: exp gives ~1e-38, and a row
             that keeps no key is zeros, as torch's is (-ffast-math: no infinity reaches the math) */
#if HAS_MASK == 1
          const float* mr = (const float*)(mh + i * st[11] * MASK_BYTES);
          for (int64_t j = 0; j < end; j++) {{
            uint32_t bits; memcpy(&bits, mr + j, 4);
            int excluded = bits == 0xff800000u;
            pr[j] = excluded ? -FLT_MAX : pr[j] + mr[j];
            kept += !excluded;
          }}
#elif HAS_MASK == 2
          const uint8_t* mb = (const uint8_t*)(mh + i * st[11] * MASK_BYTES);
          for (int64_t j = 0; j < end; j++) {{ pr[j] = mb[j] ? pr[j] : -FLT_MAX; kept += mb[j] != 0; }}
#else
          kept = end;
#endif
          if (kept == 0) {{
            memset(pr, 0, sizeof(float) * L);
            continue;                          /* inv[r] = 0: the row stores zeros */
          }}
          float mx = -FLT_MAX;
          for (int64_t j = 0; j < end; j++) mx = pr[j] > mx ? pr[j] : mx;
          vf vmx = vsplat(mx), vsum = vsplat(0.f);
          int64_t j = 0;
          for (; j + VW <= end; j += VW) {{ vf e = vexp(vld(pr + j) - vmx); vst(pr + j, e); vsum += e; }}
          float sum = 0.f;
          for (int l = 0; l < VW; l++) sum += vsum[l];
          for (; j < end; j++) {{ float e = expf(pr[j] - mx); pr[j] = e; sum += e; }}
          for (j = end; j < L; j++) pr[j] = 0.f;
          inv[r] = 1.f / sum;
        }}
        for (int dh = 0; dh < D; dh += KB) {{
          vf acc[QR][2] = {{{{0}}}};
          mk8x32(p, L32, vh + dh, st[8], L, acc);
          for (int r = 0; r < rows; r++) {{
            float* o = oh + (i0 + r) * st[14] + dh;
            vst(o, acc[r][0] * inv[r]);
            vst(o + VW, acc[r][1] * inv[r]);
          }}
        }}
      }}
    }}
  }}
}}
"""


MASKS = {None: 0, "float32": 1, "bool": 2}


def source(d: int, mask: str | None, causal: bool) -> tuple[str, str]:
    """(C source, function name) for head size d; mask: None, "float32" (additive) or "bool" (keep)."""
    if d % KEY_BLOCK:
        raise ValueError(f"the CPU attention kernel needs a head size that is a multiple of {KEY_BLOCK}, got {d}")
    if mask not in MASKS:
        raise ValueError(f"attention mask must be one of {sorted(map(str, MASKS))}, got {mask!r}")
    name = f"attention_d{d}_m{MASKS[mask]}_c{int(causal)}"
    body = _BODY.format(d=d, qr=QUERY_ROWS, kb=KEY_BLOCK, has_mask=MASKS[mask], causal=int(causal), name=name, mask_bytes=4 if mask == "float32" else 1,
                        transpose=_transpose_source())
    return (f"/* sparsify generated attention kernel {name} (template {TEMPLATE_VERSION}) */\n#define NV 1\n"
            + _HEADER + body), name
