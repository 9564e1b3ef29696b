// Internal: the host side of this library's WMMA grouped GEMM kernel, for FP8 weights (weight-only,
// 128x128 block scales) or BF16 weights, and of the grouped FP8 GEMV for few rows per group.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_kernels.h"

namespace moemesh::kernels::cuda::detail {

// y rows of each non-empty group = x rows * w_g^T (dequantised when fp8). n % 64 == 0 and
// k % 32 == 0. `args` and `host` are the caller's reusable scratch for the launch's tile list.
std::string wmma_grouped_gemm(bool fp8, const uint16_t* x, const std::vector<GroupWeight>& weights,
                              const std::vector<int64_t>& rows, const std::vector<int64_t>& offsets,
                              int64_t n, int64_t k, float* y, DeviceBuffer& args,
                              std::vector<char>& host, Stream stream);

// The same product for groups of few rows (decode): fp8_gemv's kernel over tiles of up to
// kFp8GemvMaxRows rows of one group, each reading its group's codes once (fp8_linear.cu). k % 16
// == 0, x and every group's w 16-byte aligned.
std::string fp8_grouped_gemv(const uint16_t* x, const std::vector<GroupWeight>& weights,
                             const std::vector<int64_t>& rows, const std::vector<int64_t>& offsets,
                             int64_t n, int64_t k, float* y, DeviceBuffer& args,
                             std::vector<char>& host, Stream stream);

}  // namespace moemesh::kernels::cuda::detail
