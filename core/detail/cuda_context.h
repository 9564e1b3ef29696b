// Internal: a GPU made current, a stream on it and a cuBLAS handle on that stream: what the GPU
// forward pass and GPU expert shards start from.
#pragma once

#include <memory>
#include <string>

#include "core/error.h"
#include "kernels/cuda/cuda_kernels.h"

namespace moemesh::detail {

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
