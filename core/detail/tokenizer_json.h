// JSON reading helpers shared by the tokenizer's component parsers (internal to
// core/tokenizer*.cpp).
#pragma once

#include <fmt/format.h>

#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "core/detail/tokenizer_text.h"
#include "core/error.h"

namespace moemesh::tokenizer_detail {

using json = nlohmann::json;

// Typed fields of one component object; remembers the first problem, which names the component.
class Fields {
 public:
  Fields(const json& obj, std::string where) : obj_(obj), where_(std::move(where)) {}

  const json* get(const char* key) const {
    auto it = obj_.find(key);
    return it == obj_.end() || it->is_null() ? nullptr : &*it;
  }

  bool boolean(const char* key, bool fallback) {
    const json* v = get(key);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) return fail(key, "true or false", *v), fallback;
    return v->get<bool>();
  }

  int64_t integer(const char* key, int64_t fallback) {
    const json* v = get(key);
    if (v == nullptr) return fallback;
    if (!v->is_number_integer()) return fail(key, "an integer", *v), fallback;
    return v->get<int64_t>();
  }

  std::string string(const char* key, std::optional<std::string> fallback) {
    const json* v = get(key);
    if (v == nullptr) {
      if (!fallback) error(fmt::format("has no field \"{}\"", key));
      return fallback.value_or("");
    }
    if (!v->is_string()) return fail(key, "a string", *v), fallback.value_or("");
    return v->get<std::string>();
  }

  // A field holding exactly one character (Metaspace "replacement", Strip "content").
  char32_t character(const char* key, std::optional<char32_t> fallback) {
    const std::string s = string(key, fallback ? std::optional<std::string>("") : std::nullopt);
    if (s.empty() && fallback) return *fallback;
    std::size_t i = 0;
    const char32_t c = s.empty() ? 0 : next_code_point(s, i);
    if (s.empty() || i != s.size()) error(fmt::format("field \"{}\" must be one character", key));
    return c;
  }

  const json& array(const char* key) {
    static const json kEmpty = json::array();
    const json* v = get(key);
    if (v == nullptr || !v->is_array()) {
      error(fmt::format("field \"{}\" must be a list", key));
      return kEmpty;
    }
    return *v;
  }

  void error(const std::string& what) {
    if (!error_) error_ = fmt::format("{} {}", where_, what);
  }
  void fail(const char* key, const char* expected, const json& found) {
    error(fmt::format("field \"{}\" must be {}, found {}", key, expected, found.dump()));
  }
  void take(const Error& e) {
    if (!error_) error_ = e.message();
  }
  const std::optional<std::string>& first_error() const { return error_; }
  const std::string& where() const { return where_; }

 private:
  const json& obj_;
  std::string where_;
  std::optional<std::string> error_;
};

// The "type" of a component object, or an error naming the component.
inline Expected<std::string> component_type(const json& j, const std::string& where) {
  if (!j.is_object()) return Error(fmt::format("{} must be an object, found {}", where, j.dump()));
  auto it = j.find("type");
  if (it == j.end() || !it->is_string())
    return Error(fmt::format("{} has no \"type\" naming the component", where));
  return it->get<std::string>();
}

inline Error unsupported(const std::string& where, const std::string& type, const char* supported) {
  return Error(fmt::format("{} type \"{}\" is not supported by moemesh (supported: {})", where,
                           type, supported));
}

// {"String": "..."} or {"Regex": "..."} (tokenizers' SplitPattern / ReplacePattern).
inline Expected<Pattern> parse_pattern(Fields& f) {
  const json* p = f.get("pattern");
  if (p == nullptr || !p->is_object() || p->size() != 1)
    return Error(fmt::format(
        "{} field \"pattern\" must be {{\"String\": ...}} or {{\"Regex\": ...}}", f.where()));
  if (p->contains("String") && p->at("String").is_string())
    return Pattern::literal(p->at("String").get<std::string>());
  if (p->contains("Regex") && p->at("Regex").is_string()) {
    auto r = Regex::compile(p->at("Regex").get<std::string>(), RegexDialect::Oniguruma);
    if (!r) return Error(fmt::format("{} field \"pattern\": {}", f.where(), r.error().message()));
    return Pattern::regex(std::move(r.value()));
  }
  return Error(fmt::format("{} field \"pattern\" must be {{\"String\": ...}} or {{\"Regex\": ...}}",
                           f.where()));
}

// How Metaspace prepends its replacement character: to every piece, to the piece at the start
// of the input, or never.
enum class PrependScheme { First, Never, Always };

inline Expected<PrependScheme> parse_prepend_scheme(Fields& f) {
  const std::string s = f.string("prepend_scheme", "always");
  PrependScheme scheme;
  if (s == "first") {
    scheme = PrependScheme::First;
  } else if (s == "never") {
    scheme = PrependScheme::Never;
  } else if (s == "always") {
    scheme = PrependScheme::Always;
  } else {
    return Error(fmt::format(
        "{} field \"prepend_scheme\" is \"{}\"; expected first, never or always", f.where(), s));
  }
  if (f.get("add_prefix_space") != nullptr &&
      f.boolean("add_prefix_space", true) != (scheme != PrependScheme::Never))
    return Error(
        fmt::format("{} field \"add_prefix_space\" does not match \"prepend_scheme\"", f.where()));
  return scheme;
}

}  // namespace moemesh::tokenizer_detail
