// Fuzzes the safetensors reader (core/checkpoint.h): the 8-byte header length, the JSON header
// (dtypes, shapes, data offsets) and the tensors it hands out. Checkpoint reads files only, so
// each input is written to a memfd and opened through /proc/self/fd. Input: a whole .safetensors
// file.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/checkpoint.h"
#include "tests/fuzz/fuzz_common.h"

namespace {

int memfd() {
  static const int fd = memfd_create("safetensors_fuzz", MFD_CLOEXEC);
  return fd;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  moemesh::fuzz::quiet_logs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = memfd();
  if (fd < 0) __builtin_trap();
  if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != static_cast<ssize_t>(size))
    __builtin_trap();
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  auto ckpt = moemesh::Checkpoint::open_file(path);
  if (!ckpt) return 0;
  // Every tensor the header describes must be readable where it says it is.
  for (const std::string& name : (*ckpt)->names()) {
    auto t = (*ckpt)->tensor(name);
    if (!t) continue;
    if (t->numel() <= (int64_t{1} << 16)) {
      const auto values = t->to_f32();
      (void)values;
    }
    const auto m = t->matrix();
    if (m.rows * m.cols != t->numel()) __builtin_trap();
    (void)(*ckpt)->tensor(name, {t->numel()}, "the fuzz target");
  }
  return 0;
}
