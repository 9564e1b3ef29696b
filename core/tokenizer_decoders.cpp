// Decoders and post-processors of tokenizer.json (core/detail/tokenizer_pipeline.h), ported from
// the `tokenizers` library 0.23.
#include <fmt/format.h>

#include "core/detail/tokenizer_json.h"
#include "core/detail/tokenizer_pipeline.h"
#include "core/detail/tokenizer_text.h"

namespace moemesh::tokenizer_detail {
namespace {

using nlohmann::json;

// ---- Decoders ----------------------------------------------------------------------------------

class ByteLevelDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const std::string& t : tokens) {
      const std::size_t mark = bytes.size();
      std::size_t i = 0;
      bool all = true;
      while (i < t.size()) {
        const int b = byte_level_byte(next_code_point(t, i));
        if (b < 0) {
          all = false;
          break;
        }
        bytes.push_back(static_cast<char>(b));
      }
      if (!all) {  // a token outside the byte alphabet stands for its own UTF-8 bytes
        bytes.resize(mark);
        bytes += t;
      }
    }
    tokens.assign(1, utf8_lossy(bytes));
  }
};

class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(char32_t replacement, PrependScheme scheme)
      : replacement_(replacement), scheme_(scheme) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (std::size_t k = 0; k < tokens.size(); ++k) {
      const std::string& t = tokens[k];
      std::string out;
      out.reserve(t.size());
      std::size_t i = 0;
      while (i < t.size()) {
        const std::size_t start = i;
        const char32_t c = next_code_point(t, i);
        if (c != replacement_) {
          out.append(t, start, i - start);
        } else if (k != 0 || scheme_ == PrependScheme::Never) {
          out.push_back(' ');
        }
      }
      tokens[k].swap(out);
    }
  }

 private:
  char32_t replacement_;
  PrependScheme scheme_;
};

class ByteFallbackDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens.size());
    std::string run;
    const auto flush = [&] {
      if (run.empty()) return;
      if (find_invalid_utf8(run) == std::string_view::npos) {
        out.push_back(run);
      } else {
        for (std::size_t k = 0; k < run.size(); ++k) out.emplace_back(kReplacementChar);
      }
      run.clear();
    };
    for (std::string& t : tokens) {
      const int b = parse_byte_token(t);
      if (b >= 0) {
        run.push_back(static_cast<char>(b));
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    tokens.swap(out);
  }
  bool joins_byte_tokens() const override { return true; }
};

class FuseDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string all;
    for (const std::string& t : tokens) all += t;
    tokens.assign(1, std::move(all));
  }
};

class StripDecoder final : public Decoder {
 public:
  StripDecoder(char32_t content, int64_t start, int64_t stop)
      : content_(content), start_(start), stop_(stop) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (std::string& t : tokens) {
      std::vector<std::pair<std::size_t, char32_t>> chars;  // (byte offset, char)
      std::size_t i = 0;
      while (i < t.size()) {
        const std::size_t at = i;
        chars.emplace_back(at, next_code_point(t, i));
      }
      const int64_t n = static_cast<int64_t>(chars.size());
      int64_t start_cut = 0;
      for (int64_t k = 0; k < start_ && k < n; ++k) {
        if (chars[k].second != content_) break;
        start_cut = k + 1;
      }
      int64_t stop_cut = n;
      for (int64_t k = 0; k < stop_; ++k) {
        const int64_t index = n - k - 1;
        if (index < 0 || chars[index].second != content_) break;
        stop_cut = index;
      }
      if (stop_cut <= start_cut) {
        t.clear();
        continue;
      }
      const std::size_t b0 = chars[start_cut].first;
      const std::size_t b1 = stop_cut < n ? chars[stop_cut].first : t.size();
      t = t.substr(b0, b1 - b0);
    }
  }

 private:
  char32_t content_;
  int64_t start_, stop_;
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(Pattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (std::string& t : tokens) t = pattern_.replace_all(t, content_);
  }

 private:
  Pattern pattern_;
  std::string content_;
};

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts) : parts_(std::move(parts)) {
    for (const auto& p : parts_) joins_ = joins_ || p->joins_byte_tokens();
  }
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (const auto& d : parts_) d->decode_chain(tokens);
  }
  bool joins_byte_tokens() const override { return joins_; }

 private:
  std::vector<std::unique_ptr<Decoder>> parts_;
  bool joins_ = false;
};

// ---- Post-processors ---------------------------------------------------------------------------

// TemplateProcessing (single template), RobertaProcessing and BertProcessing: special ids
// before and after the sequence.
class WrapProcessor final : public PostProcessor {
 public:
  WrapProcessor(std::vector<int32_t> before, std::vector<int32_t> after)
      : before_(std::move(before)), after_(std::move(after)) {}
  void process(std::vector<int32_t>& ids, bool add_special_tokens) const override {
    if (!add_special_tokens) return;
    ids.insert(ids.begin(), before_.begin(), before_.end());
    ids.insert(ids.end(), after_.begin(), after_.end());
  }

 private:
  std::vector<int32_t> before_, after_;
};

class NoopProcessor final : public PostProcessor {  // ByteLevel: offsets only
 public:
  void process(std::vector<int32_t>&, bool) const override {}
};

class SequenceProcessor final : public PostProcessor {
 public:
  explicit SequenceProcessor(std::vector<std::unique_ptr<PostProcessor>> parts)
      : parts_(std::move(parts)) {}
  void process(std::vector<int32_t>& ids, bool add_special_tokens) const override {
    for (const auto& p : parts_) p->process(ids, add_special_tokens);
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> parts_;
};

// [token, id] of RobertaProcessing / BertProcessing.
int32_t token_pair_id(Fields& f, const char* key) {
  const json* v = f.get(key);
  if (v == nullptr || !v->is_array() || v->size() != 2 || !(*v)[1].is_number_integer() ||
      (*v)[1].get<int64_t>() < 0 || (*v)[1].get<int64_t>() > INT32_MAX) {
    f.error(fmt::format("field \"{}\" must be [token, id]", key));
    return 0;
  }
  return static_cast<int32_t>((*v)[1].get<int64_t>());
}

Expected<std::unique_ptr<PostProcessor>> parse_template(Fields& f) {
  const json* single = f.get("single");
  const json* specials = f.get("special_tokens");
  if (single == nullptr || !single->is_array())
    return Error(fmt::format("{} field \"single\" must be a list of template pieces", f.where()));
  std::vector<int32_t> before, after;
  bool seen_sequence = false;
  for (std::size_t k = 0; k < single->size(); ++k) {
    const json& piece = (*single)[k];
    const std::string at = fmt::format("{} field \"single\"[{}]", f.where(), k);
    if (piece.is_object() && piece.contains("Sequence")) {
      const json& seq = piece.at("Sequence");
      if (!seq.is_object() || !seq.contains("id") || !seq.at("id").is_string())
        return Error(fmt::format("{} must be {{\"Sequence\": {{\"id\": \"A\"}}}}", at));
      if (seq.at("id") == "A") {
        if (seen_sequence)
          return Error(
              fmt::format("{} repeats the sequence $A, which moemesh does not support", at));
        seen_sequence = true;
      }
      continue;  // $B has no part in a single sequence
    }
    if (!piece.is_object() || !piece.contains("SpecialToken") ||
        !piece.at("SpecialToken").is_object() || !piece.at("SpecialToken").contains("id") ||
        !piece.at("SpecialToken").at("id").is_string())
      return Error(fmt::format("{} must be a Sequence or a SpecialToken piece", at));
    const std::string name = piece.at("SpecialToken").at("id").get<std::string>();
    if (specials == nullptr || !specials->is_object() || !specials->contains(name))
      return Error(
          fmt::format("{} names special token \"{}\", which \"special_tokens\" lacks", at, name));
    const json& st = specials->at(name);
    if (!st.is_object() || !st.contains("ids") || !st.at("ids").is_array())
      return Error(
          fmt::format("{} field \"special_tokens\".\"{}\" has no list \"ids\"", f.where(), name));
    for (const json& id : st.at("ids")) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
        return Error(fmt::format("{} field \"special_tokens\".\"{}\" has an invalid id {}",
                                 f.where(), name, id.dump()));
      (seen_sequence ? after : before).push_back(static_cast<int32_t>(id.get<int64_t>()));
    }
  }
  return std::unique_ptr<PostProcessor>(new WrapProcessor(std::move(before), std::move(after)));
}

}  // namespace

Expected<std::unique_ptr<Decoder>> parse_decoder(const json& j, const std::string& where) {
  using Ptr = std::unique_ptr<Decoder>;
  if (j.is_null()) return Ptr();
  auto type = component_type(j, where);
  if (!type) return type.error();
  const std::string& t = *type;
  Fields f(j, fmt::format("{} ({})", where, t));
  Ptr d;
  if (t == "ByteLevel") {
    d.reset(new ByteLevelDecoder());
  } else if (t == "Metaspace") {
    auto scheme = parse_prepend_scheme(f);
    if (!scheme) return scheme.error();
    d.reset(new MetaspaceDecoder(f.character("replacement", std::nullopt), *scheme));
  } else if (t == "ByteFallback") {
    d.reset(new ByteFallbackDecoder());
  } else if (t == "Fuse") {
    d.reset(new FuseDecoder());
  } else if (t == "Strip") {
    const int64_t start = f.integer("start", 0), stop = f.integer("stop", 0);
    if (start < 0 || stop < 0) f.error("fields \"start\" and \"stop\" must not be negative");
    d.reset(new StripDecoder(f.character("content", std::nullopt), start, stop));
  } else if (t == "Replace") {
    auto pattern = parse_pattern(f);
    if (!pattern) return pattern.error();
    d.reset(new ReplaceDecoder(std::move(pattern.value()), f.string("content", std::nullopt)));
  } else if (t == "Sequence") {
    std::vector<Ptr> parts;
    const json& list = f.array("decoders");
    for (std::size_t k = 0; k < list.size(); ++k) {
      auto part = parse_decoder(list[k], fmt::format("{}.decoders[{}]", where, k));
      if (!part) return part.error();
      if (*part) parts.push_back(std::move(part.value()));
    }
    d.reset(new SequenceDecoder(std::move(parts)));
  } else {
    return unsupported(where, t,
                       "ByteLevel, Metaspace, ByteFallback, Fuse, Strip, Replace, Sequence");
  }
  if (f.first_error()) return Error(*f.first_error());
  return d;
}

Expected<std::unique_ptr<PostProcessor>> parse_post_processor(const json& j,
                                                              const std::string& where) {
  using Ptr = std::unique_ptr<PostProcessor>;
  if (j.is_null()) return Ptr();
  auto type = component_type(j, where);
  if (!type) return type.error();
  const std::string& t = *type;
  Fields f(j, fmt::format("{} ({})", where, t));
  Ptr p;
  if (t == "TemplateProcessing") {
    auto tp = parse_template(f);
    if (!tp) return tp.error();
    p = std::move(tp.value());
  } else if (t == "ByteLevel") {
    p.reset(new NoopProcessor());
  } else if (t == "RobertaProcessing" || t == "BertProcessing") {
    const int32_t cls = token_pair_id(f, "cls"), sep = token_pair_id(f, "sep");
    p.reset(new WrapProcessor({cls}, {sep}));
  } else if (t == "Sequence") {
    std::vector<Ptr> parts;
    const json& list = f.array("processors");
    for (std::size_t k = 0; k < list.size(); ++k) {
      auto part = parse_post_processor(list[k], fmt::format("{}.processors[{}]", where, k));
      if (!part) return part.error();
      if (*part) parts.push_back(std::move(part.value()));
    }
    p.reset(new SequenceProcessor(std::move(parts)));
  } else {
    return unsupported(
        where, t, "TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence");
  }
  if (f.first_error()) return Error(*f.first_error());
  return p;
}

}  // namespace moemesh::tokenizer_detail
