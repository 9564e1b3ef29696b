// The str methods of the chat-template interpreter (core/detail/jinja_eval.h): Python's str
// semantics on UTF-8 text indexed by code point, and str.format.
#include <fmt/format.h>
#include <utf8proc.h>

#include <algorithm>

#include "core/detail/jinja_eval.h"

namespace moemesh::jinja {
namespace {

[[noreturn]] void type_error(const std::string& message) {
  throw RenderError(message);
}

// ---- str methods ------------------------------------------------------------------------------

std::vector<Value> split_whitespace(const std::string& s, int64_t maxsplit, bool from_right) {
  std::vector<std::string_view> cs = utf8_chars(s);
  std::vector<std::string> parts;
  auto space = [&](size_t i) { return is_py_space(decode_utf8(cs[i])); };
  auto join = [&](size_t b, size_t e) {
    std::string out;
    for (size_t i = b; i < e; ++i) out.append(cs[i]);
    return out;
  };
  if (!from_right) {
    size_t i = 0;
    const size_t n = cs.size();
    while (true) {
      while (i < n && space(i)) ++i;
      if (i >= n) break;
      if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) {
        parts.push_back(join(i, n));  // the rest, trailing whitespace included
        break;
      }
      size_t j = i;
      while (j < n && !space(j)) ++j;
      parts.push_back(join(i, j));
      i = j;
    }
  } else {
    size_t i = cs.size();
    while (true) {
      while (i > 0 && space(i - 1)) --i;
      if (i == 0) break;
      if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) {
        parts.push_back(join(0, i));  // the rest, leading whitespace included
        break;
      }
      size_t j = i;
      while (j > 0 && !space(j - 1)) --j;
      parts.push_back(join(j, i));
      i = j;
    }
    std::reverse(parts.begin(), parts.end());
  }
  std::vector<Value> out;
  for (auto& p : parts) out.push_back(Value::string(std::move(p)));
  return out;
}

std::vector<Value> split_sep(const std::string& s, const std::string& sep, int64_t maxsplit,
                             bool from_right) {
  if (sep.empty()) type_error("empty separator");
  std::vector<std::string> parts;
  if (!from_right) {
    size_t start = 0;
    while (maxsplit < 0 || static_cast<int64_t>(parts.size()) < maxsplit) {
      const size_t p = s.find(sep, start);
      if (p == std::string::npos) break;
      parts.push_back(s.substr(start, p - start));
      start = p + sep.size();
    }
    parts.push_back(s.substr(start));
  } else {
    size_t end = s.size();
    while (maxsplit < 0 || static_cast<int64_t>(parts.size()) < maxsplit) {
      if (end < sep.size()) break;
      const size_t p = s.rfind(sep, end - sep.size());
      if (p == std::string::npos) break;
      parts.push_back(s.substr(p + sep.size(), end - p - sep.size()));
      end = p;
    }
    parts.push_back(s.substr(0, end));
    std::reverse(parts.begin(), parts.end());
  }
  std::vector<Value> out;
  for (auto& p : parts) out.push_back(Value::string(std::move(p)));
  return out;
}

// s[start:end] in code points, for the optional start/end of find, count, startswith, ...
std::string char_range(const std::string& s, const Value* start, const Value* end,
                       int64_t* offset) {
  std::vector<std::string_view> cs = utf8_chars(s);
  const auto n = static_cast<int64_t>(cs.size());
  auto clamp = [&](const Value* v, int64_t dflt) {
    if (!v) return dflt;
    int64_t i = need_int(v, "slice index");
    if (i < 0) i = std::max<int64_t>(0, i + n);
    return std::min(i, n);
  };
  const int64_t b = clamp(start, 0), e = clamp(end, n);
  *offset = b;
  std::string out;
  for (int64_t i = b; i < e; ++i) out.append(cs[static_cast<size_t>(i)]);
  return out;
}

int64_t byte_to_char_index(const std::string& s, size_t byte) {
  return utf8_length(std::string_view(s).substr(0, byte));
}

bool char_is(char32_t c, const char* kind) {
  const auto cat = utf8proc_category(static_cast<int32_t>(c));
  const std::string_view k(kind);
  const bool letter = cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO;
  const bool decimal = cat == UTF8PROC_CATEGORY_ND;
  const bool numeric = decimal || cat == UTF8PROC_CATEGORY_NL || cat == UTF8PROC_CATEGORY_NO;
  if (k == "alpha") return letter;
  if (k == "digit" || k == "decimal") return decimal;
  if (k == "numeric") return numeric;
  if (k == "alnum") return letter || numeric;
  return false;
}

Value str_predicate(const std::string& s, const std::string& name) {
  std::vector<std::string_view> cs = utf8_chars(s);
  if (name == "isupper" || name == "islower") {
    bool cased = false;
    for (std::string_view ch : cs) {
      const auto c = static_cast<int32_t>(decode_utf8(ch));
      const bool up = utf8proc_isupper(c), low = utf8proc_islower(c);
      if ((name == "isupper" && low) || (name == "islower" && up)) return Value::boolean(false);
      cased = cased || up || low;
    }
    return Value::boolean(cased);
  }
  if (cs.empty()) return Value::boolean(false);
  for (std::string_view ch : cs) {
    const char32_t c = decode_utf8(ch);
    const bool ok = name == "isspace" ? is_py_space(c) : char_is(c, name.c_str() + 2);
    if (!ok) return Value::boolean(false);
  }
  return Value::boolean(true);
}

std::string pad(const std::string& s, int64_t width, const std::string& fill, char align) {
  check_size(static_cast<size_t>(std::max<int64_t>(0, width)) * fill.size());
  const int64_t n = utf8_length(s);
  if (width <= n) return s;
  const int64_t marg = width - n;
  int64_t left = 0;
  if (align == '>') left = marg;
  if (align == '^') left = marg / 2 + (marg & width & 1);
  std::string out;
  for (int64_t i = 0; i < left; ++i) out += fill;
  out += s;
  for (int64_t i = 0; i < marg - left; ++i) out += fill;
  return out;
}

// One replacement field of str.format with its format spec (fill, align, width, precision and the
// types s, d, f are supported).
std::string format_field(const Value& v, const std::string& spec) {
  if (spec.empty()) return py_str(v);
  size_t i = 0;
  std::string fill = " ";
  char align = 0;
  std::vector<std::string_view> cs = utf8_chars(spec);
  auto is_align = [](std::string_view c) { return c == "<" || c == ">" || c == "^"; };
  if (cs.size() >= 2 && is_align(cs[1])) {
    fill = std::string(cs[0]);
    align = cs[1][0];
    i = cs[0].size() + 1;
  } else if (!cs.empty() && is_align(cs[0])) {
    align = cs[0][0];
    i = 1;
  }
  std::string width, precision;
  while (i < spec.size() && std::isdigit(static_cast<unsigned char>(spec[i]))) width += spec[i++];
  if (i < spec.size() && spec[i] == '.') {
    ++i;
    while (i < spec.size() && std::isdigit(static_cast<unsigned char>(spec[i])))
      precision += spec[i++];
  }
  if (width.size() > 9 || precision.size() > 3)
    type_error(fmt::format("the format spec '{}' asks for too wide a field", spec));
  char type = 0;
  if (i < spec.size()) type = spec[i++];
  if (i != spec.size() || (type && type != 's' && type != 'd' && type != 'f'))
    type_error(fmt::format("the format spec '{}' is not supported", spec));
  std::string body;
  if (type == 'f' || (!type && !precision.empty() && v.is_float())) {
    if (!v.is_number()) type_error("format spec 'f' needs a number");
    body = fmt::format("{:.{}f}", v.as_float(), precision.empty() ? 6 : std::stoi(precision));
  } else if (type == 'd') {
    if (!v.is_int() && !v.is_bool()) type_error("format spec 'd' needs an integer");
    body = std::to_string(v.as_int());
  } else {
    body = py_str(v);
    if (!precision.empty()) {
      std::vector<std::string_view> bc = utf8_chars(body);
      const auto p = static_cast<size_t>(std::stoi(precision));
      if (bc.size() > p) {
        std::string cut;
        for (size_t k = 0; k < p; ++k) cut.append(bc[k]);
        body = cut;
      }
    }
  }
  if (!align) align = v.is_number() && !v.is_bool() ? '>' : '<';
  return width.empty() ? body : pad(body, std::stoll(width), fill, align);
}

std::string str_format(const std::string& f, const CallArgs& a) {
  std::string out;
  size_t auto_index = 0;
  for (size_t i = 0; i < f.size(); ++i) {
    const char c = f[i];
    if (c == '}') {
      if (i + 1 < f.size() && f[i + 1] == '}') {
        out += '}';
        ++i;
        continue;
      }
      type_error("Single '}' encountered in format string");
    }
    if (c != '{') {
      out += c;
      continue;
    }
    if (i + 1 < f.size() && f[i + 1] == '{') {
      out += '{';
      ++i;
      continue;
    }
    const size_t close = f.find('}', i);
    if (close == std::string::npos) type_error("Single '{' encountered in format string");
    std::string field = f.substr(i + 1, close - i - 1);
    i = close;
    std::string spec, conv;
    if (size_t colon = field.find(':'); colon != std::string::npos) {
      spec = field.substr(colon + 1);
      field.resize(colon);
    }
    if (size_t bang = field.find('!'); bang != std::string::npos) {
      conv = field.substr(bang + 1);
      field.resize(bang);
    }
    // field: name or index, then .attr / [key] parts
    size_t end = field.find_first_of(".[");
    std::string head = field.substr(0, end);
    Value v;
    if (head.empty()) {
      if (auto_index >= a.args.size()) type_error("Replacement index out of range");
      v = a.args[auto_index++];
    } else if (std::all_of(head.begin(), head.end(), [](char d) { return std::isdigit(d); })) {
      const size_t k = std::stoul(head);
      if (k >= a.args.size()) type_error("Replacement index out of range");
      v = a.args[k];
    } else {
      const Value* found = nullptr;
      for (const auto& kv : a.kwargs)
        if (kv.first == head) found = &kv.second;
      if (!found) type_error("KeyError: " + py_repr_string(head));
      v = *found;
    }
    while (end != std::string::npos && end < field.size()) {
      if (field[end] == '.') {
        const size_t next = field.find_first_of(".[", end + 1);
        v = get_attr(v, field.substr(end + 1, next == std::string::npos ? std::string::npos
                                                                        : next - end - 1));
        end = next;
      } else {
        const size_t rb = field.find(']', end);
        if (rb == std::string::npos) type_error("Missing ']' in format string");
        const std::string key = field.substr(end + 1, rb - end - 1);
        const bool digits = !key.empty() && std::all_of(key.begin(), key.end(),
                                                        [](char d) { return std::isdigit(d); });
        v = get_item(v, digits ? Value::integer(std::stoll(key)) : Value::string(key));
        end = rb + 1;
      }
      if (v.is_undefined()) type_error(v.undefined_message());
    }
    if (conv == "r") {
      v = Value::string(py_repr(v));
    } else if (conv == "s") {
      v = Value::string(py_str(v));
    } else if (!conv.empty()) {
      type_error("Unknown conversion specifier " + conv);
    }
    out += format_field(v, spec);
  }
  return out;
}

}  // namespace

Value string_method(const std::string& s, const std::string& name, CallArgs& a) {
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    Params p(name, a, {"chars"});
    const Value* chars = p.opt(0);
    const std::string* cp = chars ? &need_string(chars, "strip arg") : nullptr;
    return Value::string(py_strip(s, cp, name != "rstrip", name != "lstrip"));
  }
  if (name == "split" || name == "rsplit") {
    Params p(name, a, {"sep", "maxsplit"});
    const int64_t maxsplit = p.opt(1) ? need_int(p.opt(1), "maxsplit") : -1;
    const bool right = name == "rsplit";
    if (!p.opt(0)) return Value::seq(split_whitespace(s, maxsplit, right));
    return Value::seq(split_sep(s, need_string(p.opt(0), "sep"), maxsplit, right));
  }
  if (name == "splitlines") {
    Params p(name, a, {"keepends"});
    std::vector<Value> out;
    const bool keepends = p.get(0) && need_int(p.get(0), "keepends") != 0;
    for (auto& line : py_splitlines(s, keepends)) out.push_back(Value::string(std::move(line)));
    return Value::seq(std::move(out));
  }
  if (name == "startswith" || name == "endswith") {
    Params p(name, a, {"prefix", "start", "end"});
    const Value* what = p.get(0);
    int64_t offset;
    const std::string sub = (p.opt(1) || p.opt(2)) ? char_range(s, p.opt(1), p.opt(2), &offset) : s;
    std::vector<std::string> options;
    if (what && what->is_seq() && what->seq_kind() == SeqKind::Tuple) {
      for (const Value& v : what->items()) options.push_back(need_string(&v, name.c_str()));
    } else {
      if (!what || !what->is_string())
        type_error(fmt::format("{} first arg must be str or a tuple of str, not {}", name,
                               what ? what->type_name() : "None"));
      options.push_back(what->text());
    }
    for (const std::string& o : options) {
      if (o.size() > sub.size()) continue;
      if (name == "startswith" ? sub.compare(0, o.size(), o) == 0
                               : sub.compare(sub.size() - o.size(), o.size(), o) == 0)
        return Value::boolean(true);
    }
    return Value::boolean(false);
  }
  if (name == "upper" || name == "lower" || name == "title" || name == "capitalize")
    Params(name, a, {});  // these take no arguments
  if (name == "upper") return Value::string(py_upper(s));
  if (name == "lower") return Value::string(py_lower(s));
  if (name == "title") return Value::string(py_title(s));
  if (name == "capitalize") return Value::string(py_capitalize(s));

  if (name == "replace") {
    Params p(name, a, {"old", "new", "count"});
    const std::string& from = need_string(p.opt(0), "replace() argument 1");
    const std::string& to = need_string(p.opt(1), "replace() argument 2");
    int64_t count = p.opt(2) ? need_int(p.opt(2), "count") : -1;
    std::string out;
    if (from.empty()) {
      std::vector<std::string_view> cs = utf8_chars(s);
      for (size_t i = 0; i <= cs.size(); ++i) {
        if (count != 0) {
          out += to;
          check_size(out.size());
          if (count > 0) --count;
        }
        if (i < cs.size()) out.append(cs[i]);
      }
      return Value::string(std::move(out));
    }
    size_t start = 0;
    while (count != 0) {
      const size_t pos = s.find(from, start);
      if (pos == std::string::npos) break;
      out.append(s, start, pos - start);
      out += to;
      check_size(out.size());
      start = pos + from.size();
      if (count > 0) --count;
    }
    out.append(s, start, std::string::npos);
    return Value::string(std::move(out));
  }
  if (name == "find" || name == "rfind" || name == "index" || name == "rindex" || name == "count") {
    Params p(name, a, {"sub", "start", "end"});
    const std::string& sub = need_string(p.opt(0), "substring");
    int64_t offset;
    const std::string hay = char_range(s, p.opt(1), p.opt(2), &offset);
    if (name == "count") {
      if (sub.empty()) return Value::integer(utf8_length(hay) + 1);
      int64_t n = 0;
      for (size_t pos = hay.find(sub); pos != std::string::npos;
           pos = hay.find(sub, pos + sub.size()))
        ++n;
      return Value::integer(n);
    }
    const size_t pos = name[0] == 'r' ? hay.rfind(sub) : hay.find(sub);
    if (pos == std::string::npos) {
      if (name == "index" || name == "rindex") type_error("substring not found");
      return Value::integer(-1);
    }
    return Value::integer(offset + byte_to_char_index(hay, pos));
  }
  if (name == "join") {
    Params p(name, a, {"iterable"});
    if (!p.get(0)) type_error("join() takes exactly one argument");
    std::string out;
    bool first = true;
    for (const Value& v : iterate(*p.get(0))) {
      if (!v.is_string())
        type_error(fmt::format("sequence item: expected str instance, {} found", v.type_name()));
      if (!first) out += s;
      check_size(out.size());
      out += v.text();
      first = false;
    }
    return Value::string(std::move(out));
  }
  if (name == "format") return Value::string(str_format(s, a));
  if (name.rfind("is", 0) == 0) {
    Params p(name, a, {});
    return str_predicate(s, name);
  }
  if (name == "removeprefix" || name == "removesuffix") {
    Params p(name, a, {"affix"});
    const std::string& x = need_string(p.opt(0), name.c_str());
    if (name == "removeprefix" && s.compare(0, x.size(), x) == 0)
      return Value::string(s.substr(x.size()));
    if (name == "removesuffix" && !x.empty() && s.size() >= x.size() &&
        s.compare(s.size() - x.size(), x.size(), x) == 0)
      return Value::string(s.substr(0, s.size() - x.size()));
    return Value::string(s);
  }
  if (name == "center" || name == "ljust" || name == "rjust") {
    Params p(name, a, {"width", "fillchar"});
    const std::string fill = p.opt(1) ? need_string(p.opt(1), "fillchar") : " ";
    if (utf8_length(fill) != 1) type_error("The fill character must be exactly one character long");
    const char align = name == "center" ? '^' : name == "ljust" ? '<' : '>';
    return Value::string(pad(s, need_int(p.opt(0), "width"), fill, align));
  }
  if (name == "zfill") {
    Params p(name, a, {"width"});
    const int64_t w = need_int(p.opt(0), "width");
    const int64_t n = utf8_length(s);
    if (w <= n) return Value::string(s);
    const size_t sign = !s.empty() && (s[0] == '-' || s[0] == '+') ? 1 : 0;
    std::string out = s;
    check_size(static_cast<size_t>(w));
    out.insert(sign, std::string(static_cast<size_t>(w - n), '0'));
    return Value::string(std::move(out));
  }
  type_error(fmt::format("the str method '{}' is not supported", name));
}

}  // namespace moemesh::jinja
