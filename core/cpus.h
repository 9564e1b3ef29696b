// CPU lists for pinning compute threads, and their split among the role processes that share a
// machine (`--cpus` of the role subcommands and of `moemesh serve`).
//
// A CPU list is written as Linux writes one (`taskset -c`, /sys/devices/system/cpu/online):
// numbers and ranges separated by commas, e.g. "0-3,8,10-11". A process bound to a list runs all
// its threads on those CPUs, and its compute pool pins one worker to each of them.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"

namespace moemesh {

using CpuList = std::vector<int>;  // ascending, no duplicates

// Parses a CPU list; every CPU must be one of `allowed` (the CPUs this process may use, see
// kernels::allowed_cpus()). The error names the flag and the offending part.
Expected<CpuList> parse_cpu_list(std::string_view text, const CpuList& allowed,
                                 std::string_view flag = "--cpus");

// "0-3,8,10-11"
std::string format_cpu_list(const CpuList& cpus);

// How `moemesh serve` binds its role processes (attention workers first, then expert workers):
//   "auto"     each role gets its own contiguous block of CPUs: an even share, one more CPU for
//              each of the first roles while the remainder lasts (attention workers first: they
//              run every step's serial part). With fewer CPUs than roles, as "nobind": no role
//              can have CPUs of its own, and the OS balances processes that share CPUs.
//   "nobind"   no binding: every role may use every CPU.
//   "L0|L1|.." one CPU list per role, in role order (as vLLM's VLLM_CPU_OMP_THREADS_BIND).
// Returns one list per role, or an empty vector when nothing is bound.
Expected<std::vector<CpuList>> plan_role_cpus(std::string_view spec, const CpuList& allowed,
                                              int attention_workers, int expert_workers);

}  // namespace moemesh
