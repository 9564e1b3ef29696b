// Internal: an expert shard's experts on a GPU (ExpertShardOptions::device "cuda[:N]").
//
// Each held expert is uploaded once (gate and up fused into one [2 * inter, hidden] matrix, down
// [hidden, inter]): as FP8 E4M3 with its 128x128 block scales when its weights are FP8 and its
// shapes suit the FP8 grouped GEMM (fp8_expert_refusal in tensor_parallel.h), else as bf16.
// run() copies a token batch in, computes the SwiGLU FFN (cuBLAS for bf16, the FP8 grouped GEMM
// for FP8) and the kernels of kernels/cuda, and copies the result out, through pinned buffers;
// run_layer() does the same for the token batches of several experts of a layer at once, and
// run_layer_bf16() for bf16 rows (copied up as they are: the products' operands are bf16).
//
// Threads: used by the shard's one thread at a time; every call makes its device current.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>

#include "core/error.h"
#include "core/expert_shard.h"
#include "kernels/cpu/cpu_kernels.h"

namespace moemesh::detail {

class CudaExperts {
 public:
  static Expected<std::unique_ptr<CudaExperts>> create(int device, int64_t hidden);
  ~CudaExperts();
  Status add(const ExpertRef& ref, const kernels::FfnWeights& w);
  void release(const ExpertRef& ref);
  // y[m, hidden] = down(silu(gate(x)) * up(x)) with expert `ref` (held), x and y on the host.
  Status run(const ExpertRef& ref, const float* x, int64_t m, float* y);
  // ExpertShard::run_layer (groups checked by the caller): one copy in, grouped products of every
  // group's expert (FP8 ones by the FP8 grouped GEMM, bf16 ones by the bf16 one), one copy out.
  Status run_layer(int32_t layer, std::span<const ExpertRows> groups, const float* x,
                   int64_t total_rows, float* y);
  // The same with x as bf16 bits, copied up as they are (ExpertShard::run_layer_bf16).
  Status run_layer_bf16(int32_t layer, std::span<const ExpertRows> groups, const uint16_t* x,
                        int64_t total_rows, float* y);
  // ExpertShard::run_layer_combined (arguments checked by the caller): the weighted sums are
  // added on the GPU (cu::combine_rows) and only the combined rows are copied back.
  Status run_layer_combined(int32_t layer, std::span<const ExpertRows> groups, const float* x,
                            const uint16_t* x_bf16, int64_t total_rows, const RowCombine& combine,
                            float* out, uint16_t* out_bf16);
  std::string description() const;
  int64_t fp8_experts() const;  // held experts kept in FP8

  struct Impl;

 private:
  explicit CudaExperts(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moemesh::detail
