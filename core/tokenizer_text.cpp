// UTF-8, Unicode properties and regex patterns of the tokenizer (core/detail/tokenizer_text.h).
#include <fmt/format.h>
#include <utf8proc.h>

#include <cstdlib>
#include <cstring>

#include "core/detail/tokenizer_text.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

namespace moemesh::tokenizer_detail {

// ---- UTF-8 -------------------------------------------------------------------------------------

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

namespace {

// The length of the well-formed UTF-8 sequence at s[i], or the length (>= 1) of its maximal
// ill-formed subpart as a negative number (Unicode's "substitution of maximal subparts").
int utf8_sequence(std::string_view s, std::size_t i) {
  const auto b = static_cast<unsigned char>(s[i]);
  if (b < 0x80) return 1;
  int len;
  unsigned char lo = 0x80, hi = 0xBF;  // the range of the second byte
  if (b >= 0xC2 && b <= 0xDF) {
    len = 2;
  } else if (b == 0xE0) {
    len = 3, lo = 0xA0;
  } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
    len = 3;
  } else if (b == 0xED) {
    len = 3, hi = 0x9F;
  } else if (b == 0xF0) {
    len = 4, lo = 0x90;
  } else if (b >= 0xF1 && b <= 0xF3) {
    len = 4;
  } else if (b == 0xF4) {
    len = 4, hi = 0x8F;
  } else {
    return -1;
  }
  for (int k = 1; k < len; ++k) {
    if (i + k >= s.size()) return -k;
    const auto c = static_cast<unsigned char>(s[i + k]);
    const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (c < l || c > h) return -k;
  }
  return len;
}

}  // namespace

std::size_t find_invalid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    // ASCII fast path, eight bytes at a time.
    while (i + 8 <= s.size()) {
      uint64_t w;
      std::memcpy(&w, s.data() + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= s.size()) break;
    const int n = utf8_sequence(s, i);
    if (n < 0) return i;
    i += static_cast<std::size_t>(n);
  }
  return std::string_view::npos;
}

std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  std::size_t i = 0;
  while (i < bytes.size()) {
    const int n = utf8_sequence(bytes, i);
    if (n > 0) {
      out.append(bytes.substr(i, static_cast<std::size_t>(n)));
      i += static_cast<std::size_t>(n);
    } else {
      out.append(kReplacementChar);
      i += static_cast<std::size_t>(-n);
    }
  }
  return out;
}

// ---- Unicode properties ------------------------------------------------------------------------

bool is_white_space(char32_t c) {
  if (c < 0x80) return c == ' ' || (c >= '\t' && c <= '\r');
  switch (c) {
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
      return true;
    default:
      return c >= 0x2000 && c <= 0x200A;
  }
}

bool is_numeric(char32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  const utf8proc_category_t cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return cat == UTF8PROC_CATEGORY_ND || cat == UTF8PROC_CATEGORY_NL || cat == UTF8PROC_CATEGORY_NO;
}

bool is_word_char(char32_t c) {
  if (c < 0x80)
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  // Alphabetic is not in utf8proc's tables; PCRE2 knows it.
  static const Regex* word = [] {
    auto r =
        Regex::compile(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}])", RegexDialect::Pcre2);
    return r ? new Regex(std::move(r.value())) : nullptr;
  }();
  if (word == nullptr) return false;
  std::string s;
  append_utf8(s, c);
  std::vector<std::pair<std::size_t, std::size_t>> m;
  word->find_all(s, m);
  return !m.empty();
}

bool is_combining_mark(char32_t c) {
  const utf8proc_category_t cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return cat == UTF8PROC_CATEGORY_MN || cat == UTF8PROC_CATEGORY_MC || cat == UTF8PROC_CATEGORY_ME;
}

std::string normalize_unicode(std::string_view s, NormForm form) {
  if (s.empty()) return {};
  int options = UTF8PROC_STABLE;
  switch (form) {
    case NormForm::NFC:
      options |= UTF8PROC_COMPOSE;
      break;
    case NormForm::NFD:
      options |= UTF8PROC_DECOMPOSE;
      break;
    case NormForm::NFKC:
      options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
      break;
    case NormForm::NFKD:
      options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
      break;
  }
  utf8proc_uint8_t* dst = nullptr;
  const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                          static_cast<utf8proc_ssize_t>(s.size()), &dst,
                                          static_cast<utf8proc_option_t>(options));
  if (n < 0) {  // cannot happen for valid UTF-8; keep the text as it is
    std::free(dst);
    return std::string(s);
  }
  std::string out(reinterpret_cast<const char*>(dst), static_cast<std::size_t>(n));
  std::free(dst);
  return out;
}

std::string lowercase(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  std::size_t i = 0;
  while (i < s.size()) {
    const char32_t c = next_code_point(s, i);
    if (c < 0x80) {
      out.push_back(static_cast<char>(c >= 'A' && c <= 'Z' ? c + 32 : c));
    } else if (c == 0x130) {  // the one unconditional multi-character lowercase mapping
      out.append("i\xCC\x87");
    } else {
      append_utf8(out, static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c))));
    }
  }
  return out;
}

// ---- Regex -------------------------------------------------------------------------------------

namespace {

// Oniguruma's Unicode \s (U+0009-000D, U+0085, Zs, Zl, Zp) and \w (L, M, Nd, Pc) as PCRE2
// class members, so that matching does not depend on PCRE2's definitions of \s and \w.
constexpr std::string_view kOnigSpace = R"(\t-\r\x{85}\p{Z})";
constexpr std::string_view kOnigWord = R"(\p{L}\p{M}\p{Nd}\p{Pc})";
constexpr std::string_view kOnigHex = "0-9a-fA-F";

std::string translate_oniguruma(std::string_view p) {
  std::string out;
  out.reserve(p.size() + 32);
  bool in_class = false;
  for (std::size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char e = p[++i];
      std::string_view set;
      bool negated = false;
      switch (e) {
        case 's':
        case 'S':
          set = kOnigSpace, negated = e == 'S';
          break;
        case 'w':
        case 'W':
          set = kOnigWord, negated = e == 'W';
          break;
        case 'h':
        case 'H':
          set = kOnigHex, negated = e == 'H';
          break;
        default:
          break;
      }
      if (set.empty() || (in_class && negated)) {
        out.push_back('\\');
        out.push_back(e);
      } else if (in_class) {
        out.append(set);
      } else {
        out.append(negated ? "[^" : "[").append(set).append("]");
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out.push_back(c);
      if (i + 1 < p.size() && p[i + 1] == '^') out.push_back(p[++i]);
      if (i + 1 < p.size() && p[i + 1] == ']') out.push_back(p[++i]);  // a literal ']'
      continue;
    }
    if (in_class && c == '[' && i + 1 < p.size() && p[i + 1] == ':') {  // [:alpha:]
      const std::size_t end = p.find(":]", i + 2);
      if (end != std::string_view::npos) {
        out.append(p.substr(i, end + 2 - i));
        i = end + 1;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out.push_back(c);
  }
  return out;
}

// Per-thread matching state: match data for one ovector pair and a JIT stack that can grow.
struct MatchState {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
  MatchState() { pcre2_jit_stack_assign(context, nullptr, stack); }
  ~MatchState() {
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
  MatchState(const MatchState&) = delete;
  MatchState& operator=(const MatchState&) = delete;
};

MatchState& match_state() {
  thread_local MatchState state;
  return state;
}

}  // namespace

Expected<Regex> Regex::compile(std::string_view pattern, RegexDialect dialect) {
  const std::string p =
      dialect == RegexDialect::Oniguruma ? translate_oniguruma(pattern) : std::string(pattern);
  int err = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(p.data()), p.size(),
                                   PCRE2_UTF | PCRE2_UCP, &err, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR buf[256];
    pcre2_get_error_message(err, buf, sizeof buf);
    return Error(fmt::format("regex \"{}\" does not compile: {} at offset {}", pattern,
                             reinterpret_cast<const char*>(buf), offset));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // without JIT, matching still works
  Regex r;
  r.code_ =
      std::shared_ptr<void>(code, [](void* c) { pcre2_code_free(static_cast<pcre2_code*>(c)); });
  return r;
}

void Regex::find_all(std::string_view text,
                     std::vector<std::pair<std::size_t, std::size_t>>& out) const {
  auto* code = static_cast<pcre2_code*>(code_.get());
  MatchState& st = match_state();
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  std::size_t pos = 0;
  std::size_t last_end = std::string_view::npos;
  while (pos <= text.size()) {
    const int rc =
        pcre2_match(code, subject, text.size(), pos, PCRE2_NO_UTF_CHECK, st.data, st.context);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(rc, buf, sizeof buf);
      throw RegexError(
          fmt::format("regex matching failed: {}", reinterpret_cast<const char*>(buf)));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.data);
    const std::size_t s = ov[0], e = ov[1];
    if (s == e && last_end == e) {  // an empty match right after the previous one: skip a char
      if (s >= text.size()) break;
      pos = s + utf8_length(static_cast<unsigned char>(text[s]));
      continue;
    }
    out.emplace_back(s, e);
    last_end = e;
    if (e > s) {
      pos = e;
    } else {
      if (e >= text.size()) break;
      pos = e + utf8_length(static_cast<unsigned char>(text[e]));
    }
  }
}

// ---- Pattern -----------------------------------------------------------------------------------

Pattern Pattern::literal(std::string s) {
  Pattern p;
  p.kind_ = Kind::Literal;
  p.literal_ = std::move(s);
  return p;
}

Pattern Pattern::regex(Regex r) {
  Pattern p;
  p.kind_ = Kind::Regex;
  p.regex_ = std::make_shared<const Regex>(std::move(r));
  return p;
}

Pattern Pattern::predicate(bool (*fn)(char32_t)) {
  Pattern p;
  p.kind_ = Kind::Predicate;
  p.predicate_ = fn;
  return p;
}

Pattern Pattern::character(char32_t c) {
  Pattern p;
  p.kind_ = Kind::Character;
  p.char_ = c;
  return p;
}

void Pattern::find_matches(std::string_view text, std::vector<Span>& out) const {
  out.clear();
  if (text.empty()) {
    out.push_back({0, 0, false});
    return;
  }
  std::size_t prev = 0;
  const auto add_match = [&](std::size_t s, std::size_t e) {
    if (prev != s) out.push_back({prev, s, false});
    out.push_back({s, e, true});
    prev = e;
  };
  switch (kind_) {
    case Kind::Literal: {
      if (literal_.empty()) break;  // an empty pattern matches nothing
      std::size_t at = text.find(literal_);
      while (at != std::string_view::npos) {
        add_match(at, at + literal_.size());
        at = text.find(literal_, at + literal_.size());
      }
      break;
    }
    case Kind::Regex: {
      std::vector<std::pair<std::size_t, std::size_t>> m;
      regex_->find_all(text, m);
      for (const auto& [s, e] : m) add_match(s, e);
      break;
    }
    case Kind::Predicate:
    case Kind::Character: {
      std::size_t i = 0;
      while (i < text.size()) {
        const std::size_t start = i;
        const char32_t c = next_code_point(text, i);
        if (kind_ == Kind::Character ? c == char_ : predicate_(c)) add_match(start, i);
      }
      break;
    }
  }
  if (prev != text.size()) out.push_back({prev, text.size(), false});
}

std::string Pattern::replace_all(std::string_view text, std::string_view content) const {
  std::vector<Span> spans;
  find_matches(text, spans);
  std::string out;
  out.reserve(text.size());
  for (const Span& s : spans) {
    if (s.is_match) {
      out += content;
    } else {
      out += text.substr(s.start, s.end - s.start);
    }
  }
  return out;
}

}  // namespace moemesh::tokenizer_detail
