// Fault injection (contract in detail/faults.h).
#include "transport/detail/faults.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <charconv>
#include <cstdlib>

#include "transport/detail/wire.h"

namespace moemesh::transport::detail {
namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool parse_u64(std::string_view s, uint64_t& out) {
  const char* end = s.data() + s.size();
  auto [p, ec] = std::from_chars(s.data(), end, out);
  return ec == std::errc() && p == end && !s.empty();
}

// "250ms", "2s", "1.5s".
bool parse_duration(std::string_view s, std::chrono::milliseconds& out) {
  double scale = 0;
  if (s.size() > 2 && s.substr(s.size() - 2) == "ms") {
    scale = 1;
    s.remove_suffix(2);
  } else if (s.size() > 1 && s.back() == 's') {
    scale = 1000;
    s.remove_suffix(1);
  } else {
    return false;
  }
  char* end = nullptr;
  const std::string text(s);
  const double v = std::strtod(text.c_str(), &end);
  if (end != text.c_str() + text.size() || !(v >= 0) || v * scale > 3.6e6) return false;
  out = std::chrono::milliseconds(static_cast<int64_t>(v * scale + 0.5));
  return true;
}

constexpr const char* kGrammar =
    "rules are POINT.KIND[=DURATION]@WHEN separated by ';' (POINT dispatch|reply|expert, KIND "
    "drop|delay|corrupt|stall, WHEN N[,M...] | every:N | p:X), or seed=S; see "
    "transport/detail/faults.h";

}  // namespace

Expected<std::unique_ptr<FaultInjector>> FaultInjector::parse(std::string_view spec,
                                                              std::string_view node_name) {
  auto out = std::unique_ptr<FaultInjector>(new FaultInjector());
  auto bad = [&](std::string_view rule, std::string_view why) {
    return Error(fmt::format("fault spec: rule \"{}\": {}; {}", rule, why, kGrammar));
  };
  while (!spec.empty()) {
    const size_t cut = spec.find(';');
    const std::string_view rule = trim(spec.substr(0, cut));
    spec = cut == std::string_view::npos ? std::string_view{} : spec.substr(cut + 1);
    if (rule.empty()) continue;
    if (rule.substr(0, 5) == "seed=") {
      uint64_t seed = 0;
      if (!parse_u64(rule.substr(5), seed)) return bad(rule, "the seed is not a number");
      out->rng_.seed(seed);
      continue;
    }
    const size_t at = rule.find('@');
    if (at == std::string_view::npos) return bad(rule, "no @WHEN");
    std::string_view what = rule.substr(0, at);
    bool here = true;
    if (const size_t slash = what.find('/'); slash != std::string_view::npos) {
      here = trim(what.substr(0, slash)) == node_name;
      what = what.substr(slash + 1);
    }
    const std::string_view when = rule.substr(at + 1);
    Rule r;
    if (const size_t eq = what.find('='); eq != std::string_view::npos) {
      if (!parse_duration(what.substr(eq + 1), r.duration))
        return bad(rule, "the duration is not like 250ms or 2s");
      what = what.substr(0, eq);
    }
    const size_t dot = what.find('.');
    if (dot == std::string_view::npos) return bad(rule, "no POINT.KIND");
    const std::string_view point = what.substr(0, dot), kind = what.substr(dot + 1);
    if (point == "dispatch")
      r.point = FaultPoint::Dispatch;
    else if (point == "reply")
      r.point = FaultPoint::Reply;
    else if (point == "expert")
      r.point = FaultPoint::Expert;
    else
      return bad(rule, "unknown point");
    if (kind == "drop")
      r.kind = Kind::Drop;
    else if (kind == "delay")
      r.kind = Kind::Delay;
    else if (kind == "corrupt")
      r.kind = Kind::Corrupt;
    else if (kind == "stall")
      r.kind = Kind::Stall;
    else
      return bad(rule, "unknown kind");
    if ((r.point == FaultPoint::Expert) != (r.kind == Kind::Stall))
      return bad(rule, "stall applies to expert, drop/delay/corrupt to dispatch and reply");
    if ((r.kind == Kind::Delay || r.kind == Kind::Stall) != (r.duration.count() > 0))
      return bad(rule, "delay and stall need a positive =DURATION, drop and corrupt take none");
    if (when.substr(0, 6) == "every:") {
      if (!parse_u64(when.substr(6), r.every) || r.every == 0)
        return bad(rule, "every:N needs N >= 1");
    } else if (when.substr(0, 2) == "p:") {
      const std::string text(when.substr(2));
      char* end = nullptr;
      r.probability = std::strtod(text.c_str(), &end);
      if (text.empty() || end != text.c_str() + text.size() || !(r.probability >= 0) ||
          r.probability > 1)
        return bad(rule, "p:X needs 0 <= X <= 1");
    } else {
      std::string_view list = when;
      while (!list.empty()) {
        const size_t comma = list.find(',');
        uint64_t n = 0;
        if (!parse_u64(list.substr(0, comma), n) || n == 0)
          return bad(rule, "WHEN is not N[,M...] (1-based), every:N or p:X");
        r.nth.push_back(n);
        list = comma == std::string_view::npos ? std::string_view{} : list.substr(comma + 1);
      }
      if (r.nth.empty()) return bad(rule, "WHEN is empty");
    }
    if (here) out->rules_.push_back(std::move(r));
  }
  if (out->rules_.empty()) return std::unique_ptr<FaultInjector>();
  return out;
}

bool FaultInjector::has(FaultPoint point) const {
  return std::any_of(rules_.begin(), rules_.end(), [&](const Rule& r) { return r.point == point; });
}

FaultAction FaultInjector::next(FaultPoint point) {
  const uint64_t n = ++seen_[static_cast<int>(point)];
  FaultAction a;
  for (const Rule& r : rules_) {
    if (r.point != point) continue;
    bool hit = false;
    if (r.every > 0)
      hit = n % r.every == 0;
    else if (r.probability >= 0)
      hit = std::uniform_real_distribution<double>(0, 1)(rng_) < r.probability;
    else
      hit = std::find(r.nth.begin(), r.nth.end(), n) != r.nth.end();
    if (!hit) continue;
    switch (r.kind) {
      case Kind::Drop:
        if (!a.drop) ++counts_.drops;
        a.drop = true;
        break;
      case Kind::Corrupt:
        if (!a.corrupt) ++counts_.corruptions;
        a.corrupt = true;
        break;
      case Kind::Delay:
        ++counts_.delays;
        a.delay += r.duration;
        break;
      case Kind::Stall:
        ++counts_.stalls;
        a.delay += r.duration;
        break;
    }
  }
  return a;
}

void corrupt_header(std::string& sealed, uint64_t salt) {
  const size_t body = sealed.size() > kHeaderSealBytes ? sealed.size() - kHeaderSealBytes : 0;
  if (body == 0) return;
  const uint64_t bit = (salt * 0x9e3779b97f4a7c15ull >> 7) % (body * 8);
  sealed[bit / 8] = static_cast<char>(sealed[bit / 8] ^ (1 << (bit % 8)));
}

bool fault_injection_built() {
#ifdef MOEMESH_FAULT_INJECTION
  return true;
#else
  return false;
#endif
}

Expected<std::unique_ptr<FaultInjector>> make_fault_injector(const DataPlaneOptions& options,
                                                             const char* side) {
  if (trim(options.faults).empty()) return std::unique_ptr<FaultInjector>();
  if (!fault_injection_built())
    return Error(
        "fault injection was asked for (MOEMESH_FAULTS / DataPlaneOptions::faults), but this "
        "build has none: configure a test build with -DMOEMESH_FAULT_INJECTION=ON, or unset "
        "MOEMESH_FAULTS");
  auto injector = FaultInjector::parse(options.faults, options.node_name);
  if (injector && *injector)
    spdlog::warn("transport={} event=fault_injection spec=\"{}\"", side, options.faults);
  return injector;
}

}  // namespace moemesh::transport::detail

namespace moemesh::transport {
bool fault_injection_available() {
  return detail::fault_injection_built();
}
}  // namespace moemesh::transport
