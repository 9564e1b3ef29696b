// The GPU forward pass's dense layers (core/detail/cuda_forward_impl.h: Dense): uploaded as bf16,
// or as FP8 codes with their 128x128 block scales where the checkpoint (or --quantization fp8)
// has FP8 and this rank's share takes whole scale blocks; multiplied by linear().
#include "core/detail/cuda_forward_impl.h"

namespace moemesh::detail {
namespace {

// FP8 dense products of up to this many rows run cu::fp8_gemv; more rows take the bf16 copy and
// cuBLAS. On an H200 (cuda_gemm_bench's fp8_dense lines, docs/gpu.md) the GEMV took 0.6-0.7x of
// bf16 cuBLAS's time at one row and beat the copy up to 4 rows on DeepSeek-V3's projections; from
// 8 rows the copy was as fast or faster.
constexpr int64_t kFp8GemvUpToRows = 4;
static_assert(kFp8GemvUpToRows <= cu::kFp8GemvMaxRows, "one fp8_gemv call takes them");

}  // namespace

Status CudaForward::Impl::upload_dense_fp8(Dense& d, const Fp8Matrix& m) {
  d.rows = m.rows;
  d.cols = m.cols;
  d.fp8 = true;
  ++fp8_dense;
  if (Status s = upload(d.w, m.codes.data(), m.codes.size()); !s) return s;
  if (Status s = upload(d.scale, m.scales.data(), m.scales.size() * sizeof(float)); !s) return s;
  // The copies read the host vectors on the stream: finish them before the caller frees them.
  return from(cu::synchronize(stream, "uploading weights"));
}

Status CudaForward::Impl::upload_dense(Dense& d, const kernels::WeightView& w, Split split, int r,
                                       int rs) {
  if (split == Split::Rows) {
    const int64_t n = w.rows / rs;
    if (dense_fp8_rows(w, r * n, n)) return upload_dense_fp8(d, rows_fp8(w, r * n, n));
    return upload_dense_bf16(d, shard_bf16(w, split, r, rs), n, w.cols);
  }
  const int64_t n = w.cols / rs;
  if (dense_fp8_cols(w, r * n, n)) return upload_dense_fp8(d, cols_fp8(w, r * n, n));
  return upload_dense_bf16(d, shard_bf16(w, split, r, rs), w.rows, n);
}

Status CudaForward::Impl::upload_ffn(Ffn& f, const kernels::FfnWeights& w) {
  const int64_t inter = w.gate.rows / ranks;
  f.inter = inter;
  // gate and up fused into one matrix: FP8 when each share is whole blocks (then the up rows
  // start on a block of their own).
  if (inter % kernels::kFp8Block == 0 && dense_fp8_rows(w.gate, rank * inter, inter) &&
      dense_fp8_rows(w.up, rank * inter, inter)) {
    Fp8Matrix fused = rows_fp8(w.gate, rank * inter, inter);
    const Fp8Matrix up = rows_fp8(w.up, rank * inter, inter);
    fused.codes.insert(fused.codes.end(), up.codes.begin(), up.codes.end());
    fused.scales.insert(fused.scales.end(), up.scales.begin(), up.scales.end());
    fused.rows += up.rows;
    if (Status s = upload_dense_fp8(f.gate_up, fused); !s) return s;
  } else if (Status s =
                 upload_dense_bf16(f.gate_up, gate_up_rows(w, rank, ranks), 2 * inter, w.gate.cols);
             !s) {
    return s;
  }
  return upload_dense(f.down, w.down, Split::Cols);
}

Status CudaForward::Impl::linear(const Dense& d, const uint16_t* in, float* out, int64_t m) {
  if (m <= 0) return {};
  if (!d.fp8) return from(blas->gemm(in, d.w.as<uint16_t>(), out, m, d.rows, d.cols));
  const auto* codes = d.w.as<uint8_t>();
  const float* scale = d.scale.as<float>();
  if (m <= kFp8GemvUpToRows && d.cols % 16 == 0)
    return from(cu::fp8_gemv(in, codes, scale, m, d.rows, d.cols, out, stream));
  // More rows: a bf16 copy of the weights and cuBLAS (5 bytes moved a weight, against 2 for bf16
  // weights, until the product is bound by compute). The FP8 tile kernel of the grouped GEMM
  // reads the codes once, but with a tile of 64 features a block it runs few blocks on narrow
  // layers; cuda_gemm_bench times all three.
  if (Status s = ensure(dense_bf16, static_cast<std::size_t>(d.rows * d.cols) * 2); !s) return s;
  cu::fp8_dequantize_bf16(codes, scale, d.rows, d.cols, dense_bf16.as<uint16_t>(), stream);
  return from(blas->gemm(in, dense_bf16.as<uint16_t>(), out, m, d.rows, d.cols));
}

}  // namespace moemesh::detail
