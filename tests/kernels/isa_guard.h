// Helpers of the tests of ISA-specific kernels: the ISAs this machine runs, and a guard that
// restores the active ISA after a test forced another.
#pragma once

#include <vector>

#include "kernels/cpu/cpu_kernels.h"

namespace moemesh::test {

// Restores the ISA active before the test, whatever the test forced.
class IsaGuard {
 public:
  IsaGuard() : saved_(kernels::active_isa()) {}
  ~IsaGuard() { kernels::force_isa(saved_); }
  IsaGuard(const IsaGuard&) = delete;
  IsaGuard& operator=(const IsaGuard&) = delete;

 private:
  kernels::Isa saved_;
};

inline std::vector<kernels::Isa> supported_isas() {
  std::vector<kernels::Isa> out;
  for (kernels::Isa isa : {kernels::Isa::Baseline, kernels::Isa::Avx2, kernels::Isa::Avx512})
    if (isa <= kernels::detected_isa()) out.push_back(isa);
  return out;
}

}  // namespace moemesh::test
