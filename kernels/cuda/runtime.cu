// Device discovery, errors, owned buffers, streams and copies.
#include <cuda_runtime.h>

#include <cstdio>
#include <string>
#include <utility>

#include "kernels/cuda/cuda_kernels.h"

namespace moemesh::kernels::cuda {

namespace {

std::string describe(cudaError_t e, const char* what) {
  return std::string(what) + ": CUDA error " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
         ")";
}

}  // namespace

bool device_memory_is_host() {
  return false;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error of later work
    return 0;
  }
  return n;
}

std::string device_description(int device) {
  if (device < 0 || device >= device_count()) return {};
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, device) != cudaSuccess) {
    cudaGetLastError();
    return {};
  }
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s (sm_%d%d, %d SMs, %.1f GiB)", p.name, p.major, p.minor,
                p.multiProcessorCount,
                static_cast<double>(p.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

std::string set_device(int device) {
  const int n = device_count();
  if (device < 0 || device >= n)
    return "CUDA device " + std::to_string(device) + " does not exist: this machine has " +
           std::to_string(n) + " (use cuda:0 .. cuda:" + std::to_string(n > 0 ? n - 1 : 0) +
           ", or --device cpu)";
  const cudaError_t e = cudaSetDevice(device);
  return e == cudaSuccess ? std::string() : describe(e, "cudaSetDevice");
}

std::string check(const char* what) {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : describe(e, what);
}

std::string synchronize(Stream stream, const char* what) {
  const cudaError_t e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return describe(e, what);
  }
  return check(what);
}

std::string memory_info(int64_t* free_bytes, int64_t* total_bytes) {
  std::size_t f = 0, t = 0;
  const cudaError_t e = cudaMemGetInfo(&f, &t);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return describe(e, "cudaMemGetInfo");
  }
  *free_bytes = static_cast<int64_t>(f);
  *total_bytes = static_cast<int64_t>(t);
  return {};
}

// ---- Buffers -----------------------------------------------------------------------------------

struct DeviceMemory {
  static cudaError_t alloc(void** p, std::size_t bytes) { return cudaMalloc(p, bytes); }
  static void free(void* p) { cudaFree(p); }
  static constexpr const char* kWhat = "GPU memory";
};

struct PinnedMemory {
  static cudaError_t alloc(void** p, std::size_t bytes) { return cudaMallocHost(p, bytes); }
  static void free(void* p) { cudaFreeHost(p); }
  static constexpr const char* kWhat = "pinned memory";
};

template <typename Kind>
Buffer<Kind> Buffer<Kind>::allocate(std::size_t bytes, std::string* error) {
  Buffer b;
  if (bytes == 0) return b;
  const cudaError_t e = Kind::alloc(&b.data_, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    b.data_ = nullptr;
    if (error)
      *error =
          describe(e, ("allocating " + std::to_string(bytes) + " bytes of " + Kind::kWhat).c_str());
    return b;
  }
  b.size_ = bytes;
  return b;
}

template <typename Kind>
void Buffer<Kind>::reset() {
  if (data_) Kind::free(data_);
  data_ = nullptr;
  size_ = 0;
}

template class Buffer<DeviceMemory>;
template class Buffer<PinnedMemory>;

// ---- StreamHandle ------------------------------------------------------------------------------

StreamHandle StreamHandle::create(std::string* error) {
  StreamHandle h;
  cudaStream_t s = nullptr;
  const cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  if (e != cudaSuccess) {
    cudaGetLastError();
    if (error) *error = describe(e, "cudaStreamCreate");
    return h;
  }
  h.stream_ = s;
  return h;
}

StreamHandle::~StreamHandle() {
  if (stream_) cudaStreamDestroy(stream_);
}

StreamHandle::StreamHandle(StreamHandle&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)) {}

StreamHandle& StreamHandle::operator=(StreamHandle&& other) noexcept {
  if (this != &other) {
    if (stream_) cudaStreamDestroy(stream_);
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

// ---- Copies ------------------------------------------------------------------------------------

void copy(void* dst, const void* src, std::size_t bytes, Stream stream) {
  if (bytes) cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream);
}

void copy_rows(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch,
               std::size_t width, std::size_t rows, Stream stream) {
  if (width && rows)
    cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, cudaMemcpyDefault, stream);
}

void fill_bytes(void* dst, int value, std::size_t bytes, Stream stream) {
  if (bytes) cudaMemsetAsync(dst, value, bytes, stream);
}

}  // namespace moemesh::kernels::cuda
