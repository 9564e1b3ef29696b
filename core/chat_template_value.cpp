// Python semantics of the chat-template interpreter's values: str/repr, truth, comparisons,
// arithmetic and iteration (see core/detail/jinja_value.h).
#include <fmt/format.h>
#include <utf8proc.h>

#include <pthread.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>

#include "core/detail/jinja_value.h"

namespace moemesh::jinja {
namespace {

[[noreturn]] void type_error(const std::string& message) {
  throw RenderError(message);
}

}  // namespace

// ---- stack ----

bool stack_ok() {
  // The lowest address this thread's stack may grow to, plus a margin for the frames that run
  // between two checks (and for what the caller does with an error).
  thread_local uintptr_t limit = [] {
    pthread_attr_t attr;
    uintptr_t low = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      void* addr = nullptr;
      size_t size = 0;
      if (pthread_attr_getstack(&attr, &addr, &size) == 0)
        low = reinterpret_cast<uintptr_t>(addr) + std::min<size_t>(size / 2, 64 * 1024);
      pthread_attr_destroy(&attr);
    }
    return low;
  }();
  const auto here = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  return limit == 0 || here > limit;
}

// ---- Value ------------------------------------------------------------------------------------

Value Value::seq(std::vector<Value> items, SeqKind kind) {
  Value v(Kind::Seq);
  v.seq_kind_ = kind;
  auto data = std::make_shared<ListData>();
  data->items = std::move(items);
  v.list_ = std::move(data);
  return v;
}

Value Value::range(std::vector<Value> items, std::string repr) {
  Value v = seq(std::move(items), SeqKind::Range);
  v.text_ = std::move(repr);
  return v;
}

Value Value::dict(std::shared_ptr<const DictData> d) {
  Value v(Kind::Dict);
  v.dict_ = std::move(d);
  return v;
}

Value Value::dict(DictData d) {
  return dict(std::make_shared<const DictData>(std::move(d)));
}

Value Value::namespace_(std::shared_ptr<NamespaceData> ns) {
  Value v(Kind::Namespace);
  v.ns_ = std::move(ns);
  return v;
}

Value Value::function(std::shared_ptr<const Function> f) {
  Value v(Kind::Function);
  v.fn_ = std::move(f);
  return v;
}

Value Value::loop(std::shared_ptr<LoopData> l) {
  Value v(Kind::Loop);
  v.loop_ = std::move(l);
  return v;
}

const std::vector<Value>& Value::items() const {
  return list_->items;
}

std::string Value::type_name() const {
  switch (kind_) {
    case Kind::Undefined:
      return "Undefined";
    case Kind::None:
      return "NoneType";
    case Kind::Bool:
      return "bool";
    case Kind::Int:
      return "int";
    case Kind::Float:
      return "float";
    case Kind::String:
      return "str";
    case Kind::Seq:
      switch (seq_kind_) {
        case SeqKind::List:
          return "list";
        case SeqKind::Tuple:
          return "tuple";
        case SeqKind::Iterator:
          return "generator";
        case SeqKind::DictKeys:
          return "dict_keys";
        case SeqKind::DictValues:
          return "dict_values";
        case SeqKind::DictItems:
          return "dict_items";
        case SeqKind::Range:
          return "range";
      }
      return "list";
    case Kind::Dict:
      return "dict";
    case Kind::Namespace:
      return "Namespace";
    case Kind::Function:
      return "function";
    case Kind::Loop:
      return "LoopContext";
  }
  return "object";
}

std::string Value::undefined_message() const {
  return text_.empty() ? std::string("value is undefined") : text_;
}

// ---- str / repr -------------------------------------------------------------------------------

std::string py_float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  if (d == 0) return std::signbit(d) ? "-0.0" : "0.0";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  // sci is [-]D[.DDD]e[+-]XX
  bool neg = sci[0] == '-';
  if (neg) sci.erase(0, 1);
  const size_t epos = sci.find('e');
  std::string digits = sci.substr(0, epos);
  const int exp = std::stoi(sci.substr(epos + 1));
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int decpt = exp + 1;  // position of the decimal point in digits
  const int nd = static_cast<int>(digits.size());
  std::string out = neg ? "-" : "";
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) {
      out += "0." + std::string(static_cast<size_t>(-decpt), '0') + digits;
    } else if (decpt >= nd) {
      out += digits + std::string(static_cast<size_t>(decpt - nd), '0') + ".0";
    } else {
      out += digits.substr(0, static_cast<size_t>(decpt)) + "." +
             digits.substr(static_cast<size_t>(decpt));
    }
  } else {
    out += digits.substr(0, 1);
    if (nd > 1) {
      out += '.';
      out.append(digits, 1);
    }
    out += fmt::format("e{}{:02d}", exp < 0 ? '-' : '+', std::abs(exp));
  }
  return out;
}

namespace {

bool is_printable(char32_t c) {
  if (c < 0x20 || c == 0x7F) return false;
  if (c < 0x7F) return true;
  if (c == 0x20) return true;
  switch (utf8proc_category(static_cast<int32_t>(c))) {
    case UTF8PROC_CATEGORY_CC:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO:
    case UTF8PROC_CATEGORY_CN:
    case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP:
    case UTF8PROC_CATEGORY_ZS:
      return false;
    default:
      return true;
  }
}

void repr_into(std::string& out, const Value& v, int depth);

void repr_seq(std::string& out, const std::vector<Value>& items, const char* open,
              const char* close, bool tuple, int depth) {
  out += open;
  for (size_t i = 0; i < items.size(); ++i) {
    if (i) out += ", ";
    repr_into(out, items[i], depth + 1);
  }
  if (tuple && items.size() == 1) out += ",";
  out += close;
}

void repr_dict(std::string& out, const DictData& d, int depth) {
  out += "{";
  for (size_t i = 0; i < d.items.size(); ++i) {
    if (i) out += ", ";
    out += py_repr_string(d.items[i].first);
    out += ": ";
    repr_into(out, d.items[i].second, depth + 1);
  }
  out += "}";
}

void repr_into(std::string& out, const Value& v, int depth) {
  if (depth > kMaxDataDepth) type_error("data nested too deeply to print");
  switch (v.kind()) {
    case Value::Kind::String:
      out += py_repr_string(v.text());
      return;
    case Value::Kind::Undefined:
      out += "Undefined";
      return;
    case Value::Kind::Seq:
      switch (v.seq_kind()) {
        case SeqKind::List:
          repr_seq(out, v.items(), "[", "]", false, depth);
          return;
        case SeqKind::Tuple:
          repr_seq(out, v.items(), "(", ")", true, depth);
          return;
        case SeqKind::DictKeys:
          repr_seq(out, v.items(), "dict_keys([", "])", false, depth);
          return;
        case SeqKind::DictValues:
          repr_seq(out, v.items(), "dict_values([", "])", false, depth);
          return;
        case SeqKind::DictItems:
          repr_seq(out, v.items(), "dict_items([", "])", false, depth);
          return;
        case SeqKind::Range:
          out += v.text();
          return;
        case SeqKind::Iterator:
          type_error(
              "cannot print an iterator (Jinja prints its memory address); convert it with |list "
              "first");
      }
      return;
    case Value::Kind::Dict:
      repr_dict(out, v.dict_data(), depth);
      return;
    case Value::Kind::Namespace:
      out += "<Namespace ";
      repr_dict(out, v.ns().attrs, depth);
      out += ">";
      return;
    default:
      out += py_str(v);
  }
}

}  // namespace

std::string py_repr_string(std::string_view s) {
  const bool has_single = s.find('\'') != std::string_view::npos;
  const bool has_double = s.find('"') != std::string_view::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  for (std::string_view ch : utf8_chars(s)) {
    const char32_t c = decode_utf8(ch);
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (ch.size() == 1 && static_cast<unsigned char>(ch[0]) >= 0x80) {
      out += fmt::format("\\x{:02x}",
                         static_cast<unsigned char>(ch[0]));  // invalid UTF-8
    } else if (!is_printable(c)) {
      if (c < 0x100) {
        out += fmt::format("\\x{:02x}", static_cast<unsigned>(c));
      } else if (c < 0x10000) {
        out += fmt::format("\\u{:04x}", static_cast<unsigned>(c));
      } else {
        out += fmt::format("\\U{:08x}", static_cast<unsigned>(c));
      }
    } else {
      out.append(ch);
    }
  }
  out += quote;
  return out;
}

std::string py_str(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::Undefined:
      return "";
    case Value::Kind::None:
      return "None";
    case Value::Kind::Bool:
      return v.as_bool() ? "True" : "False";
    case Value::Kind::Int:
      return std::to_string(v.as_int());
    case Value::Kind::Float:
      return py_float_repr(v.as_float());
    case Value::Kind::String:
      return v.text();
    case Value::Kind::Function:
      type_error("cannot print a function (Jinja prints its memory address)");
    case Value::Kind::Loop:
      return fmt::format("<LoopContext {}/{}>", v.loop_data().index0 + 1,
                         v.loop_data().items->size());
    default: {
      std::string out;
      repr_into(out, v, 0);
      return out;
    }
  }
}

std::string py_repr(const Value& v) {
  std::string out;
  repr_into(out, v, 0);
  return out;
}

// ---- truth, equality, order -------------------------------------------------------------------

bool truthy(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::Undefined:
    case Value::Kind::None:
      return false;
    case Value::Kind::Bool:
    case Value::Kind::Int:
      return v.as_int() != 0;
    case Value::Kind::Float:
      return v.as_float() != 0.0;
    case Value::Kind::String:
      return !v.text().empty();
    case Value::Kind::Seq:
      return v.seq_kind() == SeqKind::Iterator || !v.items().empty();
    case Value::Kind::Dict:
      return !v.dict_data().items.empty();
    default:
      return true;
  }
}

bool py_equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) return a.as_float() == b.as_float();
    return a.as_int() == b.as_int();
  }
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case Value::Kind::Undefined:
    case Value::Kind::None:
      return true;
    case Value::Kind::String:
      return a.text() == b.text();
    case Value::Kind::Seq: {
      if (a.seq_kind() != b.seq_kind()) return false;
      if (a.seq_kind() == SeqKind::Iterator) return &a.items() == &b.items();
      const auto& x = a.items();
      const auto& y = b.items();
      if (x.size() != y.size()) return false;
      for (size_t i = 0; i < x.size(); ++i)
        if (!py_equal(x[i], y[i])) return false;
      return true;
    }
    case Value::Kind::Dict: {
      const DictData& x = a.dict_data();
      const DictData& y = b.dict_data();
      if (x.items.size() != y.items.size()) return false;
      for (const auto& [k, val] : x.items) {
        const Value* other = y.find(k);
        if (!other || !py_equal(val, *other)) return false;
      }
      return true;
    }
    case Value::Kind::Namespace:
      return &a.ns() == &b.ns();
    case Value::Kind::Function:
      return &a.fn() == &b.fn();
    case Value::Kind::Loop:
      return &a.loop_data() == &b.loop_data();
    default:
      return false;
  }
}

namespace {

// -1, 0 or 1; throws for unorderable operands of `op`.
int py_order(const char* op, const Value& a, const Value& b) {
  if (a.is_undefined()) throw RenderError(a.undefined_message());
  if (b.is_undefined()) throw RenderError(b.undefined_message());
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) {
      const double x = a.as_float(), y = b.as_float();
      return x < y ? -1 : x > y ? 1 : 0;  // nan: 0, as no comparison with it holds
    }
    return a.as_int() < b.as_int() ? -1 : a.as_int() > b.as_int() ? 1 : 0;
  }
  if (a.is_string() && b.is_string()) {
    const int c = a.text().compare(b.text());
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  if (a.is_seq() && b.is_seq() && a.seq_kind() == b.seq_kind() &&
      (a.seq_kind() == SeqKind::List || a.seq_kind() == SeqKind::Tuple)) {
    const auto& x = a.items();
    const auto& y = b.items();
    for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
      if (py_equal(x[i], y[i])) continue;
      return py_order(op, x[i], y[i]);
    }
    return x.size() < y.size() ? -1 : x.size() > y.size() ? 1 : 0;
  }
  type_error(fmt::format("'{}' not supported between instances of '{}' and '{}'", op, a.type_name(),
                         b.type_name()));
}

}  // namespace

bool py_less(const Value& a, const Value& b) {
  if ((a.is_float() && std::isnan(a.as_float())) || (b.is_float() && std::isnan(b.as_float())))
    return false;
  return py_order("<", a, b) < 0;
}

bool py_compare(const std::string& op, const Value& a, const Value& b) {
  if (op == "==") return py_equal(a, b);
  if (op == "!=") return !py_equal(a, b);
  const bool nan =
      (a.is_float() && std::isnan(a.as_float())) || (b.is_float() && std::isnan(b.as_float()));
  const int c = py_order(op.c_str(), a, b);
  if (nan) return false;
  if (op == "<") return c < 0;
  if (op == "<=") return c <= 0;
  if (op == ">") return c > 0;
  return c >= 0;  // ">="
}

// ---- arithmetic -------------------------------------------------------------------------------

namespace {

[[noreturn]] void unsupported(const std::string& op, const Value& a, const Value& b) {
  type_error(fmt::format("unsupported operand type(s) for {}: '{}' and '{}'", op, a.type_name(),
                         b.type_name()));
}

void check_overflow(bool overflow) {
  if (overflow)
    type_error("integer overflow: the result does not fit in 64 bits (moemesh's integers)");
}

Value repeat(const Value& s, int64_t n) {
  if (n <= 0) return s.is_string() ? Value::string("") : Value::seq({}, s.seq_kind());
  if (s.is_string()) {
    if (s.text().size() * static_cast<size_t>(n) > kMaxBuild || n > static_cast<int64_t>(kMaxBuild))
      type_error("string repetition result too large");
    std::string out;
    out.reserve(s.text().size() * static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) out += s.text();
    return Value::string(std::move(out));
  }
  if (s.items().size() * static_cast<size_t>(n) > kMaxBuild / 64 ||
      n > static_cast<int64_t>(kMaxBuild))
    type_error("list repetition result too large");
  std::vector<Value> out;
  for (int64_t i = 0; i < n; ++i) out.insert(out.end(), s.items().begin(), s.items().end());
  return Value::seq(std::move(out), s.seq_kind());
}

// CPython's float floor division and modulo.
void float_divmod(double vx, double wx, double* floordiv, double* mod) {
  double m = std::fmod(vx, wx);
  double div = (vx - m) / wx;
  if (m != 0.0) {
    if ((wx < 0) != (m < 0)) {
      m += wx;
      div -= 1.0;
    }
  } else {
    m = std::copysign(0.0, wx);
  }
  double fd;
  if (div != 0.0) {
    fd = std::floor(div);
    if (div - fd > 0.5) fd += 1.0;
  } else {
    fd = std::copysign(0.0, vx / wx);
  }
  *floordiv = fd;
  *mod = m;
}

}  // namespace

Value binary_op(const std::string& op, const Value& a, const Value& b) {
  // str % undefined is Python's str.__mod__ with a "mapping": it never touches the operand.
  if (op == "%" && a.is_string()) return Value::string(printf_format(a.text(), b));
  if (a.is_undefined()) throw RenderError(a.undefined_message());
  if (b.is_undefined()) throw RenderError(b.undefined_message());
  const bool nums = a.is_number() && b.is_number();
  const bool ints = nums && !a.is_float() && !b.is_float();
  if (op == "+") {
    if (ints) {
      int64_t r = 0;
      check_overflow(__builtin_add_overflow(a.as_int(), b.as_int(), &r));
      return Value::integer(r);
    }
    if (nums) return Value::number(a.as_float() + b.as_float());
    if (a.is_string() && b.is_string()) {
      if (a.text().size() + b.text().size() > kMaxBuild) type_error("string too large");
      return Value::string(a.text() + b.text());
    }
    if (a.is_seq() && b.is_seq() && a.seq_kind() == b.seq_kind() &&
        (a.seq_kind() == SeqKind::List || a.seq_kind() == SeqKind::Tuple)) {
      std::vector<Value> out = a.items();
      out.insert(out.end(), b.items().begin(), b.items().end());
      return Value::seq(std::move(out), a.seq_kind());
    }
    if (a.is_string() || (a.is_seq() && a.seq_kind() == SeqKind::List))
      type_error(fmt::format("can only concatenate {} (not \"{}\") to {}", a.type_name(),
                             b.type_name(), a.type_name()));
    unsupported("+", a, b);
  }
  if (op == "-") {
    if (ints) {
      int64_t r = 0;
      check_overflow(__builtin_sub_overflow(a.as_int(), b.as_int(), &r));
      return Value::integer(r);
    }
    if (nums) return Value::number(a.as_float() - b.as_float());
    unsupported("-", a, b);
  }
  if (op == "*") {
    if (ints) {
      int64_t r = 0;
      check_overflow(__builtin_mul_overflow(a.as_int(), b.as_int(), &r));
      return Value::integer(r);
    }
    if (nums) return Value::number(a.as_float() * b.as_float());
    auto seqlike = [](const Value& v) {
      return v.is_string() ||
             (v.is_seq() && (v.seq_kind() == SeqKind::List || v.seq_kind() == SeqKind::Tuple));
    };
    if (seqlike(a) && (b.is_int() || b.is_bool())) return repeat(a, b.as_int());
    if (seqlike(b) && (a.is_int() || a.is_bool())) return repeat(b, a.as_int());
    if (seqlike(a) || seqlike(b))
      type_error(fmt::format("can't multiply sequence by non-int of type '{}'",
                             seqlike(a) ? b.type_name() : a.type_name()));
    unsupported("*", a, b);
  }
  if (op == "/") {
    if (!nums) unsupported("/", a, b);
    if (b.as_float() == 0.0) type_error("division by zero");
    return Value::number(a.as_float() / b.as_float());
  }
  if (op == "//" || op == "%") {
    if (op == "%" && a.is_string()) return Value::string(printf_format(a.text(), b));
    if (!nums) unsupported(op, a, b);
    if (ints) {
      const int64_t x = a.as_int(), y = b.as_int();
      if (y == 0) type_error("integer division or modulo by zero");
      if (x == std::numeric_limits<int64_t>::min() && y == -1) check_overflow(true);
      int64_t q = x / y, r = x % y;
      if (r != 0 && ((r < 0) != (y < 0))) {
        r += y;
        q -= 1;
      }
      return Value::integer(op == "//" ? q : r);
    }
    if (b.as_float() == 0.0) type_error("float floor division by zero");
    double fd, m;
    float_divmod(a.as_float(), b.as_float(), &fd, &m);
    return Value::number(op == "//" ? fd : m);
  }
  if (op == "**") {
    if (!nums) unsupported("** or pow()", a, b);
    if (ints && b.as_int() >= 0) {
      int64_t base = a.as_int(), e = b.as_int(), r = 1;
      while (e > 0) {
        if (e & 1) check_overflow(__builtin_mul_overflow(r, base, &r));
        e >>= 1;
        if (e > 0) check_overflow(__builtin_mul_overflow(base, base, &base));
      }
      return Value::integer(r);
    }
    if (a.as_float() == 0.0 && b.as_float() < 0)
      type_error("0.0 cannot be raised to a negative power");
    return Value::number(std::pow(a.as_float(), b.as_float()));
  }
  type_error("unknown operator " + op);
}

Value negate(const Value& v, bool minus) {
  if (v.is_undefined()) throw RenderError(v.undefined_message());
  if (v.is_float()) return Value::number(minus ? -v.as_float() : v.as_float());
  if (v.is_int() || v.is_bool()) {
    if (!minus) return Value::integer(v.as_int());
    if (v.as_int() == std::numeric_limits<int64_t>::min()) check_overflow(true);
    return Value::integer(-v.as_int());
  }
  type_error(fmt::format("bad operand type for unary {}: '{}'", minus ? '-' : '+', v.type_name()));
}

// ---- containers -------------------------------------------------------------------------------

bool contains(const Value& container, const Value& item) {
  switch (container.kind()) {
    case Value::Kind::String:
      if (!item.is_string())
        type_error(
            fmt::format("'in <string>' requires string as left operand, not {}", item.type_name()));
      return container.text().find(item.text()) != std::string::npos;
    case Value::Kind::Seq:
      for (const Value& v : container.items())
        if (py_equal(v, item)) return true;
      return false;
    case Value::Kind::Dict:
      if (item.is_dict() || (item.is_seq() && item.seq_kind() == SeqKind::List) ||
          item.kind() == Value::Kind::Namespace)
        type_error(fmt::format("unhashable type: '{}'", item.type_name()));
      return item.is_string() && container.dict_data().find(item.text()) != nullptr;
    case Value::Kind::Undefined:
      return false;
    default:
      type_error(fmt::format("argument of type '{}' is not iterable", container.type_name()));
  }
}

std::vector<Value> iterate(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::Undefined:
      return {};
    case Value::Kind::Seq:
      return v.items();
    case Value::Kind::Dict: {
      std::vector<Value> keys;
      keys.reserve(v.dict_data().items.size());
      for (const auto& kv : v.dict_data().items) keys.push_back(Value::string(kv.first));
      return keys;
    }
    case Value::Kind::String: {
      std::vector<Value> out;
      for (std::string_view c : utf8_chars(v.text())) out.push_back(Value::string(std::string(c)));
      return out;
    }
    default:
      type_error(fmt::format("'{}' object is not iterable", v.type_name()));
  }
}

int64_t length(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::Undefined:
      return 0;
    case Value::Kind::String:
      return utf8_length(v.text());
    case Value::Kind::Seq:
      if (v.seq_kind() == SeqKind::Iterator) type_error("object of type 'generator' has no len()");
      return static_cast<int64_t>(v.items().size());
    case Value::Kind::Dict:
      return static_cast<int64_t>(v.dict_data().items.size());
    default:
      type_error(fmt::format("object of type '{}' has no len()", v.type_name()));
  }
}

}  // namespace moemesh::jinja
