// Paged KV cache writes and paged attention (kernels/cpu attention.cpp over a paged bf16 cache).
//
// paged_attention: one block of 128 threads per (query, kv head, group of up to 8 q heads of that
// kv head, key split). Doing the q heads of a kv head together loads each K/V row once per
// (query, kv head). A block walks its keys in chunks of kChunk, three phases per chunk:
//   1. scores: a lane group (kLanes lanes, 8 dims of the head each: one 16-byte load per key for
//      head_dim 64/128/256) takes 4 consecutive keys; the dot products are summed over the group
//      by a reduce-scatter butterfly (fewer shuffles than one butterfly per sum) into shared
//      memory.
//   2. softmax: a warp per q head takes the chunk max, rescales the running sum, exponentiates.
//   3. values: the same key-to-group mapping; each group accumulates p * v in registers. All
//      groups use the block's running max, so the final merge across groups is a plain sum.
// Scores are kept in log2 units (q is pre-scaled by scale * log2(e)) so exp is a single exp2.
// Prefill runs the same kernel: every query's blocks read the keys that query sees (mostly from L2)
// and the arithmetic is on CUDA cores, so long prefill chunks are compute-bound here.
//
// Decode with few (query, kv head) pairs would leave most SMs idle, so when the blocks number fewer
// than 4 per SM the key range is split over several blocks (flash-decoding), at least
// kMinSplitKeys keys each: each writes an unnormalised partial (max, sum, acc) to a static device
// scratch and a second kernel merges them. The contract has no workspace argument, hence the
// static scratch; it has kScratchSlots areas handed out to the first streams that use them (work on
// one stream never overlaps, so a stream owns its area). The bound per area: rows * splits <=
// kSlotRows and rows * splits * head_dim <= kSlotFloats (rows = n_q * n_heads), splits <=
// kMaxSplits; beyond it, or on a stream without an area, every block takes a whole key range.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <mutex>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/detail/common.cuh"

namespace moemesh::kernels::cuda {
namespace {

// ---- paged_kv_write ----------------------------------------------------------------------------

constexpr int kWriteThreads = 128;

__device__ __forceinline__ uint2 pack_bf16x4(float4 a) {
  return make_uint2(static_cast<uint32_t>(detail::f32_to_bf16_bits(a.x)) |
                        static_cast<uint32_t>(detail::f32_to_bf16_bits(a.y)) << 16,
                    static_cast<uint32_t>(detail::f32_to_bf16_bits(a.z)) |
                        static_cast<uint32_t>(detail::f32_to_bf16_bits(a.w)) << 16);
}

// One block per token; rows of row4 float4s. Negative slots (padding tokens) are skipped.
__global__ void kv_write_vec_kernel(const float4* __restrict__ k, const float4* __restrict__ v,
                                    const int32_t* __restrict__ slots, int64_t row4,
                                    uint2* __restrict__ ck, uint2* __restrict__ cv) {
  const int64_t t = blockIdx.x;
  const int32_t slot = slots[t];
  if (slot < 0) return;
  const int64_t src = t * row4;
  const int64_t dst = static_cast<int64_t>(slot) * row4;
  for (int64_t i = threadIdx.x; i < row4; i += blockDim.x) {
    ck[dst + i] = pack_bf16x4(k[src + i]);
    cv[dst + i] = pack_bf16x4(v[src + i]);
  }
}

// FP8: one block per token, a warp per (kv head, plane): the row's max |value| gives its scale
// (max / 448, 1 for a row of zeros), each value / scale its code (round to nearest even,
// saturating), as the CPU's FP8 cache computes them. One plane when k and v are the same.
__global__ void kv_write_fp8_kernel(const float* __restrict__ k, const float* __restrict__ v,
                                    const int32_t* __restrict__ slots, int n_kv, int head_dim,
                                    int planes, uint8_t* ck, uint8_t* cv, float* ks, float* vs) {
  const int64_t t = blockIdx.x;
  const int32_t slot = slots[t];
  if (slot < 0) return;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(n_kv) * head_dim;
  for (int i = warp; i < n_kv * planes; i += blockDim.x / 32) {
    const int h = i / planes;
    const bool value = i % planes == 1;
    const float* src = (value ? v : k) + t * row + static_cast<int64_t>(h) * head_dim;
    uint8_t* dst = (value ? cv : ck) + slot * row + static_cast<int64_t>(h) * head_dim;
    float amax = 0.0f;
    for (int d = lane; d < head_dim; d += 32) amax = fmaxf(amax, fabsf(src[d]));
    amax = detail::warp_max(amax);
    float scale = amax / 448.0f;
    if (!(scale > 0.0f)) scale = 1.0f;
    for (int d = lane; d < head_dim; d += 32)
      dst[d] = __nv_cvt_float_to_fp8(src[d] / scale, __NV_SATFINITE, __NV_E4M3);
    if (lane == 0) (value ? vs : ks)[static_cast<int64_t>(slot) * n_kv + h] = scale;
  }
}

// paged_kv_read_bf16: one block per slot; bf16 rows are copied, fp8 ones decoded and scaled.
__global__ void kv_read_kernel(const void* __restrict__ cache, const float* __restrict__ scales,
                               bool fp8, const int32_t* __restrict__ slots, int n_kv, int head_dim,
                               uint16_t* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const int64_t row = static_cast<int64_t>(n_kv) * head_dim;
  const int64_t slot = slots[r];
  for (int64_t i = threadIdx.x; i < row; i += blockDim.x) {
    if (fp8) {
      const uint8_t code = static_cast<const uint8_t*>(cache)[slot * row + i];
      const float s = scales[slot * n_kv + i / head_dim];
      out[r * row + i] = detail::f32_to_bf16_bits(detail::fp8x2_to_float2(code).x * s);
    } else {
      out[r * row + i] = static_cast<const uint16_t*>(cache)[slot * row + i];
    }
  }
}

// Any row length or alignment.
__global__ void kv_write_kernel(const float* __restrict__ k, const float* __restrict__ v,
                                const int32_t* __restrict__ slots, int64_t row,
                                uint16_t* __restrict__ ck, uint16_t* __restrict__ cv) {
  const int64_t t = blockIdx.x;
  const int32_t slot = slots[t];
  if (slot < 0) return;
  const int64_t src = t * row;
  const int64_t dst = static_cast<int64_t>(slot) * row;
  for (int64_t i = threadIdx.x; i < row; i += blockDim.x) {
    ck[dst + i] = detail::f32_to_bf16_bits(k[src + i]);
    cv[dst + i] = detail::f32_to_bf16_bits(v[src + i]);
  }
}

// Launch functions return void, so a shape no kernel supports is reported through check() as a
// launch error: a launch with no threads is refused (cudaErrorInvalidValue with CUDA 13).
__global__ void unsupported_shape_kernel() {}
void report_unsupported_shape(Stream stream) {
  unsupported_shape_kernel<<<1, 0, 0, stream>>>();
}

bool aligned(const void* p, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// ---- paged_attention: configuration ------------------------------------------------------------

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 256;               // keys per chunk (scores in shared memory)
constexpr int kScoreStride = kChunk + 4;  // padding spreads the rows of a score store over banks
constexpr int kKeysPerGroup = 4;          // consecutive keys a lane group loads at once

// Split scratch (see the file comment). 4 areas of 2 MiB + 64 KiB.
constexpr int kScratchSlots = 4;
constexpr int64_t kSlotFloats = int64_t{1} << 19;
constexpr int64_t kSlotRows = 8192;
constexpr int kMaxSplits = 128;
constexpr int kMinSplitKeys = 256;  // below this a split's fixed costs dominate
constexpr int kMergeThreads = 128;

__device__ float g_split_acc[kScratchSlots][kSlotFloats];
__device__ float2 g_split_ml[kScratchSlots][kSlotRows];  // (max, sum) per partial row

// How a lane group covers a head: kHeadDim 64/128/256 with 16-byte loads (kLanes = head_dim / 8
// lanes of 8 dims), or 0: any even head_dim <= 256 with 4-byte loads, a warp per key, lane dims
// (i * 32 + lane) * 2 + {0, 1} for i < 4, masked by head_dim. A lane always holds 8 dims.
template <int kHeadDim>
struct HeadCfg {
  static constexpr bool kGeneric = kHeadDim == 0;
  static constexpr int kVec = kGeneric ? 2 : 8;  // bf16 per load
  static constexpr int kLanes = kGeneric ? 32 : kHeadDim / 8;
  static constexpr int kLoads = kGeneric ? 4 : 1;
  static constexpr int kDims = kVec * kLoads;
  static constexpr int kWords = kDims / 2;  // 32-bit words of bf16 pairs per lane
  static constexpr int kPadDim = kLanes * kDims;
  static constexpr int kGroups = kThreads / kLanes;
  static constexpr int kSweep = kGroups * kKeysPerGroup;  // keys per pass of the whole block
  static_assert(kDims == 8 && kLanes >= 8 && kLanes <= 32 && kChunk % kSweep == 0);
};

struct AttnParams {
  const float* q;
  float* out;
  const void* k;  // bf16 bits, or FP8 codes with a float32 scale per stored row
  const void* v;
  const float* k_scale;  // FP8: [slots, n_kv]
  const float* v_scale;
  int n_kv;
  const int32_t* seq;
  const int32_t* pos;
  const int32_t* tables;
  int64_t max_blocks;
  int64_t kv_stride;  // elements between consecutive slots: n_kv_heads * head_dim
  int n_heads;
  int group;       // q heads per kv head
  int row_chunks;  // blocks per kv head: ceil(group / kRows)
  int head_dim;
  int block_size;
  int window;  // 0: none
  float q_scale;
  int splits;
  int split_len;  // keys per split (splits > 1)
  int slot;       // scratch area (splits > 1)
};

// The dim of a lane's element e (0..7).
template <class C>
__device__ __forceinline__ int lane_dim(int e, int li) {
  return ((e / C::kVec) * C::kLanes + li) * C::kVec + e % C::kVec;
}

// A lane's words of one K or V row (head_dim elements at `row`); zero past head_dim.
template <class C>
__device__ __forceinline__ void load_row(const uint16_t* __restrict__ row, int li, int head_dim,
                                         uint32_t (&w)[C::kWords]) {
  if constexpr (C::kGeneric) {
#pragma unroll
    for (int i = 0; i < C::kLoads; ++i) {
      const int d = (i * C::kLanes + li) * C::kVec;
      w[i] = d < head_dim ? __ldg(reinterpret_cast<const unsigned int*>(row + d)) : 0u;
    }
  } else {
    const uint4 x = __ldg(reinterpret_cast<const uint4*>(row + li * C::kVec));
    w[0] = x.x;
    w[1] = x.y;
    w[2] = x.z;
    w[3] = x.w;
  }
}

// Little-endian pairs: the bf16 at the lower address is the low half of the word.
template <int kWords>
__device__ __forceinline__ void unpack_bf16(const uint32_t (&w)[kWords], float (&f)[2 * kWords]) {
#pragma unroll
  for (int m = 0; m < kWords; ++m) {
    f[2 * m] = __uint_as_float(w[m] << 16);
    f[2 * m + 1] = __uint_as_float(w[m] & 0xffff0000u);
  }
}

// A lane's 8 dims (lane_dim) of the K or V row of `slot` as floats, zero past head_dim or when
// !valid: bf16 bits, or FP8 codes times the row's scale. `base` and `scales` point at the block's
// kv head (element kvh * head_dim, scale kvh).
template <class C, bool kFp8>
__device__ __forceinline__ void load_kv(const void* base, const float* scales, int slot,
                                        const AttnParams& p, int li, bool valid,
                                        float (&f)[C::kDims]) {
  if constexpr (!kFp8) {
    uint32_t w[C::kWords] = {};
    if (valid)
      load_row<C>(static_cast<const uint16_t*>(base) + slot * p.kv_stride, li, p.head_dim, w);
    unpack_bf16(w, f);
  } else {
#pragma unroll
    for (int e = 0; e < C::kDims; ++e) f[e] = 0.0f;
    if (!valid) return;
    const uint8_t* row = static_cast<const uint8_t*>(base) + slot * p.kv_stride;
    const float s = __ldg(scales + static_cast<int64_t>(slot) * p.n_kv);
    if constexpr (C::kGeneric) {
#pragma unroll
      for (int i = 0; i < C::kLoads; ++i) {
        const int d = (i * C::kLanes + li) * C::kVec;
        if (d < p.head_dim) {
          const float2 x =
              detail::fp8x2_to_float2(__ldg(reinterpret_cast<const unsigned short*>(row + d)));
          f[2 * i] = x.x * s;
          f[2 * i + 1] = x.y * s;
        }
      }
    } else {
      const uint2 x = __ldg(reinterpret_cast<const uint2*>(row + li * C::kVec));
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const float2 a = detail::fp8x2_to_float2((m < 2 ? x.x : x.y) >> (16 * (m % 2)));
        f[2 * m] = a.x * s;
        f[2 * m + 1] = a.y * s;
      }
    }
  }
}

// A lane's 8 dims of a q row in shared memory (kPadDim floats, zero past head_dim).
template <class C>
__device__ __forceinline__ void load_q(const float* qrow, int li, float (&qv)[C::kDims]) {
#pragma unroll
  for (int i = 0; i < C::kLoads; ++i) {
    const float* p = qrow + (i * C::kLanes + li) * C::kVec;
    if constexpr (C::kVec == 8) {
      const float4 a = *reinterpret_cast<const float4*>(p);
      const float4 b = *reinterpret_cast<const float4*>(p + 4);
      qv[0] = a.x, qv[1] = a.y, qv[2] = a.z, qv[3] = a.w;
      qv[4] = b.x, qv[5] = b.y, qv[6] = b.z, qv[7] = b.w;
    } else {
      const float2 a = *reinterpret_cast<const float2*>(p);
      qv[2 * i] = a.x;
      qv[2 * i + 1] = a.y;
    }
  }
}

// Values a lane keeps after group_reduce_scatter of n values over `lanes` lanes.
constexpr int scatter_kept(int n, int lanes) {
  while (n > 1 && lanes > 1) n /= 2, lanes /= 2;
  return n;
}

// One level of group_reduce_scatter: lane pairs kOffset apart each keep half of the kCount values
// (the upper half when the lane's kOffset bit is set) plus the partner's copy of that half; once
// one value is left, the remaining levels are plain butterfly sums.
template <int N, int kOffset, int kCount>
struct ScatterLevel {
  static __device__ __forceinline__ void run(float (&x)[N], int li, int& first) {
    if constexpr (kOffset > 0) {
      if constexpr (kCount > 1) {
        constexpr int kHalf = kCount / 2;
        const bool up = (li & kOffset) != 0;
#pragma unroll
        for (int i = 0; i < kHalf; ++i) {
          const float send = up ? x[i] : x[i + kHalf];
          const float keep = up ? x[i + kHalf] : x[i];
          x[i] = keep + __shfl_xor_sync(0xffffffffu, send, kOffset);
        }
        if (up) first += kHalf;
        ScatterLevel<N, kOffset / 2, kHalf>::run(x, li, first);
      } else {
        x[0] += __shfl_xor_sync(0xffffffffu, x[0], kOffset);
        ScatterLevel<N, kOffset / 2, 1>::run(x, li, first);
      }
    }
  }
};

// Sums each of x[0..N) over the kLanes lanes of a group (groups aligned on kLanes within the warp;
// every lane of the warp must call). Afterwards lane li holds the sums of values
// [first, first + scatter_kept(N, kLanes)) in x[0..), first returned; lanes that differ only in
// their low log2(kLanes * kept / N) bits hold the same sums.
template <int N, int kLanes>
__device__ __forceinline__ int group_reduce_scatter(float (&x)[N], int li) {
  int first = 0;
  ScatterLevel<N, kLanes / 2, N>::run(x, li, first);
  return first;
}

// ---- paged_attention: kernels ------------------------------------------------------------------

template <int kHeadDim, int kRows, bool kFp8>
__global__ void __launch_bounds__(kThreads, kRows >= 8 ? 3 : 4)
    paged_attention_kernel(const AttnParams p) {
  using C = HeadCfg<kHeadDim>;
  constexpr int kRowBlock = kRows < 4 ? kRows : 4;  // q heads whose scores are reduced together
  constexpr int kN = kKeysPerGroup * kRowBlock;     // value index: row * 4 + key
  constexpr int kKept = scatter_kept(kN, C::kLanes);
  constexpr int kReplicas = C::kLanes * kKept / kN;

  __shared__ __align__(16) float q_sh[kRows * C::kPadDim];
  __shared__ __align__(16) float s_sh[kRows * kScoreStride];
  __shared__ __align__(16) float red_sh[2 * kRows * C::kPadDim];
  __shared__ int32_t slot_sh[kChunk];
  __shared__ float m_sh[kRows];
  __shared__ float l_sh[kRows];
  __shared__ float alpha_sh[kRows];

  const int t = blockIdx.x;
  const int kvh = blockIdx.y / p.row_chunks;
  const int row_chunk = blockIdx.y % p.row_chunks;
  const int split = blockIdx.z;
  const int h0 = kvh * p.group + row_chunk * kRows;
  const int rows = min(kRows, p.group - row_chunk * kRows);

  const int qpos = p.pos[t];
  const int first_key = p.window > 0 ? max(0, qpos - p.window + 1) : 0;
  const int kb = first_key + split * p.split_len;
  if (kb > qpos) return;  // a split past this query's keys (block-uniform, before any barrier)
  // The last split also takes any keys beyond splits * split_len.
  const int ke =
      (split == p.splits - 1 || qpos + 1 - kb <= p.split_len) ? qpos + 1 : kb + p.split_len;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int gid = tid / C::kLanes;
  const int li = tid % C::kLanes;
  const int head_dim = p.head_dim;

  for (int i = tid; i < kRows * C::kPadDim; i += kThreads) {
    const int r = i / C::kPadDim;
    const int d = i % C::kPadDim;
    q_sh[i] = r < rows && d < head_dim
                  ? p.q[(static_cast<int64_t>(t) * p.n_heads + h0 + r) * head_dim + d] * p.q_scale
                  : 0.0f;
  }
  if (tid < kRows) {
    m_sh[tid] = -INFINITY;
    l_sh[tid] = 0.0f;
  }

  const int32_t* table = p.tables + static_cast<int64_t>(p.seq[t]) * p.max_blocks;
  constexpr int kElem = kFp8 ? 1 : 2;  // bytes per stored value
  const void* kbase = static_cast<const char*>(p.k) + static_cast<int64_t>(kvh) * head_dim * kElem;
  const void* vbase = static_cast<const char*>(p.v) + static_cast<int64_t>(kvh) * head_dim * kElem;
  const float* kscale = kFp8 ? p.k_scale + kvh : nullptr;
  const float* vscale = kFp8 ? p.v_scale + kvh : nullptr;

  float acc[kRows][C::kDims];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int e = 0; e < C::kDims; ++e) acc[r][e] = 0.0f;

  __syncthreads();

  for (int c0 = kb; c0 < ke; c0 += kChunk) {
    const int n = min(kChunk, ke - c0);

    for (int j = tid; j < n; j += kThreads) {
      const int key = c0 + j;
      slot_sh[j] = table[key / p.block_size] * p.block_size + key % p.block_size;
    }
    __syncthreads();

    // Phase 1: scores. The loop bound is block-uniform so every lane reaches the shuffles.
    for (int base = 0; base < n; base += C::kSweep) {
      const int j0 = base + gid * kKeysPerGroup;
      float kf[kKeysPerGroup][C::kDims];
#pragma unroll
      for (int u = 0; u < kKeysPerGroup; ++u) {
        const bool valid = j0 + u < n;
        load_kv<C, kFp8>(kbase, kscale, valid ? slot_sh[j0 + u] : 0, p, li, valid, kf[u]);
      }
#pragma unroll
      for (int rb = 0; rb < kRows; rb += kRowBlock) {
        float x[kN];
#pragma unroll
        for (int r = 0; r < kRowBlock; ++r) {
          float qv[C::kDims];
          load_q<C>(q_sh + (rb + r) * C::kPadDim, li, qv);
#pragma unroll
          for (int u = 0; u < kKeysPerGroup; ++u) {
            float s = 0.0f;
#pragma unroll
            for (int e = 0; e < C::kDims; ++e) s = fmaf(qv[e], kf[u][e], s);
            x[r * kKeysPerGroup + u] = s;
          }
        }
        const int first = group_reduce_scatter<kN, C::kLanes>(x, li);
        if (li % kReplicas == 0 && j0 < n) {
#pragma unroll
          for (int f = 0; f < kKept; ++f) {
            const int idx = first + f;
            s_sh[(rb + idx / kKeysPerGroup) * kScoreStride + j0 + idx % kKeysPerGroup] = x[f];
          }
        }
      }
    }
    __syncthreads();

    // Phase 2: online softmax over the chunk, a warp per q head.
    for (int r = warp; r < kRows; r += kWarps) {
      float* srow = s_sh + r * kScoreStride;
      float mx = -INFINITY;
      for (int j = lane; j < n; j += 32) mx = fmaxf(mx, srow[j]);
      mx = detail::warp_max(mx);
      const float m_old = m_sh[r];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.0f;
      for (int j = lane; j < n; j += 32) {
        const float e = exp2f(srow[j] - m_new);
        srow[j] = e;
        sum += e;
      }
      sum = detail::warp_sum(sum);
      __syncwarp();  // every lane has read m_sh[r] before lane 0 replaces it
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_new);  // 0 on the first chunk (m_old = -inf)
        alpha_sh[r] = alpha;
        l_sh[r] = l_sh[r] * alpha + sum;
        m_sh[r] = m_new;
      }
    }
    __syncthreads();

    // Phase 3: acc = acc * alpha + p * v.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float alpha = alpha_sh[r];
#pragma unroll
      for (int e = 0; e < C::kDims; ++e) acc[r][e] *= alpha;
    }
    for (int base = 0; base < n; base += C::kSweep) {
      const int j0 = base + gid * kKeysPerGroup;
      if (j0 >= n) continue;  // no shuffles in this phase: groups may diverge
      float vf[kKeysPerGroup][C::kDims];
#pragma unroll
      for (int u = 0; u < kKeysPerGroup; ++u) {
        const bool valid = j0 + u < n;
        load_kv<C, kFp8>(vbase, vscale, valid ? slot_sh[j0 + u] : 0, p, li, valid, vf[u]);
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float4 pr = *reinterpret_cast<const float4*>(s_sh + r * kScoreStride + j0);
        // Past n the scores are stale; the values there are zero but 0 * stale could be NaN.
        if (j0 + 1 >= n) pr.y = 0.0f;
        if (j0 + 2 >= n) pr.z = 0.0f;
        if (j0 + 3 >= n) pr.w = 0.0f;
#pragma unroll
        for (int e = 0; e < C::kDims; ++e) {
          float a = acc[r][e];
          a = fmaf(pr.x, vf[0][e], a);
          a = fmaf(pr.y, vf[1][e], a);
          a = fmaf(pr.z, vf[2][e], a);
          a = fmaf(pr.w, vf[3][e], a);
          acc[r][e] = a;
        }
      }
    }
    __syncthreads();  // the next chunk overwrites slot_sh, s_sh and alpha_sh
  }

  // Merge the groups: within each warp by shuffles, then warps 2, 3 into 0, 1 and 1 into 0.
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int e = 0; e < C::kDims; ++e)
#pragma unroll
      for (int o = C::kLanes; o < 32; o *= 2)
        acc[r][e] += __shfl_xor_sync(0xffffffffu, acc[r][e], o);
  const bool lead = lane < C::kLanes;  // group 0 of the warp
  auto red_at = [&](int buf, int r, int e) -> float& {
    return red_sh[(buf * kRows + r) * C::kPadDim + lane_dim<C>(e, li)];
  };
  if (warp >= 2 && lead) {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int e = 0; e < C::kDims; ++e) red_at(warp - 2, r, e) = acc[r][e];
  }
  __syncthreads();
  if (warp < 2 && lead) {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int e = 0; e < C::kDims; ++e) acc[r][e] += red_at(warp, r, e);
  }
  __syncthreads();
  if (warp == 1 && lead) {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int e = 0; e < C::kDims; ++e) red_at(0, r, e) = acc[r][e];
  }
  __syncthreads();
  if (warp != 0 || !lead) return;

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= rows) break;
    const int64_t row = static_cast<int64_t>(t) * p.n_heads + h0 + r;
    if (p.splits == 1) {
      const float inv = 1.0f / l_sh[r];  // >= 1: the max key contributes exp2(0)
      float* o = p.out + row * head_dim;
#pragma unroll
      for (int e = 0; e < C::kDims; ++e) {
        const int d = lane_dim<C>(e, li);
        if (C::kGeneric && d >= head_dim) continue;
        o[d] = (acc[r][e] + red_at(0, r, e)) * inv;
      }
    } else {
      const int64_t part = row * p.splits + split;
      float* o = g_split_acc[p.slot] + part * head_dim;
#pragma unroll
      for (int e = 0; e < C::kDims; ++e) {
        const int d = lane_dim<C>(e, li);
        if (C::kGeneric && d >= head_dim) continue;
        o[d] = acc[r][e] + red_at(0, r, e);
      }
      if (li == 0) g_split_ml[p.slot][part] = make_float2(m_sh[r], l_sh[r]);
    }
  }
}

// One block per (query, q head): merges the partials of the splits that saw keys.
__global__ void __launch_bounds__(kMergeThreads)
    merge_splits_kernel(const int32_t* __restrict__ pos, int n_heads, int head_dim, int window,
                        int splits, int split_len, int slot, float* __restrict__ out) {
  __shared__ float w_sh[kMaxSplits];
  const int64_t row = blockIdx.x;
  const int qpos = pos[row / n_heads];
  const int first_key = window > 0 ? max(0, qpos - window + 1) : 0;
  const int len = qpos - first_key + 1;
  const int used = min(splits, (len + split_len - 1) / split_len);
  const float2* ml = g_split_ml[slot] + row * splits;
  const float* acc = g_split_acc[slot] + row * splits * head_dim;

  float m = -INFINITY;
  for (int s = 0; s < used; ++s) m = fmaxf(m, ml[s].x);
  for (int s = threadIdx.x; s < used; s += blockDim.x) w_sh[s] = exp2f(ml[s].x - m);
  __syncthreads();
  float l = 0.0f;
  for (int s = 0; s < used; ++s) l += w_sh[s] * ml[s].y;
  const float inv = 1.0f / l;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float o = 0.0f;
    for (int s = 0; s < used; ++s)
      o = fmaf(w_sh[s], acc[static_cast<int64_t>(s) * head_dim + d], o);
    out[row * head_dim + d] = o * inv;
  }
}

// ---- paged_attention: heads wider than 256 ------------------------------------------------------
// Multi-head latent attention attends with one 576-wide kv head (DeepSeek-V2/V3's latent and
// rotary key; the value is the same row). One block of kWideThreads per (query, kv head, group
// of up to kWideRows q heads), walking the keys in chunks of kWideKeys held in shared memory as
// stored (32-bit words of 2 bf16 or 4 FP8 codes; FP8 rows' scales beside them):
//   1. scores: thread (r, j) takes q head r and key j of the chunk, a whole dot product;
//   2. softmax: the kWideKeys threads of a q head are one half-warp, reducing by shuffles;
//   3. values: thread i accumulates the dims of words i + kWideThreads * u of every q head.
// When k and v are the same array (MLA) the chunk loaded for the scores serves the values too.
// Few blocks (decode at small batches) split the keys as the main kernel does: each split writes
// its unnormalised partial to the same scratch and merge_splits_kernel combines them.
constexpr int kWideThreads = 128;
constexpr int kWideRows = 8;
constexpr int kWideKeys = kWideThreads / kWideRows;  // 16: a half-warp per q head
constexpr int kWideMaxDim = 640;
constexpr int kWideQStride = kWideMaxDim + 4;      // floats; spreads q rows over banks
constexpr int kWideKvWords = kWideMaxDim / 2 + 1;  // 32-bit words per key row; odd: no conflicts
static_assert(kWideKeys == 16, "the softmax reduces over a half-warp");

// The kPer values of one stored word (bf16 pairs or FP8 quads; the lower address first).
template <bool kFp8>
__device__ __forceinline__ void unpack_word(uint32_t x, float (&f)[kFp8 ? 4 : 2]) {
  if constexpr (kFp8) {
    const float2 a = detail::fp8x2_to_float2(x);
    const float2 b = detail::fp8x2_to_float2(x >> 16);
    f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y;
  } else {
    f[0] = __uint_as_float(x << 16);
    f[1] = __uint_as_float(x & 0xffff0000u);
  }
}

template <bool kFp8>
__global__ void __launch_bounds__(kWideThreads) wide_attention_kernel(const AttnParams p) {
  constexpr int kPer = kFp8 ? 4 : 2;  // values per 32-bit word
  constexpr int kUnits =              // words of a row a thread accumulates
      (kWideMaxDim / kPer + kWideThreads - 1) / kWideThreads;
  __shared__ __align__(16) float q_sh[kWideRows * kWideQStride];
  __shared__ uint32_t kv_sh[kWideKeys * kWideKvWords];
  __shared__ float p_sh[kWideRows * kWideKeys];
  __shared__ float scale_sh[kWideKeys];  // FP8: the chunk's rows' scales (keys, then values)
  __shared__ float alpha_sh[kWideRows];
  __shared__ float l_sh[kWideRows];
  __shared__ float m_sh[kWideRows];
  __shared__ int32_t slot_sh[kWideKeys];

  const int t = blockIdx.x;
  const int kvh = blockIdx.y / p.row_chunks;
  const int row_chunk = blockIdx.y % p.row_chunks;
  const int split = blockIdx.z;
  const int h0 = kvh * p.group + row_chunk * kWideRows;
  const int rows = min(kWideRows, p.group - row_chunk * kWideRows);
  const int head_dim = p.head_dim;
  const int words = head_dim / kPer;
  const int qpos = p.pos[t];
  const int first_key = p.window > 0 ? max(0, qpos - p.window + 1) : 0;
  const int kb = first_key + split * p.split_len;
  if (kb > qpos) return;  // a split past this query's keys (block-uniform, before any barrier)
  // The last split also takes any keys beyond splits * split_len.
  const int ke =
      (split == p.splits - 1 || qpos + 1 - kb <= p.split_len) ? qpos + 1 : kb + p.split_len;
  const int tid = threadIdx.x;
  const int my_row = tid / kWideKeys;
  const int my_key = tid % kWideKeys;
  const bool shared_kv = p.k == p.v && p.k_scale == p.v_scale;

  for (int i = tid; i < kWideRows * kWideQStride; i += kWideThreads) {
    const int r = i / kWideQStride;
    const int d = i % kWideQStride;
    q_sh[i] = r < rows && d < head_dim
                  ? p.q[(static_cast<int64_t>(t) * p.n_heads + h0 + r) * head_dim + d] * p.q_scale
                  : 0.0f;
  }
  const int32_t* table = p.tables + static_cast<int64_t>(p.seq[t]) * p.max_blocks;
  // Bytes from a slot's row to this kv head's values.
  const int64_t head_offset = static_cast<int64_t>(kvh) * head_dim * (kFp8 ? 1 : 2);
  const int64_t row_bytes = p.kv_stride * (kFp8 ? 1 : 2);

  // Loads the chunk's rows of `base` (k or v) into kv_sh, and their scales (FP8).
  auto load_chunk = [&](const void* base, const float* scales, int n) {
    for (int i = tid; i < n * words; i += kWideThreads) {
      const int j = i / words;
      const int w = i % words;
      const char* row = static_cast<const char*>(base) + slot_sh[j] * row_bytes + head_offset;
      kv_sh[j * kWideKvWords + w] = __ldg(reinterpret_cast<const unsigned int*>(row) + w);
    }
    if (kFp8 && tid < n)
      scale_sh[tid] = __ldg(scales + static_cast<int64_t>(slot_sh[tid]) * p.n_kv + kvh);
  };

  float m = -INFINITY, l = 0.0f;  // the running max and sum of my_row (same in its half-warp)
  float acc[kWideRows][kUnits][kPer];
#pragma unroll
  for (int r = 0; r < kWideRows; ++r)
#pragma unroll
    for (int u = 0; u < kUnits; ++u)
#pragma unroll
      for (int e = 0; e < kPer; ++e) acc[r][u][e] = 0.0f;

  for (int c0 = kb; c0 < ke; c0 += kWideKeys) {
    const int n = min(kWideKeys, ke - c0);
    if (tid < n) {
      const int key = c0 + tid;
      slot_sh[tid] = table[key / p.block_size] * p.block_size + key % p.block_size;
    }
    __syncthreads();  // slots ready; also: the previous chunk's values are no longer read
    load_chunk(p.k, p.k_scale, n);
    __syncthreads();

    // 1. Score of (my_row, my_key), in log2 units.
    float s = -INFINITY;
    if (my_key < n) {
      const float* qrow = q_sh + my_row * kWideQStride;
      const uint32_t* krow = kv_sh + my_key * kWideKvWords;
      float dot = 0.0f;
      for (int w = 0; w < words; ++w) {
        float f[kPer];
        unpack_word<kFp8>(krow[w], f);
#pragma unroll
        for (int e = 0; e < kPer; ++e) dot = fmaf(qrow[kPer * w + e], f[e], dot);
      }
      s = kFp8 ? dot * scale_sh[my_key] : dot;
    }
    // 2. Online softmax over the half-warp of my_row.
    float mx = s;
#pragma unroll
    for (int o = kWideKeys / 2; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float m_new = fmaxf(m, mx);  // finite: the chunk has at least one key
    const float e = my_key < n ? exp2f(s - m_new) : 0.0f;
    float sum = e;
#pragma unroll
    for (int o = kWideKeys / 2; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float alpha = exp2f(m - m_new);  // 0 on the first chunk (m = -inf)
    l = l * alpha + sum;
    m = m_new;
    p_sh[my_row * kWideKeys + my_key] = e;
    if (my_key == 0) alpha_sh[my_row] = alpha;
    if (!shared_kv) {
      __syncthreads();  // every score has read the keys and their scales
      load_chunk(p.v, p.v_scale, n);
    }
    __syncthreads();

    // 3. acc = acc * alpha + p * v over the chunk's keys.
#pragma unroll
    for (int r = 0; r < kWideRows; ++r) {
      const float a = alpha_sh[r];
#pragma unroll
      for (int u = 0; u < kUnits; ++u)
#pragma unroll
        for (int e = 0; e < kPer; ++e) acc[r][u][e] *= a;
    }
    for (int j = 0; j < n; ++j) {
      float v[kUnits][kPer];
#pragma unroll
      for (int u = 0; u < kUnits; ++u) {
        const int w = tid + kWideThreads * u;
        unpack_word<kFp8>(w < words ? kv_sh[j * kWideKvWords + w] : 0u, v[u]);
      }
      const float vs = kFp8 ? scale_sh[j] : 1.0f;
#pragma unroll
      for (int r = 0; r < kWideRows; ++r) {
        const float pr = p_sh[r * kWideKeys + j] * vs;
#pragma unroll
        for (int u = 0; u < kUnits; ++u)
#pragma unroll
          for (int e = 0; e < kPer; ++e) acc[r][u][e] = fmaf(pr, v[u][e], acc[r][u][e]);
      }
    }
  }
  if (my_key == 0) {
    l_sh[my_row] = l;  // >= 1: the max key contributes exp2(0)
    m_sh[my_row] = m;
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kWideRows; ++r) {
    if (r >= rows) break;
    const int64_t row = static_cast<int64_t>(t) * p.n_heads + h0 + r;
    // One split: the output. Several: this split's unnormalised sums and its (max, sum).
    const float inv = p.splits == 1 ? 1.0f / l_sh[r] : 1.0f;
    float* o = p.splits == 1 ? p.out + row * head_dim
                             : g_split_acc[p.slot] + (row * p.splits + split) * head_dim;
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const int w = tid + kWideThreads * u;
      if (w < words) {
#pragma unroll
        for (int e = 0; e < kPer; ++e) o[kPer * w + e] = acc[r][u][e] * inv;
      }
    }
    if (p.splits > 1 && tid == 0)
      g_split_ml[p.slot][row * p.splits + split] = make_float2(m_sh[r], l_sh[r]);
  }
}

// The scratch area owned by `stream`, or -1 when all are taken.
int scratch_slot(Stream stream) {
  // One handle naming a different stream on each thread: it cannot own an area.
  if (stream == cudaStreamPerThread) return -1;
  static std::mutex mu;
  static Stream owners[kScratchSlots];
  static int used = 0;
  std::lock_guard<std::mutex> lock(mu);
  for (int i = 0; i < used; ++i)
    if (owners[i] == stream) return i;
  if (used == kScratchSlots) return -1;
  owners[used] = stream;
  return used++;
}

int sm_count() {
  int device = 0;
  int sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // not an error of the caller's work; fall back to a typical count
    return 108;
  }
  return sms;
}

// How many key splits `blocks` blocks of q_rows query rows take (1 when they fill the GPU, the
// keys are few, or no scratch area is free), their length, and the scratch area they write.
void plan_splits(int64_t blocks, int64_t q_rows, int64_t head_dim, int64_t window, int64_t max_pos,
                 Stream stream, int64_t* splits, int64_t* split_len, int* slot) {
  const int64_t max_len = window > 0 ? std::min(max_pos + 1, window) : max_pos + 1;
  const int64_t target = int64_t{4} * sm_count();
  *splits = 1;
  *split_len = INT_MAX;
  *slot = -1;
  if (blocks >= target || max_len < 2 * kMinSplitKeys) return;
  int64_t n =
      std::min<int64_t>({(target + blocks - 1) / blocks, max_len / kMinSplitKeys, kMaxSplits,
                         kSlotRows / q_rows, kSlotFloats / (q_rows * head_dim)});
  if (n >= 2) *slot = scratch_slot(stream);
  if (*slot < 0) return;
  int64_t len = (max_len + n - 1) / n;
  len = (len + 31) / 32 * 32;
  *splits = (max_len + len - 1) / len;
  *split_len = len;
}

template <int kHeadDim, int kRows, bool kFp8>
void launch_attention(const AttnParams& p, dim3 grid, Stream stream) {
  paged_attention_kernel<kHeadDim, kRows, kFp8><<<grid, kThreads, 0, stream>>>(p);
}

template <int kHeadDim, bool kFp8>
void launch_rows(int rows, const AttnParams& p, dim3 grid, Stream stream) {
  switch (rows) {
    case 1:
      return launch_attention<kHeadDim, 1, kFp8>(p, grid, stream);
    case 2:
      return launch_attention<kHeadDim, 2, kFp8>(p, grid, stream);
    case 4:
      return launch_attention<kHeadDim, 4, kFp8>(p, grid, stream);
    default:
      return launch_attention<kHeadDim, 8, kFp8>(p, grid, stream);
  }
}

template <bool kFp8>
void launch_head_dim(int64_t head_dim, bool vec, int rows, const AttnParams& p, dim3 grid,
                     Stream stream) {
  if (head_dim > 256) {
    wide_attention_kernel<kFp8><<<grid, kWideThreads, 0, stream>>>(p);
  } else if (vec && head_dim == 64) {
    launch_rows<64, kFp8>(rows, p, grid, stream);
  } else if (vec && head_dim == 128) {
    launch_rows<128, kFp8>(rows, p, grid, stream);
  } else if (vec && head_dim == 256) {
    launch_rows<256, kFp8>(rows, p, grid, stream);
  } else {
    launch_rows<0, kFp8>(rows, p, grid, stream);
  }
}

}  // namespace

void paged_kv_write(const float* k, const float* v, int64_t n, const int32_t* slots,
                    const PagedKv& cache, Stream stream) {
  if (n <= 0) return;
  const int64_t row = cache.n_kv_heads * cache.head_dim;
  if (row <= 0 || n > INT_MAX) return report_unsupported_shape(stream);
  if (cache.fp8) {
    if (!cache.k_scale || !cache.v_scale || cache.n_kv_heads > INT_MAX || cache.head_dim > INT_MAX)
      return report_unsupported_shape(stream);
    const bool one_plane = k == v && cache.k == cache.v && cache.k_scale == cache.v_scale;
    kv_write_fp8_kernel<<<static_cast<unsigned>(n), kWriteThreads, 0, stream>>>(
        k, v, slots, static_cast<int>(cache.n_kv_heads), static_cast<int>(cache.head_dim),
        one_plane ? 1 : 2, static_cast<uint8_t*>(cache.k), static_cast<uint8_t*>(cache.v),
        cache.k_scale, cache.v_scale);
    return;
  }
  if (row % 4 == 0 && aligned(k, 16) && aligned(v, 16) && aligned(cache.k, 8) &&
      aligned(cache.v, 8)) {
    kv_write_vec_kernel<<<static_cast<unsigned>(n), kWriteThreads, 0, stream>>>(
        reinterpret_cast<const float4*>(k), reinterpret_cast<const float4*>(v), slots, row / 4,
        static_cast<uint2*>(cache.k), static_cast<uint2*>(cache.v));
  } else {
    kv_write_kernel<<<static_cast<unsigned>(n), kWriteThreads, 0, stream>>>(
        k, v, slots, row, static_cast<uint16_t*>(cache.k), static_cast<uint16_t*>(cache.v));
  }
}

void paged_kv_read_bf16(const PagedKv& cache, bool values, const int32_t* slots, int64_t n,
                        uint16_t* out, Stream stream) {
  if (n <= 0) return;
  if (cache.n_kv_heads <= 0 || cache.head_dim <= 0 || n > INT_MAX ||
      cache.n_kv_heads * cache.head_dim > INT_MAX || (cache.fp8 && !cache.k_scale) ||
      (cache.fp8 && !cache.v_scale))
    return report_unsupported_shape(stream);
  kv_read_kernel<<<static_cast<unsigned>(n), kWriteThreads, 0, stream>>>(
      values ? cache.v : cache.k, values ? cache.v_scale : cache.k_scale, cache.fp8, slots,
      static_cast<int>(cache.n_kv_heads), static_cast<int>(cache.head_dim), out);
}

void paged_attention(const float* q, int64_t n_q, const PagedKv& cache, const AttentionBatch& batch,
                     int64_t n_heads, float scale, int64_t window, float* out, Stream stream) {
  if (n_q <= 0) return;
  const int64_t head_dim = cache.head_dim;
  const int64_t n_kv = cache.n_kv_heads;
  if (head_dim <= 0 || head_dim % 2 != 0 || head_dim > kWideMaxDim || n_kv <= 0 || n_heads <= 0 ||
      n_heads % n_kv != 0 || n_heads > INT_MAX / n_q || cache.block_size <= 0 ||
      cache.block_size > INT_MAX || batch.max_pos < 0 || batch.max_pos >= INT_MAX ||
      !aligned(cache.k, 4) || !aligned(cache.v, 4) ||
      (cache.fp8 && (!cache.k_scale || !cache.v_scale || (head_dim > 256 && head_dim % 4 != 0))))
    return report_unsupported_shape(stream);
  const int64_t group = n_heads / n_kv;
  // Heads wider than 256 take the wide kernel (kWideRows q heads a block), the others the main one.
  const bool wide_heads = head_dim > 256;
  const int rows = wide_heads   ? kWideRows
                   : group >= 5 ? 8
                   : group >= 3 ? 4
                                : static_cast<int>(group);
  const int64_t row_chunks = (group + rows - 1) / rows;
  if (n_kv * row_chunks > 65535) return report_unsupported_shape(stream);

  // Split the keys when the (query, kv head, row chunk) blocks alone cannot fill the GPU.
  const int64_t q_rows = n_q * n_heads;
  int64_t splits = 1;
  int64_t split_len = INT_MAX;
  int slot = -1;
  plan_splits(n_q * n_kv * row_chunks, q_rows, head_dim, window, batch.max_pos, stream, &splits,
              &split_len, &slot);

  AttnParams p{};
  p.q = q;
  p.out = out;
  p.k = cache.k;
  p.v = cache.v;
  p.k_scale = cache.k_scale;
  p.v_scale = cache.v_scale;
  p.n_kv = static_cast<int>(n_kv);
  p.seq = batch.seq;
  p.pos = batch.pos;
  p.tables = batch.block_tables;
  p.max_blocks = batch.max_blocks;
  p.kv_stride = n_kv * head_dim;
  p.n_heads = static_cast<int>(n_heads);
  p.group = static_cast<int>(group);
  p.row_chunks = static_cast<int>(row_chunks);
  p.head_dim = static_cast<int>(head_dim);
  p.block_size = static_cast<int>(cache.block_size);
  p.window = window > 0 && window < INT_MAX ? static_cast<int>(window) : 0;
  p.q_scale = scale * 1.4426950408889634f;  // log2(e): scores in log2 units
  p.splits = static_cast<int>(splits);
  p.split_len = static_cast<int>(split_len);
  p.slot = slot;

  const dim3 grid(static_cast<unsigned>(n_q), static_cast<unsigned>(n_kv * row_chunks),
                  static_cast<unsigned>(splits));
  // A lane's 8 dims are one 16-byte load of bf16 values, one 8-byte load of FP8 codes.
  const std::uintptr_t vec_bytes = cache.fp8 ? 8 : 16;
  const bool vec = aligned(cache.k, vec_bytes) && aligned(cache.v, vec_bytes);
  if (cache.fp8)
    launch_head_dim<true>(head_dim, vec, rows, p, grid, stream);
  else
    launch_head_dim<false>(head_dim, vec, rows, p, grid, stream);
  if (splits > 1) {
    merge_splits_kernel<<<static_cast<unsigned>(q_rows), kMergeThreads, 0, stream>>>(
        batch.pos, p.n_heads, p.head_dim, p.window, p.splits, p.split_len, slot, out);
  }
}

}  // namespace moemesh::kernels::cuda
