// The parser of the chat-template interpreter: Jinja2's recursive-descent grammar
// (jinja2/parser.py). Statements are parsed in core/chat_template_parser.cpp, expressions in
// core/chat_template_parse_expr.cpp. Internal to core.
#pragma once

#include <fmt/format.h>

#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "core/detail/jinja_ast.h"
#include "core/detail/jinja_lexer.h"

namespace moemesh::jinja {

// Deeper nesting of expressions or blocks than this is refused, so that hostile templates cannot
// exhaust the stack of the parser or the evaluator.
constexpr int kMaxNesting = 100;

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : toks_(std::move(tokens)) {}
  std::unique_ptr<TemplateAst> parse();

 private:
  struct OpenTag {
    std::string tag;
    int line;
    std::vector<std::string> ends;
  };

  // ---- token stream ----
  const Token& cur() const { return toks_[i_]; }
  const Token& look() const { return toks_[i_ + 1 < toks_.size() ? i_ + 1 : i_]; }
  const Token& advance() {
    const Token& t = toks_[i_];
    if (i_ + 1 < toks_.size()) ++i_;
    return t;
  }
  bool at_op(std::string_view op) const { return cur().type == Tok::Op && cur().value == op; }
  bool at_name(std::string_view n) const { return cur().type == Tok::Name && cur().value == n; }
  bool skip_op(std::string_view op) {
    if (!at_op(op)) return false;
    advance();
    return true;
  }
  bool skip_name(std::string_view n) {
    if (!at_name(n)) return false;
    advance();
    return true;
  }

  [[noreturn]] void fail(const std::string& message, int line) { throw ParseError(message, line); }
  [[noreturn]] void unexpected(std::string_view expected) {
    if (cur().type == Tok::Eof) fail_eof();
    fail(fmt::format("expected {}, found {}", expected, describe(cur())), cur().line);
  }
  [[noreturn]] void fail_eof() {
    if (!open_.empty()) {
      const OpenTag& o = open_.back();
      fail(fmt::format("unexpected end of template: the '{}' tag opened on line {} is not closed "
                       "(expected {})",
                       o.tag, o.line, ends_text(o.ends)),
           o.line);
    }
    fail("unexpected end of template", cur().line);
  }
  static std::string ends_text(const std::vector<std::string>& ends) {
    std::string s;
    for (size_t k = 0; k < ends.size(); ++k) {
      if (k) s += k + 1 == ends.size() ? " or " : ", ";
      s += "{% " + ends[k] + " %}";
    }
    return s;
  }

  void expect_op(std::string_view op) {
    if (!skip_op(op)) unexpected(fmt::format("'{}'", op));
  }
  std::string expect_name() {
    if (cur().type != Tok::Name) unexpected("a name");
    return advance().value;
  }
  void expect_block_end() {
    if (cur().type != Tok::BlockEnd) unexpected("end of statement block '%}'");
    advance();
  }

  struct Depth {
    explicit Depth(Parser* p) : p_(p) {
      if (++p_->depth_ > kMaxNesting)
        p_->fail(fmt::format("template nested more than {} levels deep", kMaxNesting),
                 p_->cur().line);
      if (!stack_ok())
        p_->fail("template nested too deeply for the stack of this thread", p_->cur().line);
    }
    ~Depth() { --p_->depth_; }
    Parser* p_;
  };

  static ExprPtr make(ExprKind kind, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    return e;
  }

  // ---- statements ----
  Body subparse(const std::vector<std::string>& ends);
  Body parse_statements(const std::string& tag, int line, std::vector<std::string> ends,
                        bool drop_needle);
  std::unique_ptr<Stmt> parse_statement();
  std::unique_ptr<Stmt> parse_for(std::unique_ptr<Stmt> s);
  std::unique_ptr<Stmt> parse_if(std::unique_ptr<Stmt> s);
  std::unique_ptr<Stmt> parse_set(std::unique_ptr<Stmt> s);
  void parse_signature(Stmt& s);
  std::unique_ptr<Stmt> parse_macro(std::unique_ptr<Stmt> s);
  std::unique_ptr<Stmt> parse_call_block(std::unique_ptr<Stmt> s);
  std::unique_ptr<Stmt> parse_with(std::unique_ptr<Stmt> s);
  Target parse_target(bool with_namespace, const std::vector<std::string>& extra_end,
                      bool with_tuple = true);
  // Template data and tags up to one of `ends`; a call of a plain name must reach a builtin or a
  // macro, or a variable the template assigns.
  void check_calls();
  static void scan_expr(const Expr* e, Stmt& m);
  static void scan_names(const Body& body, Stmt& m);

  // ---- expressions ----
  ExprPtr parse_expression(bool with_condexpr);
  ExprPtr parse_condexpr();
  ExprPtr binary(ExprKind kind, ExprPtr a, ExprPtr b, int line, std::string op = "");
  ExprPtr parse_or();
  ExprPtr parse_and();
  ExprPtr parse_not();
  ExprPtr parse_compare();
  ExprPtr parse_math1();
  ExprPtr parse_concat();
  ExprPtr parse_math2();
  ExprPtr parse_pow();
  ExprPtr parse_unary(bool with_filter);
  ExprPtr parse_primary();
  ExprPtr parse_tuple(bool simplified, bool with_condexpr,
                      const std::vector<std::string>& extra_end, bool explicit_parens);
  ExprPtr parse_postfix(ExprPtr node);
  ExprPtr parse_filter_expr(ExprPtr node);
  ExprPtr parse_subscript(ExprPtr node);
  ExprPtr parse_subscribed();
  void parse_call_args(Expr& e);
  ExprPtr parse_call(ExprPtr node);
  ExprPtr parse_filter(ExprPtr node, bool start_inline);
  ExprPtr parse_test(ExprPtr node);
  void check_filter(const std::string& name, int line);
  void check_named_args(const Expr& e);

  std::vector<Token> toks_;
  size_t i_ = 0;
  int depth_ = 0;
  int loop_depth_ = 0;
  int macro_depth_ = 0;
  std::vector<OpenTag> open_;
  std::set<std::string> macros_;
  std::set<std::string> assigned_;
  std::vector<std::tuple<std::string, int, bool>> calls_;
};

}  // namespace moemesh::jinja
