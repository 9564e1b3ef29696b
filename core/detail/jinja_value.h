// Values of the chat-template interpreter (core/chat_template.h): the Python objects a Jinja
// template sees, with Python's semantics for printing (str/repr), truth, equality, ordering and
// arithmetic, so that a render is byte-identical to Jinja2's. Internal to core.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace moemesh::jinja {

// A runtime error of a render (Jinja's TemplateError, UndefinedError, TypeError, ...). Thrown
// inside the interpreter only; ChatTemplate::render converts it to an Error.
class RenderError : public std::runtime_error {
 public:
  explicit RenderError(const std::string& message, int line = 0)
      : std::runtime_error(message), line_(line) {}
  int line() const { return line_; }
  void set_line(int line) {
    if (line_ == 0) line_ = line;
  }

 private:
  int line_;
};

// A syntax error or an unsupported construct, found while parsing.
class ParseError : public std::runtime_error {
 public:
  ParseError(const std::string& message, int line) : std::runtime_error(message), line_(line) {}
  int line() const { return line_; }

 private:
  int line_;
};

// Nesting deeper than this in the data a template receives is refused (the printers and converters
// recurse over it).
constexpr int kMaxDataDepth = 256;
// No single string or list a render builds may exceed this many bytes.
constexpr size_t kMaxBuild = size_t{1} << 28;

// Throws when a string or list a render builds would exceed kMaxBuild.
inline void check_size(size_t n) {
  if (n > kMaxBuild)
    throw RenderError("the result would exceed 256 MiB, the most a chat template may build");
}

// True while the calling thread has enough stack left for another level of nesting (templates
// are parsed and run recursively; the nesting caps alone do not fit every thread's stack).
bool stack_ok();

class Value;
struct ListData;
struct DictData;
struct NamespaceData;
struct Function;
struct LoopData;

// What a sequence value is in Python: a list, a tuple, a one-shot iterator (the result of map,
// select, reverse, ...), a view of a dict, or a range.
enum class SeqKind : uint8_t { List, Tuple, Iterator, DictKeys, DictValues, DictItems, Range };

class Value {
 public:
  enum class Kind : uint8_t {
    Undefined,
    None,
    Bool,
    Int,
    Float,
    String,
    Seq,
    Dict,
    Namespace,
    Function,
    Loop
  };

  Value() = default;  // undefined, without a hint
  static Value undefined(std::string hint) {
    Value v;
    v.text_ = std::move(hint);
    return v;
  }
  static Value none() { return Value(Kind::None); }
  static Value boolean(bool b) {
    Value v(Kind::Bool);
    v.int_ = b ? 1 : 0;
    return v;
  }
  static Value integer(int64_t i) {
    Value v(Kind::Int);
    v.int_ = i;
    return v;
  }
  static Value number(double d) {
    Value v(Kind::Float);
    v.float_ = d;
    return v;
  }
  static Value string(std::string s) {
    Value v(Kind::String);
    v.text_ = std::move(s);
    return v;
  }
  static Value seq(std::vector<Value> items, SeqKind kind = SeqKind::List);
  // range(...): its items, and its repr ("range(0, 3)").
  static Value range(std::vector<Value> items, std::string repr);
  static Value dict(std::shared_ptr<const DictData> d);
  static Value dict(DictData d);
  static Value namespace_(std::shared_ptr<NamespaceData> ns);
  static Value function(std::shared_ptr<const Function> f);
  static Value loop(std::shared_ptr<LoopData> l);

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::Undefined; }
  bool is_none() const { return kind_ == Kind::None; }
  bool is_bool() const { return kind_ == Kind::Bool; }
  bool is_int() const { return kind_ == Kind::Int; }
  bool is_float() const { return kind_ == Kind::Float; }
  bool is_string() const { return kind_ == Kind::String; }
  bool is_seq() const { return kind_ == Kind::Seq; }
  bool is_dict() const { return kind_ == Kind::Dict; }
  // int, float or bool: Python's numbers.Number.
  bool is_number() const {
    return kind_ == Kind::Int || kind_ == Kind::Float || kind_ == Kind::Bool;
  }

  bool as_bool() const { return int_ != 0; }
  int64_t as_int() const { return int_; }  // Int or Bool
  double as_float() const { return kind_ == Kind::Float ? float_ : static_cast<double>(int_); }
  const std::string& text() const { return text_; }  // String; Undefined: its hint; Range: repr
  SeqKind seq_kind() const { return seq_kind_; }
  const std::vector<Value>& items() const;  // Seq
  const DictData& dict_data() const { return *dict_; }
  const std::shared_ptr<const DictData>& dict_ptr() const { return dict_; }
  NamespaceData& ns() const { return *ns_; }
  const std::shared_ptr<NamespaceData>& ns_ptr() const { return ns_; }
  const Function& fn() const { return *fn_; }
  LoopData& loop_data() const { return *loop_; }

  // Python's type name: "str", "int", "dict", "NoneType", ...
  std::string type_name() const;
  // The message of an undefined value ("'x' is undefined").
  std::string undefined_message() const;

 private:
  explicit Value(Kind k) : kind_(k) {}

  Kind kind_ = Kind::Undefined;
  SeqKind seq_kind_ = SeqKind::List;
  int64_t int_ = 0;
  double float_ = 0;
  std::string text_;
  std::shared_ptr<const ListData> list_;
  std::shared_ptr<const DictData> dict_;
  std::shared_ptr<NamespaceData> ns_;
  std::shared_ptr<const Function> fn_;
  std::shared_ptr<LoopData> loop_;
};

struct ListData {
  std::vector<Value> items;
};

// A dict with string keys, in insertion order (Python's dict).
struct DictData {
  std::vector<std::pair<std::string, Value>> items;
  std::unordered_map<std::string, size_t> index;

  const Value* find(const std::string& key) const {
    auto it = index.find(key);
    return it == index.end() ? nullptr : &items[it->second].second;
  }
  // Sets key to value; a new key goes last, an existing one keeps its place.
  void set(const std::string& key, Value value) {
    auto it = index.find(key);
    if (it != index.end()) {
      items[it->second].second = std::move(value);
      return;
    }
    index.emplace(key, items.size());
    items.emplace_back(key, std::move(value));
  }
};

// jinja2.utils.Namespace: the only mutable object of a sandboxed template.
struct NamespaceData {
  DictData attrs;
};

// The state of a running for loop, as `loop` shows it.
struct LoopData {
  std::shared_ptr<const std::vector<Value>> items;
  int64_t index0 = 0;
  int64_t depth0 = 0;
  bool has_changed_value = false;
  std::vector<Value> last_changed_value;
};

// ---- Python semantics -------------------------------------------------------------------------

// str(v): what {{ v }} prints. Undefined prints nothing.
std::string py_str(const Value& v);
// repr(v).
std::string py_repr(const Value& v);
// repr(s) of a str.
std::string py_repr_string(std::string_view s);
// repr(d) of a float, Python's shortest round-trip form ("1.0", "1e-05", "inf").
std::string py_float_repr(double d);
bool truthy(const Value& v);
bool py_equal(const Value& a, const Value& b);
// a < b as Python compares them; throws RenderError on unorderable types.
bool py_less(const Value& a, const Value& b);
// `a op b` for op in ==, !=, <, <=, >, >=.
bool py_compare(const std::string& op, const Value& a, const Value& b);

// Binary operators of Jinja ("+", "-", "*", "/", "//", "%", "**"), with Python's int/float rules.
Value binary_op(const std::string& op, const Value& a, const Value& b);
Value negate(const Value& v, bool minus);
// `a in b`.
bool contains(const Value& container, const Value& item);
// Iterates v as a for loop does: a list's items, a dict's keys, a str's characters; undefined is
// empty. Throws for what is not iterable.
std::vector<Value> iterate(const Value& v);
// len(v); throws for what has no length. Undefined has length 0.
int64_t length(const Value& v);

// json.dumps(v, ensure_ascii, indent, separators, sort_keys) as transformers' tojson filter.
struct JsonStyle {
  bool ensure_ascii = false;
  bool has_indent = false;
  std::string indent;  // the indent string, when has_indent
  bool has_separators = false;
  std::string item_separator = ", ";
  std::string key_separator = ": ";
  bool sort_keys = false;
};
std::string to_json(const Value& v, const JsonStyle& style);

// printf-style `format % args` (Python's str.__mod__ for %s, %r, %d, %i, %f).
std::string printf_format(const std::string& format, const Value& args);

// JSON -> Value (objects keep the key order of the json type: sorted for nlohmann::json, insertion
// order for nlohmann::ordered_json).
Value from_json(const nlohmann::json& j);
Value from_json(const nlohmann::ordered_json& j);

// ---- UTF-8 helpers (str is indexed by code point, as in Python) ------------------------------

std::vector<std::string_view> utf8_chars(std::string_view s);
int64_t utf8_length(std::string_view s);
// Python's str.isspace() for one code point.
bool is_py_space(char32_t c);
char32_t decode_utf8(std::string_view ch);
void append_utf8(std::string& out, char32_t c);

// Python's str.strip/lstrip/rstrip; chars == nullptr strips whitespace.
std::string py_strip(std::string_view s, const std::string* chars, bool left, bool right);
// Python's str.upper, lower, title and capitalize (full case mappings, final sigma).
std::string py_upper(std::string_view s);
std::string py_lower(std::string_view s);
std::string py_title(std::string_view s);
std::string py_capitalize(std::string_view s);
// Python's str.splitlines().
std::vector<std::string> py_splitlines(std::string_view s, bool keepends = false);

}  // namespace moemesh::jinja
