// Internal: the ExpertBackend over a model's own expert weights, and the one that stands in for it
// when the model was loaded without its routed experts.
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

// The local backend of a model loaded with ModelOptions::routed_experts = false: every call fails
// with kNoRoutedExperts, so forward() without an expert backend set reports it instead of crashing.
class NoLocalExperts final : public ExpertBackend {
 public:
  static constexpr const char* kNoRoutedExperts =
      "this model was loaded without its routed experts (an attention worker): set an expert "
      "backend with Model::set_expert_backend";

  Status compute(int64_t, const float*, int64_t, const int32_t*, const float*, int64_t,
                 float*) override {
    return Error(kNoRoutedExperts);
  }
  Status start(int64_t, const float*, int64_t, const int32_t*, const float*, int64_t,
               float*) override {
    return Error(kNoRoutedExperts);
  }
  Status finish() override { return Error(kNoRoutedExperts); }
};

}  // namespace moemesh::detail
