"""What the generated CPU kernels share after the products: vector loads and stores in the element
types, the activation of a run of sums, and the feature-major and token-major stores with the
residual (token-major stores transpose VW x VW blocks in registers).

Plain C (no format fields) that a template inserts after it has defined N_OUT, MT, RB, HAS_RES,
act_() and the element types (cpu_vector.py); used by cpu_csr_source.py and cpu_jit_source.py.
"""
from __future__ import annotations


def _transpose_source() -> str:
    """C of transpose(r): r[0 .. VW) transposed in place (r[i][j] <-> r[j][i]), for each vector width:
    at distance d = VW/2, ..., 1 the off-diagonal d x d blocks of every 2d x 2d block change places,
    two rows at a time with two-source shuffles."""
    out = ["/* r[0 .. VW) transposed in place: at each distance d the off-diagonal d x d blocks of every",
           "   2d x 2d block change places (two-source shuffles, two rows at a time) */",
           "static inline void transpose(vf* r) {"]
    for i, vw in enumerate((16, 8, 4)):
        out.append(f"#{'if' if i == 0 else 'elif'} VW == {vw}")
        d = vw // 2
        while d >= 1:
            lo = [vw + p - d if p & d else p for p in range(vw)]
            hi = [vw + p if p & d else p + d for p in range(vw)]
            out.append(f"  {{ const vi lo = {{{', '.join(map(str, lo))}}}, hi = {{{', '.join(map(str, hi))}}};")
            out.append(f"    for (int i = 0; i < VW; i++) if (!(i & {d})) {{ vf a = r[i], b = r[i + {d}]; "
                       f"r[i] = __builtin_shuffle(a, b, lo); r[i + {d}] = __builtin_shuffle(a, b, hi); }} }}")
            d //= 2
    out += ["#endif", "}"]
    return "\n".join(out) + "\n"


STORES = (r"""static inline vf vload(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vf vload_in(const tin* p) { float f[VW]; for (int l = 0; l < VW; l++) f[l] = in_(p[l]); return vload(f); }
static inline void vstore_out(tout* p, vf v) { float f[VW]; memcpy(f, &v, sizeof f); for (int l = 0; l < VW; l++) p[l] = out_(f[l]); }
/* the activation of `cnt` sums (a whole number of vectors' room) from a to out */
static inline void acts(const float* a, float* out, int cnt) {
  for (int i = 0; i < cnt; i += VW) { vf v = act_(vload(a + i)); memcpy(out + i, &v, sizeof v); }
}
""" + _transpose_source() + "\n" + r"""/* feature-major store: row n's cnt activated sums from token m0 (a), + the residual (token-major:
   read across its rows), to dst */
static inline void store_fm(int n, int64_t m0, int cnt, const float* a, const tin* res, tout* dst) {
  (void)n; (void)m0; (void)res;
  #pragma omp simd
  for (int t = 0; t < cnt; t++) {
    float v = a[t];
#if HAS_RES
    v += in_(res[(m0 + t) * N_OUT + n]);
#endif
    dst[t] = out_(v);
  }
}
/* token-major store of the rows n0 .. n0 + nr, their cnt activated sums from token m0 in fb (row j
   at fb + j * MT): each token's nr values + its residual, adjacent in y. Whole VW x VW blocks go
   through a register transpose (strided scalar stores were a third of a 90% layer's time at
   768 -> 3072); the rest value by value. */
static inline void store_tm(int n0, int nr, int64_t m0, int cnt, const float* fb, const tin* res, tout* y) {
  int t0 = 0;
  (void)res;
  if (nr == RB)
    for (; t0 + VW <= cnt; t0 += VW) {
      vf r[VW];
      for (int j = 0; j < VW; j++) r[j] = vload(fb + j * MT + t0);
      transpose(r);
      for (int t = 0; t < VW; t++) {
        int64_t o = (m0 + t0 + t) * N_OUT + n0;
        vf v = r[t];
#if HAS_RES
        v += vload_in(res + o);
#endif
        vstore_out(y + o, v);
      }
    }
  for (; t0 < cnt; t0++)
    for (int j = 0; j < nr; j++) {
      int64_t o = (m0 + t0) * N_OUT + n0 + j;
      float v = fb[j * MT + t0];
#if HAS_RES
      v += in_(res[o]);
#endif
      y[o] = out_(v);
    }
}

""")
