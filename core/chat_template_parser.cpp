// The chat-template parser, statements (core/detail/jinja_parser.h): Jinja2's tags with the ones
// transformers enables (loop controls and {% generation %}), refusing at parse time whatever the
// evaluator does not implement.
#include <fmt/format.h>

#include <set>

#include "core/detail/jinja_parser.h"

namespace moemesh::jinja {
namespace {

const std::set<std::string>& unsupported_tags() {
  static const std::set<std::string> k = {"block",  "extends", "include",
                                          "import", "from",    "autoescape"};
  return k;
}

}  // namespace

std::unique_ptr<TemplateAst> Parser::parse() {
  auto ast = std::make_unique<TemplateAst>();
  ast->body = subparse({});
  check_calls();
  return ast;
}

// Template data and tags up to one of `ends` (left as the current token, a name).
Body Parser::subparse(const std::vector<std::string>& ends) {
  Body body;
  while (true) {
    const Token& t = cur();
    if (t.type == Tok::Eof) {
      if (!ends.empty()) fail_eof();
      return body;
    }
    if (t.type == Tok::Data) {
      auto s = std::make_unique<Stmt>();
      s->kind = StmtKind::Data;
      s->line = t.line;
      s->text = t.value;
      body.push_back(std::move(s));
      advance();
    } else if (t.type == Tok::VarBegin) {
      const int line = advance().line;
      auto s = std::make_unique<Stmt>();
      s->kind = StmtKind::Output;
      s->line = line;
      s->exprs.push_back(parse_tuple(false, true, {}, false));
      if (cur().type != Tok::VarEnd) unexpected("end of print statement '}}'");
      advance();
      body.push_back(std::move(s));
    } else if (t.type == Tok::BlockBegin) {
      advance();
      if (cur().type == Tok::Name) {
        for (const std::string& e : ends)
          if (cur().value == e) return body;
      }
      body.push_back(parse_statement());
      expect_block_end();
    } else {
      fail(fmt::format("unexpected {}", describe(t)), t.line);
    }
  }
}

// The body of a tag: "%}", statements, up to one of `ends`. Consumes the end name only when
// drop_needle.
Body Parser::parse_statements(const std::string& tag, int line, std::vector<std::string> ends,
                              bool drop_needle) {
  skip_op(":");
  expect_block_end();
  open_.push_back({tag, line, ends});
  Depth d(this);
  Body body = subparse(ends);
  open_.pop_back();
  if (drop_needle) advance();
  return body;
}

std::unique_ptr<Stmt> Parser::parse_statement() {
  const Token& t = cur();
  if (t.type != Tok::Name) unexpected("a tag name");
  const std::string tag = t.value;
  const int line = t.line;
  auto s = std::make_unique<Stmt>();
  s->line = line;
  if (tag == "for") return parse_for(std::move(s));
  if (tag == "if") return parse_if(std::move(s));
  if (tag == "set") return parse_set(std::move(s));
  if (tag == "macro") return parse_macro(std::move(s));
  if (tag == "call") return parse_call_block(std::move(s));
  if (tag == "filter") {
    advance();
    s->kind = StmtKind::FilterBlock;
    s->exprs.push_back(parse_filter(nullptr, true));
    s->bodies.push_back(parse_statements("filter", line, {"endfilter"}, true));
    return s;
  }
  if (tag == "with") return parse_with(std::move(s));
  if (tag == "print") {  // {% print a, b %} prints each expression in turn
    advance();
    s->kind = StmtKind::Output;
    while (cur().type != Tok::BlockEnd) {
      if (!s->exprs.empty()) expect_op(",");
      s->exprs.push_back(parse_expression(true));
    }
    return s;
  }
  if (tag == "break" || tag == "continue") {
    advance();
    if (loop_depth_ == 0) fail(fmt::format("'{}' outside of a for loop", tag), line);
    s->kind = tag == "break" ? StmtKind::Break : StmtKind::Continue;
    return s;
  }
  if (tag == "generation") {
    advance();
    s->kind = StmtKind::Scope;
    const int saved_loops = loop_depth_;
    loop_depth_ = 0;
    ++macro_depth_;  // a call block in Jinja: its body is a macro
    s->bodies.push_back(parse_statements("generation", line, {"endgeneration"}, true));
    --macro_depth_;
    loop_depth_ = saved_loops;
    scan_names(s->bodies[0], *s);
    return s;
  }
  if (unsupported_tags().count(tag))
    fail(fmt::format("the tag '{{% {} %}}' is not supported (chat templates are rendered "
                     "standalone, without other templates)",
                     tag),
         line);
  if (!open_.empty())
    fail(fmt::format("unexpected tag '{}': the '{}' tag opened on line {} expects {}", tag,
                     open_.back().tag, open_.back().line, ends_text(open_.back().ends)),
         line);
  fail(fmt::format("unknown tag '{}'", tag), line);
}

std::unique_ptr<Stmt> Parser::parse_for(std::unique_ptr<Stmt> s) {
  const int line = advance().line;
  s->kind = StmtKind::For;
  s->target = parse_target(false, {"in"});
  if (!skip_name("in")) unexpected("'in'");
  s->exprs.push_back(parse_tuple(false, false, {"recursive"}, false));
  if (skip_name("if")) {
    s->exprs.push_back(parse_expression(true));
    s->has_filter = true;
  }
  if (at_name("recursive"))
    fail("recursive for loops ('for ... recursive') are not supported", cur().line);
  ++loop_depth_;
  s->bodies.push_back(parse_statements("for", line, {"endfor", "else"}, false));
  --loop_depth_;
  if (advance().value == "endfor") {
    s->bodies.emplace_back();
  } else {
    s->bodies.push_back(parse_statements("for", line, {"endfor"}, true));
  }
  return s;
}

std::unique_ptr<Stmt> Parser::parse_if(std::unique_ptr<Stmt> s) {
  const int line = advance().line;
  s->kind = StmtKind::If;
  while (true) {
    s->exprs.push_back(parse_tuple(false, false, {}, false));
    s->bodies.push_back(parse_statements("if", line, {"elif", "else", "endif"}, false));
    const std::string end = advance().value;
    if (end == "elif") continue;
    if (end == "else") s->bodies.push_back(parse_statements("if", line, {"endif"}, true));
    break;
  }
  return s;
}

std::unique_ptr<Stmt> Parser::parse_set(std::unique_ptr<Stmt> s) {
  const int line = advance().line;
  s->target = parse_target(true, {});
  if (skip_op("=")) {
    s->kind = StmtKind::Set;
    s->exprs.push_back(parse_tuple(false, true, {}, false));
    return s;
  }
  s->kind = StmtKind::SetBlock;
  if (s->target.kind == Target::Kind::Tuple)
    fail("a block set ({% set x %}...{% endset %}) assigns to one name", line);
  if (at_op("|")) {
    s->exprs.push_back(parse_filter(nullptr, false));
    s->has_filter = true;
  }
  s->bodies.push_back(parse_statements("set", line, {"endset"}, true));
  return s;
}

void Parser::parse_signature(Stmt& s) {
  expect_op("(");
  while (!at_op(")")) {
    if (!s.params.empty()) expect_op(",");
    s.params.push_back(expect_name());
    if (skip_op("=")) {
      s.defaults.push_back(parse_expression(true));
    } else if (!s.defaults.empty()) {
      fail("non-default argument follows default argument", cur().line);
    }
  }
  expect_op(")");
  for (const std::string& p : s.params) assigned_.insert(p);
}

std::unique_ptr<Stmt> Parser::parse_macro(std::unique_ptr<Stmt> s) {
  const int line = advance().line;
  s->kind = StmtKind::Macro;
  s->text = expect_name();
  macros_.insert(s->text);
  parse_signature(*s);
  const int saved_loops = loop_depth_;
  loop_depth_ = 0;
  ++macro_depth_;
  s->bodies.push_back(parse_statements("macro", line, {"endmacro"}, true));
  --macro_depth_;
  loop_depth_ = saved_loops;
  scan_names(s->bodies[0], *s);
  return s;
}

std::unique_ptr<Stmt> Parser::parse_call_block(std::unique_ptr<Stmt> s) {
  const int line = advance().line;
  s->kind = StmtKind::CallBlock;
  if (at_op("(")) parse_signature(*s);
  ExprPtr call = parse_expression(true);
  if (call->kind != ExprKind::Call) fail("{% call %} expects a macro call", line);
  s->exprs.push_back(std::move(call));
  const int saved_loops = loop_depth_;
  loop_depth_ = 0;
  ++macro_depth_;  // the body is the caller, a macro
  s->bodies.push_back(parse_statements("call", line, {"endcall"}, true));
  --macro_depth_;
  loop_depth_ = saved_loops;
  scan_names(s->bodies[0], *s);
  return s;
}

std::unique_ptr<Stmt> Parser::parse_with(std::unique_ptr<Stmt> s) {
  const int line = advance().line;
  s->kind = StmtKind::With;
  while (cur().type != Tok::BlockEnd) {
    if (!s->targets.empty()) expect_op(",");
    s->targets.push_back(parse_target(false, {}, /*with_tuple=*/false));
    expect_op("=");
    s->exprs.push_back(parse_expression(true));
  }
  s->bodies.push_back(parse_statements("with", line, {"endwith"}, true));
  return s;
}

// A name, ns.attr (set only), or a tuple of names (a, b) / a, b.
Target Parser::parse_target(bool with_namespace, const std::vector<std::string>& extra_end,
                            bool with_tuple) {
  auto one = [&]() -> Target {
    Target t;
    if (skip_op("(")) {
      t.kind = Target::Kind::Tuple;
      while (!at_op(")")) {
        if (!t.items.empty()) expect_op(",");
        if (at_op(")")) break;
        t.items.push_back(parse_target(false, {}, false));
      }
      expect_op(")");
      return t;
    }
    if (cur().type != Tok::Name) unexpected("a name to assign to");
    const int line = cur().line;
    t.name = advance().value;
    if (t.name == "true" || t.name == "false" || t.name == "none" || t.name == "True" ||
        t.name == "False" || t.name == "None")
      fail(fmt::format("can't assign to the constant '{}'", t.name), line);
    if (with_namespace && at_op(".")) {
      advance();
      t.kind = Target::Kind::NamespaceAttr;
      t.attr = expect_name();
    } else {
      assigned_.insert(t.name);
    }
    return t;
  };
  Target first = one();
  if (!with_tuple || !at_op(",")) return first;
  Target tuple;
  tuple.kind = Target::Kind::Tuple;
  tuple.items.push_back(std::move(first));
  while (skip_op(",")) {
    if (cur().type == Tok::BlockEnd || cur().type == Tok::VarEnd || at_op(")") || at_op("=")) break;
    bool end = false;
    for (const std::string& e : extra_end) end = end || at_name(e);
    if (end) break;
    tuple.items.push_back(one());
  }
  return tuple;
}

// template assigns (which may hold a macro); `caller` exists inside macros.
void Parser::check_calls() {
  for (const auto& [name, line, in_macro] : calls_) {
    if (is_builtin_function(name) || macros_.count(name) || assigned_.count(name)) continue;
    if (in_macro && (name == "caller" || name == "varargs" || name == "kwargs")) continue;
    if (name == "loop") fail("calling loop() (recursive for loops) is not supported", line);
    fail(fmt::format("unknown function '{}()': it is neither a builtin (range, dict, namespace, "
                     "raise_exception, strftime_now) nor a macro of this template",
                     name),
         line);
  }
}

// Which of varargs, kwargs and caller a macro body reads.
void Parser::scan_expr(const Expr* e, Stmt& m) {
  if (!e) return;
  if (e->kind == ExprKind::Name) {
    m.uses_varargs |= e->name == "varargs";
    m.uses_kwargs |= e->name == "kwargs";
    m.uses_caller |= e->name == "caller";
  }
  for (const auto& a : e->args) scan_expr(a.get(), m);
  for (const auto& kv : e->kwargs) scan_expr(kv.second.get(), m);
  scan_expr(e->dyn_args.get(), m);
  scan_expr(e->dyn_kwargs.get(), m);
}
void Parser::scan_names(const Body& body, Stmt& m) {
  for (const auto& s : body) {
    for (const auto& e : s->exprs) scan_expr(e.get(), m);
    for (const auto& e : s->defaults) scan_expr(e.get(), m);
    for (const Body& b : s->bodies) scan_names(b, m);
  }
}

std::unique_ptr<TemplateAst> parse_template(std::string_view source) {
  std::unique_ptr<TemplateAst> ast = Parser(tokenize(source)).parse();
  analyze_frames(*ast);
  return ast;
}

}  // namespace moemesh::jinja
