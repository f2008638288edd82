// recipec sparse CPU kernels: raw-pointer interface shared by the torch glue (ops.cpp) and the
// kernel implementations (kernels.cpp). No torch headers here, so kernels.cpp compiles fast and
// its AVX2 code region cannot leak into torch's inline functions.
#pragma once

#include <cstddef>
#include <cstdint>

namespace recipec {

enum Structure : int { kUnstructured = 0, kBlock4 = 1 };
// kInt8Acc writes the raw int32 accumulators (tests compare them with an integer reference).
enum Mode : int { kFp32 = 0, kInt8 = 1, kInt8Acc = 2 };
enum Isa : int { kPortable = 0, kAvx2 = 1 };

// One packed sparse linear layer plus the activations of one call.
//
// Row r's entries are row_ptr[r] .. row_ptr[r+1]-1. An entry is, per structure and mode:
//   unstructured fp32: one nonzero, col = input feature, values[e] float
//   unstructured int8: a pair of nonzeros, col[2e], col[2e+1] = features, values[2e..2e+1] int8
//   block4 fp32/int8:  4 weights of features col[e] .. col[e]+3 (col[e] % 4 == 0),
//                      values[4e..4e+3]; features past in_features hold weight 0.
struct LinearArgs {
  const float* x = nullptr;  // [tokens, in] row-major
  void* y = nullptr;         // [tokens, out] row-major, float (int32 for kInt8Acc)
  int64_t tokens = 0, in = 0, out = 0;
  // npanels x (out + 1): entries of panel q (a range of input features) of row r are
  // row_ptr[q*(out+1) + r] .. row_ptr[q*(out+1) + r + 1] - 1, panels one after the other.
  const int32_t* row_ptr = nullptr;
  int64_t npanels = 1;
  const void* col = nullptr;  // int16 if col16 else int32
  bool col16 = false;
  const void* values = nullptr;   // float (kFp32) or int8
  const float* wscale = nullptr;  // [out], int8 only
  const float* bias = nullptr;    // [out] or null
  int structure = kUnstructured;
  int mode = kFp32;
};

// Training: gradient of the kept weights, g[e] = sum_t dy[t, o] * x[t, col[e]] for each entry e
// of row o (unstructured fp32 CSR), i.e. dW = dY^T X sampled at the mask.
struct SddmmArgs {
  const float* x = nullptr;   // [tokens, in]
  const float* dy = nullptr;  // [tokens, out]
  float* g = nullptr;         // [nnz], overwritten
  int64_t tokens = 0, in = 0, out = 0;
  const int32_t* row_ptr = nullptr;
  const void* col = nullptr;
  bool col16 = false;
};

constexpr int64_t kSddmmTile = 32;

// Scratch for rows r0..r1 of sddmm_rows.
size_t sddmm_scratch_bytes(const SddmmArgs& a, int64_t rows);

// g for the entries of rows r0..r1, over all tokens.
void sddmm_rows(const SddmmArgs& a, int isa, int64_t r0, int64_t r1, void* scratch);

bool cpu_has_avx2_fma();

// Tokens per tile: token tiles are packed transposed, so this sets the packed buffer size.
int64_t tile_tokens(const LinearArgs& a, int isa, int64_t max_tile);

// Bytes of thread-local scratch one run_tile call needs (tiles of up to 64 tokens).
size_t scratch_bytes(const LinearArgs& a);

// Computes y[t0:t0+nt, r0:r1], panel by panel (partial sums of rows r0..r1 wait in scratch).
// scratch holds the packed tile; pack=false reuses the tile the previous call on this scratch
// packed (same t0, nt), so row chunks of one tile pack it once.
void run_tile(const LinearArgs& a, int isa, int64_t t0, int64_t nt, int64_t r0, int64_t r1,
              void* scratch, bool pack);

}  // namespace recipec
