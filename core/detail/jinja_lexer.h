// The lexer of the chat-template interpreter: Jinja2's lexer as Hugging Face transformers
// configures it (trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False, the default
// delimiters {{ }}, {% %}, {# #}). Internal to core.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moemesh::jinja {

enum class Tok {
  Data,        // template text between tags
  BlockBegin,  // {%
  BlockEnd,    // %}
  VarBegin,    // {{
  VarEnd,      // }}
  Name,
  String,
  Integer,
  Float,
  Op,  // an operator or punctuation; the text is in `value`
  Eof
};

struct Token {
  Tok type = Tok::Eof;
  std::string value;  // Data/Name/Op: the text; String: the unescaped string
  int line = 1;
  int64_t int_value = 0;
  double float_value = 0;
};

// Splits `source` into tokens, applying whitespace control (-, +), trim_blocks and lstrip_blocks
// exactly as Jinja2 does. Throws ParseError on a lexical error (unclosed comment, bad string,
// unbalanced brackets, an unexpected character).
std::vector<Token> tokenize(std::string_view source);

// A token's description for error messages: "end of statement block", "'('", "name 'foo'".
std::string describe(const Token& t);

}  // namespace moemesh::jinja
