// Text helpers of the chat-template interpreter: UTF-8 and Python's str case mapping, stripping and
// line splitting, printf-style formatting (str % args), and json.dumps / JSON conversion (see
// core/detail/jinja_value.h).
#include <fmt/format.h>
#include <utf8proc.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/detail/jinja_value.h"

namespace moemesh::jinja {
namespace {

[[noreturn]] void type_error(const std::string& message) {
  throw RenderError(message);
}

}  // namespace

// ---- UTF-8 ------------------------------------------------------------------------------------

namespace {

// Length of the UTF-8 sequence starting at s[i]; an invalid byte counts as one character.
size_t char_len(std::string_view s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
  if (i + n > s.size()) return 1;
  for (size_t k = 1; k < n; ++k)
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 1;
  return n;
}

}  // namespace

std::vector<std::string_view> utf8_chars(std::string_view s) {
  std::vector<std::string_view> out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const size_t n = char_len(s, i);
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

int64_t utf8_length(std::string_view s) {
  int64_t n = 0;
  for (size_t i = 0; i < s.size(); i += char_len(s, i)) ++n;
  return n;
}

char32_t decode_utf8(std::string_view ch) {
  const auto b = [&](size_t k) { return static_cast<char32_t>(static_cast<unsigned char>(ch[k])); };
  switch (ch.size()) {
    case 1:
      return b(0);
    case 2:
      return ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
    case 3:
      return ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    case 4:
      return ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
    default:
      return 0xFFFD;
  }
}

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

bool is_py_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

std::string py_strip(std::string_view s, const std::string* chars, bool left, bool right) {
  std::vector<std::string_view> cs = utf8_chars(s);
  std::vector<std::string_view> set;
  if (chars) set = utf8_chars(*chars);
  auto strip_it = [&](std::string_view c) {
    if (!chars) return is_py_space(decode_utf8(c));
    return std::find(set.begin(), set.end(), c) != set.end();
  };
  size_t b = 0, e = cs.size();
  if (left)
    while (b < e && strip_it(cs[b])) ++b;
  if (right)
    while (e > b && strip_it(cs[e - 1])) --e;
  if (b == e) return "";
  const char* start = cs[b].data();
  const char* end = cs[e - 1].data() + cs[e - 1].size();
  return std::string(start, end);
}

namespace {

// The characters whose upper, lower or title case is more than one character (Unicode's
// SpecialCasing.txt, unconditional mappings, as Python 3.11's str methods apply them).
struct SpecialCase {
  char32_t cp;
  const char* upper;
  const char* lower;
  const char* title;
};
constexpr SpecialCase kSpecialCases[] = {
    {0x00DF, "SS", "\u00DF", "Ss"},
    {0x0130, "\u0130", "i\u0307", "\u0130"},
    {0x0149, "\u02BCN", "\u0149", "\u02BCN"},
    {0x01F0, "J\u030C", "\u01F0", "J\u030C"},
    {0x0390, "\u0399\u0308\u0301", "\u0390", "\u0399\u0308\u0301"},
    {0x03B0, "\u03A5\u0308\u0301", "\u03B0", "\u03A5\u0308\u0301"},
    {0x0587, "\u0535\u0552", "\u0587", "\u0535\u0582"},
    {0x1E96, "H\u0331", "\u1E96", "H\u0331"},
    {0x1E97, "T\u0308", "\u1E97", "T\u0308"},
    {0x1E98, "W\u030A", "\u1E98", "W\u030A"},
    {0x1E99, "Y\u030A", "\u1E99", "Y\u030A"},
    {0x1E9A, "A\u02BE", "\u1E9A", "A\u02BE"},
    {0x1F50, "\u03A5\u0313", "\u1F50", "\u03A5\u0313"},
    {0x1F52, "\u03A5\u0313\u0300", "\u1F52", "\u03A5\u0313\u0300"},
    {0x1F54, "\u03A5\u0313\u0301", "\u1F54", "\u03A5\u0313\u0301"},
    {0x1F56, "\u03A5\u0313\u0342", "\u1F56", "\u03A5\u0313\u0342"},
    {0x1F80, "\u1F08\u0399", "\u1F80", "\u1F88"},
    {0x1F81, "\u1F09\u0399", "\u1F81", "\u1F89"},
    {0x1F82, "\u1F0A\u0399", "\u1F82", "\u1F8A"},
    {0x1F83, "\u1F0B\u0399", "\u1F83", "\u1F8B"},
    {0x1F84, "\u1F0C\u0399", "\u1F84", "\u1F8C"},
    {0x1F85, "\u1F0D\u0399", "\u1F85", "\u1F8D"},
    {0x1F86, "\u1F0E\u0399", "\u1F86", "\u1F8E"},
    {0x1F87, "\u1F0F\u0399", "\u1F87", "\u1F8F"},
    {0x1F88, "\u1F08\u0399", "\u1F80", "\u1F88"},
    {0x1F89, "\u1F09\u0399", "\u1F81", "\u1F89"},
    {0x1F8A, "\u1F0A\u0399", "\u1F82", "\u1F8A"},
    {0x1F8B, "\u1F0B\u0399", "\u1F83", "\u1F8B"},
    {0x1F8C, "\u1F0C\u0399", "\u1F84", "\u1F8C"},
    {0x1F8D, "\u1F0D\u0399", "\u1F85", "\u1F8D"},
    {0x1F8E, "\u1F0E\u0399", "\u1F86", "\u1F8E"},
    {0x1F8F, "\u1F0F\u0399", "\u1F87", "\u1F8F"},
    {0x1F90, "\u1F28\u0399", "\u1F90", "\u1F98"},
    {0x1F91, "\u1F29\u0399", "\u1F91", "\u1F99"},
    {0x1F92, "\u1F2A\u0399", "\u1F92", "\u1F9A"},
    {0x1F93, "\u1F2B\u0399", "\u1F93", "\u1F9B"},
    {0x1F94, "\u1F2C\u0399", "\u1F94", "\u1F9C"},
    {0x1F95, "\u1F2D\u0399", "\u1F95", "\u1F9D"},
    {0x1F96, "\u1F2E\u0399", "\u1F96", "\u1F9E"},
    {0x1F97, "\u1F2F\u0399", "\u1F97", "\u1F9F"},
    {0x1F98, "\u1F28\u0399", "\u1F90", "\u1F98"},
    {0x1F99, "\u1F29\u0399", "\u1F91", "\u1F99"},
    {0x1F9A, "\u1F2A\u0399", "\u1F92", "\u1F9A"},
    {0x1F9B, "\u1F2B\u0399", "\u1F93", "\u1F9B"},
    {0x1F9C, "\u1F2C\u0399", "\u1F94", "\u1F9C"},
    {0x1F9D, "\u1F2D\u0399", "\u1F95", "\u1F9D"},
    {0x1F9E, "\u1F2E\u0399", "\u1F96", "\u1F9E"},
    {0x1F9F, "\u1F2F\u0399", "\u1F97", "\u1F9F"},
    {0x1FA0, "\u1F68\u0399", "\u1FA0", "\u1FA8"},
    {0x1FA1, "\u1F69\u0399", "\u1FA1", "\u1FA9"},
    {0x1FA2, "\u1F6A\u0399", "\u1FA2", "\u1FAA"},
    {0x1FA3, "\u1F6B\u0399", "\u1FA3", "\u1FAB"},
    {0x1FA4, "\u1F6C\u0399", "\u1FA4", "\u1FAC"},
    {0x1FA5, "\u1F6D\u0399", "\u1FA5", "\u1FAD"},
    {0x1FA6, "\u1F6E\u0399", "\u1FA6", "\u1FAE"},
    {0x1FA7, "\u1F6F\u0399", "\u1FA7", "\u1FAF"},
    {0x1FA8, "\u1F68\u0399", "\u1FA0", "\u1FA8"},
    {0x1FA9, "\u1F69\u0399", "\u1FA1", "\u1FA9"},
    {0x1FAA, "\u1F6A\u0399", "\u1FA2", "\u1FAA"},
    {0x1FAB, "\u1F6B\u0399", "\u1FA3", "\u1FAB"},
    {0x1FAC, "\u1F6C\u0399", "\u1FA4", "\u1FAC"},
    {0x1FAD, "\u1F6D\u0399", "\u1FA5", "\u1FAD"},
    {0x1FAE, "\u1F6E\u0399", "\u1FA6", "\u1FAE"},
    {0x1FAF, "\u1F6F\u0399", "\u1FA7", "\u1FAF"},
    {0x1FB2, "\u1FBA\u0399", "\u1FB2", "\u1FBA\u0345"},
    {0x1FB3, "\u0391\u0399", "\u1FB3", "\u1FBC"},
    {0x1FB4, "\u0386\u0399", "\u1FB4", "\u0386\u0345"},
    {0x1FB6, "\u0391\u0342", "\u1FB6", "\u0391\u0342"},
    {0x1FB7, "\u0391\u0342\u0399", "\u1FB7", "\u0391\u0342\u0345"},
    {0x1FBC, "\u0391\u0399", "\u1FB3", "\u1FBC"},
    {0x1FC2, "\u1FCA\u0399", "\u1FC2", "\u1FCA\u0345"},
    {0x1FC3, "\u0397\u0399", "\u1FC3", "\u1FCC"},
    {0x1FC4, "\u0389\u0399", "\u1FC4", "\u0389\u0345"},
    {0x1FC6, "\u0397\u0342", "\u1FC6", "\u0397\u0342"},
    {0x1FC7, "\u0397\u0342\u0399", "\u1FC7", "\u0397\u0342\u0345"},
    {0x1FCC, "\u0397\u0399", "\u1FC3", "\u1FCC"},
    {0x1FD2, "\u0399\u0308\u0300", "\u1FD2", "\u0399\u0308\u0300"},
    {0x1FD3, "\u0399\u0308\u0301", "\u1FD3", "\u0399\u0308\u0301"},
    {0x1FD6, "\u0399\u0342", "\u1FD6", "\u0399\u0342"},
    {0x1FD7, "\u0399\u0308\u0342", "\u1FD7", "\u0399\u0308\u0342"},
    {0x1FE2, "\u03A5\u0308\u0300", "\u1FE2", "\u03A5\u0308\u0300"},
    {0x1FE3, "\u03A5\u0308\u0301", "\u1FE3", "\u03A5\u0308\u0301"},
    {0x1FE4, "\u03A1\u0313", "\u1FE4", "\u03A1\u0313"},
    {0x1FE6, "\u03A5\u0342", "\u1FE6", "\u03A5\u0342"},
    {0x1FE7, "\u03A5\u0308\u0342", "\u1FE7", "\u03A5\u0308\u0342"},
    {0x1FF2, "\u1FFA\u0399", "\u1FF2", "\u1FFA\u0345"},
    {0x1FF3, "\u03A9\u0399", "\u1FF3", "\u1FFC"},
    {0x1FF4, "\u038F\u0399", "\u1FF4", "\u038F\u0345"},
    {0x1FF6, "\u03A9\u0342", "\u1FF6", "\u03A9\u0342"},
    {0x1FF7, "\u03A9\u0342\u0399", "\u1FF7", "\u03A9\u0342\u0345"},
    {0x1FFC, "\u03A9\u0399", "\u1FF3", "\u1FFC"},
    {0xFB00, "FF", "\uFB00", "Ff"},
    {0xFB01, "FI", "\uFB01", "Fi"},
    {0xFB02, "FL", "\uFB02", "Fl"},
    {0xFB03, "FFI", "\uFB03", "Ffi"},
    {0xFB04, "FFL", "\uFB04", "Ffl"},
    {0xFB05, "ST", "\uFB05", "St"},
    {0xFB06, "ST", "\uFB06", "St"},
    {0xFB13, "\u0544\u0546", "\uFB13", "\u0544\u0576"},
    {0xFB14, "\u0544\u0535", "\uFB14", "\u0544\u0565"},
    {0xFB15, "\u0544\u053B", "\uFB15", "\u0544\u056B"},
    {0xFB16, "\u054E\u0546", "\uFB16", "\u054E\u0576"},
    {0xFB17, "\u0544\u053D", "\uFB17", "\u0544\u056D"},
};

const SpecialCase* special_case(char32_t c) {
  const auto* end = std::end(kSpecialCases);
  const auto* it = std::lower_bound(std::begin(kSpecialCases), end, c,
                                    [](const SpecialCase& s, char32_t x) { return s.cp < x; });
  return it != end && it->cp == c ? it : nullptr;
}

bool is_cased(char32_t c) {
  const auto i = static_cast<int32_t>(c);
  return utf8proc_isupper(i) || utf8proc_islower(i) || utf8proc_category(i) == UTF8PROC_CATEGORY_LT;
}

bool is_case_ignorable(char32_t c) {
  switch (utf8proc_category(static_cast<int32_t>(c))) {
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_SK:
      return true;
    default:
      return c == '\'' || c == '.' || c == ':' || c == 0xB7 || c == 0x2019 || c == 0x2018 ||
             c == 0x2024 || c == 0xFE52 || c == 0xFF07 || c == 0xFF0E;
  }
}

// Python's Final_Sigma rule: a capital sigma lowercases to ς at the end of a word.
bool final_sigma(const std::vector<std::string_view>& cs, size_t i) {
  bool before = false;
  for (size_t j = i; j-- > 0;) {
    const char32_t c = decode_utf8(cs[j]);
    if (is_case_ignorable(c)) continue;
    before = is_cased(c);
    break;
  }
  if (!before) return false;
  for (size_t j = i + 1; j < cs.size(); ++j) {
    const char32_t c = decode_utf8(cs[j]);
    if (is_case_ignorable(c)) continue;
    return !is_cased(c);
  }
  return true;
}

enum class Case { Upper, Lower, Title };

void map_char(std::string& out, std::string_view ch, Case mode) {
  const char32_t c = decode_utf8(ch);
  if (const SpecialCase* sc = special_case(c)) {
    out += mode == Case::Upper ? sc->upper : mode == Case::Lower ? sc->lower : sc->title;
    return;
  }
  const auto i = static_cast<int32_t>(c);
  const auto m = static_cast<char32_t>(mode == Case::Upper   ? utf8proc_toupper(i)
                                       : mode == Case::Lower ? utf8proc_tolower(i)
                                                             : utf8proc_totitle(i));
  if (ch.size() == 1 && static_cast<unsigned char>(ch[0]) >= 0x80) {
    out.append(ch);  // an invalid UTF-8 byte stays as it is
  } else if (m == c) {
    out.append(ch);
  } else {
    append_utf8(out, m);
  }
}

// Appends the case mapping of cs[k]; the characters around it decide a capital sigma's lower case.
void map_at(std::string& out, const std::vector<std::string_view>& cs, size_t k, Case mode) {
  std::string_view ch = cs[k];
  if (ch.size() == 1 && static_cast<unsigned char>(ch[0]) < 0x80) {
    char c = ch[0];
    if (mode != Case::Lower && c >= 'a' && c <= 'z') c = static_cast<char>(c - 32);
    if (mode == Case::Lower && c >= 'A' && c <= 'Z') c = static_cast<char>(c + 32);
    out += c;
  } else if (mode == Case::Lower && decode_utf8(ch) == 0x3A3) {
    out += final_sigma(cs, k) ? "\u03C2" : "\u03C3";
  } else {
    map_char(out, ch, mode);
  }
}

std::string map_case(std::string_view s, Case mode) {
  std::string out;
  out.reserve(s.size());
  std::vector<std::string_view> cs = utf8_chars(s);
  for (size_t k = 0; k < cs.size(); ++k) map_at(out, cs, k, mode);
  return out;
}

}  // namespace

std::string py_upper(std::string_view s) {
  return map_case(s, Case::Upper);
}
std::string py_lower(std::string_view s) {
  return map_case(s, Case::Lower);
}

std::string py_title(std::string_view s) {
  std::string out;
  std::vector<std::string_view> cs = utf8_chars(s);
  bool prev_cased = false;
  for (size_t k = 0; k < cs.size(); ++k) {
    map_at(out, cs, k, prev_cased ? Case::Lower : Case::Title);
    prev_cased = is_cased(decode_utf8(cs[k]));
  }
  return out;
}

std::string py_capitalize(std::string_view s) {
  std::string out;
  std::vector<std::string_view> cs = utf8_chars(s);
  for (size_t k = 0; k < cs.size(); ++k) map_at(out, cs, k, k == 0 ? Case::Title : Case::Lower);
  return out;
}

std::vector<std::string> py_splitlines(std::string_view s, bool keepends) {
  std::vector<std::string> out;
  std::string cur;
  std::vector<std::string_view> cs = utf8_chars(s);
  for (size_t i = 0; i < cs.size(); ++i) {
    const char32_t c = decode_utf8(cs[i]);
    const bool brk = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D ||
                     c == 0x1E || c == 0x85 || c == 0x2028 || c == 0x2029;
    if (!brk) {
      cur.append(cs[i]);
      continue;
    }
    if (keepends) cur.append(cs[i]);
    if (c == '\r' && i + 1 < cs.size() && cs[i + 1] == "\n") {
      ++i;
      if (keepends) cur += '\n';
    }
    out.push_back(std::move(cur));
    cur.clear();
  }
  if (!cur.empty()) out.push_back(std::move(cur));
  return out;
}

// ---- JSON -------------------------------------------------------------------------------------

namespace {

void json_string(std::string& out, std::string_view s, bool ensure_ascii) {
  out += '"';
  for (std::string_view ch : utf8_chars(s)) {
    const char32_t c = decode_utf8(ch);
    switch (c) {
      case '"':
        out += "\\\"";
        continue;
      case '\\':
        out += "\\\\";
        continue;
      case '\n':
        out += "\\n";
        continue;
      case '\r':
        out += "\\r";
        continue;
      case '\t':
        out += "\\t";
        continue;
      case '\b':
        out += "\\b";
        continue;
      case '\f':
        out += "\\f";
        continue;
      default:
        break;
    }
    if (c < 0x20 || (ensure_ascii && c >= 0x7F)) {
      if (c > 0xFFFF) {
        const char32_t v = c - 0x10000;
        out += fmt::format("\\u{:04x}\\u{:04x}", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
      } else {
        out += fmt::format("\\u{:04x}", static_cast<unsigned>(c));
      }
    } else {
      out.append(ch);
    }
  }
  out += '"';
}

void json_into(std::string& out, const Value& v, const JsonStyle& st, int level) {
  if (level > kMaxDataDepth) type_error("data nested too deeply for tojson");
  auto newline = [&](int lvl) {
    out += '\n';
    for (int i = 0; i < lvl; ++i) out += st.indent;
  };
  switch (v.kind()) {
    case Value::Kind::None:
      out += "null";
      return;
    case Value::Kind::Bool:
      out += v.as_bool() ? "true" : "false";
      return;
    case Value::Kind::Int:
      out += std::to_string(v.as_int());
      return;
    case Value::Kind::Float: {
      const double d = v.as_float();
      if (std::isnan(d)) {
        out += "NaN";
      } else if (std::isinf(d)) {
        out += d > 0 ? "Infinity" : "-Infinity";
      } else {
        out += py_float_repr(d);
      }
      return;
    }
    case Value::Kind::String:
      json_string(out, v.text(), st.ensure_ascii);
      return;
    case Value::Kind::Seq: {
      if (v.seq_kind() != SeqKind::List && v.seq_kind() != SeqKind::Tuple) break;
      const auto& items = v.items();
      if (items.empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += st.item_separator;
        if (st.has_indent) newline(level + 1);
        json_into(out, items[i], st, level + 1);
      }
      if (st.has_indent) newline(level);
      out += ']';
      return;
    }
    case Value::Kind::Dict: {
      const auto& items = v.dict_data().items;
      if (items.empty()) {
        out += "{}";
        return;
      }
      std::vector<const std::pair<std::string, Value>*> order;
      for (const auto& kv : items) order.push_back(&kv);
      if (st.sort_keys)
        std::stable_sort(order.begin(), order.end(),
                         [](auto* x, auto* y) { return x->first < y->first; });
      out += '{';
      for (size_t i = 0; i < order.size(); ++i) {
        if (i) out += st.item_separator;
        if (st.has_indent) newline(level + 1);
        json_string(out, order[i]->first, st.ensure_ascii);
        out += st.key_separator;
        json_into(out, order[i]->second, st, level + 1);
      }
      if (st.has_indent) newline(level);
      out += '}';
      return;
    }
    default:
      break;
  }
  type_error(fmt::format("Object of type {} is not JSON serializable", v.type_name()));
}

template <class J>
Value from_json_impl(const J& j, int depth) {
  if (depth > kMaxDataDepth)
    type_error(fmt::format("template variables nested more than {} levels deep", kMaxDataDepth));
  using T = nlohmann::json::value_t;
  switch (j.type()) {
    case T::null:
      return Value::none();
    case T::boolean:
      return Value::boolean(j.template get<bool>());
    case T::number_integer:
      return Value::integer(j.template get<int64_t>());
    case T::number_unsigned: {
      const auto u = j.template get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        type_error(fmt::format("integer {} in the template variables does not fit in 64 bits", u));
      return Value::integer(static_cast<int64_t>(u));
    }
    case T::number_float:
      return Value::number(j.template get<double>());
    case T::string:
      return Value::string(j.template get<std::string>());
    case T::array: {
      std::vector<Value> items;
      items.reserve(j.size());
      for (const auto& e : j) items.push_back(from_json_impl(e, depth + 1));
      return Value::seq(std::move(items));
    }
    case T::object: {
      DictData d;
      d.items.reserve(j.size());
      for (auto it = j.begin(); it != j.end(); ++it)
        d.set(it.key(), from_json_impl(*it, depth + 1));
      return Value::dict(std::move(d));
    }
    default:
      type_error("template variables hold a binary or discarded JSON value");
  }
}

}  // namespace

// ---- printf-style formatting (str % args) -----------------------------------------------------

std::string printf_format(const std::string& f, const Value& arg) {
  std::vector<Value> args;
  // Python treats any non-tuple, non-str argument with __getitem__ as a mapping: it is then used
  // whole by %s, and unused arguments are no error.
  const bool mapping =
      arg.is_dict() || arg.is_undefined() ||
      (arg.is_seq() && arg.seq_kind() != SeqKind::Tuple && arg.seq_kind() != SeqKind::Iterator);
  if (arg.is_seq() && arg.seq_kind() == SeqKind::Tuple) {
    args = arg.items();
  } else {
    args.push_back(arg);
  }
  size_t next = 0;
  std::string out;
  for (size_t i = 0; i < f.size(); ++i) {
    if (f[i] != '%') {
      out += f[i];
      continue;
    }
    if (++i >= f.size()) type_error("incomplete format");
    const Value* a = nullptr;
    if (f[i] == '(') {
      const size_t close = f.find(')', i);
      if (close == std::string::npos || !mapping) type_error("format requires a mapping");
      if (arg.is_undefined()) throw RenderError(arg.undefined_message());
      if (!arg.is_dict()) type_error("list indices must be integers or slices, not str");
      a = arg.dict_data().find(f.substr(i + 1, close - i - 1));
      if (!a) type_error("KeyError: " + f.substr(i + 1, close - i - 1));
      i = close + 1;
    }
    std::string flags;
    while (i < f.size() && std::string_view("-+ #0").find(f[i]) != std::string_view::npos)
      flags += f[i++];
    std::string width, precision;
    while (i < f.size() && std::isdigit(static_cast<unsigned char>(f[i]))) width += f[i++];
    if (i < f.size() && f[i] == '.') {
      ++i;
      while (i < f.size() && std::isdigit(static_cast<unsigned char>(f[i]))) precision += f[i++];
      if (precision.empty()) precision = "0";
    }
    if (i >= f.size()) type_error("incomplete format");
    if (precision.size() > 3) type_error("format precision too large");
    const char conv = f[i];
    if (conv == '%') {
      out += '%';
      continue;
    }
    if (!a) {
      if (next >= args.size()) type_error("not enough arguments for format string");
      a = &args[next++];
    }
    std::string piece;
    switch (conv) {
      case 's':
        piece = py_str(*a);
        break;
      case 'r':
        piece = py_repr(*a);
        break;
      case 'd':
      case 'i':
        if (!a->is_number())
          type_error(
              fmt::format("%{} format: a real number is required, not {}", conv, a->type_name()));
        piece = std::to_string(a->is_float() ? static_cast<int64_t>(a->as_float()) : a->as_int());
        break;
      case 'f':
      case 'F':
        if (!a->is_number()) type_error(fmt::format("must be real number, not {}", a->type_name()));
        piece = fmt::format("{:.{}f}", a->as_float(), precision.empty() ? 6 : std::stoi(precision));
        break;
      default:
        type_error(fmt::format("format character '{}' is not supported", conv));
    }
    if (!width.empty()) {
      if (width.size() > 9) type_error("format width too large");
      const auto w = static_cast<size_t>(std::stoi(width));
      check_size(w);
      const auto n = static_cast<size_t>(utf8_length(piece));
      if (n < w) {
        const bool left = flags.find('-') != std::string::npos;
        const bool zero =
            !left && flags.find('0') != std::string::npos && conv != 's' && conv != 'r';
        if (left) {
          piece += std::string(w - n, ' ');
        } else if (zero) {
          const size_t sign = !piece.empty() && piece[0] == '-' ? 1 : 0;
          piece.insert(sign, std::string(w - n, '0'));
        } else {
          piece.insert(0, std::string(w - n, ' '));
        }
      }
    }
    out += piece;
  }
  if (!mapping && next < args.size())
    type_error("not all arguments converted during string formatting");
  return out;
}

std::string to_json(const Value& v, const JsonStyle& style) {
  std::string out;
  json_into(out, v, style, 0);
  return out;
}

Value from_json(const nlohmann::json& j) {
  return from_json_impl(j, 0);
}
Value from_json(const nlohmann::ordered_json& j) {
  return from_json_impl(j, 0);
}

}  // namespace moemesh::jinja
