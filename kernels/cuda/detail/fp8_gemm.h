// Internal: the host side of this library's WMMA grouped GEMM kernel, for FP8 weights (weight-only,
// 128x128 block scales) or BF16 weights, and of the grouped FP8 GEMV for few rows per group.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_kernels.h"

namespace moemesh::kernels::cuda::detail {

// Up to `rows` rows of one group: what a grouped kernel's block reads from the launch's tile list.
struct RowTile {
  const uint8_t* w;
  const float* scale;
  int64_t row0;  // first row of x and y
  int32_t rows;
  int32_t pad;
};

// Every non-empty group cut into tiles of at most `per_tile` rows, uploaded on `stream` into
// `args` (grown as needed; `host` is the pageable staging copy, reused). The list is empty when
// every group is; else "" or an error naming `what`.
std::string upload_row_tiles(const std::vector<GroupWeight>& weights,
                             const std::vector<int64_t>& rows, const std::vector<int64_t>& offsets,
                             int64_t per_tile, DeviceBuffer& args, std::vector<char>& host,
                             Stream stream, const char* what, std::vector<RowTile>* tiles);

// y rows of each non-empty group = x rows * w_g^T (dequantised when fp8). n % 64 == 0 and
// k % 32 == 0. `args` and `host` are the caller's reusable scratch for the launch's tile list.
std::string wmma_grouped_gemm(bool fp8, const uint16_t* x, const std::vector<GroupWeight>& weights,
                              const std::vector<int64_t>& rows, const std::vector<int64_t>& offsets,
                              int64_t n, int64_t k, float* y, DeviceBuffer& args,
                              std::vector<char>& host, Stream stream);

// The same product for groups of few rows (decode): fp8_gemv's kernel over tiles of up to
// kFp8GemvMaxRows rows of one group, each reading its group's codes once (fp8_linear.cu). Takes
// what fp8_gemv_fits accepts, else an error.
bool fp8_gemv_fits(const uint16_t* x, const std::vector<GroupWeight>& weights,
                   const std::vector<int64_t>& rows, int64_t k);
std::string fp8_grouped_gemv(const uint16_t* x, const std::vector<GroupWeight>& weights,
                             const std::vector<int64_t>& rows, const std::vector<int64_t>& offsets,
                             int64_t n, int64_t k, float* y, DeviceBuffer& args,
                             std::vector<char>& host, Stream stream);

}  // namespace moemesh::kernels::cuda::detail
