// The chat-template parser, expressions (core/detail/jinja_parser.h): Jinja2's operator
// precedence, filters, tests, calls and subscripts; unknown filters, tests and methods are refused
// here.
#include <fmt/format.h>

#include "core/detail/jinja_parser.h"

namespace moemesh::jinja {

// ---- expressions ----

ExprPtr Parser::parse_expression(bool with_condexpr) {
  Depth d(this);
  return with_condexpr ? parse_condexpr() : parse_or();
}

ExprPtr Parser::parse_condexpr() {
  int line = cur().line;
  ExprPtr expr1 = parse_or();
  while (skip_name("if")) {
    ExprPtr expr2 = parse_or();
    ExprPtr expr3;
    if (skip_name("else")) expr3 = parse_condexpr();
    auto c = make(ExprKind::CondExpr, line);
    c->args.push_back(std::move(expr2));
    c->args.push_back(std::move(expr1));
    c->args.push_back(std::move(expr3));
    expr1 = std::move(c);
    line = cur().line;
  }
  return expr1;
}

ExprPtr Parser::binary(ExprKind kind, ExprPtr a, ExprPtr b, int line, std::string op) {
  auto e = make(kind, line);
  e->name = std::move(op);
  e->args.push_back(std::move(a));
  e->args.push_back(std::move(b));
  return e;
}

ExprPtr Parser::parse_or() {
  const int line = cur().line;
  ExprPtr left = parse_and();
  while (skip_name("or")) left = binary(ExprKind::Or, std::move(left), parse_and(), line);
  return left;
}

ExprPtr Parser::parse_and() {
  const int line = cur().line;
  ExprPtr left = parse_not();
  while (skip_name("and")) left = binary(ExprKind::And, std::move(left), parse_not(), line);
  return left;
}

ExprPtr Parser::parse_not() {
  if (at_name("not")) {
    const int line = advance().line;
    Depth d(this);
    auto e = make(ExprKind::Not, line);
    e->args.push_back(parse_not());
    return e;
  }
  return parse_compare();
}

ExprPtr Parser::parse_compare() {
  const int line = cur().line;
  ExprPtr expr = parse_math1();
  ExprPtr cmp;
  while (true) {
    std::string op;
    if (cur().type == Tok::Op &&
        (cur().value == "==" || cur().value == "!=" || cur().value == "<" || cur().value == "<=" ||
         cur().value == ">" || cur().value == ">=")) {
      op = advance().value;
    } else if (skip_name("in")) {
      op = "in";
    } else if (at_name("not") && look().type == Tok::Name && look().value == "in") {
      advance();
      advance();
      op = "notin";
    } else {
      break;
    }
    if (!cmp) {
      cmp = make(ExprKind::Compare, line);
      cmp->args.push_back(std::move(expr));
    }
    cmp->ops.push_back(op);
    cmp->args.push_back(parse_math1());
  }
  return cmp ? std::move(cmp) : std::move(expr);
}

ExprPtr Parser::parse_math1() {
  const int line = cur().line;
  ExprPtr left = parse_concat();
  while (at_op("+") || at_op("-")) {
    std::string op = advance().value;
    left = binary(ExprKind::Binary, std::move(left), parse_concat(), line, op);
  }
  return left;
}

ExprPtr Parser::parse_concat() {
  const int line = cur().line;
  ExprPtr first = parse_math2();
  if (!at_op("~")) return first;
  auto c = make(ExprKind::Concat, line);
  c->args.push_back(std::move(first));
  while (skip_op("~")) c->args.push_back(parse_math2());
  return c;
}

ExprPtr Parser::parse_math2() {
  const int line = cur().line;
  ExprPtr left = parse_pow();
  while (at_op("*") || at_op("/") || at_op("//") || at_op("%")) {
    std::string op = advance().value;
    left = binary(ExprKind::Binary, std::move(left), parse_pow(), line, op);
  }
  return left;
}

ExprPtr Parser::parse_pow() {
  const int line = cur().line;
  ExprPtr left = parse_unary(true);
  while (skip_op("**"))
    left = binary(ExprKind::Binary, std::move(left), parse_unary(true), line, "**");
  return left;
}

ExprPtr Parser::parse_unary(bool with_filter) {
  Depth d(this);
  const int line = cur().line;
  ExprPtr node;
  if (at_op("-") || at_op("+")) {
    const bool minus = advance().value == "-";
    node = make(minus ? ExprKind::Neg : ExprKind::Pos, line);
    node->args.push_back(parse_unary(false));
  } else {
    node = parse_primary();
  }
  node = parse_postfix(std::move(node));
  if (with_filter) node = parse_filter_expr(std::move(node));
  return node;
}

ExprPtr Parser::parse_primary() {
  const Token& t = cur();
  const int line = t.line;
  if (t.type == Tok::Name) {
    const std::string n = advance().value;
    auto e = make(ExprKind::Const, line);
    if (n == "true" || n == "True") {
      e->value = Value::boolean(true);
    } else if (n == "false" || n == "False") {
      e->value = Value::boolean(false);
    } else if (n == "none" || n == "None") {
      e->value = Value::none();
    } else {
      e->kind = ExprKind::Name;
      e->name = n;
    }
    return e;
  }
  if (t.type == Tok::String) {
    std::string s;
    while (cur().type == Tok::String) s += advance().value;
    auto e = make(ExprKind::Const, line);
    e->value = Value::string(std::move(s));
    return e;
  }
  if (t.type == Tok::Integer || t.type == Tok::Float) {
    auto e = make(ExprKind::Const, line);
    e->value = t.type == Tok::Integer ? Value::integer(t.int_value) : Value::number(t.float_value);
    advance();
    return e;
  }
  if (at_op("(")) {
    advance();
    ExprPtr e = parse_tuple(false, true, {}, true);
    expect_op(")");
    return e;
  }
  if (at_op("[")) {
    advance();
    auto e = make(ExprKind::List, line);
    while (!at_op("]")) {
      if (!e->args.empty()) expect_op(",");
      if (at_op("]")) break;
      e->args.push_back(parse_expression(true));
    }
    expect_op("]");
    return e;
  }
  if (at_op("{")) {
    advance();
    auto e = make(ExprKind::Dict, line);
    while (!at_op("}")) {
      if (!e->args.empty()) expect_op(",");
      if (at_op("}")) break;
      e->args.push_back(parse_expression(true));
      expect_op(":");
      e->args.push_back(parse_expression(true));
    }
    expect_op("}");
    return e;
  }
  if (t.type == Tok::Eof) fail_eof();
  fail(fmt::format("unexpected {}", describe(t)), line);
}

// Expressions separated by commas; one without a comma is returned as it is.
ExprPtr Parser::parse_tuple(bool simplified, bool with_condexpr,
                            const std::vector<std::string>& extra_end, bool explicit_parens) {
  const int line = cur().line;
  std::vector<ExprPtr> args;
  bool is_tuple = false;
  while (true) {
    if (!args.empty()) expect_op(",");
    bool end = cur().type == Tok::VarEnd || cur().type == Tok::BlockEnd || at_op(")");
    for (const std::string& e : extra_end) end = end || at_name(e);
    if (end) break;
    args.push_back(simplified ? parse_primary() : parse_expression(with_condexpr));
    if (at_op(",")) {
      is_tuple = true;
    } else {
      break;
    }
  }
  if (!is_tuple) {
    if (!args.empty()) return std::move(args[0]);
    if (!explicit_parens) unexpected("an expression");
  }
  auto t = make(ExprKind::Tuple, line);
  t->args = std::move(args);
  return t;
}

ExprPtr Parser::parse_postfix(ExprPtr node) {
  while (true) {
    if (at_op(".") || at_op("[")) {
      node = parse_subscript(std::move(node));
    } else if (at_op("(")) {
      node = parse_call(std::move(node));
    } else {
      return node;
    }
  }
}

ExprPtr Parser::parse_filter_expr(ExprPtr node) {
  while (true) {
    if (at_op("|")) {
      node = parse_filter(std::move(node), false);
    } else if (at_name("is")) {
      node = parse_test(std::move(node));
    } else if (at_op("(")) {
      node = parse_call(std::move(node));
    } else {
      return node;
    }
  }
}

ExprPtr Parser::parse_subscript(ExprPtr node) {
  const Token& t = advance();
  const int line = t.line;
  if (t.value == ".") {
    const Token& attr = cur();
    if (attr.type == Tok::Name) {
      auto e = make(ExprKind::Getattr, line);
      e->name = advance().value;
      e->args.push_back(std::move(node));
      return e;
    }
    if (attr.type != Tok::Integer) unexpected("a name or number after '.'");
    auto key = make(ExprKind::Const, attr.line);
    key->value = Value::integer(attr.int_value);
    advance();
    auto e = make(ExprKind::Getitem, line);
    e->args.push_back(std::move(node));
    e->args.push_back(std::move(key));
    return e;
  }
  // '['
  std::vector<ExprPtr> args;
  while (!at_op("]")) {
    if (!args.empty()) expect_op(",");
    args.push_back(parse_subscribed());
  }
  expect_op("]");
  if (args.size() != 1) fail("subscripts with several keys (x[a, b]) are not supported", line);
  auto e = make(ExprKind::Getitem, line);
  e->args.push_back(std::move(node));
  e->args.push_back(std::move(args[0]));
  return e;
}

ExprPtr Parser::parse_subscribed() {
  const int line = cur().line;
  std::vector<ExprPtr> parts;
  if (at_op(":")) {
    advance();
    parts.push_back(nullptr);
  } else {
    ExprPtr node = parse_expression(true);
    if (!at_op(":")) return node;
    advance();
    parts.push_back(std::move(node));
  }
  if (at_op(":")) {
    parts.push_back(nullptr);
  } else if (!at_op("]") && !at_op(",")) {
    parts.push_back(parse_expression(true));
  } else {
    parts.push_back(nullptr);
  }
  if (at_op(":")) {
    advance();
    if (!at_op("]") && !at_op(",")) {
      parts.push_back(parse_expression(true));
    } else {
      parts.push_back(nullptr);
    }
  } else {
    parts.push_back(nullptr);
  }
  auto e = make(ExprKind::Slice, line);
  e->args = std::move(parts);
  return e;
}

void Parser::parse_call_args(Expr& e) {
  const int line = cur().line;
  expect_op("(");
  bool require_comma = false;
  auto ensure = [&](bool ok) {
    if (!ok) fail("invalid syntax for function call expression", line);
  };
  while (!at_op(")")) {
    if (require_comma) {
      expect_op(",");
      if (at_op(")")) break;
    }
    if (at_op("*")) {
      ensure(!e.dyn_args && !e.dyn_kwargs);
      advance();
      e.dyn_args = parse_expression(true);
    } else if (at_op("**")) {
      ensure(!e.dyn_kwargs);
      advance();
      e.dyn_kwargs = parse_expression(true);
    } else if (cur().type == Tok::Name && look().type == Tok::Op && look().value == "=") {
      ensure(!e.dyn_kwargs);
      std::string key = advance().value;
      advance();
      e.kwargs.emplace_back(std::move(key), parse_expression(true));
    } else {
      ensure(!e.dyn_args && !e.dyn_kwargs && e.kwargs.empty());
      e.args.push_back(parse_expression(true));
    }
    require_comma = true;
  }
  expect_op(")");
}

ExprPtr Parser::parse_call(ExprPtr node) {
  auto e = make(ExprKind::Call, cur().line);
  e->args.push_back(std::move(node));
  parse_call_args(*e);
  const Expr& callee = *e->args[0];
  if (callee.kind == ExprKind::Getattr && !is_supported_method(callee.name))
    fail(fmt::format("the method '.{}()' is not supported", callee.name), e->line);
  if (callee.kind == ExprKind::Name) calls_.emplace_back(callee.name, e->line, macro_depth_ > 0);
  return e;
}

ExprPtr Parser::parse_filter(ExprPtr node, bool start_inline) {
  while (at_op("|") || start_inline) {
    if (!start_inline) advance();
    start_inline = false;
    const int line = cur().line;
    std::string name = expect_name();
    while (skip_op(".")) {
      name += '.';
      name += expect_name();
    }
    check_filter(name, line);
    auto e = make(ExprKind::Filter, line);
    e->name = name;
    e->args.push_back(std::move(node));
    if (at_op("(")) parse_call_args(*e);
    check_named_args(*e);
    node = std::move(e);
  }
  return node;
}

ExprPtr Parser::parse_test(ExprPtr node) {
  const int line = advance().line;  // 'is'
  const bool negated = skip_name("not");
  std::string name = expect_name();
  while (skip_op(".")) {
    name += '.';
    name += expect_name();
  }
  if (!is_supported_test(name))
    fail(is_jinja_test(name) ? fmt::format("the test '{}' is not supported", name)
                             : fmt::format("unknown test '{}'", name),
         line);
  auto e = make(ExprKind::Test, line);
  e->name = name;
  e->args.push_back(std::move(node));
  if (at_op("(")) {
    parse_call_args(*e);
  } else if ((cur().type == Tok::Name || cur().type == Tok::String || cur().type == Tok::Integer ||
              cur().type == Tok::Float || at_op("(") || at_op("[") || at_op("{")) &&
             !at_name("else") && !at_name("or") && !at_name("and")) {
    if (at_name("is")) fail("You cannot chain multiple tests with is", cur().line);
    e->args.push_back(parse_postfix(parse_primary()));
  }
  if (!negated) return e;
  auto n = make(ExprKind::Not, line);
  n->args.push_back(std::move(e));
  return n;
}

void Parser::check_filter(const std::string& name, int line) {
  if (is_supported_filter(name)) return;
  fail(is_jinja_filter(name) ? fmt::format("the filter '{}' is not supported", name)
                             : fmt::format("unknown filter '{}'", name),
       line);
}

// map/select/reject name a filter or test in a string argument: check constant ones now.
void Parser::check_named_args(const Expr& e) {
  auto const_string = [&](size_t i) -> const std::string* {
    if (i >= e.args.size() || e.args[i]->kind != ExprKind::Const || !e.args[i]->value.is_string())
      return nullptr;
    return &e.args[i]->value.text();
  };
  if (e.name == "map") {
    if (const std::string* f = const_string(1)) check_filter(*f, e.line);
  } else if (e.name == "select" || e.name == "reject") {
    if (const std::string* t = const_string(1))
      if (!is_supported_test(*t)) fail(fmt::format("unknown test '{}'", *t), e.line);
  } else if (e.name == "selectattr" || e.name == "rejectattr") {
    if (const std::string* t = const_string(2))
      if (!is_supported_test(*t)) fail(fmt::format("unknown test '{}'", *t), e.line);
  }
}

// A call of a plain name must reach a builtin, a macro of this template, or a variable the

}  // namespace moemesh::jinja
