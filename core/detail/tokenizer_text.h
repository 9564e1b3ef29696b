// Text machinery of the tokenizer (internal to core/tokenizer*.cpp): UTF-8, the Unicode
// properties the Hugging Face `tokenizers` library relies on, Unicode normalization (utf8proc),
// and the regex patterns (PCRE2) of Split / Replace components.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"

namespace moemesh::tokenizer_detail {

// ---- UTF-8 -------------------------------------------------------------------------------------

// Decodes the code point starting at s[i] of valid UTF-8 text and advances i past it.
inline char32_t next_code_point(std::string_view s, std::size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    ++i;
    return b0;
  }
  const auto cont = [&](std::size_t k) { return static_cast<unsigned char>(s[i + k]) & 0x3Fu; };
  char32_t c;
  if (b0 < 0xE0) {
    c = ((b0 & 0x1Fu) << 6) | cont(1);
    i += 2;
  } else if (b0 < 0xF0) {
    c = ((b0 & 0x0Fu) << 12) | (cont(1) << 6) | cont(2);
    i += 3;
  } else {
    c = ((b0 & 0x07u) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3);
    i += 4;
  }
  return c;
}

// Byte length of the UTF-8 sequence that starts with lead byte b (of valid UTF-8).
inline std::size_t utf8_length(unsigned char b) {
  return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
}

void append_utf8(std::string& out, char32_t c);

// Offset of the first byte of the first ill-formed UTF-8 sequence, or npos if s is valid.
std::size_t find_invalid_utf8(std::string_view s);

// As Rust's String::from_utf8_lossy: every maximal ill-formed subpart becomes one U+FFFD.
std::string utf8_lossy(std::string_view bytes);

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// ---- Unicode properties, as Rust's char methods and regex crate define them ---------------------

bool is_white_space(char32_t c);     // White_Space (char::is_whitespace, regex \s)
bool is_numeric(char32_t c);         // general category Nd, Nl or No (char::is_numeric)
bool is_word_char(char32_t c);       // regex crate \w: Alphabetic, M, Nd, Pc, Join_Control
bool is_combining_mark(char32_t c);  // general category Mn, Mc or Me

enum class NormForm { NFC, NFD, NFKC, NFKD };
std::string normalize_unicode(std::string_view s, NormForm form);
// Per character as Rust's char::to_lowercase (full mapping: U+0130 becomes "i\u0307").
std::string lowercase(std::string_view s);

// ---- Regular expressions -----------------------------------------------------------------------

// A regex failed while matching (resource limits); the encode() boundary turns it into an Error.
class RegexError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class RegexDialect {
  Oniguruma,  // what tokenizers' SysRegex compiles (Split, Replace patterns): \s \S \w \W
              // are translated to Oniguruma's Unicode meaning
  Pcre2,      // as written
};

// A compiled PCRE2 regex (UTF + UCP, JIT when available). Immutable; matching is thread-safe.
class Regex {
 public:
  static Expected<Regex> compile(std::string_view pattern, RegexDialect dialect);
  // Appends the non-overlapping matches [start, end) from left to right, as Rust's find_iter
  // does (an empty match right after the previous match is skipped). `text` is valid UTF-8.
  void find_all(std::string_view text, std::vector<std::pair<std::size_t, std::size_t>>& out) const;

 private:
  std::shared_ptr<void> code_;  // pcre2_code_8
};

// A piece of text as tokenizers' Pattern::find_matches reports it: the spans cover the whole
// text in order, each flagged as a match or not.
struct Span {
  std::size_t start;
  std::size_t end;
  bool is_match;
};

// tokenizers' patterns: a literal string, a regex, or a set of characters (each matching
// character is its own match).
class Pattern {
 public:
  static Pattern literal(std::string s);
  static Pattern regex(Regex r);
  static Pattern predicate(bool (*fn)(char32_t));
  static Pattern character(char32_t c);

  // Replaces `out` with the spans of `text`; empty text gives one empty non-match span.
  void find_matches(std::string_view text, std::vector<Span>& out) const;
  // `text` with every match replaced by `content` (the Replace normalizer and decoder).
  std::string replace_all(std::string_view text, std::string_view content) const;

 private:
  enum class Kind { Literal, Regex, Predicate, Character } kind_ = Kind::Literal;
  std::string literal_;
  std::shared_ptr<const Regex> regex_;
  bool (*predicate_)(char32_t) = nullptr;
  char32_t char_ = 0;
};

}  // namespace moemesh::tokenizer_detail
