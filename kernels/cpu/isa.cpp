#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/detail/linear_isa.h"

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
  if (!avx512) return Isa::Avx2;
  // AVX512-BF16 (cpuid 7.1 eax bit 5) and AVX512-VNNI (7.0 ecx bit 11).
  const bool bf16_cpu = __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 5)) != 0;
  const bool vnni_cpu = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 11)) != 0;
  if (!bf16_cpu || !vnni_cpu) return Isa::Avx512;
  // AMX: AMX-TILE, AMX-INT8 and AMX-BF16 (cpuid 7.0 edx bits 24, 25, 22), the tile state enabled
  // in XCR0 (bits 17, 18), and the kernel's permission.
  const bool amx_cpu =
      (edx & (1u << 24)) != 0 && (edx & (1u << 25)) != 0 && (edx & (1u << 22)) != 0;
  if (!amx_cpu) return Isa::Avx512Bf16;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & (3u << 17)) != (3u << 17)) return Isa::Avx512Bf16;
  return detail::amx_request_permission() ? Isa::Amx : Isa::Avx512Bf16;
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
    // Avx512Bf16 and Amx change the numerics (bf16 / int8 activations): only chosen when asked.
    Isa chosen = std::min(st->detected, Isa::Avx512);
    if (const char* env = std::getenv("MOEMESH_ISA"); env != nullptr && *env != '\0') {
      bool known = true;
      Isa wanted = Isa::Baseline;
      if (std::strcmp(env, "baseline") == 0)
        wanted = Isa::Baseline;
      else if (std::strcmp(env, "avx2") == 0)
        wanted = Isa::Avx2;
      else if (std::strcmp(env, "avx512") == 0)
        wanted = Isa::Avx512;
      else if (std::strcmp(env, "avx512bf16") == 0)
        wanted = Isa::Avx512Bf16;
      else if (std::strcmp(env, "amx") == 0)
        wanted = Isa::Amx;
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
    case Isa::Avx512Bf16:
      return "avx512bf16";
    case Isa::Amx:
      return "amx";
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
