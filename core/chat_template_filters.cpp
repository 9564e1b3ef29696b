// The filters and tests of the chat-template interpreter (core/detail/jinja_eval.h): Jinja2's
// builtins (jinja2/filters.py, jinja2/tests.py) with transformers' tojson, on Python semantics.
#include <fmt/format.h>
#include <utf8proc.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <optional>
#include <set>

#include "core/detail/jinja_eval.h"

namespace moemesh::jinja {
namespace {

[[noreturn]] void type_error(const std::string& message) {
  throw RenderError(message);
}

const std::set<std::string>& supported_filters() {
  static const std::set<std::string> k = {
      "abs",      "attr",  "capitalize", "center", "count",      "d",           "default",
      "dictsort", "e",     "escape",     "first",  "float",      "forceescape", "format",
      "indent",   "int",   "items",      "join",   "last",       "length",      "list",
      "lower",    "map",   "max",        "min",    "reject",     "rejectattr",  "replace",
      "reverse",  "round", "safe",       "select", "selectattr", "sort",        "string",
      "sum",      "title", "tojson",     "trim",   "truncate",   "unique",      "upper",
      "wordcount"};
  return k;
}

const std::set<std::string>& other_jinja_filters() {
  static const std::set<std::string> k = {"batch",  "filesizeformat", "groupby",   "pprint",
                                          "random", "slice",          "striptags", "urlencode",
                                          "urlize", "wordwrap",       "xmlattr"};
  return k;
}

const std::set<std::string>& supported_tests() {
  static const std::set<std::string> k = {
      "boolean", "callable", "defined",  "divisibleby", "eq",    "equalto", "escaped",
      "even",    "false",    "filter",   "float",       "ge",    "gt",      "greaterthan",
      "in",      "integer",  "iterable", "le",          "lower", "lt",      "lessthan",
      "mapping", "ne",       "none",     "number",      "odd",   "sameas",  "sequence",
      "string",  "test",     "true",     "undefined",   "upper", "==",      "!=",
      "<",       "<=",       ">",        ">="};
  return k;
}

int64_t int_arg(const Value* v, int64_t dflt, const char* what) {
  if (!v) return dflt;
  if (!v->is_int() && !v->is_bool())
    type_error(fmt::format("{} must be an integer, not {}", what, v->type_name()));
  return v->as_int();
}

// Jinja's attribute paths ("a.b.0"): dotted parts, digit parts are indexes.
std::vector<Value> attribute_parts(const Value& attr) {
  std::vector<Value> parts;
  if (!attr.is_string()) {
    parts.push_back(attr);
    return parts;
  }
  const std::string& s = attr.text();
  size_t start = 0;
  while (true) {
    const size_t dot = s.find('.', start);
    std::string part = s.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    const bool digits = !part.empty() && std::all_of(part.begin(), part.end(),
                                                     [](char c) { return c >= '0' && c <= '9'; });
    parts.push_back(digits ? Value::integer(std::stoll(part)) : Value::string(part));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return parts;
}

Value get_path(Value item, const std::vector<Value>& parts, const Value* dflt = nullptr) {
  for (const Value& p : parts) {
    item = get_item(item, p);
    if (dflt && item.is_undefined()) item = *dflt;
  }
  return item;
}

Value ignore_case(const Value& v) {
  return v.is_string() ? Value::string(py_lower(v.text())) : v;
}

// Python's int(str, base) for base 10/16/8/2; false when the text is not an integer.
bool parse_int(const std::string& text, int base, int64_t* out) {
  std::string s = py_strip(text, nullptr, true, true);
  bool neg = false;
  size_t i = 0;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) neg = s[i++] == '-';
  if (i + 1 < s.size() && s[i] == '0') {
    const char p = static_cast<char>(s[i + 1] | 0x20);
    if ((p == 'x' && base == 16) || (p == 'o' && base == 8) || (p == 'b' && base == 2)) i += 2;
  }
  std::string digits;
  bool last_underscore = true;
  for (; i < s.size(); ++i) {
    if (s[i] == '_' && !last_underscore) {
      last_underscore = true;
      continue;
    }
    digits += s[i];
    last_underscore = false;
  }
  if (digits.empty() || last_underscore) return false;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(digits.c_str(), &end, base);
  if (*end != '\0' || digits[0] == '-' || digits[0] == '+' || digits[0] == ' ') return false;
  if (errno == ERANGE) type_error("integer too large for 64 bits");
  *out = neg ? -v : v;
  return true;
}

// Python's float(str).
bool parse_float(const std::string& text, double* out) {
  std::string s = py_strip(text, nullptr, true, true);
  std::string clean;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '_') {
      if (i == 0 || i + 1 >= s.size() || !std::isdigit(static_cast<unsigned char>(s[i - 1])) ||
          !std::isdigit(static_cast<unsigned char>(s[i + 1])))
        return false;
      continue;
    }
    clean += s[i];
  }
  if (clean.empty()) return false;
  std::string lower = py_lower(clean);
  size_t sign = lower[0] == '+' || lower[0] == '-' ? 1 : 0;
  const std::string body = lower.substr(sign);
  if (body == "inf" || body == "infinity" || body == "nan") {
    const double v = body == "nan" ? NAN : INFINITY;
    *out = lower[0] == '-' ? -v : v;
    return true;
  }
  if (body.empty() || !(std::isdigit(static_cast<unsigned char>(body[0])) || body[0] == '.'))
    return false;
  if (body.find_first_not_of("0123456789.e+-") != std::string::npos) return false;
  char* end = nullptr;
  *out = std::strtod(clean.c_str(), &end);
  return *end == '\0';
}

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&#34;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

Value python_round(const Value& v, int64_t precision, const std::string& method) {
  if (method != "common" && method != "ceil" && method != "floor")
    type_error("method must be common, ceil or floor");
  if (!v.is_number())
    type_error(fmt::format("type {} doesn't define __round__ method", v.type_name()));
  if (method == "common") {
    if (!v.is_float() && precision >= 0) return Value::integer(v.as_int());
    if (!v.is_float()) {
      double scale = std::pow(10.0, static_cast<double>(-precision));
      return Value::integer(static_cast<int64_t>(std::nearbyint(v.as_float() / scale) * scale));
    }
    const double x = v.as_float();
    if (!std::isfinite(x)) return v;
    if (precision >= 0 && precision < 300) {
      const std::string s = fmt::format("{:.{}f}", x, precision);
      return Value::number(std::strtod(s.c_str(), nullptr));
    }
    const double scale = std::pow(10.0, static_cast<double>(-precision));
    return Value::number(std::nearbyint(x / scale) * scale);
  }
  const double scale = std::pow(10.0, static_cast<double>(precision));
  const double x = v.as_float() * scale;
  return Value::number((method == "ceil" ? std::ceil(x) : std::floor(x)) / scale);
}

int64_t word_count(const std::string& s) {
  int64_t n = 0;
  bool in_word = false;
  for (std::string_view ch : utf8_chars(s)) {
    const auto c = static_cast<int32_t>(decode_utf8(ch));
    const auto cat = utf8proc_category(c);
    const bool w = c == '_' || (cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_NO) ||
                   cat == UTF8PROC_CATEGORY_PC;
    if (w && !in_word) ++n;
    in_word = w;
  }
  return n;
}

std::string title_filter(const std::string& s) {
  // Jinja: split on runs of [-\s({[<]; each piece gets item[0].upper() + item[1:].lower().
  std::string out;
  std::vector<std::string_view> cs = utf8_chars(s);
  auto is_sep = [](char32_t c) {
    return is_py_space(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
  };
  for (size_t k = 0; k < cs.size();) {
    const bool sep = is_sep(decode_utf8(cs[k]));
    size_t e = k + 1;
    while (e < cs.size() && is_sep(decode_utf8(cs[e])) == sep) ++e;
    std::string rest;
    for (size_t m = k + 1; m < e; ++m) rest.append(cs[m]);
    out += py_upper(cs[k]) + py_lower(rest);
    k = e;
  }
  return out;
}

std::string indent_filter(const std::string& text, const Value* width, bool first, bool blank) {
  std::string indention;
  if (width && width->is_string()) {
    indention = width->text();
  } else {
    const int64_t w = std::max<int64_t>(0, int_arg(width, 4, "width"));
    check_size(static_cast<size_t>(w) * (utf8_length(text) + 1));
    indention.assign(static_cast<size_t>(w), ' ');
  }
  std::vector<std::string> lines = py_splitlines(text + "\n");
  std::string rv;
  if (blank) {
    for (size_t i = 0; i < lines.size(); ++i) {
      if (i) rv += "\n" + indention;
      rv += lines[i];
    }
  } else if (!lines.empty()) {
    rv = lines[0];
    for (size_t i = 1; i < lines.size(); ++i) {
      rv += "\n";
      if (!lines[i].empty()) rv += indention;
      rv += lines[i];
    }
  }
  return first ? indention + rv : rv;
}

std::vector<Value> sorted(std::vector<Value> items, bool reverse,
                          const std::function<Value(const Value&)>& key) {
  std::vector<std::pair<Value, Value>> keyed;
  for (Value& v : items) keyed.emplace_back(key(v), std::move(v));
  std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& a, const auto& b) {
    return reverse ? py_less(b.first, a.first) : py_less(a.first, b.first);
  });
  std::vector<Value> out;
  for (auto& kv : keyed) out.push_back(std::move(kv.second));
  return out;
}

Value do_tojson(const Value& v, const Params& p) {
  JsonStyle st;
  st.ensure_ascii = p.flag(0);
  if (const Value* indent = p.opt(1)) {
    st.has_indent = true;
    if (indent->is_string()) {
      st.indent = indent->text();
    } else {
      const int64_t w = std::max<int64_t>(0, int_arg(indent, 0, "indent"));
      check_size(static_cast<size_t>(w));
      st.indent.assign(static_cast<size_t>(w), ' ');
    }
    st.item_separator.assign(1, ',');
  }
  if (const Value* sep = p.opt(2)) {
    std::vector<Value> parts = iterate(*sep);
    if (parts.size() != 2 || !parts[0].is_string() || !parts[1].is_string())
      type_error("tojson separators must be a pair of strings");
    st.item_separator = parts[0].text();
    st.key_separator = parts[1].text();
  }
  st.sort_keys = p.flag(3);
  return Value::string(to_json(v, st));
}

// select/reject/selectattr/rejectattr.
Value select_filter(const std::string& name, const Value& v, CallArgs& a) {
  if (!truthy(v)) return Value::seq({}, SeqKind::Iterator);  // Jinja: `if value: ...`
  const bool by_attr = name == "selectattr" || name == "rejectattr";
  const bool keep_if = name == "select" || name == "selectattr";
  size_t off = 0;
  std::vector<Value> parts;
  if (by_attr) {
    if (a.args.empty()) type_error("Missing parameter for attribute name");
    parts = attribute_parts(a.args[0]);
    off = 1;
  }
  std::optional<std::string> test;
  CallArgs test_args;
  if (a.args.size() > off) {
    if (!a.args[off].is_string()) type_error("the test name must be a string");
    test = a.args[off].text();
    if (!is_supported_test(*test)) type_error(fmt::format("No test named '{}'", *test));
    test_args.args.assign(a.args.begin() + static_cast<long>(off) + 1, a.args.end());
  }
  test_args.kwargs = a.kwargs;
  std::vector<Value> out;
  for (const Value& item : iterate(v)) {
    Value probe = by_attr ? get_path(item, parts) : item;
    const bool ok = test ? apply_test(*test, probe, test_args) : truthy(probe);
    if (ok == keep_if) out.push_back(item);
  }
  return Value::seq(std::move(out), SeqKind::Iterator);
}

Value map_filter(const Value& v, CallArgs& a) {
  if (!truthy(v)) return Value::seq({}, SeqKind::Iterator);  // Jinja: `if value: ...`
  std::vector<Value> out;
  const Value* attribute = nullptr;
  const Value* dflt = nullptr;
  for (const auto& [k, val] : a.kwargs) {
    if (k == "attribute") attribute = &val;
    if (k == "default") dflt = &val;
  }
  if (a.args.empty() && attribute) {
    for (const auto& kv : a.kwargs)
      if (kv.first != "attribute" && kv.first != "default")
        type_error(fmt::format("Unexpected keyword argument '{}'", kv.first));
    const std::vector<Value> parts = attribute_parts(*attribute);
    for (const Value& item : iterate(v)) out.push_back(get_path(item, parts, dflt));
    return Value::seq(std::move(out), SeqKind::Iterator);
  }
  if (a.args.empty()) type_error("map requires a filter argument");
  if (!a.args[0].is_string()) type_error("map: the filter name must be a string");
  const std::string filter = a.args[0].text();
  if (!is_supported_filter(filter)) type_error(fmt::format("No filter named '{}'", filter));
  for (const Value& item : iterate(v)) {
    CallArgs sub;
    sub.args.assign(a.args.begin() + 1, a.args.end());
    sub.kwargs = a.kwargs;
    out.push_back(apply_filter(filter, item, std::move(sub)));
  }
  return Value::seq(std::move(out), SeqKind::Iterator);
}

Value min_max(const Value& v, bool is_max, const Params& p) {
  std::vector<Value> items = iterate(v);
  if (items.empty()) return Value::undefined("No aggregated item, sequence was empty.");
  const bool cs = p.flag(0);
  const std::vector<Value> parts = p.opt(1) ? attribute_parts(*p.opt(1)) : std::vector<Value>{};
  auto key = [&](const Value& x) {
    Value k = get_path(x, parts);
    return cs ? k : ignore_case(k);
  };
  size_t best = 0;
  Value best_key = key(items[0]);
  for (size_t i = 1; i < items.size(); ++i) {
    Value k = key(items[i]);
    if (is_max ? py_less(best_key, k) : py_less(k, best_key)) {
      best = i;
      best_key = std::move(k);
    }
  }
  return items[best];
}

}  // namespace

Params::Params(const std::string& fname, CallArgs& a, std::vector<const char*> names)
    : values_(names.size()) {
  if (a.args.size() > names.size())
    type_error(fmt::format("{}() takes at most {} argument(s) ({} given)", fname, names.size(),
                           a.args.size()));
  for (size_t i = 0; i < a.args.size(); ++i) values_[i] = std::move(a.args[i]);
  for (auto& [k, v] : a.kwargs) {
    size_t i = 0;
    while (i < names.size() && k != names[i]) ++i;
    if (i == names.size())
      type_error(fmt::format("{}() got an unexpected keyword argument '{}'", fname, k));
    values_[i] = std::move(v);
  }
}

const std::string& need_string(const Value* v, const char* what) {
  if (!v || !v->is_string())
    type_error(fmt::format("{} must be str, not {}", what, v ? v->type_name() : "None"));
  return v->text();
}

int64_t need_int(const Value* v, const char* what) {
  if (!v || !(v->is_int() || v->is_bool()))
    type_error(fmt::format("{} must be an integer, not {}", what, v ? v->type_name() : "None"));
  return v->as_int();
}

bool is_supported_filter(const std::string& name) {
  return supported_filters().count(name) > 0;
}
bool is_jinja_filter(const std::string& name) {
  return is_supported_filter(name) || other_jinja_filters().count(name) > 0;
}
bool is_supported_test(const std::string& name) {
  return supported_tests().count(name) > 0;
}
bool is_jinja_test(const std::string& name) {
  return is_supported_test(name);
}

Value apply_filter(const std::string& name, const Value& v, CallArgs a) {
  if (name == "default" || name == "d") {
    Params p(name, a, {"default_value", "boolean"});
    if (v.is_undefined() || (p.flag(1) && !truthy(v)))
      return p.get(0) ? *p.get(0) : Value::string("");
    return v;
  }
  if (name == "length" || name == "count") {
    Params p(name, a, {});
    return Value::integer(length(v));
  }
  if (name == "string") {
    Params p(name, a, {});
    return Value::string(py_str(v));
  }
  if (name == "safe") {
    Params p(name, a, {});
    return v.is_string() ? v : Value::string(py_str(v));
  }
  if (name == "escape" || name == "e" || name == "forceescape") {
    Params p(name, a, {});
    return Value::string(html_escape(py_str(v)));
  }
  if (name == "tojson")
    return do_tojson(v, Params(name, a, {"ensure_ascii", "indent", "separators", "sort_keys"}));
  if (name == "trim") {
    Params p(name, a, {"chars"});
    const Value* chars = p.opt(0);
    std::string cs;
    if (chars) cs = py_str(*chars);
    return Value::string(py_strip(py_str(v), chars ? &cs : nullptr, true, true));
  }
  if (name == "upper" || name == "lower") {
    Params p(name, a, {});
    return Value::string(name == "upper" ? py_upper(py_str(v)) : py_lower(py_str(v)));
  }
  if (name == "title") {
    Params p(name, a, {});
    return Value::string(title_filter(py_str(v)));
  }
  if (name == "capitalize") {
    Params p(name, a, {});
    CallArgs none;
    return call_method(Value::string(py_str(v)), "capitalize", std::move(none));
  }
  if (name == "center") {
    Params p(name, a, {"width"});
    CallArgs c;
    c.args.push_back(Value::integer(int_arg(p.get(0), 80, "width")));
    return call_method(Value::string(py_str(v)), "center", std::move(c));
  }
  if (name == "replace") {
    Params p(name, a, {"old", "new", "count"});
    if (!p.get(0) || !p.get(1)) type_error("replace() needs the old and the new string");
    CallArgs c;
    c.args = {Value::string(py_str(*p.get(0))), Value::string(py_str(*p.get(1)))};
    if (p.opt(2)) c.args.push_back(*p.opt(2));
    return call_method(Value::string(py_str(v)), "replace", std::move(c));
  }
  if (name == "join") {
    Params p(name, a, {"d", "attribute"});
    const std::string sep = p.get(0) ? py_str(*p.get(0)) : "";
    const std::vector<Value> parts = p.opt(1) ? attribute_parts(*p.opt(1)) : std::vector<Value>{};
    std::string out;
    bool first = true;
    for (const Value& item : iterate(v)) {
      if (!first) out += sep;
      check_size(out.size());
      out += py_str(get_path(item, parts));
      first = false;
    }
    return Value::string(std::move(out));
  }
  if (name == "first") {
    Params p(name, a, {});
    std::vector<Value> items = iterate(v);
    if (items.empty()) return Value::undefined("No first item, sequence was empty.");
    return items.front();
  }
  if (name == "last") {
    Params p(name, a, {});
    if (v.is_seq() && v.seq_kind() == SeqKind::Iterator)
      type_error("'generator' object is not reversible");
    std::vector<Value> items = iterate(v);
    if (items.empty()) return Value::undefined("No last item, sequence was empty.");
    return items.back();
  }
  if (name == "list") {
    Params p(name, a, {});
    return Value::seq(iterate(v));
  }
  if (name == "items") {
    Params p(name, a, {});
    if (v.is_undefined()) return Value::seq({}, SeqKind::Iterator);
    if (!v.is_dict()) type_error("Can only get item pairs from a mapping.");
    std::vector<Value> out;
    for (const auto& [k, val] : v.dict_data().items)
      out.push_back(Value::seq({Value::string(k), val}, SeqKind::Tuple));
    return Value::seq(std::move(out), SeqKind::Iterator);
  }
  if (name == "dictsort") {
    Params p(name, a, {"case_sensitive", "by", "reverse"});
    if (!v.is_dict())
      type_error(fmt::format("'{}' object has no attribute 'items'", v.type_name()));
    const std::string by = p.get(1) ? py_str(*p.get(1)) : "key";
    if (by != "key" && by != "value")
      type_error("You can only sort by either \"key\" or \"value\"");
    std::vector<Value> items;
    for (const auto& [k, val] : v.dict_data().items)
      items.push_back(Value::seq({Value::string(k), val}, SeqKind::Tuple));
    const bool cs = p.flag(0);
    const size_t pos = by == "key" ? 0 : 1;
    return Value::seq(sorted(std::move(items), p.flag(2), [&](const Value& kv) {
      const Value& x = kv.items()[pos];
      return cs ? x : ignore_case(x);
    }));
  }
  if (name == "sort") {
    Params p(name, a, {"reverse", "case_sensitive", "attribute"});
    const bool cs = p.flag(1);
    std::vector<std::vector<Value>> paths;
    if (const Value* attr = p.opt(2)) {
      if (attr->is_string()) {
        std::string s = attr->text();
        size_t start = 0;
        while (true) {
          const size_t comma = s.find(',', start);
          paths.push_back(attribute_parts(Value::string(
              s.substr(start, comma == std::string::npos ? std::string::npos : comma - start))));
          if (comma == std::string::npos) break;
          start = comma + 1;
        }
      } else {
        paths.push_back(attribute_parts(*attr));
      }
    }
    return Value::seq(sorted(iterate(v), p.flag(0), [&](const Value& item) {
      if (paths.empty()) return cs ? item : ignore_case(item);
      std::vector<Value> key;
      for (const auto& path : paths) {
        Value k = get_path(item, path);
        key.push_back(cs ? k : ignore_case(k));
      }
      return paths.size() == 1 ? key[0] : Value::seq(std::move(key));
    }));
  }
  if (name == "unique") {
    Params p(name, a, {"case_sensitive", "attribute"});
    const bool cs = p.flag(0);
    const std::vector<Value> parts = p.opt(1) ? attribute_parts(*p.opt(1)) : std::vector<Value>{};
    std::vector<Value> seen, out;
    for (const Value& item : iterate(v)) {
      Value key = get_path(item, parts);
      if (!cs) key = ignore_case(key);
      if (key.is_dict() || (key.is_seq() && key.seq_kind() == SeqKind::List))
        type_error(fmt::format("unhashable type: '{}'", key.type_name()));  // Python's set()
      if (std::any_of(seen.begin(), seen.end(), [&](const Value& s) { return py_equal(s, key); }))
        continue;
      seen.push_back(std::move(key));
      out.push_back(item);
    }
    return Value::seq(std::move(out), SeqKind::Iterator);
  }
  if (name == "min" || name == "max")
    return min_max(v, name == "max", Params(name, a, {"case_sensitive", "attribute"}));
  if (name == "sum") {
    Params p(name, a, {"attribute", "start"});
    const std::vector<Value> parts = p.opt(0) ? attribute_parts(*p.opt(0)) : std::vector<Value>{};
    Value total = p.get(1) ? *p.get(1) : Value::integer(0);
    for (const Value& item : iterate(v)) total = binary_op("+", total, get_path(item, parts));
    return total;
  }
  if (name == "reverse") {
    Params p(name, a, {});
    if (v.is_string()) {
      std::vector<std::string_view> cs = utf8_chars(v.text());
      std::string out;
      for (size_t i = cs.size(); i > 0; --i) out.append(cs[i - 1]);
      return Value::string(std::move(out));
    }
    std::vector<Value> items = iterate(v);
    std::reverse(items.begin(), items.end());
    return Value::seq(std::move(items), SeqKind::Iterator);
  }
  if (name == "map") return map_filter(v, a);
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr")
    return select_filter(name, v, a);
  if (name == "attr") {
    Params p(name, a, {"name"});
    if (!p.get(0) || !p.get(0)->is_string()) type_error("attr() needs an attribute name");
    if (v.is_dict() && v.dict_data().find(p.get(0)->text()))
      return Value::undefined(
          fmt::format("'dict object' has no attribute {}", py_repr_string(p.get(0)->text())));
    return get_attr(v, p.get(0)->text());
  }
  if (name == "int") {
    Params p(name, a, {"default", "base"});
    const Value dflt = p.get(0) ? *p.get(0) : Value::integer(0);
    const int64_t base = int_arg(p.get(1), 10, "base");
    if (v.is_undefined()) throw RenderError(v.undefined_message());  // int(Undefined) raises
    if (v.is_int() || v.is_bool()) return Value::integer(v.as_int());
    double f;
    if (v.is_float()) {
      if (std::isinf(v.as_float())) type_error("cannot convert float infinity to integer");
      if (std::isnan(v.as_float())) return dflt;
      f = v.as_float();
    } else if (v.is_string()) {
      int64_t i;
      if (parse_int(v.text(), static_cast<int>(base), &i)) return Value::integer(i);
      if (!parse_float(v.text(), &f) || std::isnan(f) || std::isinf(f)) return dflt;
    } else {
      return dflt;
    }
    if (std::fabs(f) >= 9.2e18) type_error("integer too large for 64 bits");
    return Value::integer(static_cast<int64_t>(f));
  }
  if (name == "float") {
    Params p(name, a, {"default"});
    const Value dflt = p.get(0) ? *p.get(0) : Value::number(0.0);
    if (v.is_undefined()) throw RenderError(v.undefined_message());  // float(Undefined) raises
    if (v.is_number()) return Value::number(v.as_float());
    double f;
    if (v.is_string() && parse_float(v.text(), &f)) return Value::number(f);
    return dflt;
  }
  if (name == "abs") {
    Params p(name, a, {});
    if (v.is_float()) return Value::number(std::fabs(v.as_float()));
    if (v.is_int() || v.is_bool()) return negate(v, v.as_int() < 0);
    type_error(fmt::format("bad operand type for abs(): '{}'", v.type_name()));
  }
  if (name == "round") {
    Params p(name, a, {"precision", "method"});
    return python_round(v, int_arg(p.get(0), 0, "precision"),
                        p.get(1) ? py_str(*p.get(1)) : "common");
  }
  if (name == "indent") {
    Params p(name, a, {"width", "first", "blank"});
    if (!v.is_string()) binary_op("+", v, Value::string("\n"));  // Jinja's `s += "\n"` fails
    return Value::string(indent_filter(v.text(), p.get(0), p.flag(1), p.flag(2)));
  }
  if (name == "truncate") {
    Params p(name, a, {"length", "killwords", "end", "leeway"});
    const int64_t len = int_arg(p.get(0), 255, "length");
    const std::string end = p.get(2) ? py_str(*p.get(2)) : "...";
    const int64_t leeway = p.opt(3) ? int_arg(p.opt(3), 5, "leeway") : 5;
    const int64_t end_len = utf8_length(end);
    if (!v.is_string()) {  // Jinja takes len() of whatever it is given
      if (length(v) <= len + leeway) return v;
      type_error(fmt::format("truncate expects a string, not {}", v.type_name()));
    }
    const std::string& s = v.text();
    if (len < end_len) type_error(fmt::format("expected length >= {}, got {}", end_len, len));
    std::vector<std::string_view> cs = utf8_chars(s);
    if (static_cast<int64_t>(cs.size()) <= len + leeway) return Value::string(s);
    std::string head;
    for (int64_t i = 0; i < len - end_len; ++i) head.append(cs[static_cast<size_t>(i)]);
    if (!p.flag(1)) {
      const size_t sp = head.rfind(' ');
      if (sp != std::string::npos) head.resize(sp);
    }
    return Value::string(head + end);
  }
  if (name == "wordcount") {
    Params p(name, a, {});
    return Value::integer(word_count(py_str(v)));
  }
  if (name == "format") {
    if (!a.args.empty() && !a.kwargs.empty())
      type_error("can't handle positional and keyword arguments at the same time");
    if (!a.kwargs.empty()) {
      DictData d;
      for (auto& [k, val] : a.kwargs) d.set(k, val);
      return Value::string(printf_format(py_str(v), Value::dict(std::move(d))));
    }
    return Value::string(printf_format(py_str(v), Value::seq(a.args, SeqKind::Tuple)));
  }
  type_error(fmt::format("the filter '{}' is not supported", name));
}

bool apply_test(const std::string& name, const Value& v, CallArgs a) {
  auto arg = [&](const char* what) -> const Value& {
    if (a.args.empty()) {
      if (!a.kwargs.empty()) return a.kwargs[0].second;
      type_error(fmt::format("the test '{}' needs {}", name, what));
    }
    return a.args[0];
  };
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "boolean") return v.is_bool();
  if (name == "true") return v.is_bool() && v.as_bool();
  if (name == "false") return v.is_bool() && !v.as_bool();
  if (name == "integer") return v.is_int();
  if (name == "float") return v.is_float();
  if (name == "number") return v.is_number();
  if (name == "string") return v.is_string();
  if (name == "mapping") return v.is_dict();
  if (name == "callable") return v.kind() == Value::Kind::Function;
  if (name == "iterable") return v.is_undefined() || v.is_string() || v.is_seq() || v.is_dict();
  if (name == "sequence")
    return v.is_undefined() || v.is_string() || v.is_dict() ||
           (v.is_seq() && v.seq_kind() != SeqKind::Iterator);
  if (name == "escaped") return false;
  if (name == "lower" || name == "upper") {
    CallArgs none;
    return truthy(call_method(Value::string(py_str(v)), name == "lower" ? "islower" : "isupper",
                              std::move(none)));
  }
  if (name == "odd" || name == "even") {
    const Value r = binary_op("%", v, Value::integer(2));
    return name == "odd" ? py_equal(r, Value::integer(1)) : py_equal(r, Value::integer(0));
  }
  if (name == "divisibleby") return py_equal(binary_op("%", v, arg("a number")), Value::integer(0));
  if (name == "eq" || name == "equalto" || name == "==") return py_equal(v, arg("a value"));
  if (name == "ne" || name == "!=") return !py_equal(v, arg("a value"));
  if (name == "lt" || name == "lessthan" || name == "<") return py_compare("<", v, arg("a value"));
  if (name == "le" || name == "<=") return py_compare("<=", v, arg("a value"));
  if (name == "gt" || name == "greaterthan" || name == ">")
    return py_compare(">", v, arg("a value"));
  if (name == "ge" || name == ">=") return py_compare(">=", v, arg("a value"));
  if (name == "in") return contains(arg("a container"), v);
  if (name == "sameas") {
    const Value& o = arg("a value");
    if (v.kind() != o.kind()) return false;
    if (v.is_none() || v.is_undefined()) return true;
    if (v.is_bool()) return v.as_bool() == o.as_bool();
    if (v.is_dict()) return v.dict_ptr() == o.dict_ptr();
    if (v.is_seq()) return &v.items() == &o.items();
    if (v.kind() == Value::Kind::Namespace) return &v.ns() == &o.ns();
    return false;
  }
  if (name == "filter") return v.is_string() && is_supported_filter(v.text());
  if (name == "test") return v.is_string() && is_supported_test(v.text());
  type_error(fmt::format("the test '{}' is not supported", name));
}

}  // namespace moemesh::jinja
