// The CUDA simulator's runtime (tests/cuda_sim/include/moemesh_cuda_sim.h): fibers for a block's
// threads, the runtime API, cuBLAS's GEMMs and CUDA's conversions.
#include <sys/mman.h>
#include <unistd.h>

#include <boost/context/fiber.hpp>
#include <boost/context/stack_context.hpp>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "cublas_v2.h"
#include "cuda_runtime.h"
#include "kernels/cuda/cuda_kernels.h"

namespace ctx = boost::context;

namespace moemesh_sim {
namespace {

// ---- fibers ---------------------------------------------------------------------------------

// Stacks reused across launches (one pool per host thread), each with a guard page below it.
class StackPool {
 public:
  static constexpr std::size_t kSize = 256 * 1024;
  ~StackPool() {
    for (void* base : free_) munmap(base, kSize + page());
  }
  ctx::stack_context allocate() {
    void* base = nullptr;
    if (!free_.empty()) {
      base = free_.back();
      free_.pop_back();
    } else {
      base =
          mmap(nullptr, kSize + page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (base == MAP_FAILED) throw std::bad_alloc();
      mprotect(base, page(), PROT_NONE);
    }
    ctx::stack_context sc;
    sc.size = kSize;
    sc.sp = static_cast<char*>(base) + page() + kSize;
    return sc;
  }
  void release(const ctx::stack_context& sc) {
    free_.push_back(static_cast<char*>(sc.sp) - kSize - page());
  }

 private:
  static std::size_t page() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }
  std::vector<void*> free_;
};
thread_local StackPool t_stacks;

struct PooledStack {
  ctx::stack_context allocate() { return t_stacks.allocate(); }
  void deallocate(ctx::stack_context& sc) { t_stacks.release(sc); }
};

enum class Wait : uint8_t { None, Block, Warp, Done };

struct Lane {
  ctx::fiber fiber;  // the thread's fiber while it is suspended
  ctx::fiber back;   // the scheduler, while the thread runs
  ThreadContext tc;
  Wait wait = Wait::None;
  unsigned mask = 0;     // Wait::Warp: the lanes that take part
  uint64_t offer = 0;    // the value offered to a warp exchange
  bool offered = false;  // the barrier is an exchange
};

struct Block {
  std::vector<Lane> lanes;
  std::vector<uint64_t> exchanged;  // per warp x 32: the offers of the last exchange
  int current = -1;
  int live = 0;
};

thread_local Block* t_block = nullptr;
thread_local std::string t_failure;  // a launch failure, for the next cudaGetLastError
thread_local cudaError_t t_last_error = cudaSuccess;

Lane& me() {
  return t_block->lanes[static_cast<std::size_t>(t_block->current)];
}

void suspend(Wait w, unsigned mask) {
  Lane& l = me();
  l.wait = w;
  l.mask = mask;
  l.back = std::move(l.back).resume();
}

// Releases the waiters of a barrier whose participants have all arrived; false if none could go.
bool release(Block& b) {
  const int n = static_cast<int>(b.lanes.size());
  bool any_block = false, all_block = true;
  for (const Lane& l : b.lanes) {
    if (l.wait == Wait::Done) continue;
    if (l.wait == Wait::Block)
      any_block = true;
    else
      all_block = false;
  }
  if (any_block && all_block) {
    for (Lane& l : b.lanes)
      if (l.wait == Wait::Block) l.wait = Wait::None;
    return true;
  }
  bool released = false;
  for (int w0 = 0; w0 < n; w0 += 32) {
    const int w1 = std::min(n, w0 + 32);
    // The first waiting lane's mask decides who must be there.
    unsigned mask = 0;
    for (int i = w0; i < w1; ++i)
      if (b.lanes[i].wait == Wait::Warp) {
        mask = b.lanes[i].mask;
        break;
      }
    if (!mask) continue;
    bool ready = true;
    for (int i = w0; i < w1 && ready; ++i) {
      const Lane& l = b.lanes[i];
      if (!(mask >> (i - w0) & 1u) || l.wait == Wait::Done) continue;
      if (l.wait != Wait::Warp) ready = false;
    }
    if (!ready) continue;
    uint64_t* slots = &b.exchanged[static_cast<std::size_t>(w0)];
    for (int i = w0; i < w1; ++i) {
      Lane& l = b.lanes[i];
      if (l.wait != Wait::Warp || !(mask >> (i - w0) & 1u)) continue;
      if (l.offered) slots[i - w0] = l.offer;
      l.wait = Wait::None;
      l.offered = false;
    }
    released = true;
  }
  return released;
}

std::string describe(const Block& b) {
  std::string s;
  for (std::size_t i = 0; i < b.lanes.size() && s.size() < 200; ++i) {
    const Lane& l = b.lanes[i];
    if (l.wait == Wait::Done) continue;
    s += " t" + std::to_string(i) + (l.wait == Wait::Block ? ":__syncthreads" : ":warp");
  }
  return s;
}

bool reverse_order() {
  static const bool reverse = [] {
    const char* v = std::getenv("MOEMESH_CUDA_SIM_ORDER");
    return v && std::string(v) == "reverse";
  }();
  return reverse;
}

}  // namespace

const ThreadContext& context() {
  return me().tc;
}

void sync_block() {
  suspend(Wait::Block, 0);
}

void sync_warp(unsigned mask) {
  suspend(Wait::Warp, mask);
}

void exchange(unsigned mask, uint64_t mine, uint64_t (&all)[32]) {
  Lane& l = me();
  l.offer = mine;
  l.offered = true;
  suspend(Wait::Warp, mask);
  const std::size_t w0 = static_cast<std::size_t>(t_block->current & ~31);
  for (int i = 0; i < 32; ++i)
    all[i] = w0 + i < t_block->exchanged.size() ? t_block->exchanged[w0 + i] : 0;
}

namespace {

thread_local const char* t_kernel = nullptr;  // the kernel running on this thread

// A fault inside a kernel is, in the simulator, an access outside device memory's buffers.
void on_fault(int sig) {
  if (t_kernel) {
    const char* a = "cuda_sim: kernel ";
    const char* b = " touched memory outside its buffers (past the end of a device allocation?)\n";
    (void)!write(2, a, std::strlen(a));
    (void)!write(2, t_kernel, std::strlen(t_kernel));
    (void)!write(2, b, std::strlen(b));
  }
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

}  // namespace

void land_default_stream_work(const void* stream);

void run_grid(const char* name, dim3 grid, dim3 block, const std::function<void()>& body,
              const void* stream) {
  land_default_stream_work(stream);
  static const bool handler = [] {
    struct sigaction sa {};
    sa.sa_handler = on_fault;
    sa.sa_flags = SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
    return true;
  }();
  (void)handler;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0) {
    t_last_error = cudaErrorInvalidValue;
    return;
  }
  if (blocks == 0 || threads > 1024 || block.z > 64 || grid.y > 65535 || grid.z > 65535) {
    t_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (t_block) {
    std::fprintf(stderr, "cuda_sim: a kernel launched from a kernel\n");
    std::abort();
  }
  t_kernel = name;
  Block b;
  b.lanes.resize(threads);
  b.exchanged.assign((threads + 31) & ~uint64_t{31}, 0);
  t_block = &b;
  for (uint64_t id = 0; id < blocks && t_failure.empty(); ++id) {
    const uint3 bi{static_cast<unsigned>(id % grid.x), static_cast<unsigned>(id / grid.x % grid.y),
                   static_cast<unsigned>(id / (uint64_t{grid.x} * grid.y))};
    for (uint64_t t = 0; t < threads; ++t) {
      Lane& l = b.lanes[t];
      l.tc.thread_idx = {static_cast<unsigned>(t % block.x),
                         static_cast<unsigned>(t / block.x % block.y),
                         static_cast<unsigned>(t / (uint64_t{block.x} * block.y))};
      l.tc.block_idx = bi;
      l.tc.block_dim = block;
      l.tc.grid_dim = grid;
      l.tc.linear = static_cast<int>(t);
      l.wait = Wait::None;
      l.offered = false;
      const std::size_t index = t;
      l.fiber =
          ctx::fiber(std::allocator_arg, PooledStack{}, [&b, &body, index](ctx::fiber&& back) {
            b.lanes[index].back = std::move(back);
            body();
            b.lanes[index].wait = Wait::Done;
            --b.live;
            return std::move(b.lanes[index].back);
          });
    }
    b.live = static_cast<int>(threads);
    while (b.live > 0) {
      for (std::size_t i = 0; i < b.lanes.size(); ++i) {
        const std::size_t t = reverse_order() ? b.lanes.size() - 1 - i : i;
        Lane& l = b.lanes[t];
        if (l.wait != Wait::None) continue;
        b.current = static_cast<int>(t);
        l.fiber = std::move(l.fiber).resume();
      }
      b.current = -1;
      if (b.live > 0 && !release(b)) {
        t_failure = std::string("deadlock in ") + name + " block " + std::to_string(id) +
                    ": threads wait at different barriers:" + describe(b);
        break;
      }
    }
    for (Lane& l : b.lanes) l.fiber = {};  // unwinds the threads of a deadlocked block
  }
  t_block = nullptr;
  t_kernel = nullptr;
  if (!t_failure.empty()) {
    std::fprintf(stderr, "cuda_sim: %s\n", t_failure.c_str());
    t_last_error = cudaErrorLaunchFailure;
    t_failure.clear();
  }
}

// ---- conversions ----------------------------------------------------------------------------

uint16_t f32_to_bf16_rn(float v) {
  const uint32_t u = std::bit_cast<uint32_t>(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN: CUDA's canonical bf16 NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Decoding is exact: kernels/cuda's host decoder (checked on every code by its own tests).
float e4m3_to_f32(uint8_t bits) {
  return moemesh::kernels::cuda::fp8_e4m3_to_f32(bits);
}

// Nearest E4M3 value, ties to the even code; beyond 448 saturated to +-448; NaN to 0x7F.
uint8_t f32_to_e4m3_satfinite(float v) {
  if (std::isnan(v)) return 0x7F;
  const uint8_t sign = std::signbit(v) ? 0x80 : 0;
  const float a = std::fabs(v);
  if (a >= 448.0f) return sign | 0x7E;
  // Search the 127 finite magnitudes (codes 0..126 are increasing).
  uint8_t best = 0;
  for (int c = 1; c <= 126; ++c) {
    const float d = std::fabs(e4m3_to_f32(static_cast<uint8_t>(c)) - a);
    const float bd = std::fabs(e4m3_to_f32(best) - a);
    if (d < bd || (d == bd && (c & 1) == 0)) best = static_cast<uint8_t>(c);
  }
  return sign | best;
}

uint16_t f32_to_f16_rn(float v) {
  // Exact for the values simulated here (E4M3 codes); general rounding is not needed.
  if (std::isnan(v)) return 0x7e00;
  const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  float a = std::fabs(v);
  if (a == 0.0f) return sign;
  int e = 0;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int exp = e - 1 + 15;
  if (exp <= 0) {  // subnormal: a / 2^-24
    return sign | static_cast<uint16_t>(std::nearbyint(std::ldexp(a, 24)));
  }
  if (exp >= 31) return sign | 0x7c00;
  const uint32_t mant = static_cast<uint32_t>(std::nearbyint((m * 2.0f - 1.0f) * 1024.0f));
  return static_cast<uint16_t>(sign | (exp << 10)) + static_cast<uint16_t>(mant);
}

float f16_to_f32(uint16_t h) {
  const float sign = h & 0x8000 ? -1.0f : 1.0f;
  const int exp = h >> 10 & 0x1F;
  const int mant = h & 0x3FF;
  if (exp == 0) return sign * std::ldexp(static_cast<float>(mant), -24);
  if (exp == 31) return mant ? std::nanf("") : sign * INFINITY;
  return sign * std::ldexp(1.0f + static_cast<float>(mant) / 1024.0f, exp - 15);
}

}  // namespace moemesh_sim

// ---- the runtime API ------------------------------------------------------------------------

namespace {

constexpr std::size_t kTotalMemory = std::size_t{80} << 30;
std::mutex g_mu;
std::size_t g_allocated = 0;  // guarded by g_mu
thread_local int t_device = 0;

struct Allocation {
  void* base = nullptr;    // the mapping
  std::size_t mapped = 0;  // its bytes, the guard page included
  std::size_t bytes = 0;   // asked for
};
std::map<void*, Allocation> g_allocations;  // guarded by g_mu

// Copies and memsets issued on the default stream that have not landed: the bytes they will
// write, in issue order.
struct Landing {
  void* dst;
  std::vector<unsigned char> bytes;
};
std::vector<Landing> g_in_flight;  // guarded by g_mu

bool is_device(const void* p) {  // g_mu held
  auto it = g_allocations.upper_bound(const_cast<void*>(p));
  if (it == g_allocations.begin()) return false;
  --it;
  return static_cast<const char*>(p) < static_cast<const char*>(it->first) + it->second.bytes;
}

// Lands every copy and memset in flight on the default stream.
void land() {
  std::vector<Landing> due;
  {
    std::lock_guard lock(g_mu);
    due.swap(g_in_flight);
  }
  for (const Landing& l : due) std::memcpy(l.dst, l.bytes.data(), l.bytes.size());
}

// Queues a default-stream write into device memory; false when dst is not device memory (the
// write then happens at once).
bool defer(void* dst, std::vector<unsigned char> bytes) {
  std::lock_guard lock(g_mu);
  if (!is_device(dst)) return false;
  g_in_flight.push_back({dst, std::move(bytes)});
  return true;
}

cudaError_t fail(cudaError_t e) {
  moemesh_sim::t_last_error = e;
  return e;
}

int device_count() {
  const char* v = std::getenv("MOEMESH_CUDA_SIM_DEVICES");
  return v ? std::atoi(v) : 1;
}

}  // namespace

struct CUstream_st {
  bool non_blocking = false;
};
struct CUevent_st {};
struct cublasContext {
  cudaStream_t stream = nullptr;
};

namespace {

// Work on `s` is ordered after the default stream's unless s is non-blocking.
void ordered(cudaStream_t s) {
  if (s == nullptr || !s->non_blocking) land();
}

}  // namespace

namespace moemesh_sim {
void land_default_stream_work(const void* stream) {
  ordered(static_cast<cudaStream_t>(const_cast<void*>(stream)));
}
}  // namespace moemesh_sim

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
    case cudaErrorNoDevice:
      return "cudaErrorNoDevice";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorNoDevice:
      return "no CUDA-capable device is detected";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure (simulated kernel)";
  }
  return "unknown error";
}
cudaError_t cudaGetLastError() {
  const cudaError_t e = moemesh_sim::t_last_error;
  moemesh_sim::t_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() {
  return moemesh_sim::t_last_error;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = device_count();
  return *n > 0 ? cudaSuccess : fail(cudaErrorNoDevice);
}
cudaError_t cudaGetDevice(int* d) {
  *d = t_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= device_count()) return fail(cudaErrorInvalidDevice);
  t_device = d;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d < 0 || d >= device_count()) return fail(cudaErrorInvalidDevice);
  *p = {};
  std::snprintf(p->name, sizeof p->name, "moemesh CUDA simulator");
  p->totalGlobalMem = kTotalMemory;
  p->sharedMemPerBlock = 48 * 1024;
  p->warpSize = 32;
  p->maxThreadsPerBlock = 1024;
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = 132;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d) {
  if (d < 0 || d >= device_count()) return fail(cudaErrorInvalidDevice);
  if (a != cudaDevAttrMultiProcessorCount) return fail(cudaErrorInvalidValue);
  *v = 132;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
  land();
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(std::size_t* free_bytes, std::size_t* total_bytes) {
  std::lock_guard lock(g_mu);
  *free_bytes = kTotalMemory - g_allocated;
  *total_bytes = kTotalMemory;
  return cudaSuccess;
}
// Device allocations end where an inaccessible page begins, so that a kernel (or a copy) that
// reads or writes past the end of a buffer stops the process at once with a message naming the
// kernel, instead of reading a neighbour's data. Buffers are 16-byte aligned (CUDA gives 256;
// kernels here rely on 16 at most), so at most 15 bytes past the end go unnoticed.
cudaError_t cudaMalloc(void** p, std::size_t bytes) {
  *p = nullptr;
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  const std::size_t body = (std::max<std::size_t>(bytes, 1) + 15) & ~std::size_t{15};
  const std::size_t mapped = (body + page - 1) / page * page + page;
  {
    std::lock_guard lock(g_mu);
    if (bytes > kTotalMemory - g_allocated) return fail(cudaErrorMemoryAllocation);
    g_allocated += bytes;
  }
  void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) {
    std::lock_guard lock(g_mu);
    g_allocated -= bytes;
    return fail(cudaErrorMemoryAllocation);
  }
  char* guard = static_cast<char*>(base) + mapped - page;
  mprotect(guard, page, PROT_NONE);
  *p = guard - body;
  std::lock_guard lock(g_mu);
  g_allocations[*p] = {base, mapped, bytes};
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  land();  // cudaFree synchronises the device
  Allocation a;
  {
    std::lock_guard lock(g_mu);
    auto it = g_allocations.find(p);
    if (it == g_allocations.end()) return fail(cudaErrorInvalidValue);
    a = it->second;
    g_allocations.erase(it);
    g_allocated -= a.bytes;
  }
  munmap(a.base, a.mapped);
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, std::size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  return *p ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}
cudaError_t cudaFreeHost(void* p) {
  land();
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind) {
  land();
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind,
                            cudaStream_t s) {
  ordered(s);
  if (!bytes) return cudaSuccess;
  // The source is read now (staged), the destination written when the copy lands.
  if (s == nullptr) {
    const auto* from = static_cast<const unsigned char*>(src);
    if (defer(dst, std::vector<unsigned char>(from, from + bytes))) return cudaSuccess;
  }
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpy2DAsync(void* dst, std::size_t dpitch, const void* src, std::size_t spitch,
                              std::size_t width, std::size_t height, cudaMemcpyKind,
                              cudaStream_t s) {
  if (width > dpitch || width > spitch) return fail(cudaErrorInvalidValue);
  ordered(s);
  for (std::size_t r = 0; r < height; ++r)
    std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch,
                 width);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, std::size_t bytes, cudaStream_t s) {
  ordered(s);
  if (!bytes) return cudaSuccess;
  if (s == nullptr &&
      defer(dst, std::vector<unsigned char>(bytes, static_cast<unsigned char>(value))))
    return cudaSuccess;
  std::memset(dst, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = new CUstream_st;
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  *s = new CUstream_st;
  (*s)->non_blocking = (flags & cudaStreamNonBlocking) != 0;
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  ordered(s);
  return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) {
  return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new CUevent_st;
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  return cudaEventCreate(e);
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t s) {
  ordered(s);
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) {
  return cudaSuccess;
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) {
  *ms = 0.0f;
  return cudaSuccess;
}

// ---- cuBLAS ---------------------------------------------------------------------------------

namespace {

float load(const void* p, cudaDataType t, std::size_t i) {
  if (t == CUDA_R_32F) return static_cast<const float*>(p)[i];
  return std::bit_cast<float>(static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16);
}
void store(void* p, cudaDataType t, std::size_t i, float v) {
  if (t == CUDA_R_32F)
    static_cast<float*>(p)[i] = v;
  else
    static_cast<uint16_t*>(p)[i] = moemesh_sim::f32_to_bf16_rn(v);
}
bool known(cudaDataType t) {
  return t == CUDA_R_32F || t == CUDA_R_16BF;
}

// Column-major C (m x n) = alpha op(A) op(B) + beta C, as cuBLAS defines it.
cublasStatus_t gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha,
                    const void* a, cudaDataType at, int lda, const void* b, cudaDataType bt,
                    int ldb, float beta, void* c, cudaDataType ct, int ldc) {
  if (m < 0 || n < 0 || k < 0 || !known(at) || !known(bt) || !known(ct))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (lda < std::max(1, ta == CUBLAS_OP_N ? m : k) ||
      ldb < std::max(1, tb == CUBLAS_OP_N ? k : n) || ldc < std::max(1, m))
    return CUBLAS_STATUS_INVALID_VALUE;
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      float s = 0.0f;
      for (int l = 0; l < k; ++l) {
        const std::size_t ai = ta == CUBLAS_OP_N ? std::size_t(i) + std::size_t(l) * lda
                                                 : std::size_t(l) + std::size_t(i) * lda;
        const std::size_t bi = tb == CUBLAS_OP_N ? std::size_t(l) + std::size_t(j) * ldb
                                                 : std::size_t(j) + std::size_t(l) * ldb;
        s += load(a, at, ai) * load(b, bt, bi);
      }
      const std::size_t ci = std::size_t(i) + std::size_t(j) * ldc;
      float v = alpha * s;
      if (beta != 0.0f) v += beta * load(c, ct, ci);
      store(c, ct, ci, v);
    }
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

cublasStatus_t cublasCreate(cublasHandle_t* h) {
  *h = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->stream = s;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void*, std::size_t) {
  return h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}
const char* cublasGetStatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}
const char* cublasGetStatusString(cublasStatus_t s) {
  return s == CUBLAS_STATUS_SUCCESS ? "success" : "simulated cuBLAS refused the call";
}
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                            int n, int k, const void* alpha, const void* a, cudaDataType at,
                            int lda, const void* b, cudaDataType bt, int ldb, const void* beta,
                            void* c, cudaDataType ct, int ldc, cublasComputeType_t,
                            cublasGemmAlgo_t) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  ordered(h->stream);
  return gemm(ta, tb, m, n, k, *static_cast<const float*>(alpha), a, at, lda, b, bt, ldb,
              *static_cast<const float*>(beta), c, ct, ldc);
}
cublasStatus_t cublasGemmStridedBatchedEx(
    cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
    const void* alpha, const void* a, cudaDataType at, int lda, long long stride_a, const void* b,
    cudaDataType bt, int ldb, long long stride_b, const void* beta, void* c, cudaDataType ct,
    int ldc, long long stride_c, int batch, cublasComputeType_t, cublasGemmAlgo_t) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  ordered(h->stream);
  auto at_ = [](const void* p, cudaDataType t, long long i) {
    return static_cast<const char*>(p) + i * (t == CUDA_R_32F ? 4 : 2);
  };
  for (int i = 0; i < batch; ++i) {
    const cublasStatus_t s =
        gemm(ta, tb, m, n, k, *static_cast<const float*>(alpha), at_(a, at, i * stride_a), at, lda,
             at_(b, bt, i * stride_b), bt, ldb, *static_cast<const float*>(beta),
             const_cast<char*>(at_(c, ct, i * stride_c)), ct, ldc);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
  }
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t h, const cublasOperation_t ta[],
                                          const cublasOperation_t tb[], const int m[],
                                          const int n[], const int k[], const void* alpha,
                                          const void* const a[], cudaDataType at, const int lda[],
                                          const void* const b[], cudaDataType bt, const int ldb[],
                                          const void* beta, void* const c[], cudaDataType ct,
                                          const int ldc[], int group_count, const int group_size[],
                                          cublasComputeType_t) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  ordered(h->stream);
  // As cuBLAS 13.0: float32 C is not supported by the grouped call.
  if (ct == CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  int index = 0;  // a, b and c hold one pointer per problem, group after group
  for (int g = 0; g < group_count; ++g)
    for (int i = 0; i < group_size[g]; ++i, ++index) {
      const cublasStatus_t s = gemm(
          ta[g], tb[g], m[g], n[g], k[g], static_cast<const float*>(alpha)[g], a[index], at, lda[g],
          b[index], bt, ldb[g], static_cast<const float*>(beta)[g], c[index], ct, ldc[g]);
      if (s != CUBLAS_STATUS_SUCCESS) return s;
    }
  return CUBLAS_STATUS_SUCCESS;
}
