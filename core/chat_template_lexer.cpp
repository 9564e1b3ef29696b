// The chat-template lexer (core/detail/jinja_lexer.h): a transcription of jinja2/lexer.py's state
// machine for the configuration transformers uses, so that whitespace control matches Jinja2 byte
// for byte.
#include <fmt/format.h>

#include <cerrno>
#include <cstdlib>

#include "core/detail/jinja_lexer.h"
#include "core/detail/jinja_value.h"

namespace moemesh::jinja {
namespace {

// Byte length of the whitespace character (Python's \s) at s[pos], or 0.
size_t space_at(std::string_view s, size_t pos) {
  if (pos >= s.size()) return 0;
  const auto c = static_cast<unsigned char>(s[pos]);
  if (c < 0x80) return is_py_space(c) ? 1 : 0;
  size_t n = (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
  if (pos + n > s.size()) return 0;
  return is_py_space(decode_utf8(s.substr(pos, n))) ? n : 0;
}

size_t skip_spaces(std::string_view s, size_t pos) {
  while (size_t n = space_at(s, pos)) pos += n;
  return pos;
}

// Python's str.rstrip() (whitespace).
std::string_view rstrip_view(std::string_view s) {
  std::vector<std::string_view> cs = utf8_chars(s);
  size_t end = s.size();
  for (size_t i = cs.size(); i > 0; --i) {
    if (!is_py_space(decode_utf8(cs[i - 1]))) break;
    end -= cs[i - 1].size();
  }
  return s.substr(0, end);
}

bool all_spaces(std::string_view s) {
  for (size_t pos = 0; pos < s.size();) {
    const size_t n = space_at(s, pos);
    if (n == 0) return false;
    pos += n;
  }
  return true;
}

bool is_name_byte(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c >= 0x80;
}

bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

int count_newlines(std::string_view s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

class Lexer {
 public:
  explicit Lexer(std::string_view source) {
    // Jinja splits on \r\n, \r, \n, drops one trailing newline (keep_trailing_newline=False) and
    // joins the lines with \n.
    std::string normalized;
    normalized.reserve(source.size());
    for (size_t i = 0; i < source.size(); ++i) {
      if (source[i] == '\r') {
        normalized += '\n';
        if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
      } else {
        normalized += source[i];
      }
    }
    if (!normalized.empty() && normalized.back() == '\n') normalized.pop_back();
    src_ = std::move(normalized);
  }

  std::vector<Token> run() {
    while (pos_ < src_.size()) {
      if (!lex_root()) break;
    }
    push(Tok::Eof, "", line_);
    return std::move(tokens_);
  }

 private:
  void push(Tok type, std::string value, int line) {
    Token t;
    t.type = type;
    t.value = std::move(value);
    t.line = line;
    tokens_.push_back(std::move(t));
  }

  [[noreturn]] void fail(const std::string& message, int line) { throw ParseError(message, line); }

  // Text, then one tag opener. Returns false at the end of the source.
  bool lex_root() {
    const std::string_view s = src_;
    size_t start = pos_;
    size_t found = std::string_view::npos;
    for (size_t i = pos_; i + 1 < s.size(); ++i) {
      if (s[i] == '{' && (s[i + 1] == '%' || s[i + 1] == '{' || s[i + 1] == '#')) {
        found = i;
        break;
      }
    }
    if (found == std::string_view::npos) {
      push(Tok::Data, std::string(s.substr(start)), line_);
      line_ += count_newlines(s.substr(start));
      pos_ = s.size();
      return false;
    }
    const char kind = s[found + 1];
    size_t after = found + 2;
    char sign = 0;
    if (after < s.size() && (s[after] == '-' || s[after] == '+')) sign = s[after++];
    // {% raw %}: "{%(-|+|)\s*raw\s*(-%}\s*|%})"
    bool raw = false;
    size_t raw_end = 0;
    if (kind == '%') {
      size_t p = skip_spaces(s, after);
      if (s.substr(p, 3) == "raw") {
        p = skip_spaces(s, p + 3);
        if (s.substr(p, 3) == "-%}") {
          raw = true;
          raw_end = skip_spaces(s, p + 3);
        } else if (s.substr(p, 2) == "%}") {
          raw = true;
          raw_end = p + 2;
        }
      }
    }
    std::string_view text = s.substr(start, found - start);
    const int text_newlines = count_newlines(text);
    if (sign == '-') {
      text = rstrip_view(text);
    } else if (sign != '+' && kind != '{') {
      // lstrip_blocks: drop the spaces between the start of the line and a block or comment tag.
      const size_t nl = text.rfind('\n');
      const size_t l_pos = nl == std::string_view::npos ? 0 : nl + 1;
      if ((l_pos > 0 || line_starting_) && l_pos < text.size() && all_spaces(text.substr(l_pos)))
        text = text.substr(0, l_pos);
    }
    if (!text.empty()) push(Tok::Data, std::string(text), line_);
    line_ += text_newlines;
    pos_ = after;
    line_starting_ = false;
    if (raw) {
      line_starting_ = raw_end > 0 && s[raw_end - 1] == '\n';
      line_ += count_newlines(s.substr(after, raw_end - after));
      pos_ = raw_end;
      lex_raw();
      return true;
    }
    if (kind == '#') {
      lex_comment();
    } else {
      lex_tag(kind == '%');
    }
    return true;
  }

  void lex_comment() {
    const std::string_view s = src_;
    const int open_line = line_;
    for (size_t i = pos_; i < s.size(); ++i) {
      size_t end = 0;
      if (s.substr(i, 3) == "+#}") {
        end = i + 3;
      } else if (s.substr(i, 3) == "-#}") {
        end = skip_spaces(s, i + 3);
      } else if (s.substr(i, 2) == "#}") {
        end = i + 2;
        if (end < s.size() && s[end] == '\n') ++end;  // trim_blocks
      }
      if (end) {
        line_ += count_newlines(s.substr(pos_, end - pos_));
        line_starting_ = s[end - 1] == '\n';
        pos_ = end;
        return;
      }
    }
    fail("missing end of comment tag: a comment opened with {# needs #}", open_line);
  }

  void lex_raw() {
    const std::string_view s = src_;
    const int open_line = line_;
    for (size_t i = pos_; i + 1 < s.size(); ++i) {
      if (s[i] != '{' || s[i + 1] != '%') continue;
      size_t p = i + 2;
      char sign = 0;
      if (p < s.size() && (s[p] == '-' || s[p] == '+')) sign = s[p++];
      p = skip_spaces(s, p);
      if (s.substr(p, 6) != "endraw") continue;
      p = skip_spaces(s, p + 6);
      size_t end = 0;
      if (s.substr(p, 3) == "+%}") {
        end = p + 3;
      } else if (s.substr(p, 3) == "-%}") {
        end = skip_spaces(s, p + 3);
      } else if (s.substr(p, 2) == "%}") {
        end = p + 2;
        if (end < s.size() && s[end] == '\n') ++end;
      }
      if (!end) continue;
      std::string_view text = s.substr(pos_, i - pos_);
      if (sign == '-') {
        text = rstrip_view(text);
      } else if (sign != '+') {
        const size_t nl = text.rfind('\n');
        const size_t l_pos = nl == std::string_view::npos ? 0 : nl + 1;
        if ((l_pos > 0 || line_starting_) && l_pos < text.size() && all_spaces(text.substr(l_pos)))
          text = text.substr(0, l_pos);
      }
      if (!text.empty()) push(Tok::Data, std::string(text), line_);
      line_ += count_newlines(s.substr(pos_, end - pos_));
      line_starting_ = s[end - 1] == '\n';
      pos_ = end;
      return;
    }
    fail("missing end of raw directive: {% raw %} needs {% endraw %}", open_line);
  }

  // Tokens inside {% %} (block) or {{ }}, up to and including the closing delimiter.
  void lex_tag(bool block) {
    const std::string_view s = src_;
    const int open_line = line_;
    push(block ? Tok::BlockBegin : Tok::VarBegin, block ? "{%" : "{{", line_);
    std::vector<char> balance;
    while (true) {
      if (pos_ >= s.size())
        fail(fmt::format(
                 "unexpected end of template: the {} opened on line {} is not closed with {}",
                 block ? "{%" : "{{", open_line, block ? "%}" : "}}"),
             open_line);
      const size_t p = pos_;
      // The closing delimiter, only while brackets are balanced.
      if (balance.empty()) {
        size_t end = 0;
        if (block) {
          if (s.substr(p, 3) == "+%}") {
            end = p + 3;
          } else if (s.substr(p, 3) == "-%}") {
            end = skip_spaces(s, p + 3);
          } else if (s.substr(p, 2) == "%}") {
            end = p + 2;
            if (end < s.size() && s[end] == '\n') ++end;  // trim_blocks
          }
        } else {
          if (s.substr(p, 3) == "-}}") {
            end = skip_spaces(s, p + 3);
          } else if (s.substr(p, 2) == "}}") {
            end = p + 2;
          }
        }
        if (end) {
          push(block ? Tok::BlockEnd : Tok::VarEnd, block ? "%}" : "}}", line_);
          line_ += count_newlines(s.substr(p, end - p));
          line_starting_ = s[end - 1] == '\n';
          pos_ = end;
          return;
        }
      }
      if (size_t n = space_at(s, p)) {
        const size_t end = skip_spaces(s, p + n);
        line_ += count_newlines(s.substr(p, end - p));
        line_starting_ = s[end - 1] == '\n';
        pos_ = end;
        continue;
      }
      line_starting_ = false;
      if (lex_number()) continue;
      const char c = s[p];
      if (is_name_byte(static_cast<unsigned char>(c)) && !is_digit(c)) {
        size_t e = p;
        while (e < s.size() && is_name_byte(static_cast<unsigned char>(s[e]))) ++e;
        push(Tok::Name, std::string(s.substr(p, e - p)), line_);
        pos_ = e;
        continue;
      }
      if (c == '\'' || c == '"') {
        lex_string();
        continue;
      }
      static const char* const kOps[] = {"//", "**", "==", "!=", ">=", "<=", "+", "-", "/",
                                         "*",  "%",  "~",  "[",  "]",  "(",  ")", "{", "}",
                                         ">",  "<",  "=",  ".",  ":",  "|",  ",", ";"};
      bool matched = false;
      for (const char* op : kOps) {
        const std::string_view o(op);
        if (s.substr(p, o.size()) != o) continue;
        if (o == "{" || o == "(" || o == "[") {
          balance.push_back(o == "{" ? '}' : o == "(" ? ')' : ']');
        } else if (o == "}" || o == ")" || o == "]") {
          if (balance.empty()) fail(fmt::format("unexpected '{}'", o), line_);
          if (balance.back() != o[0])
            fail(fmt::format("unexpected '{}', expected '{}'", o, balance.back()), line_);
          balance.pop_back();
        }
        push(Tok::Op, std::string(o), line_);
        pos_ = p + o.size();
        matched = true;
        break;
      }
      if (!matched) {
        const size_t n = utf8_chars(s.substr(p, 4)).front().size();
        fail(fmt::format("unexpected character {} in a tag", py_repr_string(s.substr(p, n))),
             line_);
      }
    }
  }

  // Jinja's float_re / integer_re at pos_ (underscores allowed between digits).
  bool lex_number() {
    const std::string_view s = src_;
    const size_t p = pos_;
    if (!is_digit(s[p])) return false;
    auto digits = [&](size_t q) {  // (\d+_)*\d+ ; returns the end or q when none
      size_t e = q;
      while (e < s.size() && is_digit(s[e])) {
        ++e;
        if (e + 1 < s.size() && s[e] == '_' && is_digit(s[e + 1])) ++e;
      }
      return e;
    };
    auto strip_underscores = [](std::string_view t) {
      std::string out;
      for (char ch : t)
        if (ch != '_') out += ch;
      return out;
    };
    // float: no '.' right before, digits, then (.digits)?e[+-]?digits | .digits
    if (p == 0 || s[p - 1] != '.') {
      const size_t int_end = digits(p);
      size_t e = int_end;
      bool is_float = false;
      if (e < s.size() && s[e] == '.' && e + 1 < s.size() && is_digit(s[e + 1])) {
        e = digits(e + 1);
        is_float = true;
      }
      if (e < s.size() && (s[e] == 'e' || s[e] == 'E')) {
        size_t q = e + 1;
        if (q < s.size() && (s[q] == '+' || s[q] == '-')) ++q;
        if (q < s.size() && is_digit(s[q])) {
          e = digits(q);
          is_float = true;
        }
      }
      if (is_float) {
        Token t;
        t.type = Tok::Float;
        t.value = std::string(s.substr(p, e - p));
        t.line = line_;
        t.float_value = std::strtod(strip_underscores(t.value).c_str(), nullptr);
        tokens_.push_back(std::move(t));
        pos_ = e;
        return true;
      }
    }
    // integer: 0b.., 0o.., 0x.., [1-9](_?\d)*, 0(_?0)*
    size_t e = p;
    int base = 10;
    auto is_base_digit = [&](char ch) {
      if (base == 2) return ch == '0' || ch == '1';
      if (base == 8) return ch >= '0' && ch <= '7';
      if (base == 16) return is_digit(ch) || (ch >= 'a' && ch <= 'f') || (ch >= 'A' && ch <= 'F');
      return is_digit(ch);
    };
    std::string digits_text;
    if (s[p] == '0' && p + 1 < s.size() &&
        std::string_view("bBoOxX").find(s[p + 1]) != std::string_view::npos) {
      const char b = static_cast<char>(s[p + 1] | 0x20);
      base = b == 'b' ? 2 : b == 'o' ? 8 : 16;
      size_t q = p + 2;
      while (q < s.size()) {
        if (is_base_digit(s[q])) {
          digits_text += s[q++];
        } else if (s[q] == '_' && q + 1 < s.size() && is_base_digit(s[q + 1])) {
          ++q;
        } else {
          break;
        }
      }
      if (digits_text.empty()) {
        base = 10;  // just "0"
        e = p + 1;
        digits_text.assign(1, '0');
      } else {
        e = q;
      }
    } else if (s[p] == '0') {
      e = p + 1;
      while (e < s.size()) {
        if (s[e] == '0') {
          ++e;
        } else if (s[e] == '_' && e + 1 < s.size() && s[e + 1] == '0') {
          e += 2;
        } else {
          break;
        }
      }
      digits_text = "0";
    } else {
      e = digits(p);
      digits_text = strip_underscores(s.substr(p, e - p));
    }
    errno = 0;
    char* endp = nullptr;
    const unsigned long long v = std::strtoull(digits_text.c_str(), &endp, base);
    if (errno == ERANGE || v > static_cast<unsigned long long>(INT64_MAX))
      fail(fmt::format("integer literal {} does not fit in 64 bits", s.substr(p, e - p)), line_);
    Token t;
    t.type = Tok::Integer;
    t.value = std::string(s.substr(p, e - p));
    t.line = line_;
    t.int_value = static_cast<int64_t>(v);
    tokens_.push_back(std::move(t));
    pos_ = e;
    return true;
  }

  // A '...' or "..." literal, unescaped as Python's "unicode-escape" codec does.
  void lex_string() {
    const std::string_view s = src_;
    const char quote = s[pos_];
    const int start_line = line_;
    size_t i = pos_ + 1;
    std::string out;
    auto hex = [&](size_t at, int n) -> char32_t {
      char32_t v = 0;
      for (int k = 0; k < n; ++k) {
        if (at + static_cast<size_t>(k) >= s.size()) return 0xFFFFFFFF;
        const char c = s[at + static_cast<size_t>(k)];
        int d = is_digit(c)              ? c - '0'
                : (c >= 'a' && c <= 'f') ? c - 'a' + 10
                : (c >= 'A' && c <= 'F') ? c - 'A' + 10
                                         : -1;
        if (d < 0) return 0xFFFFFFFF;
        v = v * 16 + static_cast<char32_t>(d);
      }
      return v;
    };
    while (true) {
      if (i >= s.size()) fail("unterminated string literal", start_line);
      const char c = s[i];
      if (c == quote) break;
      if (c != '\\') {
        out += c;
        ++i;
        continue;
      }
      if (i + 1 >= s.size()) fail("unterminated string literal", start_line);
      const char e = s[i + 1];
      i += 2;
      switch (e) {
        case '\n':
          break;  // line continuation
        case '\\':
          out += '\\';
          break;
        case '\'':
          out += '\'';
          break;
        case '"':
          out += '"';
          break;
        case 'a':
          out += '\a';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'v':
          out += '\v';
          break;
        case 'x':
        case 'u':
        case 'U': {
          const int n = e == 'x' ? 2 : e == 'u' ? 4 : 8;
          const char32_t v = hex(i, n);
          if (v == 0xFFFFFFFF || v > 0x10FFFF)
            fail(fmt::format("truncated or invalid \\{} escape in a string literal", e), line_);
          append_utf8(out, v);
          i += static_cast<size_t>(n);
          break;
        }
        case 'N':
          fail("\\N{...} escapes in string literals are not supported", line_);
        default:
          if (e >= '0' && e <= '7') {
            char32_t v = static_cast<char32_t>(e - '0');
            for (int k = 0; k < 2 && i < s.size() && s[i] >= '0' && s[i] <= '7'; ++k)
              v = v * 8 + static_cast<char32_t>(s[i++] - '0');
            append_utf8(out, v);
          } else {
            out += '\\';
            out += e;  // unknown escapes stay as they are
          }
      }
    }
    const std::string_view raw = s.substr(pos_, i + 1 - pos_);
    Token t;
    t.type = Tok::String;
    t.value = std::move(out);
    t.line = start_line;
    tokens_.push_back(std::move(t));
    line_ += count_newlines(raw);
    pos_ = i + 1;
  }

  std::string src_;
  size_t pos_ = 0;
  int line_ = 1;
  bool line_starting_ = true;
  std::vector<Token> tokens_;
};

}  // namespace

std::vector<Token> tokenize(std::string_view source) {
  return Lexer(source).run();
}

std::string describe(const Token& t) {
  switch (t.type) {
    case Tok::Data:
      return "template data";
    case Tok::BlockBegin:
      return "begin of statement block";
    case Tok::BlockEnd:
      return "end of statement block";
    case Tok::VarBegin:
      return "begin of print statement";
    case Tok::VarEnd:
      return "end of print statement";
    case Tok::Name:
      return "'" + t.value + "'";
    case Tok::String:
      return "string " + py_repr_string(t.value);
    case Tok::Integer:
    case Tok::Float:
      return "number " + t.value;
    case Tok::Op:
      return "'" + t.value + "'";
    case Tok::Eof:
      return "end of template";
  }
  return "token";
}

}  // namespace moemesh::jinja
