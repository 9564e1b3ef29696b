#include "core/cpus.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>

namespace moemesh {
namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
  while (!s.empty() && s.back() == ' ') s.remove_suffix(1);
  return s;
}

bool to_int(std::string_view s, int* out) {
  s = trim(s);
  if (s.empty()) return false;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && end == s.data() + s.size() && *out >= 0;
}

}  // namespace

Expected<CpuList> parse_cpu_list(std::string_view text, const CpuList& allowed,
                                 std::string_view flag) {
  CpuList out;
  std::string_view rest = text;
  while (true) {
    const size_t comma = rest.find(',');
    const std::string_view part = trim(rest.substr(0, comma));
    int first = 0;
    int last = 0;
    const size_t dash = part.find('-');
    const bool ok = dash == std::string_view::npos
                        ? to_int(part, &first) && (last = first, true)
                        : to_int(part.substr(0, dash), &first) &&
                              to_int(part.substr(dash + 1), &last) && first <= last;
    if (!ok)
      return Error(fmt::format(
          "{} '{}': '{}' is not a CPU number or a range FIRST-LAST (write a list as taskset -c "
          "takes it, e.g. 0-3,8)",
          flag, text, part));
    for (int c = first; c <= last; ++c) {
      if (!std::binary_search(allowed.begin(), allowed.end(), c))
        return Error(fmt::format("{} '{}': CPU {} is not one this process may use ({})", flag, text,
                                 c, format_cpu_list(allowed)));
      out.push_back(c);
    }
    if (comma == std::string_view::npos) break;
    rest.remove_prefix(comma + 1);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::string format_cpu_list(const CpuList& cpus) {
  std::string out;
  for (size_t i = 0; i < cpus.size();) {
    size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    if (!out.empty()) out += ',';
    out += j == i ? fmt::format("{}", cpus[i]) : fmt::format("{}-{}", cpus[i], cpus[j]);
    i = j + 1;
  }
  return out;
}

Expected<std::vector<CpuList>> plan_role_cpus(std::string_view spec, const CpuList& allowed,
                                              int attention_workers, int expert_workers) {
  const int roles = attention_workers + expert_workers;
  spec = trim(spec);
  if (spec == "nobind") return std::vector<CpuList>{};
  if (allowed.empty() || roles <= 0) return Error("--cpus: no CPUs or no role processes to place");
  std::vector<CpuList> out(roles);
  if (spec == "auto") {
    const int n = static_cast<int>(allowed.size());
    // Fewer CPUs than roles: they cannot have CPUs of their own, and the OS balances processes
    // that share CPUs better than fixed shares do (also when other work runs on the machine).
    if (n < roles) return std::vector<CpuList>{};
    const int share = n / roles;
    const int extra = n % roles;  // one more for each of the first `extra` roles (attention first)
    int next = 0;
    for (int r = 0; r < roles; ++r) {
      const int take = share + (r < extra ? 1 : 0);
      out[r].assign(allowed.begin() + next, allowed.begin() + next + take);
      next += take;
    }
    return out;
  }
  std::vector<std::string_view> lists;
  for (std::string_view rest = spec;;) {
    const size_t bar = rest.find('|');
    lists.push_back(rest.substr(0, bar));
    if (bar == std::string_view::npos) break;
    rest.remove_prefix(bar + 1);
  }
  if (static_cast<int>(lists.size()) != roles)
    return Error(fmt::format(
        "--cpus '{}': {} CPU lists for {} role processes; give one per role separated by '|', "
        "the {} attention worker(s) first, then the {} expert worker(s) (or 'auto', 'nobind')",
        spec, lists.size(), roles, attention_workers, expert_workers));
  for (int r = 0; r < roles; ++r) {
    Expected<CpuList> l = parse_cpu_list(lists[r], allowed, "--cpus");
    if (!l) return l.error();
    out[r] = std::move(*l);
  }
  return out;
}

}  // namespace moemesh
