// Token permutation by expert for the grouped expert GEMM: moe_align (a counting sort of the
// routing slots), moe_gather (rows into expert order) and moe_combine (weighted rows back).
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/detail/common.cuh"

namespace moemesh::kernels::cuda {
namespace {

constexpr int kMaxExperts = 1024;
constexpr int kAlignThreads = 256;
constexpr int kAlignItems = 8;  // slots per thread per chunk
constexpr int kChunk = kAlignThreads * kAlignItems;
constexpr int64_t kMaxBlocks = 65535;

unsigned capped(int64_t blocks) {
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < kMaxBlocks ? blocks : kMaxBlocks));
}

// counts[e] += slots of expert e, through a block-private histogram (counts zeroed before).
// Out-of-range ids are not counted.
__global__ void __launch_bounds__(kAlignThreads)
    count_kernel(const int32_t* __restrict__ ids, int64_t n_slots, int n_experts,
                 int32_t* __restrict__ counts) {
  __shared__ int hist[kMaxExperts];
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < n_slots;
       s += stride) {
    const int32_t e = ids[s];
    if (e >= 0 && e < n_experts) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x)
    if (hist[e] != 0) atomicAdd(&counts[e], hist[e]);
}

// offsets = the exclusive prefix sum of counts, plus the total: one block of kMaxExperts threads,
// thread e owning expert e.
__global__ void __launch_bounds__(kMaxExperts)
    scan_kernel(const int32_t* __restrict__ counts, int n_experts, int32_t* __restrict__ offsets) {
  __shared__ int warp_total[kMaxExperts / 32];
  const int e = threadIdx.x;
  const int lane = e & 31;
  const int warp = e >> 5;
  const int v = e < n_experts ? counts[e] : 0;
  int incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += up;
  }
  if (lane == 31) warp_total[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int t = warp_total[lane];
    for (int o = 1; o < 32; o <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += up;
    }
    warp_total[lane] = t;  // inclusive over warps
  }
  __syncthreads();
  if (warp > 0) incl += warp_total[warp - 1];
  if (e < n_experts) offsets[e] = incl - v;
  if (e == n_experts - 1) offsets[n_experts] = incl;
}

// Places each slot: a chunk's slots take ranks within their expert from a block-local count,
// then one global atomic per (chunk, expert) on offsets[e], used as a cursor, reserves their
// rows. Afterwards offsets[e] has moved on by counts[e]; fix_offsets_kernel moves it back.
__global__ void __launch_bounds__(kAlignThreads)
    place_kernel(const int32_t* __restrict__ ids, int64_t n_slots, int n_experts,
                 int32_t* __restrict__ cursor, int32_t* __restrict__ row_of_slot,
                 int32_t* __restrict__ slot_of_row) {
  __shared__ int count[kMaxExperts];
  __shared__ int base[kMaxExperts];
  for (int64_t chunk = static_cast<int64_t>(blockIdx.x) * kChunk; chunk < n_slots;
       chunk += static_cast<int64_t>(gridDim.x) * kChunk) {
    for (int e = threadIdx.x; e < n_experts; e += blockDim.x) count[e] = 0;
    __syncthreads();
    int expert[kAlignItems];
    int rank[kAlignItems];
#pragma unroll
    for (int i = 0; i < kAlignItems; ++i) {
      const int64_t s = chunk + i * kAlignThreads + threadIdx.x;
      expert[i] = -1;
      if (s < n_slots) {
        const int32_t e = ids[s];
        if (e >= 0 && e < n_experts) {
          expert[i] = e;
          rank[i] = atomicAdd(&count[e], 1);
        } else {
          row_of_slot[s] = -1;
        }
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < n_experts; e += blockDim.x)
      if (count[e] != 0) base[e] = atomicAdd(&cursor[e], count[e]);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kAlignItems; ++i) {
      if (expert[i] < 0) continue;
      const int64_t s = chunk + i * kAlignThreads + threadIdx.x;
      const int row = base[expert[i]] + rank[i];
      row_of_slot[s] = row;
      slot_of_row[row] = static_cast<int32_t>(s);
    }
    __syncthreads();  // base and count are reused by the next chunk
  }
}

__global__ void fix_offsets_kernel(const int32_t* __restrict__ counts, int n_experts,
                                   int32_t* __restrict__ offsets) {
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x) offsets[e] -= counts[e];
}

// One block per row (grid-stride over rows). kVec8: 16-byte copies (hidden % 8 == 0, both arrays
// 16-byte aligned).
template <bool kVec8>
__global__ void gather_kernel(const uint16_t* __restrict__ x,
                              const int32_t* __restrict__ slot_of_row, int64_t n_rows,
                              int64_t top_k, int64_t hidden, uint16_t* __restrict__ out) {
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const int64_t token = slot_of_row[r] / top_k;
    const uint16_t* src = x + token * hidden;
    uint16_t* dst = out + r * hidden;
    if constexpr (kVec8) {
      const auto* s8 = reinterpret_cast<const uint4*>(src);
      auto* d8 = reinterpret_cast<uint4*>(dst);
      for (int64_t i = threadIdx.x; i < hidden / 8; i += blockDim.x) d8[i] = s8[i];
    } else {
      for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
    }
  }
}

// One block per token (grid-stride over tokens). The sum runs over j in order, each term rounded
// as the CPU rounds `o += g * y` (no FMA contraction), so that the result is deterministic and
// the CPU's when the orders agree. kVec4: hidden % 4 == 0, y and out 16-byte aligned.
template <bool kVec4>
__global__ void combine_kernel(const float* __restrict__ y, const int32_t* __restrict__ row_of_slot,
                               const float* __restrict__ weights, int64_t n_tokens, int64_t top_k,
                               int64_t hidden, bool accumulate, float* __restrict__ out) {
  for (int64_t t = blockIdx.x; t < n_tokens; t += gridDim.x) {
    float* o = out + t * hidden;
    if constexpr (kVec4) {
      auto* o4 = reinterpret_cast<float4*>(o);
      for (int64_t i = threadIdx.x; i < hidden / 4; i += blockDim.x) {
        float4 acc = accumulate ? o4[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int64_t j = 0; j < top_k; ++j) {
          const float g = weights[t * top_k + j];
          const float4 v =
              reinterpret_cast<const float4*>(y + row_of_slot[t * top_k + j] * hidden)[i];
          acc.x = __fadd_rn(acc.x, __fmul_rn(g, v.x));
          acc.y = __fadd_rn(acc.y, __fmul_rn(g, v.y));
          acc.z = __fadd_rn(acc.z, __fmul_rn(g, v.z));
          acc.w = __fadd_rn(acc.w, __fmul_rn(g, v.w));
        }
        o4[i] = acc;
      }
    } else {
      for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
        float acc = accumulate ? o[i] : 0.0f;
        for (int64_t j = 0; j < top_k; ++j) {
          const float g = weights[t * top_k + j];
          acc = __fadd_rn(acc, __fmul_rn(g, y[row_of_slot[t * top_k + j] * hidden + i]));
        }
        o[i] = acc;
      }
    }
  }
}

// One block per output row (grid-stride), threads over hidden.
__global__ void combine_rows_kernel(const float* __restrict__ y,
                                    const int64_t* __restrict__ offsets,
                                    const int32_t* __restrict__ rows,
                                    const float* __restrict__ weights, int64_t n_out,
                                    int64_t hidden, float* __restrict__ out,
                                    uint16_t* __restrict__ out_bf16) {
  for (int64_t o = blockIdx.x; o < n_out; o += gridDim.x) {
    const int64_t begin = offsets[o], end = offsets[o + 1];
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
      float acc = 0.0f;
      for (int64_t j = begin; j < end; ++j)
        acc = __fadd_rn(acc, __fmul_rn(weights[j], y[static_cast<int64_t>(rows[j]) * hidden + i]));
      if (out_bf16)
        out_bf16[o * hidden + i] = detail::f32_to_bf16_bits(acc);
      else
        out[o * hidden + i] = acc;
    }
  }
}

bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

int threads_for(int64_t items) {
  return items >= 256 ? 256 : static_cast<int>((items + 31) / 32 * 32);
}

}  // namespace

void moe_align(const int32_t* ids, int64_t n_slots, int64_t n_experts, int32_t* counts,
               int32_t* offsets, int32_t* row_of_slot, int32_t* slot_of_row, Stream stream) {
  if (n_experts < 1 || n_experts > kMaxExperts || n_slots < 0) {
    // An empty grid makes the launch fail, so that check() reports it.
    scan_kernel<<<0, kMaxExperts, 0, stream>>>(counts, 0, offsets);
    return;
  }
  const int e = static_cast<int>(n_experts);
  cudaMemsetAsync(counts, 0, static_cast<std::size_t>(e) * sizeof(int32_t), stream);
  const unsigned blocks = capped((n_slots + kChunk - 1) / kChunk);
  count_kernel<<<blocks, kAlignThreads, 0, stream>>>(ids, n_slots, e, counts);
  scan_kernel<<<1, kMaxExperts, 0, stream>>>(counts, e, offsets);
  if (n_slots > 0)
    place_kernel<<<blocks, kAlignThreads, 0, stream>>>(ids, n_slots, e, offsets, row_of_slot,
                                                       slot_of_row);
  fix_offsets_kernel<<<1, kMaxExperts, 0, stream>>>(counts, e, offsets);
}

void moe_gather(const uint16_t* x, const int32_t* slot_of_row, int64_t n_rows, int64_t top_k,
                int64_t hidden, uint16_t* out, Stream stream) {
  if (n_rows <= 0 || hidden <= 0) return;
  const bool vec8 = hidden % 8 == 0 && aligned16(x) && aligned16(out);
  const int threads = threads_for(vec8 ? hidden / 8 : hidden);
  if (vec8)
    gather_kernel<true>
        <<<capped(n_rows), threads, 0, stream>>>(x, slot_of_row, n_rows, top_k, hidden, out);
  else
    gather_kernel<false>
        <<<capped(n_rows), threads, 0, stream>>>(x, slot_of_row, n_rows, top_k, hidden, out);
}

void moe_combine(const float* y, const int32_t* row_of_slot, const float* weights, int64_t n_tokens,
                 int64_t top_k, int64_t hidden, bool accumulate, float* out, Stream stream) {
  if (n_tokens <= 0 || hidden <= 0) return;
  const bool vec4 = hidden % 4 == 0 && aligned16(y) && aligned16(out);
  const int threads = threads_for(vec4 ? hidden / 4 : hidden);
  if (vec4)
    combine_kernel<true><<<capped(n_tokens), threads, 0, stream>>>(
        y, row_of_slot, weights, n_tokens, top_k, hidden, accumulate, out);
  else
    combine_kernel<false><<<capped(n_tokens), threads, 0, stream>>>(
        y, row_of_slot, weights, n_tokens, top_k, hidden, accumulate, out);
}

void combine_rows(const float* y, const int64_t* offsets, const int32_t* rows, const float* weights,
                  int64_t n_out, int64_t hidden, float* out, uint16_t* out_bf16, Stream stream) {
  if (n_out <= 0 || hidden <= 0) return;
  if ((out == nullptr) == (out_bf16 == nullptr)) {
    scan_kernel<<<0, kMaxExperts, 0, stream>>>(nullptr, 0, nullptr);  // check() reports it
    return;
  }
  combine_rows_kernel<<<capped(n_out), threads_for(hidden), 0, stream>>>(
      y, offsets, rows, weights, n_out, hidden, out, out_bf16);
}

}  // namespace moemesh::kernels::cuda
