// The MoE router: softmax or sigmoid scores, a choice bias, group-limited top-k selection
// (kernels/cpu grouped_topk.cpp).
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/detail/common.cuh"

namespace moemesh::kernels::cuda {
namespace {

constexpr int kMaxExperts = 512;
constexpr int kMaxTopK = 32;  // one lane per chosen expert
constexpr int kWarps = 4;     // tokens per block, one warp each
constexpr int64_t kMaxBlocks = 65535;

// A candidate as one integer whose maximum is the next pick: competing (in a kept group) first,
// then the larger biased score, then the lower id. 0 marks an expert already picked.
__device__ __forceinline__ uint64_t expert_rank(bool competing, uint32_t key, int e) {
  return (competing ? (uint64_t{1} << 48) : 0) | (static_cast<uint64_t>(key) << 16) |
         static_cast<uint64_t>(0xffff - e);
}
__device__ __forceinline__ int rank_id(uint64_t r) {
  return 0xffff - static_cast<int>(r & 0xffff);
}

__device__ __forceinline__ uint64_t warp_max_u64(uint64_t v) {
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// One warp per token. Expert e belongs to lane e % 32, which alone writes its rank; the warp
// picks top_k times the largest rank, and only the owner of the pick rescans its experts.
__global__ void __launch_bounds__(kWarps * 32)
    route_kernel(const float* __restrict__ logits, const float* __restrict__ bias, int64_t n,
                 int n_experts, int top_k, bool sigmoid, bool renormalize, float scaling,
                 int n_groups, int topk_groups, bool top2_sum, int32_t* __restrict__ ids,
                 float* __restrict__ weights) {
  __shared__ float s_score[kWarps][kMaxExperts];
  __shared__ uint64_t s_rank[kWarps][kMaxExperts];
  __shared__ uint64_t s_group[kWarps][kMaxExperts];  // a group's rank; 0 once kept
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  float* score = s_score[warp];
  uint64_t* rank = s_rank[warp];
  uint64_t* group = s_group[warp];
  const bool grouped = n_groups > 1 && topk_groups < n_groups;
  const int group_size = grouped ? n_experts / n_groups : n_experts;

  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp; t < n;
       t += static_cast<int64_t>(gridDim.x) * kWarps) {
    const float* l = logits + t * n_experts;
    __syncwarp();  // the previous token's reads of score and rank are done
    if (sigmoid) {
      for (int e = lane; e < n_experts; e += 32) score[e] = 1.0f / (1.0f + expf(-l[e]));
    } else {
      float mx = -__int_as_float(0x7f800000);
      for (int e = lane; e < n_experts; e += 32) mx = fmaxf(mx, l[e]);
      mx = detail::warp_max(mx);
      float sum = 0.0f;
      for (int e = lane; e < n_experts; e += 32) {
        const float p = expf(l[e] - mx);
        score[e] = p;
        sum += p;
      }
      sum = detail::warp_sum(sum);
      for (int e = lane; e < n_experts; e += 32) score[e] /= sum;
    }
    for (int e = lane; e < n_experts; e += 32) {
      const float choice = bias ? score[e] + bias[e] : score[e];
      rank[e] = expert_rank(true, detail::float_order_key(choice), e);
    }

    if (grouped) {
      __syncwarp();  // every rank written before groups read them
      for (int g = lane; g < n_groups; g += 32) {
        float first = -__int_as_float(0x7f800000);
        float second = first;
        for (int e = g * group_size; e < (g + 1) * group_size; ++e) {
          const float c = detail::order_key_float(static_cast<uint32_t>(rank[e] >> 16));
          if (c > first) {
            second = first;
            first = c;
          } else if (c > second) {
            second = c;
          }
        }
        const float r = top2_sum && group_size > 1 ? first + second : first;
        group[g] = (static_cast<uint64_t>(detail::float_order_key(r)) << 16) |
                   static_cast<uint64_t>(0xffff - g);
      }
      for (int k = 0; k < topk_groups; ++k) {
        __syncwarp();
        uint64_t best = 0;
        for (int g = lane; g < n_groups; g += 32) best = group[g] > best ? group[g] : best;
        best = warp_max_u64(best);
        const int g = rank_id(best);
        if (lane == g % 32) group[g] = 0;
      }
      __syncwarp();
      for (int e = lane; e < n_experts; e += 32)
        if (group[e / group_size] != 0) rank[e] &= ~(uint64_t{1} << 48);
    }

    uint64_t mine = 0;  // this lane's best remaining expert
    for (int e = lane; e < n_experts; e += 32) mine = rank[e] > mine ? rank[e] : mine;
    int my_pick = 0;  // lane j holds the id of the j-th pick
    for (int k = 0; k < top_k; ++k) {
      const uint64_t best = warp_max_u64(mine);
      const int e = rank_id(best);
      if (lane == k) my_pick = e;
      if (lane == e % 32) {
        rank[e] = 0;
        mine = 0;
        for (int i = lane; i < n_experts; i += 32) mine = rank[i] > mine ? rank[i] : mine;
      }
    }

    // The CPU's sum order: pick 0, 1, ...
    __syncwarp();  // scores written by other lanes are visible
    const float w = lane < top_k ? score[my_pick] : 0.0f;
    float kept = 0.0f;
    for (int k = 0; k < top_k; ++k) kept += __shfl_sync(0xffffffffu, w, k);
    if (lane < top_k) {
      ids[t * top_k + lane] = my_pick;
      weights[t * top_k + lane] = (renormalize ? w / kept : w) * scaling;
    }
  }
}

// One thread per row of k weights (grid-stride over the rows).
__global__ void p_norm_kernel(float* __restrict__ w, int64_t n, int k, double p) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float* row = w + t * k;
    double acc = 0;
    for (int j = 0; j < k; ++j) {
      const double a = fabs(static_cast<double>(row[j]));
      acc += p == 1.0 ? a : p == 2.0 ? a * a : pow(a, p);
    }
    const double norm = p == 1.0 ? acc : p == 2.0 ? sqrt(acc) : pow(acc, 1.0 / p);
    const auto d = static_cast<float>(norm);
    for (int j = 0; j < k; ++j) row[j] = row[j] / d;
  }
}

}  // namespace

void divide_by_p_norm(float* weights, int64_t n, int64_t k, double p, Stream stream) {
  if (n <= 0) return;
  constexpr int kThreads = 128;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  // As route_topk: an empty grid fails the launch for rows wider than any router's top k.
  const unsigned grid = k >= 1 && k <= kMaxTopK
                            ? static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks)
                            : 0u;
  p_norm_kernel<<<grid, kThreads, 0, stream>>>(weights, n, static_cast<int>(k), p);
}

void route_topk(const float* logits, const float* bias, int64_t n, const RouterSpec& spec,
                int32_t* ids, float* weights, Stream stream) {
  if (n <= 0) return;
  const bool grouped = spec.n_groups > 1 && spec.topk_groups < spec.n_groups;
  const bool supported = spec.n_experts >= 1 && spec.n_experts <= kMaxExperts && spec.top_k >= 1 &&
                         spec.top_k <= kMaxTopK && spec.top_k <= spec.n_experts &&
                         (!grouped || spec.n_experts % spec.n_groups == 0);
  const int64_t blocks = (n + kWarps - 1) / kWarps;
  // An empty grid makes the launch fail, so that check() reports a router this kernel cannot
  // run instead of leaving ids unwritten.
  const unsigned grid =
      supported ? static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks) : 0u;
  route_kernel<<<grid, kWarps * 32, 0, stream>>>(
      logits, bias, n, static_cast<int>(spec.n_experts), static_cast<int>(spec.top_k),
      spec.scoring == Scoring::Sigmoid, spec.renormalize, spec.scaling,
      static_cast<int>(spec.n_groups),
      static_cast<int>(spec.topk_groups < 0 ? 0 : spec.topk_groups),
      spec.group_score == GroupScore::Top2Sum, ids, weights);
}

}  // namespace moemesh::kernels::cuda
