// Internal: a GPU made current, a stream on it and a cuBLAS handle on that stream: what the GPU
// forward pass and GPU expert shards start from.
#pragma once

#include <algorithm>
#include <memory>
#include <string>

#include "core/error.h"
#include "kernels/cuda/cuda_kernels.h"

namespace moemesh::detail {

// A kernels/cuda error message ("" for none) as a Status.
inline Status from(const std::string& error) {
  return error.empty() ? Status{} : Status(Error(error));
}

// Grows `b` (device or pinned scratch) to hold at least `bytes`, at least doubling it so that
// growing step by step costs few reallocations; the old contents are not kept.
template <typename Kind>
Status ensure(kernels::cuda::Buffer<Kind>& b, std::size_t bytes) {
  if (b.size() >= bytes) return {};
  const std::size_t size = std::max({bytes, 2 * b.size(), std::size_t{256}});
  b = kernels::cuda::Buffer<Kind>();  // free first: the new one may need the room
  std::string e;
  b = kernels::cuda::Buffer<Kind>::allocate(size, &e);
  return b.data() ? Status{} : Status(Error(e));
}

struct CudaContext {
  int device = 0;
  kernels::cuda::StreamHandle stream_handle;
  kernels::cuda::Stream stream = nullptr;
  std::unique_ptr<kernels::cuda::Blas> blas;

  // Makes `device` current and creates the stream and the handle; errors say what to do.
  Status open(int gpu) {
    namespace cu = kernels::cuda;
    if (cu::device_count() == 0)
      return Error(
          "--device cuda: no CUDA device is usable on this machine (no GPU, or no driver); use "
          "--device cpu");
    if (std::string e = cu::set_device(gpu); !e.empty()) return Error(e);
    device = gpu;
    std::string e;
    stream_handle = cu::StreamHandle::create(&e);
    if (!stream_handle.get()) return Error(e);
    stream = stream_handle.get();
    blas = cu::Blas::create(stream, &e);
    if (!blas) return Error(e);
    return {};
  }
};

}  // namespace moemesh::detail
