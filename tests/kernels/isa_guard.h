// Helpers of the tests of ISA-specific kernels: the ISAs this machine runs, a guard that restores
// the active ISA after a test forced another, and the batch-invariance check of linear().
#pragma once

#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"

namespace moemesh::test {

// Restores the ISA active before the test, whatever the test forced.
class IsaGuard {
 public:
  IsaGuard() : saved_(kernels::active_isa()) {}
  ~IsaGuard() { kernels::force_isa(saved_); }
  IsaGuard(const IsaGuard&) = delete;
  IsaGuard& operator=(const IsaGuard&) = delete;

 private:
  kernels::Isa saved_;
};

inline std::vector<kernels::Isa> supported_isas() {
  std::vector<kernels::Isa> out;
  for (kernels::Isa isa :
       {kernels::Isa::Baseline, kernels::Isa::Avx2, kernels::Isa::Avx512, kernels::Isa::Amx})
    if (isa <= kernels::detected_isa()) out.push_back(isa);
  return out;
}

// The ISAs with bf16 / int8 activations (Avx512Bf16, Amx) this machine runs.
inline std::vector<kernels::Isa> reduced_precision_isas() {
  std::vector<kernels::Isa> out;
  for (kernels::Isa isa : {kernels::Isa::Avx512Bf16, kernels::Isa::Amx})
    if (isa <= kernels::detected_isa()) out.push_back(isa);
  return out;
}

// Batch invariance of linear(): for each {n, first} of `batches`, the outputs of tokens
// x[first, first + n) computed in one call (on `pool`) are the same bits as each token computed
// alone (single-threaded). x holds `tokens` rows of w.cols values; `label` names the case.
inline void expect_batches_match_alone(const kernels::WeightView& w, const float* bias,
                                       const std::vector<float>& x, int64_t tokens,
                                       const std::vector<std::pair<int64_t, int64_t>>& batches,
                                       kernels::ThreadPool* pool, const std::string& label) {
  const int64_t rows = w.rows, cols = w.cols;
  std::vector<float> alone(static_cast<std::size_t>(tokens * rows));
  for (int64_t t = 0; t < tokens; ++t)
    kernels::linear(x.data() + t * cols, 1, w, bias, alone.data() + t * rows, nullptr);
  for (const auto& [n, first] : batches) {
    std::vector<float> y(static_cast<std::size_t>(n * rows));
    kernels::linear(x.data() + first * cols, n, w, bias, y.data(), pool);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t r = 0; r < rows; ++r)
        ASSERT_EQ(std::bit_cast<uint32_t>(y[t * rows + r]),
                  std::bit_cast<uint32_t>(alone[(first + t) * rows + r]))
            << label << " n=" << n << " first=" << first << " t=" << t << " r=" << r;
  }
}

}  // namespace moemesh::test
