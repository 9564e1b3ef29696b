// Normalizers and pre-tokenizers of tokenizer.json (core/detail/tokenizer_pipeline.h), ported
// from the `tokenizers` library 0.23.
#include "core/detail/tokenizer_pipeline.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <optional>

#include "core/detail/tokenizer_json.h"
#include "core/detail/tokenizer_text.h"

namespace moemesh::tokenizer_detail {
namespace {

using nlohmann::json;

// ---- Splitting ---------------------------------------------------------------------------------

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

std::optional<Behavior> parse_behavior(const std::string& s) {
  if (s == "Removed") return Behavior::Removed;
  if (s == "Isolated") return Behavior::Isolated;
  if (s == "MergedWithPrevious") return Behavior::MergedWithPrevious;
  if (s == "MergedWithNext") return Behavior::MergedWithNext;
  if (s == "Contiguous") return Behavior::Contiguous;
  return std::nullopt;
}

// NormalizedString::split: turns the spans of a pattern into the kept parts of `p`.
void split_piece(const Piece& p, std::vector<Span>& spans, Behavior behavior, bool invert,
                 std::vector<Piece>& out) {
  if (invert)
    for (Span& s : spans) s.is_match = !s.is_match;
  struct Part {
    std::size_t start, end;
    bool remove;
  };
  std::vector<Part> parts;
  parts.reserve(spans.size());
  switch (behavior) {
    case Behavior::Isolated:
      for (const Span& s : spans) parts.push_back({s.start, s.end, false});
      break;
    case Behavior::Removed:
      for (const Span& s : spans) parts.push_back({s.start, s.end, s.is_match});
      break;
    case Behavior::Contiguous: {
      bool previous_match = false;
      for (const Span& s : spans) {
        if (s.is_match == previous_match && !parts.empty()) {
          parts.back().end = s.end;
        } else {
          parts.push_back({s.start, s.end, false});
        }
        previous_match = s.is_match;
      }
      break;
    }
    case Behavior::MergedWithPrevious: {
      bool previous_match = false;
      for (const Span& s : spans) {
        if (s.is_match && !previous_match && !parts.empty()) {
          parts.back().end = s.end;
        } else {
          parts.push_back({s.start, s.end, false});
        }
        previous_match = s.is_match;
      }
      break;
    }
    case Behavior::MergedWithNext: {
      bool previous_match = false;
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !previous_match && !parts.empty()) {
          parts.back().start = it->start;
        } else {
          parts.push_back({it->start, it->end, false});
        }
        previous_match = it->is_match;
      }
      std::reverse(parts.begin(), parts.end());
      break;
    }
  }
  for (const Part& part : parts) {
    if (part.remove || part.end == part.start) continue;  // empty splits vanish
    Piece q;
    q.text = p.text.substr(part.start, part.end - part.start);
    q.at_origin = p.at_origin && part.start == 0;
    out.push_back(std::move(q));
  }
}

// Applies `fn(piece, out)` to every piece that is not an added token.
template <class Fn>
void split_pieces(std::vector<Piece>& pieces, Fn&& fn) {
  std::vector<Piece> out;
  out.reserve(pieces.size() * 2);
  for (Piece& p : pieces) {
    if (p.id >= 0) {
      out.push_back(std::move(p));
    } else if (!p.text.empty()) {
      fn(p, out);
    }
  }
  pieces.swap(out);
}

void split_all(std::vector<Piece>& pieces, const Pattern& pattern, Behavior behavior, bool invert) {
  std::vector<Span> spans;
  split_pieces(pieces, [&](Piece& p, std::vector<Piece>& out) {
    pattern.find_matches(p.text, spans);
    split_piece(p, spans, behavior, invert, out);
  });
}

// ---- Normalizers -------------------------------------------------------------------------------

class UnicodeNormalizer final : public Normalizer {
 public:
  explicit UnicodeNormalizer(NormForm form) : form_(form) {}
  void normalize(std::string& text) const override {
    // Pure ASCII is invariant under every normalization form.
    bool ascii = true;
    for (char c : text) ascii = ascii && static_cast<unsigned char>(c) < 0x80;
    if (!ascii) text = normalize_unicode(text, form_);
  }

 private:
  NormForm form_;
};

class LowercaseNormalizer final : public Normalizer {
 public:
  void normalize(std::string& text) const override { text = lowercase(text); }
};

class StripAccentsNormalizer final : public Normalizer {
 public:
  void normalize(std::string& text) const override;
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(Pattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void normalize(std::string& text) const override { text = pattern_.replace_all(text, content_); }

 private:
  Pattern pattern_;
  std::string content_;
};

class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prepend) : prepend_(std::move(prepend)) {}
  void normalize(std::string& text) const override {
    if (!text.empty()) text.insert(0, prepend_);
  }

 private:
  std::string prepend_;
};

class StripNormalizer final : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  void normalize(std::string& text) const override {
    std::size_t begin = 0, end = text.size();
    if (left_) {
      std::size_t i = 0;
      while (i < end) {
        const std::size_t at = i;
        if (!is_white_space(next_code_point(text, i))) {
          i = at;
          break;
        }
      }
      begin = i;
    }
    if (right_) {
      while (end > begin) {
        std::size_t start = end - 1;
        while (start > begin && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
        std::size_t i = start;
        if (!is_white_space(next_code_point(text, i))) break;
        end = start;
      }
    }
    text = text.substr(begin, end - begin);
  }

 private:
  bool left_, right_;
};

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts)
      : parts_(std::move(parts)) {}
  void normalize(std::string& text) const override {
    for (const auto& n : parts_) n->normalize(text);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

void StripAccentsNormalizer::normalize(std::string& text) const {
  std::string out;
  out.reserve(text.size());
  std::size_t i = 0;
  while (i < text.size()) {
    const std::size_t start = i;
    const char32_t c = next_code_point(text, i);
    if (c >= 0x300 && is_combining_mark(c)) continue;
    out.append(text, start, i - start);
  }
  text.swap(out);
}

// ---- Pre-tokenizers ----------------------------------------------------------------------------

constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::optional<Pattern> regex)
      : add_prefix_space_(add_prefix_space), regex_(std::move(regex)) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    std::vector<Span> spans;
    split_pieces(pieces, [&](Piece& p, std::vector<Piece>& out) {
      if (add_prefix_space_ && p.text[0] != ' ') p.text.insert(p.text.begin(), ' ');
      if (!regex_) {
        out.push_back(std::move(p));
        return;
      }
      regex_->find_matches(p.text, spans);
      split_piece(p, spans, Behavior::Isolated, false, out);
    });
    for (Piece& p : pieces) {
      if (p.id >= 0) continue;
      std::string mapped;
      mapped.reserve(p.text.size() * 2);
      for (char c : p.text) mapped += byte_level_char(static_cast<uint8_t>(c));
      p.text.swap(mapped);
    }
  }

 private:
  bool add_prefix_space_;
  std::optional<Pattern> regex_;
};

class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(Pattern pattern, Behavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    split_all(pieces, pattern_, behavior_, invert_);
  }

 private:
  Pattern pattern_;
  Behavior behavior_;
  bool invert_;
};

class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  MetaspacePreTokenizer(char32_t replacement, PrependScheme scheme, bool split)
      : scheme_(scheme), split_(split), replacement_char_(replacement) {
    append_utf8(replacement_, replacement);
  }
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    const Pattern on_replacement = Pattern::character(replacement_char_);
    std::vector<Span> spans;
    split_pieces(pieces, [&](Piece& p, std::vector<Piece>& out) {
      std::string replaced;
      replaced.reserve(p.text.size() + 8);
      for (char c : p.text) {
        if (c == ' ') {
          replaced += replacement_;
        } else {
          replaced.push_back(c);
        }
      }
      p.text.swap(replaced);
      const bool starts = p.text.compare(0, replacement_.size(), replacement_) == 0;
      if (!starts &&
          (scheme_ == PrependScheme::Always || (scheme_ == PrependScheme::First && p.at_origin)))
        p.text.insert(0, replacement_);
      if (!split_) {
        out.push_back(std::move(p));
        return;
      }
      on_replacement.find_matches(p.text, spans);
      split_piece(p, spans, Behavior::MergedWithNext, false, out);
    });
  }

 private:
  PrependScheme scheme_;
  bool split_;
  char32_t replacement_char_;
  std::string replacement_;
};

class PatternPreTokenizer final : public PreTokenizer {  // Digits, Whitespace, WhitespaceSplit
 public:
  PatternPreTokenizer(Pattern pattern, Behavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    split_all(pieces, pattern_, behavior_, invert_);
  }

 private:
  Pattern pattern_;
  Behavior behavior_;
  bool invert_;
};

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> parts)
      : parts_(std::move(parts)) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    for (const auto& p : parts_) p->pre_tokenize(pieces);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> parts_;
};

}  // namespace

// ---- Shared tables -----------------------------------------------------------------------------

namespace {
struct ByteLevelTables {
  std::array<std::string, 256> chars;
  std::array<int16_t, 512> bytes;
  ByteLevelTables() {
    bytes.fill(-1);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const char32_t c = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      append_utf8(chars[b], c);
      bytes[c] = static_cast<int16_t>(b);
    }
  }
};
const ByteLevelTables& byte_level_tables() {
  static const ByteLevelTables t;
  return t;
}
}  // namespace

const std::string& byte_level_char(uint8_t b) {
  return byte_level_tables().chars[b];
}

int byte_level_byte(char32_t c) {
  return c < 512 ? byte_level_tables().bytes[c] : -1;
}

int parse_byte_token(std::string_view s) {
  if (s.size() != 6 || s.substr(0, 3) != "<0x" || s[5] != '>') return -1;
  // u8::from_str_radix(&s[3..5], 16): two hex digits, or '+' and one digit.
  const auto hex = [](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  if (s[3] == '+') return hex(s[4]);
  const int hi = hex(s[3]), lo = hex(s[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

// ---- Parsers -----------------------------------------------------------------------------------

Expected<std::unique_ptr<Normalizer>> parse_normalizer(const json& j, const std::string& where) {
  using Ptr = std::unique_ptr<Normalizer>;
  if (j.is_null()) return Ptr();
  auto type = component_type(j, where);
  if (!type) return type.error();
  const std::string& t = *type;
  Fields f(j, fmt::format("{} ({})", where, t));
  Ptr n;
  if (t == "NFC") {
    n.reset(new UnicodeNormalizer(NormForm::NFC));
  } else if (t == "NFD") {
    n.reset(new UnicodeNormalizer(NormForm::NFD));
  } else if (t == "NFKC") {
    n.reset(new UnicodeNormalizer(NormForm::NFKC));
  } else if (t == "NFKD") {
    n.reset(new UnicodeNormalizer(NormForm::NFKD));
  } else if (t == "Lowercase") {
    n.reset(new LowercaseNormalizer());
  } else if (t == "StripAccents") {
    n.reset(new StripAccentsNormalizer());
  } else if (t == "Replace") {
    auto pattern = parse_pattern(f);
    if (!pattern) return pattern.error();
    n.reset(new ReplaceNormalizer(std::move(pattern.value()), f.string("content", std::nullopt)));
  } else if (t == "Prepend") {
    n.reset(new PrependNormalizer(f.string("prepend", std::nullopt)));
  } else if (t == "Strip") {
    n.reset(new StripNormalizer(f.boolean("strip_left", true), f.boolean("strip_right", true)));
  } else if (t == "Sequence") {
    std::vector<Ptr> parts;
    const json& list = f.array("normalizers");
    for (std::size_t k = 0; k < list.size(); ++k) {
      auto part = parse_normalizer(list[k], fmt::format("{}.normalizers[{}]", where, k));
      if (!part) return part.error();
      if (*part) parts.push_back(std::move(part.value()));
    }
    n.reset(new SequenceNormalizer(std::move(parts)));
  } else {
    return unsupported(where, t,
                       "NFC, NFD, NFKC, NFKD, Lowercase, StripAccents, Replace, Prepend, Strip, "
                       "Sequence");
  }
  if (f.first_error()) return Error(*f.first_error());
  return n;
}

Expected<std::unique_ptr<PreTokenizer>> parse_pre_tokenizer(const json& j,
                                                            const std::string& where) {
  using Ptr = std::unique_ptr<PreTokenizer>;
  if (j.is_null()) return Ptr();
  auto type = component_type(j, where);
  if (!type) return type.error();
  const std::string& t = *type;
  Fields f(j, fmt::format("{} ({})", where, t));
  Ptr p;
  if (t == "ByteLevel") {
    std::optional<Pattern> regex;
    if (f.boolean("use_regex", true)) {
      auto r = Regex::compile(kGpt2Regex, RegexDialect::Oniguruma);
      if (!r) return r.error();
      regex = Pattern::regex(std::move(r.value()));
    }
    p.reset(new ByteLevelPreTokenizer(f.boolean("add_prefix_space", true), std::move(regex)));
  } else if (t == "Split") {
    auto pattern = parse_pattern(f);
    if (!pattern) return pattern.error();
    const std::string b = f.string("behavior", std::nullopt);
    const std::optional<Behavior> behavior = parse_behavior(b);
    if (!behavior && !f.first_error())
      f.error(
          fmt::format("field \"behavior\" is \"{}\"; expected Removed, Isolated, "
                      "MergedWithPrevious, MergedWithNext or Contiguous",
                      b));
    p.reset(new SplitPreTokenizer(std::move(pattern.value()), behavior.value_or(Behavior::Isolated),
                                  f.boolean("invert", false)));
  } else if (t == "Metaspace") {
    auto scheme = parse_prepend_scheme(f);
    if (!scheme) return scheme.error();
    p.reset(new MetaspacePreTokenizer(f.character("replacement", std::nullopt), *scheme,
                                      f.boolean("split", true)));
  } else if (t == "Digits") {
    p.reset(new PatternPreTokenizer(
        Pattern::predicate(is_numeric),
        f.boolean("individual_digits", false) ? Behavior::Isolated : Behavior::Contiguous, false));
  } else if (t == "Whitespace") {
    // \w+|[^\w\s]+ of Rust's regex crate (\w: Alphabetic, M, Nd, Pc, Join_Control).
    auto r = Regex::compile(
        R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}]+|)"
        R"([^\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}\t-\r\x{20}\x{85}\p{Z}]+)",
        RegexDialect::Pcre2);
    if (!r) return r.error();
    p.reset(new PatternPreTokenizer(Pattern::regex(std::move(r.value())), Behavior::Removed, true));
  } else if (t == "WhitespaceSplit") {
    p.reset(new PatternPreTokenizer(Pattern::predicate(is_white_space), Behavior::Removed, false));
  } else if (t == "Sequence") {
    std::vector<Ptr> parts;
    const json& list = f.array("pretokenizers");
    for (std::size_t k = 0; k < list.size(); ++k) {
      auto part = parse_pre_tokenizer(list[k], fmt::format("{}.pretokenizers[{}]", where, k));
      if (!part) return part.error();
      if (*part) parts.push_back(std::move(part.value()));
    }
    p.reset(new SequencePreTokenizer(std::move(parts)));
  } else {
    return unsupported(where, t,
                       "ByteLevel, Split, Metaspace, Digits, Whitespace, WhitespaceSplit, "
                       "Sequence");
  }
  if (f.first_error()) return Error(*f.first_error());
  return p;
}

}  // namespace moemesh::tokenizer_detail
