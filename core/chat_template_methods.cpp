// The object model of the chat-template interpreter (core/detail/jinja_eval.h): attribute and item
// access as Jinja2's ImmutableSandboxedEnvironment resolves them, the methods of str, dict, list
// and loop that templates call, and the global functions transformers provides.
#include <fmt/format.h>

#include <cmath>
#include <ctime>
#include <set>

#include "core/detail/jinja_eval.h"

namespace moemesh::jinja {
namespace {

[[noreturn]] void type_error(const std::string& message) {
  throw RenderError(message);
}

const std::set<std::string>& str_attributes() {
  static const std::set<std::string> k = {
      "capitalize",   "casefold",    "center",    "count",      "encode",       "endswith",
      "expandtabs",   "find",        "format",    "format_map", "index",        "isalnum",
      "isalpha",      "isascii",     "isdecimal", "isdigit",    "isidentifier", "islower",
      "isnumeric",    "isprintable", "isspace",   "istitle",    "isupper",      "join",
      "ljust",        "lower",       "lstrip",    "maketrans",  "partition",    "removeprefix",
      "removesuffix", "replace",     "rfind",     "rindex",     "rjust",        "rpartition",
      "rsplit",       "rstrip",      "split",     "splitlines", "startswith",   "strip",
      "swapcase",     "title",       "translate", "upper",      "zfill"};
  return k;
}

const std::set<std::string>& dict_attributes() {
  static const std::set<std::string> k = {"clear",      "copy",   "fromkeys", "get",
                                          "items",      "keys",   "pop",      "popitem",
                                          "setdefault", "update", "values"};
  return k;
}

const std::set<std::string>& list_attributes() {
  static const std::set<std::string> k = {"append", "clear", "copy",   "count",   "extend", "index",
                                          "insert", "pop",   "remove", "reverse", "sort"};
  return k;
}

// Methods that would modify a list or dict: the immutable sandbox refuses them when called.
const std::set<std::string>& mutating_methods() {
  static const std::set<std::string> k = {"append", "extend",     "insert", "pop",
                                          "remove", "reverse",    "sort",   "clear",
                                          "update", "setdefault", "popitem"};
  return k;
}

const std::set<std::string>& supported_methods() {
  static const std::set<std::string> k = {
      // str
      "strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "startswith", "endswith",
      "upper", "lower", "title", "capitalize", "replace", "find", "rfind", "index", "rindex",
      "count", "join", "format", "isdigit", "isalpha", "isalnum", "isspace", "isupper", "islower",
      "isnumeric", "isdecimal", "removeprefix", "removesuffix", "center", "ljust", "rjust", "zfill",
      // dict, list
      "get", "items", "keys", "values", "copy",
      // loop
      "cycle", "changed"};
  return k;
}

Value method(const Value& self, const std::string& name) {
  auto f = std::make_shared<Function>();
  f->type = Function::Type::Method;
  f->name = name;
  f->self = self;
  return Value::function(std::move(f));
}

// Jinja's object_type_repr for undefined messages: "'dict object'", "'None'".
std::string object_repr(const Value& v) {
  if (v.is_none()) return "None";
  if (v.kind() == Value::Kind::Namespace)
    return "transformers.utils.chat_template_utils.TemplateNamespace object";
  return v.type_name() + " object";
}

Value no_attribute(const Value& obj, const std::string& name) {
  return Value::undefined(fmt::format("{} has no attribute {}", py_repr_string(object_repr(obj)),
                                      py_repr_string(name)));
}

// Python's index normalisation for obj[i]; returns false when out of range.
bool normalize_index(int64_t& i, size_t n) {
  if (i < 0) i += static_cast<int64_t>(n);
  return i >= 0 && i < static_cast<int64_t>(n);
}

}  // namespace

bool is_supported_method(const std::string& name) {
  return supported_methods().count(name) > 0 || mutating_methods().count(name) > 0;
}

bool is_builtin_function(const std::string& name) {
  return name == "range" || name == "dict" || name == "namespace" || name == "raise_exception" ||
         name == "strftime_now";
}

// ---- attribute and item access ----------------------------------------------------------------

Value get_attr(const Value& obj, const std::string& name) {
  switch (obj.kind()) {
    case Value::Kind::Undefined:
      throw RenderError(obj.undefined_message());
    case Value::Kind::Dict:
      if (dict_attributes().count(name)) return method(obj, name);
      if (const Value* v = obj.dict_data().find(name)) return *v;
      return no_attribute(obj, name);
    case Value::Kind::String:
      if (str_attributes().count(name)) return method(obj, name);
      return no_attribute(obj, name);
    case Value::Kind::Seq:
      if ((obj.seq_kind() == SeqKind::List && list_attributes().count(name)) ||
          ((obj.seq_kind() == SeqKind::Tuple || obj.seq_kind() == SeqKind::Range) &&
           (name == "count" || name == "index")))
        return method(obj, name);
      return no_attribute(obj, name);
    case Value::Kind::Namespace:
      if (const Value* v = obj.ns().attrs.find(name)) return *v;
      return no_attribute(obj, name);
    case Value::Kind::Loop: {
      const LoopData& l = obj.loop_data();
      const auto n = static_cast<int64_t>(l.items->size());
      if (name == "index0") return Value::integer(l.index0);
      if (name == "index") return Value::integer(l.index0 + 1);
      if (name == "revindex0") return Value::integer(n - l.index0 - 1);
      if (name == "revindex") return Value::integer(n - l.index0);
      if (name == "first") return Value::boolean(l.index0 == 0);
      if (name == "last") return Value::boolean(l.index0 == n - 1);
      if (name == "length") return Value::integer(n);
      if (name == "depth0") return Value::integer(l.depth0);
      if (name == "depth") return Value::integer(l.depth0 + 1);
      if (name == "previtem")
        return l.index0 > 0 ? (*l.items)[static_cast<size_t>(l.index0 - 1)]
                            : Value::undefined("there is no previous item");
      if (name == "nextitem")
        return l.index0 + 1 < n ? (*l.items)[static_cast<size_t>(l.index0 + 1)]
                                : Value::undefined("there is no next item");
      if (name == "cycle" || name == "changed") return method(obj, name);
      return no_attribute(obj, name);
    }
    default:
      return no_attribute(obj, name);
  }
}

Value get_item(const Value& obj, const Value& key) {
  if (obj.is_undefined()) throw RenderError(obj.undefined_message());
  auto no_element = [&]() {
    return Value::undefined(fmt::format("{} has no element {}", object_repr(obj), py_repr(key)));
  };
  switch (obj.kind()) {
    case Value::Kind::Dict:
      if (key.is_string()) {
        if (const Value* v = obj.dict_data().find(key.text())) return *v;
        return get_attr(obj, key.text());
      }
      return no_element();
    case Value::Kind::Seq:
    case Value::Kind::String: {
      if (key.is_string()) return get_attr(obj, key.text());
      const bool indexable = obj.is_string() || obj.seq_kind() == SeqKind::List ||
                             obj.seq_kind() == SeqKind::Tuple || obj.seq_kind() == SeqKind::Range;
      if (!indexable || !(key.is_int() || key.is_bool())) return no_element();
      int64_t i = key.as_int();
      if (obj.is_string()) {
        std::vector<std::string_view> cs = utf8_chars(obj.text());
        if (!normalize_index(i, cs.size())) return no_element();
        return Value::string(std::string(cs[static_cast<size_t>(i)]));
      }
      if (!normalize_index(i, obj.items().size())) return no_element();
      return obj.items()[static_cast<size_t>(i)];
    }
    default:
      if (key.is_string()) return get_attr(obj, key.text());
      return no_element();
  }
}

Value get_slice(const Value& obj, const Value& start, const Value& stop, const Value& step) {
  if (obj.is_undefined()) throw RenderError(obj.undefined_message());
  const bool indexable = obj.is_string() || (obj.is_seq() && (obj.seq_kind() == SeqKind::List ||
                                                              obj.seq_kind() == SeqKind::Tuple ||
                                                              obj.seq_kind() == SeqKind::Range));
  if (!indexable) {
    // Jinja slices with Python's own subscript, not through the environment.
    if (obj.is_dict()) type_error("unhashable type: 'slice'");
    type_error(fmt::format("'{}' object is not subscriptable", obj.type_name()));
  }
  auto index = [](const Value& v) -> std::optional<int64_t> {
    if (v.is_none()) return std::nullopt;
    if (!v.is_int() && !v.is_bool())
      type_error("slice indices must be integers or None or have an __index__ method");
    return v.as_int();
  };
  const std::optional<int64_t> b = index(start), e = index(stop), s = index(step);
  const int64_t st = s.value_or(1);
  if (st == 0) type_error("slice step cannot be zero");
  std::vector<std::string_view> chars;
  if (obj.is_string()) chars = utf8_chars(obj.text());
  const auto n = static_cast<int64_t>(obj.is_string() ? chars.size() : obj.items().size());
  // CPython's PySlice_AdjustIndices.
  auto adjust = [&](std::optional<int64_t> v, int64_t dflt) {
    if (!v) return dflt;
    int64_t i = *v;
    if (i < 0) {
      i += n;
      if (i < 0) i = st < 0 ? -1 : 0;
    } else if (i >= n) {
      i = st < 0 ? n - 1 : n;
    }
    return i;
  };
  const int64_t lo = adjust(b, st < 0 ? n - 1 : 0);
  const int64_t hi = adjust(e, st < 0 ? -1 : n);
  std::vector<size_t> picks;
  for (int64_t i = lo; st > 0 ? i < hi : i > hi; i += st) picks.push_back(static_cast<size_t>(i));
  if (obj.is_string()) {
    std::string out;
    for (size_t i : picks) out.append(chars[i]);
    return Value::string(std::move(out));
  }
  std::vector<Value> out;
  for (size_t i : picks) out.push_back(obj.items()[i]);
  return Value::seq(std::move(out),
                    obj.seq_kind() == SeqKind::Tuple ? SeqKind::Tuple : SeqKind::List);
}

// ---- methods ----------------------------------------------------------------------------------

Value call_method(const Value& obj, const std::string& name, CallArgs args) {
  if ((obj.is_dict() || (obj.is_seq() && obj.seq_kind() == SeqKind::List)) &&
      mutating_methods().count(name))
    throw RenderError(
        fmt::format("access to attribute '{}' of '{}' object is unsafe.", name, obj.type_name()));
  if (obj.is_string()) return string_method(obj.text(), name, args);
  if (obj.is_dict()) {
    const DictData& d = obj.dict_data();
    if (name == "get") {
      if (!args.kwargs.empty()) type_error("get() takes no keyword arguments");
      if (args.args.empty() || args.args.size() > 2)
        type_error(fmt::format("get expected 1 or 2 arguments, got {}", args.args.size()));
      const Value& key = args.args[0];
      const Value* v = key.is_string() ? d.find(key.text()) : nullptr;
      if (v) return *v;
      return args.args.size() > 1 ? args.args[1] : Value::none();
    }
    Params p(name, args, {});
    if (name == "copy") return obj;
    std::vector<Value> out;
    for (const auto& [k, v] : d.items) {
      if (name == "keys") {
        out.push_back(Value::string(k));
      } else if (name == "values") {
        out.push_back(v);
      } else {
        out.push_back(Value::seq({Value::string(k), v}, SeqKind::Tuple));
      }
    }
    if (name == "keys") return Value::seq(std::move(out), SeqKind::DictKeys);
    if (name == "values") return Value::seq(std::move(out), SeqKind::DictValues);
    if (name == "items") return Value::seq(std::move(out), SeqKind::DictItems);
  }
  if (obj.is_seq()) {
    if (name == "copy") return Value::seq(obj.items(), SeqKind::List);
    if (name == "count" || name == "index") {
      if (args.args.empty()) type_error(fmt::format("{}() takes at least 1 argument", name));
      const auto& items = obj.items();
      int64_t n = 0;
      for (size_t i = 0; i < items.size(); ++i) {
        if (!py_equal(items[i], args.args[0])) continue;
        if (name == "index") return Value::integer(static_cast<int64_t>(i));
        ++n;
      }
      if (name == "index") type_error(fmt::format("{} is not in list", py_repr(args.args[0])));
      return Value::integer(n);
    }
  }
  if (obj.kind() == Value::Kind::Loop) {
    LoopData& l = obj.loop_data();
    if (!args.kwargs.empty()) type_error(fmt::format("loop.{}() takes no keyword arguments", name));
    if (name == "cycle") {
      if (args.args.empty()) type_error("no items for cycling given");
      return args.args[static_cast<size_t>(l.index0) % args.args.size()];
    }
    if (name == "changed") {
      bool same = l.has_changed_value && l.last_changed_value.size() == args.args.size();
      for (size_t i = 0; same && i < args.args.size(); ++i)
        same = py_equal(l.last_changed_value[i], args.args[i]);
      if (same) return Value::boolean(false);
      l.has_changed_value = true;
      l.last_changed_value = std::move(args.args);
      return Value::boolean(true);
    }
  }
  type_error(
      fmt::format("the method '{}' of '{}' objects is not supported", name, obj.type_name()));
}

// ---- global functions -------------------------------------------------------------------------

Value call_builtin(const std::string& name, CallArgs args) {
  if (name == "range") {
    if (!args.kwargs.empty()) type_error("range() takes no keyword arguments");
    std::vector<int64_t> n;
    for (const Value& v : args.args) {
      if (!v.is_int() && !v.is_bool())
        type_error(fmt::format("'{}' object cannot be interpreted as an integer", v.type_name()));
      n.push_back(v.as_int());
    }
    if (n.empty() || n.size() > 3)
      type_error(fmt::format("range expected at most 3 arguments, got {}", n.size()));
    const int64_t start = n.size() == 1 ? 0 : n[0];
    const int64_t stop = n.size() == 1 ? n[0] : n[1];
    const int64_t stride = n.size() == 3 ? n[2] : 1;
    if (stride == 0) type_error("range() arg 3 must not be zero");
    const double count = stride > 0 ? std::ceil((static_cast<double>(stop) - start) / stride)
                                    : std::ceil((static_cast<double>(start) - stop) / -stride);
    if (count > 100000)
      type_error("Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
    std::vector<Value> items;
    for (int64_t i = start; stride > 0 ? i < stop : i > stop; i += stride)
      items.push_back(Value::integer(i));
    const std::string repr = stride == 1 ? fmt::format("range({}, {})", start, stop)
                                         : fmt::format("range({}, {}, {})", start, stop, stride);
    return Value::range(std::move(items), repr);
  }
  if (name == "dict" || name == "namespace") {
    if (args.args.size() > 1)
      type_error(fmt::format("{} expected at most 1 argument, got {}", name, args.args.size()));
    DictData d;
    if (!args.args.empty()) {
      const Value& src = args.args[0];
      if (src.is_dict()) {
        d = src.dict_data();
      } else {
        for (const Value& pair : iterate(src)) {
          std::vector<Value> kv = iterate(pair);
          if (kv.size() != 2)
            type_error("dictionary update sequence element has the wrong length; 2 is required");
          if (!kv[0].is_string()) type_error("dict keys must be strings here");
          d.set(kv[0].text(), kv[1]);
        }
      }
    }
    for (auto& [k, v] : args.kwargs) d.set(k, std::move(v));
    if (name == "dict") return Value::dict(std::move(d));
    for (const auto& kv : d.items)
      if (!kv.first.empty() && kv.first[0] == '_')
        type_error(
            fmt::format("Chat templates cannot store underscore-prefixed attributes on a "
                        "namespace, but got {}. Please rename the attribute.",
                        py_repr_string(kv.first)));
    auto ns = std::make_shared<NamespaceData>();
    ns->attrs = std::move(d);
    return Value::namespace_(std::move(ns));
  }
  if (name == "strftime_now") {
    Params p(name, args, {"format"});
    const std::string& f = need_string(p.opt(0), "strftime_now() format");
    const std::time_t now = std::time(nullptr);
    std::tm tm{};
    localtime_r(&now, &tm);
    std::string buf(256 + f.size() * 8, '\0');
    const size_t n = std::strftime(buf.data(), buf.size(), f.c_str(), &tm);
    if (n == 0 && !f.empty()) type_error("strftime_now(): the formatted date is too long");
    buf.resize(n);
    return Value::string(std::move(buf));
  }
  type_error(fmt::format("unknown function '{}'", name));
}

}  // namespace moemesh::jinja
