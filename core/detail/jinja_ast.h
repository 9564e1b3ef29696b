// The syntax tree of a parsed chat template, and the parser that builds it (Jinja2's grammar and
// operator precedence). Internal to core.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/detail/jinja_value.h"

namespace moemesh::jinja {

enum class ExprKind {
  Const,     // value
  Name,      // name
  List,      // args: items
  Tuple,     // args: items
  Dict,      // args: key0, value0, key1, value1, ...
  Getattr,   // args[0].name
  Getitem,   // args[0][args[1]]
  Slice,     // args: start, stop, step (each may be null)
  Call,      // args[0](args[1:], kwargs)
  Filter,    // args[0] | name(args[1:], kwargs); args[0] is null in filter blocks
  Test,      // args[0] is name(args[1:], kwargs)
  Not,       // not args[0]
  Neg,       // -args[0]
  Pos,       // +args[0]
  Binary,    // args[0] name args[1] for + - * / // % **
  Concat,    // args[0] ~ args[1] ~ ...
  And,       // args[0] and args[1]
  Or,        // args[0] or args[1]
  Compare,   // args[0] ops[0] args[1] ops[1] args[2] ...
  CondExpr,  // args[1] if args[0] else args[2] (args[2] may be null)
};

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  ExprKind kind = ExprKind::Const;
  int line = 0;
  Value value;
  std::string name;
  std::vector<ExprPtr> args;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  ExprPtr dyn_args;    // f(*x)
  ExprPtr dyn_kwargs;  // f(**x)
  std::vector<std::string> ops;
};

// Where a set, for or with statement stores values.
struct Target {
  enum class Kind { Name, Tuple, NamespaceAttr } kind = Kind::Name;
  std::string name;
  std::string attr;           // NamespaceAttr: name.attr
  std::vector<Target> items;  // Tuple
};

enum class StmtKind {
  Data,         // text
  Output,       // {{ exprs[0] }}; {% print exprs... %}
  If,           // exprs[i] -> bodies[i]; one more body is the else branch
  For,          // for target in exprs[0] [if exprs[1]]: bodies[0], else bodies[1]
  Set,          // set target = exprs[0]
  SetBlock,     // set target [| exprs[0]] ... endset: bodies[0]
  Macro,        // macro text(params = defaults): bodies[0]
  CallBlock,    // call(params) exprs[0]: bodies[0]
  FilterBlock,  // filter exprs[0]: bodies[0]
  With,         // with targets = exprs: bodies[0]
  Break,
  Continue,
  Scope,  // generation ... endgeneration: bodies[0] (a call block in Jinja)
};

// How a frame initialises a name when it is entered (jinja2/idtracking.py): a parameter is
// bound by the frame itself, Resolve reads the render's context (top-level assignments so far,
// then the render variables and globals), Alias copies the enclosing frame's variable, Undefined
// starts undefined. Names a frame does not declare are read from the enclosing frames.
enum class LoadKind { Param, Resolve, Alias, Undefined };

// The names a frame declares: the template, a for loop's body (and its else branch and loop
// filter), a macro, a call block's caller, a filter block, a with block, a block set.
struct Frame {
  std::vector<std::pair<std::string, LoadKind>> names;
};

struct Stmt;
using Body = std::vector<std::unique_ptr<Stmt>>;

struct Stmt {
  StmtKind kind = StmtKind::Data;
  int line = 0;
  std::string text;
  std::vector<ExprPtr> exprs;
  std::vector<Body> bodies;
  Target target;
  std::vector<Target> targets;
  std::vector<std::string> params;
  std::vector<ExprPtr> defaults;  // for the last defaults.size() params
  bool has_filter = false;        // For: exprs[1] is the loop filter; SetBlock: exprs[0] exists
  bool uses_varargs = false;      // Macro: its body reads varargs / kwargs / caller
  bool uses_kwargs = false;
  bool uses_caller = false;
  // The frames the statement opens: For: body, else, loop filter; Macro, CallBlock,
  // FilterBlock, With, SetBlock, Scope: frames[0].
  std::vector<Frame> frames;
};

struct TemplateAst {
  Body body;
  Frame frame;
};

// Computes every frame's names as Jinja2's compiler does (called by parse_template), so that a
// name resolves to the same variable as in Jinja2.
void analyze_frames(TemplateAst& ast);

// Parses template source. Throws ParseError (with the line) on a syntax error or on anything this
// interpreter does not implement: a tag, filter, test, method or function.
std::unique_ptr<TemplateAst> parse_template(std::string_view source);

// What the evaluator implements; the parser refuses anything else.
bool is_supported_filter(const std::string& name);
bool is_supported_test(const std::string& name);
bool is_supported_method(const std::string& name);
bool is_builtin_function(const std::string& name);
// Jinja2 filters and tests this interpreter does not implement (for clearer messages).
bool is_jinja_filter(const std::string& name);
bool is_jinja_test(const std::string& name);

}  // namespace moemesh::jinja
