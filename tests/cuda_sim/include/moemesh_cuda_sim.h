// The CUDA simulator's contract: enough of the CUDA runtime, its bf16/fp16/fp8 types, WMMA,
// cuBLAS and NCCL headers for the sources of kernels/cuda to compile as C++ and run on the CPU.
//
// Each kernel launch runs at once, on the launching thread: the grid's blocks one after another,
// a block's threads as fibers (Boost.Context) switched at every __syncthreads, warp shuffle, vote
// and __syncwarp, so that the kernels' own code (indexing, shared memory, barriers, warp
// exchanges) runs as written. Shared memory is a thread_local static per kernel; device memory is
// host memory, each allocation ending at an inaccessible page (an access past a buffer's end stops
// the process, naming the kernel). Threads that wait at different barriers are a launch failure
// ("deadlock"), reported by the next cudaGetLastError.
//
// Streams: everything runs at once, in order, except asynchronous copies and memsets into device
// memory on the default (legacy) stream: those land only when the default stream or a blocking
// stream next does something (a copy, a memset, a kernel, a cuBLAS call, an event record, a
// synchronisation) or the device synchronises (cudaDeviceSynchronize, cudaMemcpy, cudaFree). Work
// on a stream created with cudaStreamNonBlocking does not wait for them, as on a GPU, where such
// a copy from pageable memory may still be in flight when cudaMemcpyAsync returns: a kernel on a
// non-blocking stream that reads an upload the default stream has not finished reads stale memory
// here every time, not once in a while.
//
// What it does not model: timing and concurrency between blocks, accesses before a buffer's
// start, hardware rounding of fast-math intrinsics, tensor-core accumulation order.
#pragma once

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- keywords -----------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __constant__

// ---- vector types -------------------------------------------------------------------------
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct __align__(8) float2 {
  float x, y;
};
struct __align__(16) float4 {
  float x, y, z, w;
};
struct __align__(8) uint2 {
  unsigned x, y;
};
struct __align__(16) uint4 {
  unsigned x, y, z, w;
};
struct __align__(8) ushort4 {
  unsigned short x, y, z, w;
};
inline float2 make_float2(float x, float y) {
  return {x, y};
}
inline float4 make_float4(float x, float y, float z, float w) {
  return {x, y, z, w};
}
inline uint2 make_uint2(unsigned x, unsigned y) {
  return {x, y};
}
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return {x, y, z, w};
}
inline ushort4 make_ushort4(unsigned short x, unsigned short y, unsigned short z,
                            unsigned short w) {
  return {x, y, z, w};
}

// ---- the simulator ------------------------------------------------------------------------
namespace moemesh_sim {

// The running thread's indices (valid inside a kernel only).
struct ThreadContext {
  uint3 thread_idx{0, 0, 0};
  uint3 block_idx{0, 0, 0};
  dim3 block_dim;
  dim3 grid_dim;
  int linear = 0;  // thread_idx as one number (x fastest)
};
const ThreadContext& context();

// Block-wide barrier, warp barrier, and a warp exchange: every lane of `mask` (that exists and
// has not exited) offers `mine`; returns the 32 lanes' offers (lanes outside the mask: their own
// slot's stale value, 0 at first).
void sync_block();
void sync_warp(unsigned mask);
void exchange(unsigned mask, uint64_t mine, uint64_t (&all)[32]);

// Runs `body` as every thread of a grid; records launch errors for cudaGetLastError. Threads run
// in index order between barriers, or in reverse order with MOEMESH_CUDA_SIM_ORDER=reverse (a
// read of another thread's write without a barrier between them fails in one of the two).
// `stream` (a cudaStream_t) orders the launch after the default stream's work when it waits for it
// (above).
void run_grid(const char* name, dim3 grid, dim3 block, const std::function<void()>& body,
              const void* stream = nullptr);

struct Launch {
  dim3 grid, block;
  const char* name = "a kernel";
  const void* stream = nullptr;
  Launch named(const char* n) const { return {grid, block, n, stream}; }
  template <typename Kernel, typename... Args>
  void operator()(Kernel* kernel, Args&&... args) const {
    auto params = std::make_tuple(std::decay_t<Args>(std::forward<Args>(args))...);
    run_grid(
        name, grid, block, [kernel, params] { std::apply(kernel, params); }, stream);
  }
};
inline Launch launch(dim3 grid, dim3 block, std::size_t = 0, const void* stream = nullptr) {
  return {grid, block, "a kernel", stream};
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
inline int lane_id() {
  return context().linear & 31;
}

// Conversions with CUDA's rounding (defined in the runtime).
uint16_t f32_to_bf16_rn(float v);
uint8_t f32_to_e4m3_satfinite(float v);
float e4m3_to_f32(uint8_t bits);
uint16_t f32_to_f16_rn(float v);
float f16_to_f32(uint16_t bits);

}  // namespace moemesh_sim

#define threadIdx (::moemesh_sim::context().thread_idx)
#define blockIdx (::moemesh_sim::context().block_idx)
#define blockDim (::moemesh_sim::context().block_dim)
#define gridDim (::moemesh_sim::context().grid_dim)

// ---- device functions ---------------------------------------------------------------------
inline void __syncthreads() {
  moemesh_sim::sync_block();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  moemesh_sim::sync_warp(mask);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  uint64_t all[32];
  moemesh_sim::exchange(mask, moemesh_sim::to_bits(v), all);
  const int lane = moemesh_sim::lane_id();
  const int s = (lane & ~(width - 1)) + (src & (width - 1));
  return moemesh_sim::from_bits<T>(all[s]);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  uint64_t all[32];
  moemesh_sim::exchange(mask, moemesh_sim::to_bits(v), all);
  const int lane = moemesh_sim::lane_id();
  const int s = lane ^ lane_mask;
  const int base = lane & ~(width - 1);
  return s < base || s >= base + width ? v : moemesh_sim::from_bits<T>(all[s]);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  uint64_t all[32];
  moemesh_sim::exchange(mask, moemesh_sim::to_bits(v), all);
  const int lane = moemesh_sim::lane_id();
  return (lane & (width - 1)) < static_cast<int>(delta)
             ? v
             : moemesh_sim::from_bits<T>(all[lane - static_cast<int>(delta)]);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  uint64_t all[32];
  moemesh_sim::exchange(mask, predicate ? 1 : 0, all);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && all[l]) bits |= 1u << l;
  return bits;
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}
inline int __popc(unsigned v) {
  return std::popcount(v);
}
inline float __uint_as_float(unsigned v) {
  return std::bit_cast<float>(v);
}
inline float __int_as_float(int v) {
  return std::bit_cast<float>(v);
}
inline unsigned __float_as_uint(float v) {
  return std::bit_cast<unsigned>(v);
}
inline int __float_as_int(float v) {
  return std::bit_cast<int>(v);
}
// Correctly rounded single operations (no contraction into an FMA).
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
inline float __fadd_rn(float a, float b) {
  volatile float r = a + b;
  return r;
}
inline float __fsub_rn(float a, float b) {
  volatile float r = a - b;
  return r;
}
inline float __fdiv_rn(float a, float b) {
  volatile float r = a / b;
  return r;
}

template <typename A, typename B>
constexpr std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B>
constexpr std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// Blocks run one after another on one thread: atomics are plain read-modify-writes.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  const T old = *p;
  if (v < old) *p = v;
  return old;
}
template <typename T>
T atomicMax(T* p, T v) {
  const T old = *p;
  if (old < v) *p = v;
  return old;
}
