// The chat-template evaluator (core/detail/jinja_eval.h): executes a parsed template as the
// Python code Jinja2 compiles it to would: frames declare the names core/chat_template_frames.cpp
// computed and initialise them on entry (a loop body on every iteration), top-level assignments
// are exported to the context, values follow Python's semantics, and limits keep hostile
// templates from exhausting the stack, the memory or the time of the rendering thread.
#include <fmt/format.h>

#include <algorithm>
#include <optional>

#include "core/detail/jinja_eval.h"

namespace moemesh::jinja {
namespace {

// Macro calls nested deeper than this fail (Python would hit its recursion limit).
constexpr int kMaxCallDepth = 100;
// A render may produce at most this many bytes, and run at most this many loop iterations and macro
// calls.
constexpr size_t kMaxOutput = size_t{1} << 28;
constexpr int64_t kMaxSteps = 2'000'000;

enum class Flow { Normal, Break, Continue };

// Executes one render. Owned by the rendering thread; a ChatTemplate's tree is shared read-only.
class Renderer {
 public:
  // `variables`: the render's variables (a dict), the context that frames resolve names from.
  explicit Renderer(const Value& variables) : variables_(variables) {}
  Renderer(const Renderer&) = delete;
  Renderer& operator=(const Renderer&) = delete;

  // Macros hold their defining frame, which may hold them back; namespaces and loops can hold
  // themselves. Clearing the objects that can close a cycle frees everything the render built.
  ~Renderer() {
    for (auto& f : functions_) f->closure.reset();
    for (auto& ns : namespaces_) ns->attrs = DictData();
    for (auto& l : loops_) {
      l->items.reset();
      l->last_changed_value.clear();
    }
  }

  std::string render(const TemplateAst& ast) {
    root_ = enter_frame(ast.frame, nullptr);
    std::string out;
    Flow flow = Flow::Normal;
    exec_body(ast.body, out, root_, &flow);
    return out;
  }

  void exec_body(const Body& body, std::string& out, const ScopePtr& scope, Flow* flow) {
    for (const auto& s : body) {
      exec(*s, out, scope, flow);
      if (*flow != Flow::Normal) return;
    }
  }

 private:
  [[noreturn]] static void fail(const std::string& message, int line) {
    throw RenderError(message, line);
  }

  void step(int line) {
    if (++steps_ > kMaxSteps)
      fail(fmt::format("the template ran more than {} loop iterations and macro calls", kMaxSteps),
           line);
  }

  static void check_stack(int line) {
    if (!stack_ok()) fail("template nested too deeply for the stack of this thread", line);
  }

  void emit(std::string& out, const std::string& s, int line) {
    if (out.size() + s.size() > kMaxOutput)
      fail(fmt::format("the rendered text exceeds {} bytes", kMaxOutput), line);
    out += s;
  }

  void exec(const Stmt& s, std::string& out, const ScopePtr& scope, Flow* flow) {
    check_stack(s.line);
    try {
      exec_inner(s, out, scope, flow);
    } catch (RenderError& e) {
      e.set_line(s.line);
      throw;
    }
  }

  void exec_inner(const Stmt& s, std::string& out, const ScopePtr& scope, Flow* flow) {
    switch (s.kind) {
      case StmtKind::Data:
        emit(out, s.text, s.line);
        return;
      case StmtKind::Output:
        for (const auto& e : s.exprs) emit(out, py_str(eval(*e, scope)), s.line);
        return;
      case StmtKind::If:
        for (size_t i = 0; i < s.exprs.size(); ++i) {
          if (truthy(eval(*s.exprs[i], scope))) {
            exec_body(s.bodies[i], out, scope, flow);
            return;
          }
        }
        if (s.bodies.size() > s.exprs.size()) exec_body(s.bodies.back(), out, scope, flow);
        return;
      case StmtKind::For:
        exec_for(s, out, scope);
        return;
      case StmtKind::Set:
        assign(s.target, eval(*s.exprs[0], scope), scope, s.line);
        return;
      case StmtKind::SetBlock: {
        ScopePtr inner = enter_frame(s.frames[0], scope);
        Value v = Value::string(capture(s.bodies[0], inner));
        if (s.has_filter) v = eval_filter_chain(*s.exprs[0], v, inner);
        assign(s.target, v, scope, s.line);
        return;
      }
      case StmtKind::Macro: {
        auto f = std::make_shared<Function>();
        f->type = Function::Type::Macro;
        f->name = s.text;
        f->stmt = &s;
        f->closure = scope;
        functions_.push_back(f);
        Value macro = Value::function(std::move(f));
        if (scope == root_) context_vars_.set(s.text, macro);  // exported, as Jinja does
        scope->set(s.text, std::move(macro));
        return;
      }
      case StmtKind::CallBlock: {
        auto f = std::make_shared<Function>();
        f->type = Function::Type::Caller;
        f->name = "caller";
        f->stmt = &s;
        f->closure = scope;
        functions_.push_back(f);
        Value caller = Value::function(std::move(f));
        emit(out, py_str(eval_call(*s.exprs[0], scope, &caller)), s.line);
        return;
      }
      case StmtKind::FilterBlock: {
        ScopePtr inner = enter_frame(s.frames[0], scope);
        std::string captured = capture(s.bodies[0], inner);
        emit(out, py_str(eval_filter_chain(*s.exprs[0], Value::string(std::move(captured)), inner)),
             s.line);
        return;
      }
      case StmtKind::With: {
        std::vector<Value> values;
        for (const auto& e : s.exprs) values.push_back(eval(*e, scope));
        ScopePtr inner = enter_frame(s.frames[0], scope);
        for (size_t i = 0; i < s.targets.size(); ++i)
          assign(s.targets[i], values[i], inner, s.line);
        exec_body(s.bodies[0], out, inner, flow);
        return;
      }
      case StmtKind::Break:
        *flow = Flow::Break;
        return;
      case StmtKind::Continue:
        *flow = Flow::Continue;
        return;
      case StmtKind::Scope: {  // {% generation %}: a call block in Jinja; its body is a macro
        Function body;
        body.type = Function::Type::Caller;
        body.name = "caller";
        body.stmt = &s;
        body.closure = scope;
        emit(out, py_str(call_macro(body, CallArgs{}, s.line)), s.line);
        return;
      }
    }
  }

  std::string capture(const Body& body, const ScopePtr& scope) {
    std::string out;
    Flow flow = Flow::Normal;
    exec_body(body, out, scope, &flow);
    return out;
  }

  void exec_for(const Stmt& s, std::string& out, const ScopePtr& scope) {
    std::vector<Value> items = iterate(eval(*s.exprs[0], scope));
    if (s.has_filter) {
      std::vector<Value> kept;
      ScopePtr probe = enter_frame(s.frames[2], scope);
      for (Value& item : items) {
        step(s.line);
        assign(s.target, item, probe, s.line);
        if (truthy(eval(*s.exprs[1], probe))) kept.push_back(std::move(item));
      }
      items = std::move(kept);
    }
    Flow flow = Flow::Normal;
    if (items.empty()) {
      exec_body(s.bodies[1], out, enter_frame(s.frames[1], scope), &flow);
      return;
    }
    auto loop = std::make_shared<LoopData>();
    loops_.push_back(loop);
    loop->items = std::make_shared<const std::vector<Value>>(std::move(items));
    const Value loop_value = Value::loop(loop);
    for (size_t i = 0; i < loop->items->size(); ++i) {
      step(s.line);
      loop->index0 = static_cast<int64_t>(i);
      ScopePtr iter_scope = enter_frame(s.frames[0], scope);
      assign(s.target, (*loop->items)[i], iter_scope, s.line);
      iter_scope->set("loop", loop_value);
      flow = Flow::Normal;
      exec_body(s.bodies[0], out, iter_scope, &flow);
      if (flow == Flow::Break) break;
    }
  }

  void assign(const Target& t, const Value& v, const ScopePtr& scope, int line) {
    switch (t.kind) {
      case Target::Kind::Name:
        scope->set(t.name, v);
        if (scope == root_) context_vars_.set(t.name, v);  // top-level assignments are exported
        return;
      case Target::Kind::Tuple: {
        std::vector<Value> parts = iterate(v);
        if (parts.size() > t.items.size())
          fail(fmt::format("too many values to unpack (expected {})", t.items.size()), line);
        if (parts.size() < t.items.size())
          fail(fmt::format("not enough values to unpack (expected {}, got {})", t.items.size(),
                           parts.size()),
               line);
        for (size_t i = 0; i < parts.size(); ++i) assign(t.items[i], parts[i], scope, line);
        return;
      }
      case Target::Kind::NamespaceAttr: {
        const Value* ns = scope->find(t.name);
        if (!ns || ns->kind() != Value::Kind::Namespace)
          fail("cannot assign attribute on non-namespace object", line);
        if (!t.attr.empty() && t.attr[0] == '_')
          fail(fmt::format("Chat templates cannot store underscore-prefixed attributes on a "
                           "namespace, but got {}. Please rename the attribute.",
                           py_repr_string(t.attr)),
               line);
        ns->ns().attrs.set(t.attr, v);
        return;
      }
    }
  }

  // ---- expressions ----

  // A name the frames do not declare resolves in the context, as Jinja's resolve() does: the
  // template's top-level assignments so far, then the render's variables, then the globals.
  Value resolve(const std::string& name) {
    if (const Value* v = context_vars_.find(name)) return *v;
    if (variables_.is_dict())
      if (const Value* v = variables_.dict_data().find(name)) return *v;
    if (is_builtin_function(name)) {
      auto f = std::make_shared<Function>();
      f->type = Function::Type::Builtin;
      f->name = name;
      return Value::function(std::move(f));
    }
    return Value::undefined(fmt::format("{} is undefined", py_repr_string(name)));
  }

  Value lookup(const std::string& name, const ScopePtr& scope) {
    if (const Value* v = scope->find(name)) return *v;
    return resolve(name);
  }

  // A new frame below `parent` with the names `frame` declares, initialised as Jinja's
  // enter_frame does; parameters are bound by the caller.
  ScopePtr enter_frame(const Frame& frame, const ScopePtr& parent) {
    auto scope = std::make_shared<Scope>(parent);
    scope->vars.reserve(frame.names.size());
    for (const auto& [name, kind] : frame.names) {
      switch (kind) {
        case LoadKind::Param:
          break;
        case LoadKind::Resolve:
          scope->set(name, resolve(name));
          break;
        case LoadKind::Alias:
          scope->set(name, parent ? lookup(name, parent) : resolve(name));
          break;
        case LoadKind::Undefined:
          scope->set(name, Value::undefined(fmt::format("{} is undefined", py_repr_string(name))));
          break;
      }
    }
    return scope;
  }

  Value eval(const Expr& e, const ScopePtr& scope) {
    check_stack(e.line);
    switch (e.kind) {
      case ExprKind::Const:
        return e.value;
      case ExprKind::Name:
        return lookup(e.name, scope);
      case ExprKind::List:
      case ExprKind::Tuple: {
        std::vector<Value> items;
        items.reserve(e.args.size());
        for (const auto& a : e.args) items.push_back(eval(*a, scope));
        return Value::seq(std::move(items),
                          e.kind == ExprKind::List ? SeqKind::List : SeqKind::Tuple);
      }
      case ExprKind::Dict: {
        DictData d;
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          Value k = eval(*e.args[i], scope);
          if (!k.is_string())
            fail(fmt::format("dict literal keys must be strings here, found {}", k.type_name()),
                 e.line);
          d.set(k.text(), eval(*e.args[i + 1], scope));
        }
        return Value::dict(std::move(d));
      }
      case ExprKind::Getattr:
        return get_attr(eval(*e.args[0], scope), e.name);
      case ExprKind::Getitem: {
        Value obj = eval(*e.args[0], scope);
        const Expr& key = *e.args[1];
        if (key.kind == ExprKind::Slice) {
          auto part = [&](size_t i) {
            return key.args[i] ? eval(*key.args[i], scope) : Value::none();
          };
          Value start = part(0), stop = part(1), stride = part(2);
          return get_slice(obj, start, stop, stride);
        }
        return get_item(obj, eval(key, scope));
      }
      case ExprKind::Slice:
        fail("a slice outside of a subscript", e.line);
      case ExprKind::Call:
        return eval_call(e, scope, nullptr);
      case ExprKind::Filter: {
        Value v = eval(*e.args[0], scope);
        return apply_filter(e.name, v, eval_args(e, scope));
      }
      case ExprKind::Test: {
        Value v = eval(*e.args[0], scope);
        return Value::boolean(apply_test(e.name, v, eval_args(e, scope)));
      }
      case ExprKind::Not:
        return Value::boolean(!truthy(eval(*e.args[0], scope)));
      case ExprKind::Neg:
      case ExprKind::Pos:
        return negate(eval(*e.args[0], scope), e.kind == ExprKind::Neg);
      case ExprKind::Binary: {
        Value a = eval(*e.args[0], scope);
        Value b = eval(*e.args[1], scope);
        return binary_op(e.name, a, b);
      }
      case ExprKind::Concat: {
        std::string s;
        for (const auto& a : e.args) {
          s += py_str(eval(*a, scope));
          if (s.size() > kMaxOutput) fail("string too large", e.line);
        }
        return Value::string(std::move(s));
      }
      case ExprKind::And: {
        Value a = eval(*e.args[0], scope);
        return truthy(a) ? eval(*e.args[1], scope) : a;
      }
      case ExprKind::Or: {
        Value a = eval(*e.args[0], scope);
        return truthy(a) ? a : eval(*e.args[1], scope);
      }
      case ExprKind::Compare: {
        Value left = eval(*e.args[0], scope);
        for (size_t i = 0; i < e.ops.size(); ++i) {
          Value right = eval(*e.args[i + 1], scope);
          const std::string& op = e.ops[i];
          bool ok;
          if (op == "in") {
            ok = contains(right, left);
          } else if (op == "notin") {
            ok = !contains(right, left);
          } else {
            ok = py_compare(op, left, right);
          }
          if (!ok) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
      case ExprKind::CondExpr:
        if (truthy(eval(*e.args[0], scope))) return eval(*e.args[1], scope);
        if (e.args[2]) return eval(*e.args[2], scope);
        return Value::undefined(
            fmt::format("the inline if-expression on line {} evaluated to false and no else "
                        "section was defined.",
                        e.line));
    }
    fail("unknown expression", e.line);
  }

  // A filter chain of {% filter %} or {% set x | f %}: the innermost filter has no operand.
  Value eval_filter_chain(const Expr& e, const Value& base, const ScopePtr& scope) {
    Value v = e.args[0] ? eval_filter_chain(*e.args[0], base, scope) : base;
    return apply_filter(e.name, v, eval_args(e, scope));
  }

  CallArgs eval_args(const Expr& e, const ScopePtr& scope) {
    CallArgs a;
    for (size_t i = 1; i < e.args.size(); ++i) a.args.push_back(eval(*e.args[i], scope));
    for (const auto& [k, v] : e.kwargs) a.kwargs.emplace_back(k, eval(*v, scope));
    if (e.dyn_args) {
      for (Value& v : iterate(eval(*e.dyn_args, scope))) a.args.push_back(std::move(v));
    }
    if (e.dyn_kwargs) {
      Value d = eval(*e.dyn_kwargs, scope);
      if (!d.is_dict()) fail("argument after ** must be a mapping", e.line);
      for (const auto& [k, v] : d.dict_data().items) a.kwargs.emplace_back(k, v);
    }
    return a;
  }

  Value eval_call(const Expr& e, const ScopePtr& scope, const Value* caller) {
    Value callee = eval(*e.args[0], scope);
    CallArgs args = eval_args(e, scope);
    if (caller) args.kwargs.emplace_back("caller", *caller);
    return call(callee, std::move(args), e.line);
  }

  Value call(const Value& callee, CallArgs args, int line) {
    if (callee.is_undefined()) fail(callee.undefined_message(), line);
    if (callee.kind() != Value::Kind::Function)
      fail(fmt::format("'{}' object is not callable", callee.type_name()), line);
    const Function& f = callee.fn();
    switch (f.type) {
      case Function::Type::Builtin:
        if (f.name == "raise_exception") {
          std::string message = args.args.empty() ? "" : py_str(args.args[0]);
          throw RenderError(message, line);  // the template's own message
        }
        {
          Value v = call_builtin(f.name, std::move(args));
          if (v.kind() == Value::Kind::Namespace) namespaces_.push_back(v.ns_ptr());
          return v;
        }
      case Function::Type::Method:
        return call_method(f.self, f.name, std::move(args));
      case Function::Type::Macro:
      case Function::Type::Caller:
        return call_macro(f, std::move(args), line);
    }
    fail("cannot call this value", line);
  }

  Value call_macro(const Function& f, CallArgs args, int line) {
    step(line);
    if (depth_ >= kMaxCallDepth)
      fail(fmt::format("macro calls nested more than {} deep (runaway recursion in '{}')",
                       kMaxCallDepth, f.name),
           line);
    check_stack(line);
    // Jinja's Macro.__call__: positional arguments, then keyword arguments for the remaining
    // parameters, then caller, kwargs and varargs when the body reads them.
    const Stmt& m = *f.stmt;
    ScopePtr frame = enter_frame(m.frames[0], f.closure);
    const size_t argc = m.params.size();
    const bool explicit_caller =
        std::find(m.params.begin(), m.params.end(), "caller") != m.params.end();
    auto take_kwarg = [&](const std::string& name) -> std::optional<Value> {
      for (auto it = args.kwargs.begin(); it != args.kwargs.end(); ++it) {
        if (it->first != name) continue;
        Value v = std::move(it->second);
        args.kwargs.erase(it);
        return v;
      }
      return std::nullopt;
    };
    std::vector<bool> bound(argc, false);
    const size_t off = std::min(args.args.size(), argc);
    for (size_t i = 0; i < off; ++i) {
      frame->set(m.params[i], args.args[i]);
      bound[i] = true;
    }
    bool found_caller = explicit_caller;
    if (off != argc) {
      found_caller = false;
      for (size_t i = off; i < argc; ++i) {
        if (m.params[i] == "caller") found_caller = true;
        if (std::optional<Value> v = take_kwarg(m.params[i])) {
          frame->set(m.params[i], std::move(*v));
          bound[i] = true;
        }
      }
    }
    if (m.uses_caller && !found_caller) {
      std::optional<Value> c = take_kwarg("caller");
      frame->set("caller", c ? std::move(*c) : Value::undefined("No caller defined"));
    }
    if (m.uses_kwargs) {
      DictData extra;
      for (auto& [k, v] : args.kwargs) extra.set(k, std::move(v));
      frame->set("kwargs", Value::dict(std::move(extra)));
    } else if (!args.kwargs.empty()) {
      if (take_kwarg("caller"))
        fail(fmt::format("macro '{}' was invoked with two values for the special caller "
                         "argument. This is most likely a bug.",
                         f.name),
             line);
      fail(fmt::format("macro '{}' takes no keyword argument '{}'", f.name,
                       args.kwargs.front().first),
           line);
    }
    if (m.uses_varargs) {
      std::vector<Value> extra;
      for (size_t i = argc; i < args.args.size(); ++i) extra.push_back(std::move(args.args[i]));
      frame->set("varargs", Value::seq(std::move(extra), SeqKind::Tuple));
    } else if (args.args.size() > argc) {
      fail(fmt::format("macro '{}' takes not more than {} argument(s)", f.name, argc), line);
    }
    ++depth_;
    struct Leave {
      int* d;
      ~Leave() { --*d; }
    } leave{&depth_};
    const size_t first_default = argc - m.defaults.size();
    for (size_t i = 0; i < argc; ++i) {
      if (bound[i]) continue;
      frame->set(m.params[i], i >= first_default
                                  ? eval(*m.defaults[i - first_default], frame)
                                  : Value::undefined(fmt::format("parameter {} was not provided",
                                                                 py_repr_string(m.params[i]))));
    }
    return Value::string(capture(m.bodies[0], frame));
  }

  const Value& variables_;
  DictData context_vars_;  // the template's top-level assignments (Jinja's context.vars)
  ScopePtr root_;          // the template's frame
  int depth_ = 0;
  int64_t steps_ = 0;
  std::vector<std::shared_ptr<Function>> functions_;
  std::vector<std::shared_ptr<NamespaceData>> namespaces_;
  std::vector<std::shared_ptr<LoopData>> loops_;
};

}  // namespace

std::string render_ast(const TemplateAst& ast, const Value& variables) {
  Renderer r(variables);
  return r.render(ast);
}

}  // namespace moemesh::jinja
