// recipec sparse linear kernels: y[T, out] = x[T, in] @ W^T + b with W in CSR (by output row).
//
// Scheme (both ISAs): tokens are processed in tiles of up to 64. A tile of x is packed
// transposed into thread-local scratch (xt[feature][token]), so one weight is broadcast and
// multiplied into a vector of tokens; the tile stays in L1/L2 while all rows of W stream past
// it once. Each row's token vector of outputs lands in a small buffer that is transposed back
// 8 rows x 8 tokens at a time, so x and y stay row-major [tokens, features] in memory.
//
// INT8: activations are quantized per token while packing (scale = max|x_t| / 127, values
// rounded half-to-even and clamped to +-127) and stored as int16; `vpmaddwd` multiplies int16
// pairs and adds each pair into an int32 lane, exactly (|w x| <= 127 * 127, no saturation at
// any step; `vpmaddubsw` would add u8 * s8 pairs into int16 with saturation at 32767, and on
// Zen 2 it shares the one vector-multiply pipe, so it would not be faster once widened).
// int32 holds the sum of up to 133,000 features.
//
// No torch headers: this file is compiled with -ffp-contract=off so the int8 epilogue rounds
// (acc * (scale_w * scale_x)) + b exactly like the pure-torch fallback.

#include "kernels.h"

#include <cmath>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#define RECIPEC_X86 1
#include <immintrin.h>
#else
#define RECIPEC_X86 0
#endif

namespace recipec {
namespace {

constexpr int64_t kMaxTile = 64;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Features of the packed tile: a multiple of 8 so packing runs in 8x8 blocks and a block4's
// features past in_features read zeros.
inline int64_t in_padded(const LinearArgs& a) { return round_up(a.in, 8); }

// Token granularity of a tile: the int8 unstructured kernel interleaves 16 tokens per step.
inline int64_t token_group(const LinearArgs& a) {
  return (a.mode != kFp32 && a.structure == kUnstructured) ? 16 : 8;
}

struct Scratch {
  void* xt;       // packed tile
  float* xscale;  // int8: per-token activation scale of the tile
  float* obuf;    // 8 rows x tile outputs before the transposed write-back
  void* acc;      // rows x tile partial sums (fp32 or int32) between panels
};

// One pass over the rows for one panel of input features.
struct Pass {
  const int32_t* rp;  // the panel's row pointers
  bool first, last;   // first panel: start from zero; last: finish the outputs
};

inline size_t xt_bytes(const LinearArgs& a, int64_t tile) {
  return static_cast<size_t>(in_padded(a) * round_up(tile, 16)) * (a.mode == kFp32 ? 4 : 2);
}

inline Scratch carve(const LinearArgs& a, void* s) {
  char* p = static_cast<char*>(s);
  size_t off = round_up(static_cast<int64_t>(xt_bytes(a, kMaxTile)), 64);
  Scratch r;
  r.xt = p;
  r.xscale = reinterpret_cast<float*>(p + off);
  r.obuf = reinterpret_cast<float*>(p + off + kMaxTile * sizeof(float));
  r.acc = p + off + kMaxTile * sizeof(float) + 8 * kMaxTile * sizeof(float);
  return r;
}

// Per-token symmetric quantization, shared by both ISAs so they agree bit for bit.
inline float token_absmax(const float* x, int64_t n) {
  float m = 0.f;
  for (int64_t k = 0; k < n; ++k) {
    float v = std::fabs(x[k]);
    m = v > m ? v : m;
  }
  return m;
}

inline void token_scales(const LinearArgs& a, int64_t t0, int64_t nt, float* scale, float* inv) {
  for (int64_t t = 0; t < nt; ++t) {
    float m = token_absmax(a.x + (t0 + t) * a.in, a.in);
    scale[t] = m / 127.f;
    inv[t] = m > 0.f ? 127.f / m : 0.f;
  }
}

inline int32_t quantize(float v, float inv) {
  float r = std::nearbyint(v * inv);  // default rounding: half to even, like cvtps2dq
  r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
  return static_cast<int32_t>(r);
}

// ---------------------------------------------------------------------------------------------
// Portable scalar path (any CPU). Same tiling; the inner token loops auto-vectorize.
// ---------------------------------------------------------------------------------------------
namespace portable {

void pack(const LinearArgs& a, int64_t t0, int64_t nt, int64_t tt, const Scratch& s) {
  const int64_t inp = in_padded(a);
  if (a.mode == kFp32) {
    float* xt = static_cast<float*>(s.xt);
    for (int64_t k = 0; k < inp; ++k)
      for (int64_t t = 0; t < tt; ++t)
        xt[k * tt + t] = (k < a.in && t < nt) ? a.x[(t0 + t) * a.in + k] : 0.f;
    return;
  }
  float inv[kMaxTile];
  token_scales(a, t0, nt, s.xscale, inv);
  int16_t* xq = static_cast<int16_t*>(s.xt);
  for (int64_t k = 0; k < inp; ++k)
    for (int64_t t = 0; t < tt; ++t)
      xq[k * tt + t] = static_cast<int16_t>(
          (k < a.in && t < nt) ? quantize(a.x[(t0 + t) * a.in + k], inv[t]) : 0);
}

template <typename IT>
void rows(const LinearArgs& a, int64_t t0, int64_t nt, int64_t tt, int64_t r0, int64_t r1,
          const Scratch& s, const Pass& ps) {
  const IT* col = static_cast<const IT*>(a.col);
  float* y = static_cast<float*>(a.y);
  for (int64_t o = r0; o < r1; ++o) {
    const int64_t pb = ps.rp[o], pe = ps.rp[o + 1];
    if (a.mode == kFp32) {
      const float* xt = static_cast<const float*>(s.xt);
      const float* w = static_cast<const float*>(a.values);
      float* part = static_cast<float*>(s.acc) + (o - r0) * tt;
      float acc[kMaxTile];
      for (int64_t t = 0; t < tt; ++t) acc[t] = ps.first ? 0.f : part[t];
      if (a.structure == kUnstructured) {
        for (int64_t p = pb; p < pe; ++p) {
          const float* xr = xt + static_cast<int64_t>(col[p]) * tt;
          for (int64_t t = 0; t < tt; ++t) acc[t] += w[p] * xr[t];
        }
      } else {
        for (int64_t p = pb; p < pe; ++p) {
          const float* xr = xt + static_cast<int64_t>(col[p]) * tt;
          for (int j = 0; j < 4; ++j)
            for (int64_t t = 0; t < tt; ++t) acc[t] += w[4 * p + j] * xr[j * tt + t];
        }
      }
      if (!ps.last) {
        for (int64_t t = 0; t < tt; ++t) part[t] = acc[t];
        continue;
      }
      const float b = a.bias ? a.bias[o] : 0.f;
      for (int64_t t = 0; t < nt; ++t) y[(t0 + t) * a.out + o] = acc[t] + b;
      continue;
    }
    const int16_t* xq = static_cast<const int16_t*>(s.xt);
    const int8_t* w = static_cast<const int8_t*>(a.values);
    int32_t* part = static_cast<int32_t*>(s.acc) + (o - r0) * tt;
    int32_t acc[kMaxTile];
    for (int64_t t = 0; t < tt; ++t) acc[t] = ps.first ? 0 : part[t];
    const int n = a.structure == kUnstructured ? 2 : 4;
    for (int64_t p = pb; p < pe; ++p) {
      for (int j = 0; j < n; ++j) {
        const int64_t k = a.structure == kUnstructured ? static_cast<int64_t>(col[2 * p + j])
                                                       : static_cast<int64_t>(col[p]) + j;
        const int32_t wv = w[n * p + j];
        const int16_t* xr = xq + k * tt;
        for (int64_t t = 0; t < tt; ++t) acc[t] += wv * static_cast<int32_t>(xr[t]);
      }
    }
    if (!ps.last) {
      for (int64_t t = 0; t < tt; ++t) part[t] = acc[t];
      continue;
    }
    if (a.mode == kInt8Acc) {
      int32_t* yi = static_cast<int32_t*>(a.y);
      for (int64_t t = 0; t < nt; ++t) yi[(t0 + t) * a.out + o] = acc[t];
      continue;
    }
    const float b = a.bias ? a.bias[o] : 0.f;
    for (int64_t t = 0; t < nt; ++t)
      y[(t0 + t) * a.out + o] = static_cast<float>(acc[t]) * (s.xscale[t] * a.wscale[o]) + b;
  }
}

void run(const LinearArgs& a, int64_t t0, int64_t nt, int64_t r0, int64_t r1, const Scratch& s,
         bool do_pack) {
  const int64_t tt = round_up(nt, token_group(a));
  if (do_pack) pack(a, t0, nt, tt, s);
  for (int64_t q = 0; q < a.npanels; ++q) {
    const Pass ps{a.row_ptr + q * (a.out + 1), q == 0, q == a.npanels - 1};
    if (a.col16)
      rows<int16_t>(a, t0, nt, tt, r0, r1, s, ps);
    else
      rows<int32_t>(a, t0, nt, tt, r0, r1, s, ps);
  }
}

// Packs columns c0..c0+nc-1 of tokens t0..t0+nt-1 of src [*, ld] transposed, zero-padded to
// tt tokens: dst[c * tt + t].
void pack_cols(const float* src, int64_t ld, int64_t c0, int64_t nc, int64_t t0, int64_t nt,
               int64_t tt, float* dst) {
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t t = 0; t < tt; ++t) dst[c * tt + t] = t < nt ? src[(t0 + t) * ld + c0 + c] : 0.f;
}

template <typename IT>
void sddmm(const SddmmArgs& a, int64_t r0, int64_t r1, float* xt, float* dyt) {
  constexpr int64_t TT = kSddmmTile;
  const IT* col = static_cast<const IT*>(a.col);
  for (int64_t p = a.row_ptr[r0]; p < a.row_ptr[r1]; ++p) a.g[p] = 0.f;
  for (int64_t t0 = 0; t0 < a.tokens; t0 += TT) {
    const int64_t nt = min64(TT, a.tokens - t0);
    pack_cols(a.x, a.in, 0, a.in, t0, nt, TT, xt);
    pack_cols(a.dy, a.out, r0, r1 - r0, t0, nt, TT, dyt);
    for (int64_t o = r0; o < r1; ++o) {
      const float* d = dyt + (o - r0) * TT;
      for (int64_t p = a.row_ptr[o]; p < a.row_ptr[o + 1]; ++p) {
        const float* xr = xt + static_cast<int64_t>(col[p]) * TT;
        float s = 0.f;
        for (int64_t t = 0; t < TT; ++t) s += d[t] * xr[t];
        a.g[p] += s;
      }
    }
  }
}

}  // namespace portable

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA path. Compiled for that ISA by the pragma below (the rest of the library stays
// baseline x86-64) and only called after cpu_has_avx2_fma(). No STL in this region: template
// instantiations here would be compiled for AVX2 and could be picked by the linker elsewhere.
// ---------------------------------------------------------------------------------------------
#if RECIPEC_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {

inline void transpose8(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-3 (h=0) and 4-7 (h=1)
    s[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    s[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x20);
    r[j + 4] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x31);
  }
}

// Writes obuf[j * tt + t] (rows o0..o0+nr-1, 32-bit values) to y[(t0 + t) * out + o0 + j].
void write_back(const LinearArgs& a, const float* obuf, int64_t tt, int64_t t0, int64_t nt,
                int64_t o0, int64_t nr) {
  float* y = static_cast<float*>(a.y);  // int32 outputs are moved as raw 32-bit lanes
  int64_t t8 = 0;
  if (nr == 8) {
    for (; t8 + 8 <= nt; t8 += 8) {
      __m256 r[8];
      for (int j = 0; j < 8; ++j) r[j] = _mm256_load_ps(obuf + j * tt + t8);
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(y + (t0 + t8 + i) * a.out + o0, r[i]);
    }
  }
  for (int64_t t = t8; t < nt; ++t)
    for (int64_t j = 0; j < nr; ++j) y[(t0 + t) * a.out + o0 + j] = obuf[j * tt + t];
}

// Packs tokens t0..t0+nt-1 transposed into xt[k * tt + t] (fp32), zero-padded to tt x inp.
void pack_fp32(const LinearArgs& a, int64_t t0, int64_t nt, int64_t tt, float* xt) {
  const int64_t inp = in_padded(a), in = a.in;
  for (int64_t t8 = 0; t8 < tt; t8 += 8) {
    const int64_t rows = nt - t8;
    int64_t k = 0;
    if (rows >= 8) {
      const float* x0 = a.x + (t0 + t8) * in;
      for (; k + 8 <= in; k += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(x0 + i * in + k);
        transpose8(r);
        for (int j = 0; j < 8; ++j) _mm256_store_ps(xt + (k + j) * tt + t8, r[j]);
      }
    }
    for (; k < inp; ++k)
      for (int64_t i = 0; i < 8; ++i)
        xt[k * tt + t8 + i] = (k < in && i < rows) ? a.x[(t0 + t8 + i) * in + k] : 0.f;
  }
}

// max |x[k]| (exact in any order, so equal to the portable token_absmax).
float absmax(const float* x, int64_t n) {
  const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    m0 = _mm256_max_ps(m0, _mm256_and_ps(_mm256_loadu_ps(x + k), nosign));
    m1 = _mm256_max_ps(m1, _mm256_and_ps(_mm256_loadu_ps(x + k + 8), nosign));
  }
  m0 = _mm256_max_ps(m0, m1);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m0), _mm256_extractf128_ps(m0, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  float m = _mm_cvtss_f32(h);
  for (; k < n; ++k) {
    const float v = std::fabs(x[k]);
    m = v > m ? v : m;
  }
  return m;
}

// INT8 packing. layout 0: xq[k * tt + t] (unstructured); layout 1: int16 pairs of features
// (2m, 2m+1) per token, xq[(m * tt + t) * 2 + (k & 1)] (block4), so one load is 8 tokens x 2
// features, ready for vpmaddwd without shuffles.
void pack_int8(const LinearArgs& a, int64_t t0, int64_t nt, int64_t tt, int layout,
               const Scratch& s) {
  const int64_t inp = in_padded(a), in = a.in;
  float inv[kMaxTile];
  for (int64_t t = 0; t < nt; ++t) {
    const float m = absmax(a.x + (t0 + t) * in, in);
    s.xscale[t] = m / 127.f;
    inv[t] = m > 0.f ? 127.f / m : 0.f;
  }
  int16_t* xq = static_cast<int16_t*>(s.xt);
  const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
  const __m256i lo16 = _mm256_set1_epi32(0xffff);
  for (int64_t t8 = 0; t8 < tt; t8 += 8) {
    const int64_t rows = nt - t8;
    int64_t k = 0;
    if (rows >= 8) {
      const float* x0 = a.x + (t0 + t8) * in;
      for (; k + 8 <= in; k += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) {
          __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x0 + i * in + k), _mm256_set1_ps(inv[t8 + i]));
          __m256i q = _mm256_cvtps_epi32(v);
          q = _mm256_max_epi32(_mm256_min_epi32(q, lim), nlim);
          r[i] = _mm256_castsi256_ps(q);
        }
        transpose8(r);  // r[j]: feature k + j of 8 tokens
        if (layout == 0) {
          for (int j = 0; j < 8; ++j) {
            __m256i q = _mm256_castps_si256(r[j]);
            __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
            _mm_store_si128(reinterpret_cast<__m128i*>(xq + (k + j) * tt + t8), h);
          }
        } else {
          for (int j = 0; j < 8; j += 2) {
            __m256i e = _mm256_and_si256(_mm256_castps_si256(r[j]), lo16);
            __m256i o = _mm256_slli_epi32(_mm256_castps_si256(r[j + 1]), 16);
            _mm256_store_si256(reinterpret_cast<__m256i*>(xq + (((k + j) / 2) * tt + t8) * 2),
                               _mm256_or_si256(e, o));
          }
        }
      }
    }
    for (; k < inp; ++k)
      for (int64_t i = 0; i < 8; ++i) {
        const int16_t q = static_cast<int16_t>(
            (k < in && i < rows) ? quantize(a.x[(t0 + t8 + i) * in + k], inv[t8 + i]) : 0);
        if (layout == 0)
          xq[k * tt + t8 + i] = q;
        else
          xq[((k / 2) * tt + t8 + i) * 2 + (k & 1)] = q;
      }
  }
}

// FP32 rows: U independent accumulator sets over the entries (or over a block's features)
// hide the 5-cycle FMA latency on 2 FMA ports; NV vectors of 8 tokens each.
template <int NV, int U, typename IT>
void fp32_rows(const LinearArgs& a, int64_t t0, int64_t nt, int64_t r0, int64_t r1,
               const Scratch& s, const Pass& ps) {
  constexpr int64_t TT = NV * 8;
  const IT* col = static_cast<const IT*>(a.col);
  const float* val = static_cast<const float*>(a.values);
  const float* xt = static_cast<const float*>(s.xt);
  const bool b4 = a.structure == kBlock4;
  for (int64_t o0 = r0; o0 < r1; o0 += 8) {
    const int64_t nr = min64(8, r1 - o0);
    for (int64_t j = 0; j < nr; ++j) {
      const int64_t o = o0 + j;
      float* part = static_cast<float*>(s.acc) + (o - r0) * TT;
      __m256 acc[U][NV];
      for (int u = 0; u < U; ++u)
        for (int v = 0; v < NV; ++v)
          acc[u][v] = (u == 0 && !ps.first) ? _mm256_load_ps(part + 8 * v) : _mm256_setzero_ps();
      int64_t p = ps.rp[o];
      const int64_t e = ps.rp[o + 1];
      if (!b4) {
        for (; p + U <= e; p += U) {
          for (int u = 0; u < U; ++u) {
            const float* xr = xt + static_cast<int64_t>(col[p + u]) * TT;
            const __m256 w = _mm256_broadcast_ss(val + p + u);
            for (int v = 0; v < NV; ++v)
              acc[u][v] = _mm256_fmadd_ps(w, _mm256_load_ps(xr + 8 * v), acc[u][v]);
          }
        }
        for (; p < e; ++p) {
          const float* xr = xt + static_cast<int64_t>(col[p]) * TT;
          const __m256 w = _mm256_broadcast_ss(val + p);
          for (int v = 0; v < NV; ++v)
            acc[0][v] = _mm256_fmadd_ps(w, _mm256_load_ps(xr + 8 * v), acc[0][v]);
        }
      } else {
        for (; p < e; ++p) {
          const float* xr = xt + static_cast<int64_t>(col[p]) * TT;
          // One load for the block's 4 weights, broadcast in registers: loads, not shuffles, are
          // what this loop runs short of (2 per cycle for ~1 FMA each).
          const __m256 w4 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(val + 4 * p));
          __m256 w[4];
          w[0] = _mm256_permute_ps(w4, 0x00);
          w[1] = _mm256_permute_ps(w4, 0x55);
          w[2] = _mm256_permute_ps(w4, 0xAA);
          w[3] = _mm256_permute_ps(w4, 0xFF);
          for (int f = 0; f < 4; ++f)
            for (int v = 0; v < NV; ++v)
              acc[f % U][v] =
                  _mm256_fmadd_ps(w[f], _mm256_load_ps(xr + f * TT + 8 * v), acc[f % U][v]);
        }
      }
      const __m256 b = _mm256_set1_ps(a.bias ? a.bias[o] : 0.f);
      for (int v = 0; v < NV; ++v) {
        __m256 r = acc[0][v];
        for (int u = 1; u < U; ++u) r = _mm256_add_ps(r, acc[u][v]);
        if (ps.last)
          _mm256_store_ps(s.obuf + j * TT + 8 * v, _mm256_add_ps(r, b));
        else
          _mm256_store_ps(part + 8 * v, r);
      }
    }
    if (ps.last) write_back(a, s.obuf, TT, t0, nt, o0, nr);
  }
}

inline __m256i bcast_pair(const int8_t* w) {  // (w[0], w[1]) as an int16 pair in each lane
  uint16_t two;
  std::memcpy(&two, w, 2);
  return _mm256_broadcastd_epi32(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(two)));
}

// Int8 epilogue for 8 tokens (t..t+7) of row o: raw accumulators or acc * (sx * sw) + b.
inline void int8_store(const LinearArgs& a, const Scratch& s, int64_t o, int64_t t, __m256i acc,
                       float* dst) {
  if (a.mode == kInt8Acc) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(dst), acc);
    return;
  }
  const __m256 sc = _mm256_mul_ps(_mm256_load_ps(s.xscale + t), _mm256_set1_ps(a.wscale[o]));
  const __m256 b = _mm256_set1_ps(a.bias ? a.bias[o] : 0.f);
  _mm256_store_ps(dst, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), sc), b));
}

// INT8 unstructured: entries are pairs of nonzeros (k1, k2); their token rows are interleaved
// with unpack so each vpmaddwd does 16 useful multiply-adds. NV16 vectors of 16 tokens.
template <int NV16, typename IT>
void int8_rows_unstructured(const LinearArgs& a, int64_t t0, int64_t nt, int64_t r0, int64_t r1,
                            const Scratch& s, const Pass& ps) {
  constexpr int64_t TT = NV16 * 16;
  const IT* col = static_cast<const IT*>(a.col);
  const int8_t* val = static_cast<const int8_t*>(a.values);
  const int16_t* xq = static_cast<const int16_t*>(s.xt);
  for (int64_t o0 = r0; o0 < r1; o0 += 8) {
    const int64_t nr = min64(8, r1 - o0);
    for (int64_t j = 0; j < nr; ++j) {
      const int64_t o = o0 + j;
      __m256i* part = static_cast<__m256i*>(s.acc) + (o - r0) * 2 * NV16;
      __m256i acc[2 * NV16];
      for (int v = 0; v < 2 * NV16; ++v)
        acc[v] = ps.first ? _mm256_setzero_si256() : _mm256_load_si256(part + v);
      for (int64_t p = ps.rp[o], e = ps.rp[o + 1]; p < e; ++p) {
        const int16_t* xa = xq + static_cast<int64_t>(col[2 * p]) * TT;
        const int16_t* xb = xq + static_cast<int64_t>(col[2 * p + 1]) * TT;
        const __m256i w = bcast_pair(val + 2 * p);
        for (int g = 0; g < NV16; ++g) {
          __m256i va = _mm256_load_si256(reinterpret_cast<const __m256i*>(xa + 16 * g));
          __m256i vb = _mm256_load_si256(reinterpret_cast<const __m256i*>(xb + 16 * g));
          // Keep both in registers: compilers otherwise fold them into the two unpacks as memory
          // operands, loading each twice, and loads are what this loop runs out of.
          __asm__("" : "+x"(va), "+x"(vb));
          acc[2 * g] =
              _mm256_add_epi32(acc[2 * g], _mm256_madd_epi16(_mm256_unpacklo_epi16(va, vb), w));
          acc[2 * g + 1] =
              _mm256_add_epi32(acc[2 * g + 1], _mm256_madd_epi16(_mm256_unpackhi_epi16(va, vb), w));
        }
      }
      if (!ps.last) {  // partial sums kept in the accumulators' own token order
        for (int v = 0; v < 2 * NV16; ++v) _mm256_store_si256(part + v, acc[v]);
        continue;
      }
      // unpacklo/hi work per 128-bit lane: acc[2g] holds tokens 0-3 | 8-11, acc[2g+1] 4-7 | 12-15.
      for (int g = 0; g < NV16; ++g) {
        const __m256i lo = _mm256_permute2x128_si256(acc[2 * g], acc[2 * g + 1], 0x20);
        const __m256i hi = _mm256_permute2x128_si256(acc[2 * g], acc[2 * g + 1], 0x31);
        int8_store(a, s, o, 16 * g, lo, s.obuf + j * TT + 16 * g);
        int8_store(a, s, o, 16 * g + 8, hi, s.obuf + j * TT + 16 * g + 8);
      }
    }
    if (ps.last) write_back(a, s.obuf, TT, t0, nt, o0, nr);
  }
}

// INT8 block4: features (c, c+1) and (c+2, c+3) are stored as int16 pairs per token, so a block
// costs two loads and two vpmaddwd per 8 tokens with no shuffles.
template <int NV, typename IT>
void int8_rows_block4(const LinearArgs& a, int64_t t0, int64_t nt, int64_t r0, int64_t r1,
                      const Scratch& s, const Pass& ps) {
  constexpr int64_t TT = NV * 8;
  const IT* col = static_cast<const IT*>(a.col);
  const int8_t* val = static_cast<const int8_t*>(a.values);
  const int16_t* xq = static_cast<const int16_t*>(s.xt);
  for (int64_t o0 = r0; o0 < r1; o0 += 8) {
    const int64_t nr = min64(8, r1 - o0);
    for (int64_t j = 0; j < nr; ++j) {
      const int64_t o = o0 + j;
      __m256i* part = static_cast<__m256i*>(s.acc) + (o - r0) * NV;
      __m256i acc[NV];
      for (int v = 0; v < NV; ++v)
        acc[v] = ps.first ? _mm256_setzero_si256() : _mm256_load_si256(part + v);
      for (int64_t p = ps.rp[o], e = ps.rp[o + 1]; p < e; ++p) {
        const int16_t* x0 = xq + (static_cast<int64_t>(col[p]) / 2) * TT * 2;
        const int16_t* x1 = x0 + TT * 2;
        int32_t four;
        std::memcpy(&four, val + 4 * p, 4);
        const __m128i w16 = _mm_cvtepi8_epi16(_mm_cvtsi32_si128(four));
        const __m256i wlo = _mm256_broadcastd_epi32(w16);
        const __m256i whi = _mm256_broadcastd_epi32(_mm_srli_si128(w16, 4));
        for (int v = 0; v < NV; ++v) {
          const __m256i m0 = _mm256_madd_epi16(
              _mm256_load_si256(reinterpret_cast<const __m256i*>(x0 + 16 * v)), wlo);
          const __m256i m1 = _mm256_madd_epi16(
              _mm256_load_si256(reinterpret_cast<const __m256i*>(x1 + 16 * v)), whi);
          acc[v] = _mm256_add_epi32(acc[v], _mm256_add_epi32(m0, m1));
        }
      }
      if (!ps.last) {
        for (int v = 0; v < NV; ++v) _mm256_store_si256(part + v, acc[v]);
        continue;
      }
      for (int v = 0; v < NV; ++v) int8_store(a, s, o, 8 * v, acc[v], s.obuf + j * TT + 8 * v);
    }
    if (ps.last) write_back(a, s.obuf, TT, t0, nt, o0, nr);
  }
}

// Sum of each of 8 vectors, as one vector: out[j] = sum(a[j]).
inline __m256 hsum8(const __m256 a[8]) {
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 q0 = _mm256_hadd_ps(h01, h23), q1 = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Transposed packing of columns c0..c0+nc-1 of src [*, ld] (8x8 blocks), zero-padded to tt.
void pack_cols(const float* src, int64_t ld, int64_t c0, int64_t nc, int64_t t0, int64_t nt,
               int64_t tt, float* dst) {
  for (int64_t t8 = 0; t8 < tt; t8 += 8) {
    const int64_t rows = nt - t8;
    int64_t c = 0;
    if (rows >= 8) {
      const float* s0 = src + (t0 + t8) * ld + c0;
      for (; c + 8 <= nc; c += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s0 + i * ld + c);
        transpose8(r);
        for (int j = 0; j < 8; ++j) _mm256_store_ps(dst + (c + j) * tt + t8, r[j]);
      }
    }
    for (; c < nc; ++c)
      for (int64_t i = 0; i < 8; ++i)
        dst[c * tt + t8 + i] = i < rows ? src[(t0 + t8 + i) * ld + c0 + c] : 0.f;
  }
}

// SDDMM: the 32 tokens of dy's row stay in 4 registers; 8 entries at a time each get one
// accumulator (8 independent FMA chains), reduced together by hsum8 into g[p..p+7].
template <typename IT>
void sddmm(const SddmmArgs& a, int64_t r0, int64_t r1, float* xt, float* dyt) {
  constexpr int64_t TT = kSddmmTile;
  const IT* col = static_cast<const IT*>(a.col);
  for (int64_t p = a.row_ptr[r0]; p < a.row_ptr[r1]; ++p) a.g[p] = 0.f;
  for (int64_t t0 = 0; t0 < a.tokens; t0 += TT) {
    const int64_t nt = min64(TT, a.tokens - t0);
    pack_cols(a.x, a.in, 0, a.in, t0, nt, TT, xt);
    pack_cols(a.dy, a.out, r0, r1 - r0, t0, nt, TT, dyt);
    for (int64_t o = r0; o < r1; ++o) {
      const float* d = dyt + (o - r0) * TT;
      const __m256 d0 = _mm256_load_ps(d), d1 = _mm256_load_ps(d + 8);
      const __m256 d2 = _mm256_load_ps(d + 16), d3 = _mm256_load_ps(d + 24);
      int64_t p = a.row_ptr[o];
      const int64_t e = a.row_ptr[o + 1];
      for (; p + 8 <= e; p += 8) {
        __m256 acc[8];
        for (int j = 0; j < 8; ++j) {
          const float* xr = xt + static_cast<int64_t>(col[p + j]) * TT;
          __m256 s = _mm256_mul_ps(d0, _mm256_load_ps(xr));
          s = _mm256_fmadd_ps(d1, _mm256_load_ps(xr + 8), s);
          s = _mm256_fmadd_ps(d2, _mm256_load_ps(xr + 16), s);
          acc[j] = _mm256_fmadd_ps(d3, _mm256_load_ps(xr + 24), s);
        }
        _mm256_storeu_ps(a.g + p, _mm256_add_ps(_mm256_loadu_ps(a.g + p), hsum8(acc)));
      }
      for (; p < e; ++p) {
        const float* xr = xt + static_cast<int64_t>(col[p]) * TT;
        __m256 s = _mm256_mul_ps(d0, _mm256_load_ps(xr));
        s = _mm256_fmadd_ps(d1, _mm256_load_ps(xr + 8), s);
        s = _mm256_fmadd_ps(d2, _mm256_load_ps(xr + 16), s);
        s = _mm256_fmadd_ps(d3, _mm256_load_ps(xr + 24), s);
        a.g[p] += hsum(s);
      }
    }
  }
}

template <typename IT>
void dispatch_rows(const LinearArgs& a, int64_t t0, int64_t nt, int64_t tt, int64_t r0, int64_t r1,
                   const Scratch& s, const Pass& ps) {
  if (a.mode == kFp32) {
    // U sets of accumulators: enough independent FMA chains (U * NV >= ~8) within 16 registers.
    switch (tt / 8) {
      case 1: return fp32_rows<1, 4, IT>(a, t0, nt, r0, r1, s, ps);
      case 2: return fp32_rows<2, 4, IT>(a, t0, nt, r0, r1, s, ps);
      case 3: return fp32_rows<3, 3, IT>(a, t0, nt, r0, r1, s, ps);
      case 4: return fp32_rows<4, 2, IT>(a, t0, nt, r0, r1, s, ps);
      case 5: return fp32_rows<5, 2, IT>(a, t0, nt, r0, r1, s, ps);
      case 6: return fp32_rows<6, 2, IT>(a, t0, nt, r0, r1, s, ps);
      case 7: return fp32_rows<7, 1, IT>(a, t0, nt, r0, r1, s, ps);
      default: return fp32_rows<8, 1, IT>(a, t0, nt, r0, r1, s, ps);
    }
  }
  if (a.structure == kUnstructured) {
    switch (tt / 16) {
      case 1: return int8_rows_unstructured<1, IT>(a, t0, nt, r0, r1, s, ps);
      case 2: return int8_rows_unstructured<2, IT>(a, t0, nt, r0, r1, s, ps);
      case 3: return int8_rows_unstructured<3, IT>(a, t0, nt, r0, r1, s, ps);
      default: return int8_rows_unstructured<4, IT>(a, t0, nt, r0, r1, s, ps);
    }
  }
  switch (tt / 8) {
    case 1: return int8_rows_block4<1, IT>(a, t0, nt, r0, r1, s, ps);
    case 2: return int8_rows_block4<2, IT>(a, t0, nt, r0, r1, s, ps);
    case 3: return int8_rows_block4<3, IT>(a, t0, nt, r0, r1, s, ps);
    case 4: return int8_rows_block4<4, IT>(a, t0, nt, r0, r1, s, ps);
    case 5: return int8_rows_block4<5, IT>(a, t0, nt, r0, r1, s, ps);
    case 6: return int8_rows_block4<6, IT>(a, t0, nt, r0, r1, s, ps);
    case 7: return int8_rows_block4<7, IT>(a, t0, nt, r0, r1, s, ps);
    default: return int8_rows_block4<8, IT>(a, t0, nt, r0, r1, s, ps);
  }
}

void run(const LinearArgs& a, int64_t t0, int64_t nt, int64_t r0, int64_t r1, const Scratch& s,
         bool do_pack) {
  const int64_t tt = round_up(nt, token_group(a));
  if (do_pack) {
    if (a.mode == kFp32)
      pack_fp32(a, t0, nt, tt, static_cast<float*>(s.xt));
    else
      pack_int8(a, t0, nt, tt, a.structure == kUnstructured ? 0 : 1, s);
  }
  for (int64_t q = 0; q < a.npanels; ++q) {
    const Pass ps{a.row_ptr + q * (a.out + 1), q == 0, q == a.npanels - 1};
    if (a.col16)
      dispatch_rows<int16_t>(a, t0, nt, tt, r0, r1, s, ps);
    else
      dispatch_rows<int32_t>(a, t0, nt, tt, r0, r1, s, ps);
  }
}

}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // RECIPEC_X86

}  // namespace

bool cpu_has_avx2_fma() {
#if RECIPEC_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

int64_t tile_tokens(const LinearArgs& a, int /*isa*/, int64_t max_tile) {
  const int64_t g = token_group(a);
  int64_t t = round_up(max_tile < 1 ? 1 : max_tile, g);
  return t > kMaxTile ? kMaxTile : t;
}

size_t scratch_bytes(const LinearArgs& a) {
  // Sized for the largest tile so one thread-local buffer serves every call of a layer.
  size_t n = round_up(static_cast<int64_t>(xt_bytes(a, kMaxTile)), 64) + kMaxTile * sizeof(float) +
             8 * kMaxTile * sizeof(float);
  if (a.npanels > 1) n += static_cast<size_t>(round_up(a.out, 8) * kMaxTile) * sizeof(float);
  return n;
}

size_t sddmm_scratch_bytes(const SddmmArgs& a, int64_t rows) {
  return static_cast<size_t>((round_up(a.in, 8) + round_up(rows, 8)) * kSddmmTile) * sizeof(float);
}

void sddmm_rows(const SddmmArgs& a, int isa, int64_t r0, int64_t r1, void* scratch) {
  float* xt = static_cast<float*>(scratch);
  float* dyt = xt + round_up(a.in, 8) * kSddmmTile;
#if RECIPEC_X86
  if (isa == kAvx2) {
    if (a.col16) return avx2::sddmm<int16_t>(a, r0, r1, xt, dyt);
    return avx2::sddmm<int32_t>(a, r0, r1, xt, dyt);
  }
#endif
  (void)isa;
  if (a.col16) return portable::sddmm<int16_t>(a, r0, r1, xt, dyt);
  portable::sddmm<int32_t>(a, r0, r1, xt, dyt);
}

void run_tile(const LinearArgs& a, int isa, int64_t t0, int64_t nt, int64_t r0, int64_t r1,
              void* scratch, bool pack) {
  const Scratch s = carve(a, scratch);
#if RECIPEC_X86
  if (isa == kAvx2) return avx2::run(a, t0, nt, r0, r1, s, pack);
#endif
  (void)isa;
  portable::run(a, t0, nt, r0, r1, s, pack);
}

}  // namespace recipec
