// The evaluator of the chat-template interpreter: scopes, callables, and the builtin filters,
// tests, methods and functions of Jinja2 as transformers' sandboxed environment provides them.
// Internal to core.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/detail/jinja_ast.h"
#include "core/detail/jinja_value.h"

namespace moemesh::jinja {

// The variables of one frame (the template, one loop iteration, one macro call, ...), chained to
// the frame it was entered from; a name a frame does not declare is read from its ancestors.
struct Scope {
  // A frame holds few names: a flat list is faster than a hash map to build and search.
  std::vector<std::pair<std::string, Value>> vars;
  std::shared_ptr<Scope> parent;

  Scope() = default;
  explicit Scope(std::shared_ptr<Scope> p) : parent(std::move(p)) {}

  // The innermost binding of `name`, or nullptr.
  const Value* find(const std::string& name) const {
    for (const Scope* s = this; s; s = s->parent.get())
      for (const auto& kv : s->vars)
        if (kv.first == name) return &kv.second;
    return nullptr;
  }
  // Binds `name` in this frame.
  void set(const std::string& name, Value v) {
    for (auto& kv : vars) {
      if (kv.first == name) {
        kv.second = std::move(v);
        return;
      }
    }
    vars.emplace_back(name, std::move(v));
  }
};
using ScopePtr = std::shared_ptr<Scope>;

struct Function {
  enum class Type {
    Macro,    // {% macro %}: stmt, called in a frame chained to closure
    Caller,   // the body of a {% call %} block: stmt (the CallBlock), closure
    Builtin,  // range, dict, namespace, raise_exception, strftime_now: name
    Method,   // a bound method: self.name(...)
  };
  Type type = Type::Builtin;
  std::string name;
  const Stmt* stmt = nullptr;
  ScopePtr closure;
  Value self;
};

struct CallArgs {
  std::vector<Value> args;
  std::vector<std::pair<std::string, Value>> kwargs;
};

// Arguments bound to a Python function's parameter names (positional, then keywords).
class Params {
 public:
  Params(const std::string& fname, CallArgs& a, std::vector<const char*> names);
  // The argument, or nullptr when not given.
  const Value* get(size_t i) const { return values_[i] ? &*values_[i] : nullptr; }
  // The argument, or nullptr when not given or None.
  const Value* opt(size_t i) const {
    return values_[i] && !values_[i]->is_none() ? &*values_[i] : nullptr;
  }
  bool flag(size_t i) const { return values_[i] && truthy(*values_[i]); }

 private:
  std::vector<std::optional<Value>> values_;
};

// The argument as a str / an int, or a TypeError naming `what`.
const std::string& need_string(const Value* v, const char* what);
int64_t need_int(const Value* v, const char* what);

// Renders a parsed template with the given variables (a dict). Throws RenderError.
std::string render_ast(const TemplateAst& ast, const Value& variables);

// ---- builtins (core/chat_template_filters.cpp) ------------------------------------------------

Value apply_filter(const std::string& name, const Value& value, CallArgs args);
bool apply_test(const std::string& name, const Value& value, CallArgs args);
// obj.name(args) for a method of str, dict, list or loop.
Value call_method(const Value& obj, const std::string& name, CallArgs args);
// s.name(args) for a str method (core/chat_template_strings.cpp).
Value string_method(const std::string& s, const std::string& name, CallArgs& args);
Value call_builtin(const std::string& name, CallArgs args);
// obj.name and obj[key] as Jinja's sandboxed environment resolves them (a missing attribute is
// undefined; anything done to an undefined value but printing, testing or iterating it throws).
Value get_attr(const Value& obj, const std::string& name);
Value get_item(const Value& obj, const Value& key);
Value get_slice(const Value& obj, const Value& start, const Value& stop, const Value& step);

}  // namespace moemesh::jinja
