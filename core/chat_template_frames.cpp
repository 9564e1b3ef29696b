// Frame analysis of the chat-template interpreter (core/detail/jinja_ast.h): a transcription of
// jinja2/idtracking.py. Jinja2 compiles a template to Python functions whose local variables
// are decided at compile time; a name read in a loop body, say, is that body's own variable when
// the body assigns it, initialised on entry to the enclosing frame's variable if that frame has
// one, else to undefined, and otherwise it is the enclosing frame's variable. Reproducing the
// decisions makes every read see what Jinja2's would.
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/detail/jinja_ast.h"

namespace moemesh::jinja {
namespace {

// The symbol table of one frame (jinja2.idtracking.Symbols): the names it declares, how each is
// initialised, and which it assigns.
class Symbols {
 public:
  explicit Symbols(const Symbols* parent) : parent_(parent) {}

  bool find_ref(const std::string& name) const {
    for (const Symbols* s = this; s; s = s->parent_)
      if (s->index_.count(name)) return true;
    return false;
  }

  void store(const std::string& name) {
    stores_.insert(name);
    if (index_.count(name)) return;
    set(name, parent_ && parent_->find_ref(name) ? LoadKind::Alias : LoadKind::Undefined);
  }

  void declare_parameter(const std::string& name) {
    stores_.insert(name);
    set(name, LoadKind::Param);
  }

  void load(const std::string& name) {
    if (!find_ref(name)) set(name, LoadKind::Resolve);
  }

  // Merges the symbol tables of an if statement's branches, which started as copies of this one.
  void branch_update(const std::vector<Symbols>& branches) {
    std::set<std::string> stored;
    for (const Symbols& b : branches) stored.insert(b.stores_.begin(), b.stores_.end());
    for (const std::string& s : stores_) stored.erase(s);
    for (const Symbols& b : branches) {
      for (const auto& [name, kind] : b.names_) set(name, kind);
      stores_.insert(b.stores_.begin(), b.stores_.end());
    }
    for (const std::string& name : stored)
      set(name, parent_ && parent_->find_ref(name) ? LoadKind::Alias : LoadKind::Resolve);
  }

  Frame frame() const { return Frame{names_}; }

 private:
  void set(const std::string& name, LoadKind kind) {
    auto it = index_.find(name);
    if (it != index_.end()) {
      names_[it->second].second = kind;
      return;
    }
    index_.emplace(name, names_.size());
    names_.emplace_back(name, kind);
  }

  const Symbols* parent_;
  std::vector<std::pair<std::string, LoadKind>> names_;
  std::unordered_map<std::string, size_t> index_;
  std::set<std::string> stores_;
};

// jinja2.idtracking.FrameSymbolVisitor: what a statement contributes to the frame it is in.
// Statements that open frames contribute only what is evaluated outside them.
class FrameVisitor {
 public:
  explicit FrameVisitor(Symbols* symbols) : sym_(symbols) {}

  void expr(const Expr* e) {
    if (!e) return;
    if (e->kind == ExprKind::Name) sym_->load(e->name);
    for (const auto& a : e->args) expr(a.get());
    for (const auto& kv : e->kwargs) expr(kv.second.get());
    expr(e->dyn_args.get());
    expr(e->dyn_kwargs.get());
  }

  void store_target(const Target& t) {
    switch (t.kind) {
      case Target::Kind::Name:
        sym_->store(t.name);
        return;
      case Target::Kind::Tuple:
        for (const Target& item : t.items) store_target(item);
        return;
      case Target::Kind::NamespaceAttr:
        sym_->load(t.name);
        return;
    }
  }

  void param_target(const Target& t) {
    if (t.kind == Target::Kind::Tuple) {
      for (const Target& item : t.items) param_target(item);
    } else {
      sym_->declare_parameter(t.name);
    }
  }

  void body(const Body& b) {
    for (const auto& s : b) stmt(*s);
  }

  void stmt(const Stmt& s) {
    switch (s.kind) {
      case StmtKind::Output:
        for (const auto& e : s.exprs) expr(e.get());
        return;
      case StmtKind::If:
        visit_if(s);
        return;
      case StmtKind::For:
        expr(s.exprs[0].get());
        return;
      case StmtKind::Set:
        expr(s.exprs[0].get());
        store_target(s.target);
        return;
      case StmtKind::SetBlock:
        store_target(s.target);
        return;
      case StmtKind::Macro:
        sym_->store(s.text);
        return;
      case StmtKind::CallBlock:
      case StmtKind::FilterBlock:
        expr(s.exprs[0].get());
        return;
      case StmtKind::With:
        for (const auto& e : s.exprs) expr(e.get());
        return;
      default:  // Data, Break, Continue, Scope
        return;
    }
  }

 private:
  // Jinja's If node: the test, then three branches: the body, the elif nodes (each an If with
  // a test and a body), the else body.
  void visit_if(const Stmt& s) {
    expr(s.exprs[0].get());
    Symbols* original = sym_;
    auto branch = [&](auto&& visit) {
      Symbols copy = *original;
      sym_ = &copy;
      visit();
      sym_ = original;
      return copy;
    };
    std::vector<Symbols> branches;
    branches.push_back(branch([&] { body(s.bodies[0]); }));
    branches.push_back(branch([&] {
      for (size_t k = 1; k < s.exprs.size(); ++k) {
        expr(s.exprs[k].get());
        Symbols* outer = sym_;
        Symbols elif_body = *outer;
        sym_ = &elif_body;
        body(s.bodies[k]);
        sym_ = outer;
        outer->branch_update({elif_body, *outer, *outer});
      }
    }));
    branches.push_back(branch([&] {
      if (s.bodies.size() > s.exprs.size()) body(s.bodies.back());
    }));
    original->branch_update(branches);
  }

  Symbols* sym_;
};

void analyze_body(const Body& body, const Symbols& frame);

// A macro's (or a caller's) caller, kwargs and varargs, when its body reads them.
void declare_specials(const Stmt& s, Symbols& symbols) {
  if (s.uses_caller) symbols.declare_parameter("caller");
  if (s.uses_kwargs) symbols.declare_parameter("kwargs");
  if (s.uses_varargs) symbols.declare_parameter("varargs");
}

// Analyses the frames `s` opens, whose enclosing frame is `parent`.
void analyze_stmt(Stmt& s, const Symbols& parent) {
  auto frame_of = [&](auto&& fill) {
    Symbols sym(&parent);
    FrameVisitor v(&sym);
    fill(sym, v);
    return sym;
  };
  switch (s.kind) {
    case StmtKind::If:
      for (Body& b : s.bodies)
        for (auto& child : b) analyze_stmt(*child, parent);
      return;
    case StmtKind::For: {
      Symbols body = frame_of([&](Symbols& sym, FrameVisitor& v) {
        sym.declare_parameter("loop");
        v.param_target(s.target);
        v.body(s.bodies[0]);
      });
      Symbols else_ = frame_of([&](Symbols&, FrameVisitor& v) { v.body(s.bodies[1]); });
      Symbols test = frame_of([&](Symbols&, FrameVisitor& v) {
        v.param_target(s.target);
        if (s.has_filter) v.expr(s.exprs[1].get());
      });
      s.frames = {body.frame(), else_.frame(), test.frame()};
      analyze_body(s.bodies[0], body);
      analyze_body(s.bodies[1], else_);
      return;
    }
    case StmtKind::Macro:
    case StmtKind::CallBlock: {
      Symbols sym = frame_of([&](Symbols& symbols, FrameVisitor& v) {
        for (const std::string& p : s.params) symbols.declare_parameter(p);
        for (const auto& d : s.defaults) v.expr(d.get());
        v.body(s.bodies[0]);
        declare_specials(s, symbols);
      });
      s.frames = {sym.frame()};
      analyze_body(s.bodies[0], sym);
      return;
    }
    case StmtKind::FilterBlock:
    case StmtKind::SetBlock: {
      Symbols sym = frame_of([&](Symbols&, FrameVisitor& v) {
        v.body(s.bodies[0]);
        if (!s.exprs.empty()) v.expr(s.exprs[0].get());  // the filter and its arguments
      });
      s.frames = {sym.frame()};
      analyze_body(s.bodies[0], sym);
      return;
    }
    case StmtKind::With: {
      Symbols sym = frame_of([&](Symbols&, FrameVisitor& v) {
        for (const Target& t : s.targets) v.param_target(t);
        v.body(s.bodies[0]);
      });
      s.frames = {sym.frame()};
      analyze_body(s.bodies[0], sym);
      return;
    }
    case StmtKind::Scope: {
      Symbols sym = frame_of([&](Symbols& symbols, FrameVisitor& v) {
        v.body(s.bodies[0]);
        declare_specials(s, symbols);
      });
      s.frames = {sym.frame()};
      analyze_body(s.bodies[0], sym);
      return;
    }
    default:
      return;
  }
}

void analyze_body(const Body& body, const Symbols& frame) {
  for (const auto& s : body) analyze_stmt(*s, frame);
}

}  // namespace

void analyze_frames(TemplateAst& ast) {
  Symbols root(nullptr);
  FrameVisitor v(&root);
  v.body(ast.body);
  ast.frame = root.frame();
  analyze_body(ast.body, root);
}

}  // namespace moemesh::jinja
