// Helpers of the CUDA kernel tests: skipping without a GPU, moving vectors to and from the device,
// random data and error norms.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cuda/cuda_kernels.h"

namespace moemesh::kernels::cuda::testing {

// Skips the test (with the reason) when this machine has no usable GPU.
#define MOEMESH_REQUIRE_GPU()                                             \
  do {                                                                    \
    if (::moemesh::kernels::cuda::device_count() == 0)                    \
      GTEST_SKIP() << "no CUDA device on this machine: GPU tests run in " \
                      "scripts/gpu-check";                                \
    ASSERT_EQ(::moemesh::kernels::cuda::set_device(0), "");               \
  } while (0)

// A device copy of a host vector (allocation failures fail the test). Returns once the copy has
// landed: from pageable memory a copy on the default stream may still be in flight when
// cudaMemcpyAsync returns, and the streams of StreamHandle::create do not wait for the default
// stream.
template <typename T>
DeviceBuffer upload(const std::vector<T>& host) {
  std::string error;
  DeviceBuffer buf =
      DeviceBuffer::allocate(std::max<std::size_t>(1, host.size() * sizeof(T)), &error);
  EXPECT_NE(buf.data(), nullptr) << error;
  if (!host.empty()) copy(buf.data(), host.data(), host.size() * sizeof(T), nullptr);
  EXPECT_EQ(synchronize(nullptr, "upload"), "");
  return buf;
}

// A device buffer of n elements filled with 0xFF bytes (NaN for floats): every element a kernel
// should write is checked to have been written.
template <typename T>
DeviceBuffer poisoned(std::size_t n) {
  std::string error;
  DeviceBuffer buf = DeviceBuffer::allocate(std::max<std::size_t>(1, n * sizeof(T)), &error);
  EXPECT_NE(buf.data(), nullptr) << error;
  fill_bytes(buf.data(), 0xFF, n * sizeof(T), nullptr);
  EXPECT_EQ(synchronize(nullptr, "poison"), "");
  return buf;
}

// n elements of a device buffer back on the host (synchronises the default stream first, and
// fails the test on any pending CUDA error).
template <typename T>
std::vector<T> download(const DeviceBuffer& buf, std::size_t n) {
  EXPECT_EQ(synchronize(nullptr, "before download"), "");
  std::vector<T> host(n);
  if (n) copy(host.data(), buf.data(), n * sizeof(T), nullptr);
  EXPECT_EQ(synchronize(nullptr, "download"), "");
  return host;
}

inline std::vector<float> random_floats(std::size_t n, uint32_t seed, float lo = -1.0f,
                                        float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Rounds to bf16 and back: the values a bf16 tensor holds.
inline std::vector<float> bf16_round(const std::vector<float>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i)
    out[i] = ::moemesh::kernels::bf16_to_f32(::moemesh::kernels::f32_to_bf16(v[i]));
  return out;
}
inline std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = ::moemesh::kernels::f32_to_bf16(v[i]);
  return out;
}

// ||a - b|| / ||b||; NaN in either gives infinity.
inline double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return INFINITY;
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  if (a.size() != b.size()) return INFINITY;
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

}  // namespace moemesh::kernels::cuda::testing
