// Internal: the ExpertBackend over a model's own expert weights.
#pragma once

#include <vector>

#include "core/detail/weights.h"
#include "core/model.h"

namespace moemesh::detail {

// Groups the batch's tokens by expert and runs each expert once over its tokens, in increasing
// expert order. Owned and called by the model's thread; parallel inside each expert's matmuls.
class LocalExperts final : public ExpertBackend {
 public:
  LocalExperts(const ModelWeights& weights, int64_t hidden, kernels::ThreadPool* pool)
      : weights_(weights), hidden_(hidden), pool_(pool) {}

  Status compute(int64_t layer, const float* x, int64_t n, const int32_t* ids, const float* weights,
                 int64_t top_k, float* out) override;

 private:
  const ModelWeights& weights_;
  int64_t hidden_;
  kernels::ThreadPool* pool_;
  // Scratch, reused across calls.
  std::vector<int64_t> rows_;
  std::vector<float> gathered_, scratch_, result_;
};

}  // namespace moemesh::detail
