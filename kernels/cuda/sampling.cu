// Token sampling from rows of logits: argmax, and the temperature / min_p / top_k / top_p / draw
// rule of core/sampling.cpp (Sampler::sample_random), one block per row.
//
// The CPU sorts (part of) the row; a kernel may not allocate, so the sorted order is never
// materialised here. Positions in it ("the most likely tokens first, ties to the lower id") are
// found by radix selection over float keys instead: three passes over the row narrow down the
// key (11 + 11 + 10 bits) at which a running count or probability mass crosses a threshold,
// with a shared-memory histogram per pass; the lower ids among equal keys come first, and equal
// keys carry equal weights, so a position inside a run of ties is found by arithmetic and one
// scan in id order. Weights are recomputed from the logits in each pass, exactly as the CPU
// computes them once.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/detail/common.cuh"

namespace moemesh::kernels::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kBuckets = 2048;  // 11-bit digits
constexpr int kPerThread = kBuckets / kThreads;
constexpr int64_t kMaxBlocks = 65535;
constexpr float kGreedyEpsilon = 1e-5f;  // core/sampling.cpp: below it, temperature is greedy

struct Shared {
  double mass[kBuckets];
  uint32_t count[kBuckets];
  double warp_mass[kWarps];
  uint32_t warp_count[kWarps];
  float warp_value[kWarps];
  int warp_index[kWarps];
  int win;   // a position (or id) claimed by the threads that see a crossing: the least wins
  int last;  // the last non-empty bucket position
  double result_mass;
  uint32_t result_count;
  uint32_t result_bucket_count;
};

__device__ __forceinline__ float neg_inf() {
  return -__int_as_float(0x7f800000);
}

// ---- Block-wide reductions and scans (every thread calls them; every thread gets the result) --

__device__ float block_max(float v, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;  // NaN never wins
  }
  if (lane == 0) sh.warp_value[warp] = v;
  __syncthreads();
  v = lane < kWarps ? sh.warp_value[lane] : neg_inf();
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  __syncthreads();
  return v;
}

// The largest value and its index, ties to the lower index; NaN and -inf never win, and the
// index is INT_MAX when nothing is larger than -inf.
__device__ int block_argmax(float v, int i, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto combine = [](float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  };
  for (int o = 16; o > 0; o >>= 1)
    combine(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
  if (lane == 0) {
    sh.warp_value[warp] = v;
    sh.warp_index[warp] = i;
  }
  __syncthreads();
  v = lane < kWarps ? sh.warp_value[lane] : neg_inf();
  i = lane < kWarps ? sh.warp_index[lane] : INT_MAX;
  for (int o = 16; o > 0; o >>= 1)
    combine(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
  __syncthreads();
  return v > neg_inf() ? i : INT_MAX;
}

__device__ int block_max_int(int v, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) sh.warp_index[warp] = v;
  __syncthreads();
  v = lane < kWarps ? sh.warp_index[lane] : INT_MIN;
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  return v;
}

// Exclusive prefix sums over the threads in order of threadIdx.x, and the totals.
struct Scan {
  double mass_before, mass_total;
  uint32_t count_before, count_total;
};
__device__ Scan block_scan(double m, uint32_t c, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double im = m;
  uint32_t ic = c;
  for (int o = 1; o < 32; o <<= 1) {
    const double um = __shfl_up_sync(0xffffffffu, im, o);
    const uint32_t uc = __shfl_up_sync(0xffffffffu, ic, o);
    if (lane >= o) {
      im += um;
      ic += uc;
    }
  }
  double em = __shfl_up_sync(0xffffffffu, im, 1);
  uint32_t ec = __shfl_up_sync(0xffffffffu, ic, 1);
  if (lane == 0) {
    em = 0.0;
    ec = 0;
  }
  if (lane == 31) {
    sh.warp_mass[warp] = im;
    sh.warp_count[warp] = ic;
  }
  __syncthreads();
  if (warp == 0) {
    double wm = lane < kWarps ? sh.warp_mass[lane] : 0.0;
    uint32_t wc = lane < kWarps ? sh.warp_count[lane] : 0u;
    for (int o = 1; o < 32; o <<= 1) {
      const double um = __shfl_up_sync(0xffffffffu, wm, o);
      const uint32_t uc = __shfl_up_sync(0xffffffffu, wc, o);
      if (lane >= o) {
        wm += um;
        wc += uc;
      }
    }
    if (lane < kWarps) {
      sh.warp_mass[lane] = wm;  // inclusive over warps
      sh.warp_count[lane] = wc;
    }
  }
  __syncthreads();
  Scan s;
  s.mass_before = warp > 0 ? sh.warp_mass[warp - 1] + em : em;
  s.count_before = warp > 0 ? sh.warp_count[warp - 1] + ec : ec;
  s.mass_total = sh.warp_mass[kWarps - 1];
  s.count_total = sh.warp_count[kWarps - 1];
  __syncthreads();
  return s;
}

template <typename T>
__device__ T block_sum(T v, Shared& sh) {
  const Scan s = block_scan(static_cast<double>(v), 0u, sh);
  return static_cast<T>(s.mass_total);
}

// ---- One row -----------------------------------------------------------------------------------

struct Row {
  const float* logits;
  int64_t vocab;
  float temperature;
  float mx;     // the largest scaled logit (NaN ignored)
  float min_p;  // weights below it are dropped
};

__device__ __forceinline__ float scaled(const Row& r, int64_t i) {
  return __fdiv_rn(r.logits[i], r.temperature);
}

// The CPU's weight: 1 for the largest, exp(l - mx) otherwise; 0 when NaN, masked or below min_p.
__device__ __forceinline__ float weight(const Row& r, float l) {
  const float w = l == r.mx ? 1.0f : expf(l - r.mx);
  return (w >= r.min_p && w > 0.0f) ? w : 0.0f;
}

// The first `j` tokens of key `key` (by id), or every token when j == 0 and key == 0 (no float
// has key 0). The positions before a limit are those of larger keys and these j.
struct Limit {
  uint32_t key = 0;
  uint32_t j = 0;
  float w = 0.0f;  // the weight of a token of that key
};

// A position in the order: the j-th token (1-based, by id) of the tokens of key `key`;
// mass_before is the mass of every position before the tokens of that key.
struct Pick {
  bool found = false;
  uint32_t key = 0;
  uint32_t j = 0;
  double mass_before = 0.0;
  float w = 0.0f;
};

// The first position before `lim` whose running total (the count of positions so far when
// by_count, else their mass) crosses thr: is > thr when strict, >= thr otherwise. Not found when
// even the total over every position before lim does not cross.
__device__ Pick select(const Row& row, const Limit& lim, bool by_count, double thr, bool strict,
                       Shared& sh) {
  auto crosses = [&](double v) { return strict ? v > thr : v >= thr; };
  const int tid = threadIdx.x;
  uint32_t prefix = 0, prefix_mask = 0;
  double above_mass = 0.0;
  uint32_t above_count = 0, tie_count = 0;
  Pick pick;
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
    const int n_buckets = pass == 2 ? 1024 : 2048;
    for (int b = tid; b < kBuckets; b += kThreads) {
      sh.mass[b] = 0.0;
      sh.count[b] = 0;
    }
    if (tid == 0) {
      sh.win = INT_MAX;
      sh.last = -1;
    }
    __syncthreads();
    for (int64_t i = tid; i < row.vocab; i += kThreads) {
      const float l = scaled(row, i);
      const uint32_t key = detail::float_order_key(l);
      // Tokens of the limit's key are added below, as many as the limit keeps.
      if (key <= lim.key || (key & prefix_mask) != prefix) continue;
      const float w = weight(row, l);
      if (w == 0.0f) continue;
      const int d = static_cast<int>(key >> shift) & (n_buckets - 1);
      atomicAdd(&sh.mass[d], static_cast<double>(w));
      atomicAdd(&sh.count[d], 1u);
    }
    __syncthreads();
    if (tid == 0 && lim.j > 0 && (lim.key & prefix_mask) == prefix) {
      const int d = static_cast<int>(lim.key >> shift) & (n_buckets - 1);
      sh.mass[d] += static_cast<double>(lim.j) * lim.w;
      sh.count[d] += lim.j;
    }
    __syncthreads();

    // Thread tid holds the buckets at positions tid * kPerThread + q in decreasing key order.
    double m[kPerThread];
    uint32_t c[kPerThread];
    double m_sum = 0.0;
    uint32_t c_sum = 0;
#pragma unroll
    for (int q = 0; q < kPerThread; ++q) {
      const int p = tid * kPerThread + q;
      m[q] = p < n_buckets ? sh.mass[n_buckets - 1 - p] : 0.0;
      c[q] = p < n_buckets ? sh.count[n_buckets - 1 - p] : 0u;
      m_sum += m[q];
      c_sum += c[q];
    }
    const Scan s = block_scan(m_sum, c_sum, sh);
    double run_m = above_mass + s.mass_before;
    uint32_t run_c = above_count + s.count_before;
    double before_m[kPerThread];
    uint32_t before_c[kPerThread];
#pragma unroll
    for (int q = 0; q < kPerThread; ++q) {
      before_m[q] = run_m;
      before_c[q] = run_c;
      run_m += m[q];
      run_c += c[q];
      if (c[q] > 0) {
        const int p = tid * kPerThread + q;
        if (crosses(by_count ? static_cast<double>(run_c) : run_m)) atomicMin(&sh.win, p);
        atomicMax(&sh.last, p);
      }
    }
    __syncthreads();
    int win = sh.win;
    if (win == INT_MAX) {
      // Past the first pass the chosen bucket's sub-buckets must cross; only rounding of the
      // mass sums (in another order) can say otherwise: take the last of them.
      if (pass == 0 || sh.last < 0) {
        __syncthreads();
        return pick;
      }
      win = sh.last;
    }
    if (win / kPerThread == tid) {
      const int q = win % kPerThread;
      sh.result_mass = before_m[q];
      sh.result_count = before_c[q];
      sh.result_bucket_count = c[q];
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(n_buckets - 1 - win) << shift;
    prefix_mask |= static_cast<uint32_t>(n_buckets - 1) << shift;
    above_mass = sh.result_mass;
    above_count = sh.result_count;
    tie_count = sh.result_bucket_count;
    __syncthreads();
  }

  // prefix is now the whole key; its tie_count tokens share one weight.
  pick.found = true;
  pick.key = prefix;
  pick.w = weight(row, detail::order_key_float(prefix));
  pick.mass_before = above_mass;
  const double unit = by_count ? 1.0 : static_cast<double>(pick.w);
  const double base = by_count ? static_cast<double>(above_count) : above_mass;
  const double estimate = (thr - base) / unit;
  uint32_t j = !(estimate >= 1.0)
                   ? 1u
                   : (estimate >= static_cast<double>(tie_count) ? tie_count
                                                                 : static_cast<uint32_t>(estimate));
  while (j > 1 && crosses(base + static_cast<double>(j - 1) * unit)) --j;
  while (j < tie_count && !crosses(base + static_cast<double>(j) * unit)) ++j;
  pick.j = j;
  return pick;
}

// The id of the j-th token (by id) whose scaled logit has key `key`.
__device__ int tie_id(const Row& row, uint32_t key, uint32_t j, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) sh.win = INT_MAX;
  uint32_t seen = 0;
  for (int64_t base = 0; base < row.vocab; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const bool match = i < row.vocab && detail::float_order_key(scaled(row, i)) == key;
    const uint32_t ballot = __ballot_sync(0xffffffffu, match);
    if (lane == 0) sh.warp_count[warp] = __popc(ballot);
    __syncthreads();
    uint32_t before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      const uint32_t cw = sh.warp_count[w];
      before += w < warp ? cw : 0u;
      total += cw;
    }
    before += __popc(ballot & ((1u << lane) - 1u));
    if (match && seen + before + 1 == j) sh.win = static_cast<int>(i);
    seen += total;
    __syncthreads();
    if (seen >= j) break;
  }
  const int id = sh.win;
  __syncthreads();
  return id == INT_MAX ? 0 : id;
}

// Path A of the CPU: neither top_k nor top_p cuts, so the draw walks the weights in id order.
__device__ int draw_in_id_order(const Row& row, double u, int last_id, Shared& sh) {
  if (threadIdx.x == 0) sh.win = INT_MAX;
  double run = 0.0;
  for (int64_t base = 0; base < row.vocab; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const float w = i < row.vocab ? weight(row, scaled(row, i)) : 0.0f;
    const Scan s = block_scan(static_cast<double>(w), 0u, sh);  // ends with a barrier
    if (w > 0.0f && run + s.mass_before + w > u) atomicMin(&sh.win, static_cast<int>(i));
    run += s.mass_total;
    __syncthreads();
    if (sh.win != INT_MAX) break;
  }
  const int id = sh.win;
  __syncthreads();
  return id == INT_MAX ? last_id : id;
}

// steps 6-10 of core/sampling.h for one row whose temperature is not greedy.
__device__ int sample_row(Row row, float top_p, int top_k, float uniform, Shared& sh) {
  float mx = neg_inf();
  for (int64_t i = threadIdx.x; i < row.vocab; i += kThreads) {
    const float l = scaled(row, i);
    mx = l > mx ? l : mx;
  }
  row.mx = block_max(mx, sh);
  if (!(row.mx > neg_inf())) return 0;  // everything masked

  double total = 0.0;
  uint32_t n_left = 0;
  int last_id = -1;
  for (int64_t i = threadIdx.x; i < row.vocab; i += kThreads) {
    const float w = weight(row, scaled(row, i));
    if (w > 0.0f) {
      total += w;
      ++n_left;
      last_id = static_cast<int>(i);
    }
  }
  total = block_sum(total, sh);
  n_left = block_sum(n_left, sh);
  last_id = block_max_int(last_id, sh);

  const bool use_k = top_k > 0 && static_cast<uint32_t>(top_k) < n_left;
  const bool use_p = top_p < 1.0f;
  if (!use_k && !use_p)
    return draw_in_id_order(row, static_cast<double>(uniform) * total, last_id, sh);

  Limit lim;  // every position
  bool whole_row = true;
  double kept = total;
  if (use_k) {
    const Pick k = select(row, lim, true, static_cast<double>(top_k), false, sh);
    if (k.found) {  // always: top_k < n_left
      lim = Limit{k.key, k.j, k.w};
      whole_row = false;
      kept = k.mass_before + static_cast<double>(k.j) * k.w;
    }
  }
  if (use_p) {
    // Kept while the mass before a token is < top_p of what is left: up to the first position
    // whose running mass reaches the target.
    const Pick p = select(row, lim, false, static_cast<double>(top_p) * kept, false, sh);
    if (p.found) {
      lim = Limit{p.key, p.j, p.w};
      whole_row = false;
      kept = p.mass_before + static_cast<double>(p.j) * p.w;
    }
  }
  // The draw: the first kept position whose running mass exceeds uniform * kept.
  Pick d = select(row, lim, false, static_cast<double>(uniform) * kept, true, sh);
  if (!d.found) {  // rounding left u just past the end: the last kept token, as the CPU does
    if (whole_row) {
      const Pick last = select(row, lim, true, static_cast<double>(n_left), false, sh);
      lim = Limit{last.key, last.j, last.w};
    }
    d.key = lim.key;
    d.j = lim.j;
  }
  return tie_id(row, d.key, d.j, sh);
}

// The first index of the largest logit (NaN and -inf never win; 0 when nothing is larger).
__device__ int row_argmax(const float* l, int64_t vocab, Shared& sh) {
  float best = neg_inf();
  int index = INT_MAX;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float v = l[i];
    if (v > best) {
      best = v;
      index = static_cast<int>(i);
    }
  }
  const int id = block_argmax(best, index, sh);
  return id == INT_MAX ? 0 : id;
}

__global__ void __launch_bounds__(kThreads)
    argmax_kernel(const float* __restrict__ logits, int64_t n, int64_t vocab,
                  int32_t* __restrict__ ids) {
  __shared__ Shared sh;
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const int id = row_argmax(logits + t * vocab, vocab, sh);
    if (threadIdx.x == 0) ids[t] = id;
  }
}

__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* __restrict__ logits, int64_t n, int64_t vocab, SamplingBatch p,
                  int32_t* __restrict__ ids) {
  __shared__ Shared sh;
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const float* l = logits + t * vocab;
    const float temperature = p.temperature[t];
    int id;
    if (temperature < kGreedyEpsilon) {
      id = row_argmax(l, vocab, sh);
    } else {
      const Row row{l, vocab, temperature, 0.0f, p.min_p[t]};
      id = sample_row(row, p.top_p[t], p.top_k[t], p.uniform[t], sh);
    }
    if (threadIdx.x == 0) ids[t] = id;
  }
}

}  // namespace

void argmax(const float* logits, int64_t n, int64_t vocab, int32_t* ids, Stream stream) {
  if (n <= 0) return;
  if (vocab <= 0 || vocab > INT_MAX) {
    argmax_kernel<<<0, kThreads, 0, stream>>>(logits, n, vocab, ids);  // fails: check() says so
    return;
  }
  argmax_kernel<<<static_cast<unsigned>(n < kMaxBlocks ? n : kMaxBlocks), kThreads, 0, stream>>>(
      logits, n, vocab, ids);
}

void sample(const float* logits, int64_t n, int64_t vocab, const SamplingBatch& params,
            int32_t* ids, Stream stream) {
  if (n <= 0) return;
  if (vocab <= 0 || vocab > INT_MAX) {
    sample_kernel<<<0, kThreads, 0, stream>>>(logits, n, vocab, params, ids);  // fails
    return;
  }
  sample_kernel<<<static_cast<unsigned>(n < kMaxBlocks ? n : kMaxBlocks), kThreads, 0, stream>>>(
      logits, n, vocab, params, ids);
}

}  // namespace moemesh::kernels::cuda
