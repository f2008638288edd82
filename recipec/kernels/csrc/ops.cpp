// Torch glue: checks tensors, splits the work over torch's own thread pool (parallel_for, so
// the kernels never compete with a second pool for the cores) and registers the ops. It uses
// torch's stable C ABI (torch/csrc/stable, torch >= 2.10): its headers compile in ~1 s where
// torch/library.h + ATen take ~11 s, and the library does not depend on libtorch's C++ ABI.
// Outputs are allocated by the caller (no tensor-creating calls needed here).

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "kernels.h"

namespace recipec {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Grow-only, 64-byte aligned, one per thread: torch's OpenMP workers live for the process, so
// the packed-tile buffer is allocated (and page-faulted) once, not on every call.
struct ThreadScratch {
  void* p = nullptr;
  size_t n = 0;
  ~ThreadScratch() { std::free(p); }
  void* get(size_t need) {
    if (need > n) {
      std::free(p);
      n = (need + 63) / 64 * 64;
      p = std::aligned_alloc(64, n);
      STD_TORCH_CHECK(p != nullptr, "recipec kernels: out of memory for ", n, " bytes of scratch");
    }
    return p;
  }
};
thread_local ThreadScratch tls_scratch;

struct Item {
  int64_t tile, r0, r1;
  double cost;
};

int resolve_isa(int64_t isa) {
  if (isa < 0) return cpu_has_avx2_fma() ? kAvx2 : kPortable;
  STD_TORCH_CHECK(isa == kPortable || cpu_has_avx2_fma(),
                  "recipec kernels: this CPU has no AVX2+FMA");
  return static_cast<int>(isa);
}

// Row chunks balanced by entries (binary search on row_ptr), boundaries aligned to 8.
std::vector<int64_t> balanced_rows(const int32_t* rp, int64_t rows, int64_t nchunks) {
  std::vector<int64_t> bounds{0};
  const int64_t total = rp[rows];
  for (int64_t c = 1; c < nchunks; ++c) {
    const int64_t target = total * c / nchunks;
    int64_t r = std::lower_bound(rp, rp + rows + 1, static_cast<int32_t>(target)) - rp;
    r = std::min<int64_t>((r + 7) / 8 * 8, rows);
    if (r > bounds.back()) bounds.push_back(r);
  }
  if (bounds.back() < rows) bounds.push_back(rows);
  return bounds;
}

void linear(const Tensor& x, const Tensor& row_ptr, const Tensor& col, const Tensor& values,
            const std::optional<Tensor>& wscale, const std::optional<Tensor>& bias,
            int64_t out_features, int64_t in_features, int64_t structure, int64_t mode, int64_t isa,
            int64_t max_tile, int64_t max_threads, const Tensor& y) {
  // x [..., in] and y [..., out]: any leading dims (contiguous), so Python needs no reshapes.
  STD_TORCH_CHECK(
      x.dim() >= 1 && x.scalar_type() == ScalarType::Float && x.is_contiguous() && x.is_cpu(),
      "recipec kernels: x must be a contiguous float32 CPU tensor");
  STD_TORCH_CHECK(x.size(x.dim() - 1) == in_features, "recipec kernels: x has ",
                  x.size(x.dim() - 1), " features, the layer ", in_features);
  STD_TORCH_CHECK(structure == kUnstructured || structure == kBlock4, "bad structure ", structure);
  STD_TORCH_CHECK(mode == kFp32 || mode == kInt8 || mode == kInt8Acc, "bad mode ", mode);
  STD_TORCH_CHECK(row_ptr.scalar_type() == ScalarType::Int && row_ptr.is_contiguous() &&
                      row_ptr.numel() >= out_features + 1 &&
                      row_ptr.numel() % (out_features + 1) == 0,
                  "recipec kernels: row_ptr must be int32 [panels * (out + 1)]");
  STD_TORCH_CHECK(
      (col.scalar_type() == ScalarType::Short || col.scalar_type() == ScalarType::Int) &&
          col.is_contiguous(),
      "recipec kernels: col must be contiguous int16/int32");
  const bool fp32 = mode == kFp32;
  STD_TORCH_CHECK(values.scalar_type() == (fp32 ? ScalarType::Float : ScalarType::Char) &&
                      values.is_contiguous(),
                  "recipec kernels: values must be contiguous ", fp32 ? "float32" : "int8");
  if (!fp32)
    STD_TORCH_CHECK(wscale.has_value() && wscale->scalar_type() == ScalarType::Float &&
                        wscale->is_contiguous() && wscale->numel() == out_features,
                    "recipec kernels: int8 needs float32 weight scales [out]");
  if (bias.has_value())
    STD_TORCH_CHECK(bias->scalar_type() == ScalarType::Float && bias->is_contiguous() &&
                        bias->numel() == out_features,
                    "recipec kernels: bias must be float32 [out]");

  // Tokens from y when the layer has no inputs (then y = bias).
  const int64_t T =
      in_features > 0 ? x.numel() / in_features : (out_features > 0 ? y.numel() / out_features : 0);
  STD_TORCH_CHECK(y.numel() == T * out_features && y.is_contiguous() &&
                      y.scalar_type() == (mode == kInt8Acc ? ScalarType::Int : ScalarType::Float),
                  "recipec kernels: y must be contiguous [..., out], float32 (int32 accumulators)");
  if (T == 0 || out_features == 0) return;

  LinearArgs a;
  a.x = static_cast<const float*>(x.data_ptr());
  a.y = y.data_ptr();
  a.tokens = T;
  a.in = in_features;
  a.out = out_features;
  a.row_ptr = static_cast<const int32_t*>(row_ptr.data_ptr());
  a.npanels = row_ptr.numel() / (out_features + 1);
  a.col = col.data_ptr();
  a.col16 = col.scalar_type() == ScalarType::Short;
  a.values = values.data_ptr();
  a.wscale = fp32 ? nullptr : static_cast<const float*>(wscale->data_ptr());
  a.bias = bias.has_value() ? static_cast<const float*>(bias->data_ptr()) : nullptr;
  a.structure = static_cast<int>(structure);
  a.mode = static_cast<int>(mode);
  const int is = resolve_isa(isa);

  const int64_t tile = tile_tokens(a, is, max_tile);
  const int64_t ntiles = (T + tile - 1) / tile;
  int64_t nthreads = static_cast<int64_t>(torch::stable::get_num_threads());
  if (max_threads > 0) nthreads = std::min(nthreads, max_threads);

  // Work items: (token tile, chunk of output rows). Few tiles (e.g. 128 tokens on 2 threads)
  // are split by rows too, chunks balanced by entries and aligned to 8 rows (the write-back
  // transposes 8 rows at a time). Items are tile-major so a thread packs each tile once.
  // Entries per row over all panels, cumulated (the row pointers themselves for one panel).
  std::vector<int32_t> cum;
  const int32_t* rp = a.row_ptr;
  if (a.npanels > 1) {
    cum.assign(out_features + 1, 0);
    for (int64_t q = 0; q < a.npanels; ++q) {
      const int32_t* r = a.row_ptr + q * (out_features + 1);
      for (int64_t o = 0; o < out_features; ++o) cum[o + 1] += r[o + 1] - r[o];
    }
    for (int64_t o = 0; o < out_features; ++o) cum[o + 1] += cum[o];
    rp = cum.data();
  }
  int64_t nchunks = 1;
  if (nthreads > 1)
    nchunks = std::min<int64_t>((4 * nthreads + ntiles - 1) / ntiles, (out_features + 7) / 8);
  const std::vector<int64_t> bounds = balanced_rows(rp, out_features, nchunks);
  std::vector<Item> items;
  double sum = 0;
  for (int64_t t = 0; t < ntiles; ++t) {
    const double nt = static_cast<double>(std::min(tile, T - t * tile));
    for (size_t c = 0; c + 1 < bounds.size(); ++c) {
      // Entries dominate; each row also costs its write-back.
      const double e = rp[bounds[c + 1]] - rp[bounds[c]] + 0.25 * (bounds[c + 1] - bounds[c]);
      items.push_back({t, bounds[c], bounds[c + 1], e * nt});
      sum += e * nt;
    }
  }
  // Contiguous runs of items per thread, split at equal shares of the estimated cost.
  std::vector<size_t> first(nthreads + 1, items.size());
  first[0] = 0;
  {
    double acc = 0;
    int64_t th = 1;
    for (size_t i = 0; i < items.size() && th < nthreads; ++i) {
      while (th < nthreads && acc + items[i].cost / 2 >= sum * th / nthreads) first[th++] = i;
      acc += items[i].cost;
    }
  }
  const size_t sbytes = scratch_bytes(a);
  auto work = [&](int64_t th) {
    void* scratch = tls_scratch.get(sbytes);
    int64_t packed = -1;
    for (size_t i = first[th]; i < first[th + 1]; ++i) {
      const Item& it = items[i];
      const int64_t t0 = it.tile * tile;
      run_tile(a, is, t0, std::min(tile, T - t0), it.r0, it.r1, scratch, packed != it.tile);
      packed = it.tile;
    }
  };
  if (nthreads == 1) {
    work(0);
  } else {
    torch::stable::parallel_for(0, nthreads, 1, [&](int64_t b, int64_t e) {
      for (int64_t th = b; th < e; ++th) work(th);
    });
  }
}

// dW sampled at the kept entries: g[e] = sum_t dy[t, row(e)] * x[t, col[e]].
void sddmm(const Tensor& x, const Tensor& dy, const Tensor& row_ptr, const Tensor& col, int64_t isa,
           int64_t max_threads, const Tensor& g) {
  STD_TORCH_CHECK(
      x.dim() == 2 && x.scalar_type() == ScalarType::Float && x.is_contiguous() && x.is_cpu(),
      "recipec kernels: x must be a contiguous 2-D float32 CPU tensor");
  STD_TORCH_CHECK(dy.dim() == 2 && dy.scalar_type() == ScalarType::Float && dy.is_contiguous() &&
                      dy.size(0) == x.size(0),
                  "recipec kernels: dy must be contiguous float32 [tokens, out]");
  const int64_t out = dy.size(1);
  STD_TORCH_CHECK(row_ptr.scalar_type() == ScalarType::Int && row_ptr.is_contiguous() &&
                      row_ptr.numel() == out + 1,
                  "recipec kernels: row_ptr must be int32 [out + 1]");
  STD_TORCH_CHECK(
      (col.scalar_type() == ScalarType::Short || col.scalar_type() == ScalarType::Int) &&
          col.is_contiguous(),
      "recipec kernels: col must be contiguous int16/int32");
  const int32_t* rp = static_cast<const int32_t*>(row_ptr.data_ptr());
  STD_TORCH_CHECK(g.dim() == 1 && g.numel() == rp[out] && g.scalar_type() == ScalarType::Float &&
                      g.is_contiguous(),
                  "recipec kernels: g must be contiguous float32 [nnz]");
  SddmmArgs a;
  a.x = static_cast<const float*>(x.data_ptr());
  a.dy = static_cast<const float*>(dy.data_ptr());
  a.g = static_cast<float*>(g.data_ptr());
  a.tokens = x.size(0);
  a.in = x.size(1);
  a.out = out;
  a.row_ptr = rp;
  a.col = col.data_ptr();
  a.col16 = col.scalar_type() == ScalarType::Short;
  const int is = resolve_isa(isa);
  int64_t nthreads = static_cast<int64_t>(torch::stable::get_num_threads());
  if (max_threads > 0) nthreads = std::min(nthreads, max_threads);
  const std::vector<int64_t> bounds = balanced_rows(rp, out, nthreads);
  const int64_t nchunks = static_cast<int64_t>(bounds.size()) - 1;
  auto work = [&](int64_t c) {
    const int64_t r0 = bounds[c], r1 = bounds[c + 1];
    sddmm_rows(a, is, r0, r1, tls_scratch.get(sddmm_scratch_bytes(a, r1 - r0)));
  };
  if (nchunks <= 1) {
    if (nchunks == 1) work(0);
  } else {
    torch::stable::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) work(c);
    });
  }
}

// Takes a (CPU) tensor only so the dispatcher can route it.
bool has_avx2(Tensor) { return cpu_has_avx2_fma(); }

}  // namespace
}  // namespace recipec

STABLE_TORCH_LIBRARY(recipec_kernels, m) {
  m.def(
      "linear(Tensor x, Tensor row_ptr, Tensor col, Tensor values, Tensor? wscale, Tensor? bias, "
      "int out_features, int in_features, int structure, int mode, int isa, int max_tile, "
      "int max_threads, Tensor(a!) y) -> ()");
  m.def(
      "sddmm(Tensor x, Tensor dy, Tensor row_ptr, Tensor col, int isa, int max_threads, "
      "Tensor(a!) g) -> ()");
  m.def("has_avx2(Tensor any) -> bool");
}

STABLE_TORCH_LIBRARY_IMPL(recipec_kernels, CPU, m) {
  m.impl("linear", TORCH_BOX(&recipec::linear));
  m.impl("sddmm", TORCH_BOX(&recipec::sddmm));
  m.impl("has_avx2", TORCH_BOX(&recipec::has_avx2));
}
