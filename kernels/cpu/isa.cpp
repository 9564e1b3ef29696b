#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels/cpu/cpu_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace moemesh::kernels {
namespace {

Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  // __builtin_cpu_supports also checks (through xgetbv) that the operating system saves the
  // ymm / zmm registers; it has no name for F16C on every compiler, so cpuid answers that one.
  __builtin_cpu_init();
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  if (!avx2) return Isa::Baseline;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return avx512 ? Isa::Avx512 : Isa::Avx2;
#else
  return Isa::Baseline;
#endif
}

struct IsaState {
  Isa detected = Isa::Baseline;
  std::atomic<Isa> active{Isa::Baseline};
  bool env_rejected = false;
};

// Initialised once, at the first call of any ISA function, so that MOEMESH_ISA is read before
// anything can be forced and a later force_isa() is never overwritten by it.
IsaState& state() {
  static IsaState* s = [] {
    auto* st = new IsaState;  // never destroyed: kernels may run during static destruction
    st->detected = detect();
    Isa chosen = st->detected;
    if (const char* env = std::getenv("MOEMESH_ISA"); env != nullptr && *env != '\0') {
      bool known = true;
      Isa wanted = Isa::Baseline;
      if (std::strcmp(env, "baseline") == 0)
        wanted = Isa::Baseline;
      else if (std::strcmp(env, "avx2") == 0)
        wanted = Isa::Avx2;
      else if (std::strcmp(env, "avx512") == 0)
        wanted = Isa::Avx512;
      else
        known = false;
      if (known && wanted <= st->detected)
        chosen = wanted;
      else
        st->env_rejected = true;
    }
    st->active.store(chosen);
    return st;
  }();
  return *s;
}

}  // namespace

Isa detected_isa() {
  return state().detected;
}

Isa active_isa() {
  return state().active.load(std::memory_order_relaxed);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Baseline:
      return "baseline";
    case Isa::Avx2:
      return "avx2";
    case Isa::Avx512:
      return "avx512";
  }
  return "unknown";
}

bool force_isa(Isa isa) {
  IsaState& s = state();
  if (isa > s.detected) return false;
  s.active.store(isa);
  return true;
}

bool isa_env_rejected() {
  return state().env_rejected;
}

}  // namespace moemesh::kernels
