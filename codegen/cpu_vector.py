"""What every generated CPU kernel's C source starts with: GCC vector types (VW lanes: 16 with
AVX-512, 8 with AVX2), inlined vector exp / erf / tanh for epilogues, and the element types (fp32,
bf16 read as fp32; fp32, bf16 or fp16 stored, rounded once at the store).

Shared by the kernel generators (cpu_csr_source.py, cpu_ffn_source.py); a change here changes every
generated kernel's source and so its build-cache key."""
from __future__ import annotations

ACTIVATIONS = {   # on a vector v of VW values
    "none": "return v;",
    "relu": "return vmax(v, vsplat(0.f));",
    "gelu": "return 0.5f * v * (1.f + verf(v * 0.70710678118654752f));",
    "gelu_tanh": "return 0.5f * v * (1.f + vtanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));",
    "silu": "return v / (1.f + vexp(-v));",
}

HEADER = r"""
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#include <omp.h>

#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
#ifndef NV
#define NV (64 / VW)   /* vectors per token tile: 64 tokens (measured best against 32 and 128 on BERT-base shapes) */
#endif
#define MT (NV * VW)
typedef float vf __attribute__((vector_size(VW * 4)));

/* Vector math for the epilogue, written on GCC vector types so that it is always vectorised and
   inlined: glibc's vector expf is a call per vector, and the erf GELU through it cost ~10 cycles an
   element (more than torch's own GELU). C has no vector ?:, so selects are bit masks. */
typedef int32_t vi __attribute__((vector_size(VW * 4)));
static inline vf vsplat(float a) { return (vf){0} + a; }
static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
static inline vf vmin(vf a, vf b) { return vsel(a < b, a, b); }
#define SIGN ((vi){0} + (int32_t)0x80000000)
/* exp: n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2], e^r by its Taylor series to r^6
   (relative error < 2e-7), times 2^n built in the exponent bits; clamped where fp32 saturates
   (-ffast-math assumes no infinities) */
static inline vf vexp(vf x) {
  x = vmin(vmax(x, vsplat(-87.f)), vsplat(88.f));
  vf t = x * 1.44269504088896341f;
  vi n = __builtin_convertvector(t + (vf)((vi)vsplat(0.5f) | ((vi)t & SIGN)), vi);
  vf nf = __builtin_convertvector(n, vf);
  vf r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  vf p = ((((((1.f / 720) * r + 1.f / 120) * r + 1.f / 24) * r + 1.f / 6) * r + 0.5f) * r + 1.f) * r + 1.f;
  return p * (vf)((n + 127) << 23);
}
/* erf: Abramowitz & Stegun 7.1.28, 1 - 1 / (1 + a1 x + ... + a6 x^6)^16 (|error| < 3e-7 in exact
   arithmetic, ~1.6e-6 in fp32): no exp, one reciprocal; erf(6) is 1 in fp32, and the clamp keeps
   the 16th power finite. 7.1.26 (t-polynomial times exp(-x^2)) made the GELU epilogue cost more
   than the rest of a BERT-base FFN-up layer's stores. */
static inline vf verf(vf x) {
  vi sign = (vi)x & SIGN;
  vf a = vmin((vf)((vi)x & ~SIGN), vsplat(6.f));
  vf p = (((((4.30638e-5f * a + 2.765672e-4f) * a + 1.520143e-4f) * a + 9.2705272e-3f) * a + 4.22820123e-2f) * a
          + 7.05230784e-2f) * a + 1.f;
  p = p * p; p = p * p; p = p * p; p = p * p;
  return (vf)((vi)(1.f - 1.f / p) | sign);
}
static inline vf vtanh(vf x) { return 1.f - 2.f / (vexp(2.f * vmin(vmax(x, vsplat(-15.f)), vsplat(15.f))) + 1.f); }
"""

ELEMENT = {
    "f32": r"""
typedef float tin;
static inline float in_(tin v) { return v; }
""",
    "bf16": r"""
typedef uint16_t tin;
static inline float in_(tin v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
""",
}

OUT = {
    "f32": "typedef float tout;\nstatic inline tout out_(float f) { return f; }\n",
    "f16": "typedef _Float16 tout;\nstatic inline tout out_(float f) { return (_Float16)f; }\n",
    "bf16": r"""typedef uint16_t tout;
static inline tout out_(float f) {   /* round to nearest even, once, at the store */
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (tout)((u >> 16) | 0x40);   /* a NaN stays a NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (tout)(u >> 16);
}
""",
}
