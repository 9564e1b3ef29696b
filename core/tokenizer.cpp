// Tokenizer and DecodeStream (core/tokenizer.h): loading tokenizer.json, the added vocabulary,
// and the encode / decode pipelines of the `tokenizers` library 0.23.
#include "core/tokenizer.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "core/detail/tokenizer_bpe.h"
#include "core/detail/tokenizer_pipeline.h"
#include "core/detail/tokenizer_text.h"

namespace moemesh {

using nlohmann::json;
using namespace tokenizer_detail;

namespace {

struct AddedToken {
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
  bool operator==(const AddedToken&) const = default;
};

// Leftmost-longest matching of the added tokens' patterns (tokenizers uses Aho-Corasick with
// MatchKind::LeftmostLongest): at the first position where any pattern matches, the longest.
class TokenTrie {
 public:
  void insert(std::string_view pattern, int32_t id) {
    if (pattern.empty()) return;
    int32_t node = 0;
    for (char ch : pattern) {
      const auto b = static_cast<uint8_t>(ch);
      int32_t next = -1;
      for (const auto& [k, child] : nodes_[node].children)
        if (k == b) next = child;
      if (next < 0) {
        next = static_cast<int32_t>(nodes_.size());
        nodes_[node].children.emplace_back(b, next);
        nodes_.emplace_back();
      }
      node = next;
    }
    if (nodes_[node].id < 0) nodes_[node].id = id;  // the first pattern with this content wins
    first_byte_[static_cast<uint8_t>(pattern[0])] = true;
    empty_ = false;
  }
  bool empty() const { return empty_; }

  // The longest pattern starting at text[at]: (length, id), or length 0.
  std::pair<std::size_t, int32_t> longest_at(std::string_view text, std::size_t at) const {
    if (!first_byte_[static_cast<uint8_t>(text[at])]) return {0, -1};
    std::pair<std::size_t, int32_t> best{0, -1};
    int32_t node = 0;
    for (std::size_t i = at; i < text.size(); ++i) {
      const auto b = static_cast<uint8_t>(text[i]);
      int32_t next = -1;
      for (const auto& [k, child] : nodes_[node].children)
        if (k == b) next = child;
      if (next < 0) break;
      node = next;
      if (nodes_[node].id >= 0) best = {i + 1 - at, nodes_[node].id};
    }
    return best;
  }

 private:
  struct Node {
    std::vector<std::pair<uint8_t, int32_t>> children;
    int32_t id = -1;
  };
  std::vector<Node> nodes_ = std::vector<Node>(1);
  std::array<bool, 256> first_byte_{};
  bool empty_ = true;
};

bool starts_with_word(std::string_view s) {
  if (s.empty()) return false;
  std::size_t i = 0;
  return is_word_char(next_code_point(s, i));
}

bool ends_with_word(std::string_view s) {
  if (s.empty()) return false;
  std::size_t start = s.size() - 1;
  while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
  std::size_t i = start;
  return is_word_char(next_code_point(s, i));
}

// Where the run of white space that ends s begins.
std::size_t space_leftmost_at_end(std::string_view s) {
  std::size_t end = s.size();
  while (end > 0) {
    std::size_t start = end - 1;
    while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    std::size_t i = start;
    if (!is_white_space(next_code_point(s, i))) break;
    end = start;
  }
  return end;
}

// The byte length of the run of white space that begins s.
std::size_t space_rightmost_at_start(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const std::size_t at = i;
    if (!is_white_space(next_code_point(s, i))) return at;
  }
  return s.size();
}

std::string read_file(const std::filesystem::path& path, std::string* error) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    *error = fmt::format("tokenizer file {} does not exist", path.string());
    return {};
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *error = fmt::format("tokenizer file {} is not readable", path.string());
    return {};
  }
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

// ---- The added vocabulary ----------------------------------------------------------------------

struct Tokenizer::Impl {
  std::string source;
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  std::unique_ptr<BpeModel> model;
  std::unique_ptr<PostProcessor> post_processor;
  std::unique_ptr<Decoder> decoder;

  // tokenizers' AddedVocabulary.
  std::unordered_map<std::string, int32_t> added_ids;   // content -> id
  std::unordered_map<int32_t, AddedToken> added_by_id;  // id -> token
  // id -> the token's text as decode and id_to_token give it: a normalized token reads as its
  // normalized content (tokenizers 0.23 does so).
  std::unordered_map<int32_t, std::string> added_text;
  std::vector<AddedToken> special_tokens, non_special_tokens;
  std::unordered_set<std::string> special_contents;
  TokenTrie raw_trie, normalized_trie;  // tokens with normalized false / true
  int64_t vocab_size = 0;
  mutable std::atomic<int64_t> skipped_ids{0};  // decode: ids no token has

  std::optional<int32_t> token_to_id(std::string_view content) const {
    if (auto it = added_ids.find(std::string(content)); it != added_ids.end()) return it->second;
    return model->token_to_id(content);
  }

  const std::string* id_to_token(int32_t id) const {
    if (auto it = added_text.find(id); it != added_text.end()) return &it->second;
    return model->id_to_token(id);
  }

  // AddedVocabulary::add_tokens: ids come from the vocabulary, else follow it.
  void add_tokens(const std::vector<AddedToken>& tokens) {
    for (const AddedToken& t : tokens) {
      if (t.special && !t.content.empty() && !special_contents.contains(t.content)) {
        special_tokens.push_back(t);
        special_contents.insert(t.content);
      }
    }
    const auto model_size = static_cast<int64_t>(model->vocab_count());
    int64_t max_added = -1;  // the largest id in added_ids
    for (const AddedToken& t : tokens) {
      if (t.content.empty()) continue;
      if (auto it = added_ids.find(t.content);
          it != added_ids.end() && added_by_id.at(it->second) == t)
        continue;  // the same token twice
      int64_t new_id;
      if (auto existing_id = token_to_id(t.content)) {
        new_id = *existing_id;
      } else if (added_ids.empty()) {
        new_id = model_size;
      } else {
        new_id = (max_added >= model_size || model_size == 0) ? max_added + 1 : model_size;
      }
      max_added = std::max(max_added, new_id);
      added_ids[t.content] = static_cast<int32_t>(new_id);
      added_by_id[static_cast<int32_t>(new_id)] = t;
      if (!special_contents.contains(t.content)) non_special_tokens.push_back(t);
    }
    for (const auto& [id, t] : added_by_id) {
      std::string text = t.content;
      if (t.normalized && normalizer) normalizer->normalize(text);
      added_text[id] = std::move(text);
    }
    // refresh_added_tokens: normalized tokens are matched in normalized text, by their
    // normalized content.
    for (const auto* list : {&special_tokens, &non_special_tokens}) {
      for (const AddedToken& t : *list) {
        const int32_t id = *token_to_id(t.content);
        if (t.normalized) {
          std::string pattern = t.content;
          if (normalizer) normalizer->normalize(pattern);
          normalized_trie.insert(pattern, id);
        } else {
          raw_trie.insert(t.content, id);
        }
      }
    }
  }

  // AddedVocabulary::find_matches + split_with_indices: splits `p` around the added tokens of
  // `trie`, honouring single_word, lstrip and rstrip; empty parts vanish.
  void split_added(Piece& p, const TokenTrie& trie, std::vector<Piece>& out) const {
    const std::string_view s = p.text;
    if (trie.empty()) {
      if (!p.text.empty()) out.push_back(std::move(p));
      return;
    }
    const auto emit = [&](std::size_t start, std::size_t stop, int32_t id) {
      if (stop <= start) return;
      Piece q;
      q.text = std::string(s.substr(start, stop - start));
      q.id = id;
      q.at_origin = p.at_origin && start == 0;
      out.push_back(std::move(q));
    };
    std::size_t start_offset = 0;
    std::size_t i = 0;
    const std::size_t first = out.size();
    while (i < s.size()) {
      const auto [len, id] = trie.longest_at(s, i);
      if (len == 0) {
        ++i;
        continue;
      }
      std::size_t start = i, stop = i + len;
      i = stop;
      const AddedToken& t = added_by_id.at(id);
      if (t.single_word) {
        const bool start_space = start == 0 || !ends_with_word(s.substr(0, start));
        const bool stop_space = stop == s.size() || !starts_with_word(s.substr(stop));
        if (!start_space || !stop_space) continue;
      }
      if (t.lstrip) start = std::max(space_leftmost_at_end(s.substr(0, start)), start_offset);
      if (t.rstrip) stop += space_rightmost_at_start(s.substr(stop));
      if (start_offset < start) emit(start_offset, start, -1);
      emit(start, stop, id);
      start_offset = stop;
    }
    if (out.size() == first) {  // no token: keep the piece as it is
      if (!p.text.empty()) out.push_back(std::move(p));
      return;
    }
    if (start_offset < s.size()) emit(start_offset, s.size(), -1);
  }

  // AddedVocabulary::extract_and_normalize, then the pre-tokenizer and the model.
  void encode_into(std::string_view text, std::vector<int32_t>& ids) const {
    std::vector<Piece> pieces;
    {
      Piece whole;
      whole.text = std::string(text);
      whole.at_origin = true;
      split_added(whole, raw_trie, pieces);
    }
    std::vector<Piece> normalized;
    normalized.reserve(pieces.size());
    for (Piece& p : pieces) {
      if (p.id >= 0) {
        normalized.push_back(std::move(p));
        continue;
      }
      if (normalizer) normalizer->normalize(p.text);
      split_added(p, normalized_trie, normalized);
    }
    if (pre_tokenizer) pre_tokenizer->pre_tokenize(normalized);
    for (const Piece& p : normalized) {
      if (p.id >= 0) {
        ids.push_back(p.id);
      } else {
        model->tokenize(p.text, ids);
      }
    }
  }

  // Tokens as Tokenizer::decode gives them to the decoder.
  void decode_tokens(std::span<const int32_t> ids, bool skip_special_tokens,
                     std::vector<std::string>& tokens) const {
    tokens.clear();
    tokens.reserve(ids.size());
    for (int32_t id : ids) {
      const std::string* t = id_to_token(id);
      if (t == nullptr) {
        skipped_ids.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      if (skip_special_tokens && special_contents.contains(*t)) continue;
      tokens.push_back(*t);
    }
  }
};

// ---- Loading -----------------------------------------------------------------------------------

namespace {

Expected<std::vector<AddedToken>> parse_added_tokens(const json& root) {
  std::vector<AddedToken> tokens;
  auto it = root.find("added_tokens");
  if (it == root.end() || it->is_null()) return tokens;
  if (!it->is_array()) return Error("field \"added_tokens\" must be a list");
  for (std::size_t k = 0; k < it->size(); ++k) {
    const json& t = (*it)[k];
    if (!t.is_object() || !t.contains("content") || !t.at("content").is_string())
      return Error(fmt::format("added_tokens[{}] must be an object with a string \"content\"", k));
    AddedToken a;
    a.content = t.at("content").get<std::string>();
    const auto flag = [&](const char* key, bool fallback) -> Expected<bool> {
      auto f = t.find(key);
      if (f == t.end() || f->is_null()) return fallback;
      if (!f->is_boolean())
        return Error(fmt::format("added_tokens[{}] field \"{}\" must be true or false, found {}", k,
                                 key, f->dump()));
      return f->get<bool>();
    };
    auto special = flag("special", false);
    if (!special) return special.error();
    a.special = *special;
    for (auto [key, field, fallback] :
         {std::tuple{"single_word", &a.single_word, false}, std::tuple{"lstrip", &a.lstrip, false},
          std::tuple{"rstrip", &a.rstrip, false},
          std::tuple{"normalized", &a.normalized, !a.special}}) {
      auto v = flag(key, fallback);
      if (!v) return v.error();
      *field = *v;
    }
    tokens.push_back(std::move(a));
  }
  return tokens;
}

Expected<std::unique_ptr<Tokenizer::Impl>> parse_tokenizer(std::string_view text,
                                                           const std::string& source) {
  json root = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded())
    return Error(fmt::format("{}: not valid JSON; expected a Hugging Face tokenizer.json", source));
  if (!root.is_object())
    return Error(fmt::format("{}: expected a JSON object (a Hugging Face tokenizer.json), found {}",
                             source, root.type_name()));
  const auto in_file = [&](const Error& e) {
    return Error(fmt::format("{}: {}", source, e.message()));
  };

  auto impl = std::make_unique<Tokenizer::Impl>();
  impl->source = source;

  // The model.
  auto mit = root.find("model");
  if (mit == root.end() || !mit->is_object())
    return Error(fmt::format("{}: no \"model\" object; a tokenizer.json needs one", source));
  std::string type;
  if (auto t = mit->find("type"); t != mit->end() && t->is_string()) {
    type = t->get<std::string>();
  } else if (mit->contains("merges")) {
    type = "BPE";  // files of older versions do not tag the model
  } else {
    return Error(fmt::format("{}: model has no \"type\"; expected \"BPE\"", source));
  }
  if (type != "BPE")
    return Error(fmt::format("{}: model type \"{}\" is not supported by moemesh (supported: BPE)",
                             source, type));
  auto model = BpeModel::from_json(*mit, "model (BPE)");
  if (!model) return in_file(model.error());
  impl->model = std::move(model.value());

  const auto component = [&](const char* key) -> const json& {
    static const json kNull;
    auto it = root.find(key);
    return it == root.end() ? kNull : *it;
  };
  auto normalizer = parse_normalizer(component("normalizer"), "normalizer");
  if (!normalizer) return in_file(normalizer.error());
  impl->normalizer = std::move(normalizer.value());
  auto pre = parse_pre_tokenizer(component("pre_tokenizer"), "pre_tokenizer");
  if (!pre) return in_file(pre.error());
  impl->pre_tokenizer = std::move(pre.value());
  auto post = parse_post_processor(component("post_processor"), "post_processor");
  if (!post) return in_file(post.error());
  impl->post_processor = std::move(post.value());
  auto decoder = parse_decoder(component("decoder"), "decoder");
  if (!decoder) return in_file(decoder.error());
  impl->decoder = std::move(decoder.value());

  auto added = parse_added_tokens(root);
  if (!added) return in_file(added.error());
  impl->add_tokens(*added);

  int64_t max_id = impl->model->max_id();
  for (const auto& [id, token] : impl->added_by_id) max_id = std::max<int64_t>(max_id, id);
  impl->vocab_size = max_id + 1;
  return impl;
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

Expected<std::shared_ptr<const Tokenizer>> Tokenizer::from_json_text(std::string_view json_text,
                                                                     const std::string& source) {
  try {
    auto impl = parse_tokenizer(json_text, source);
    if (!impl) return impl.error();
    return std::shared_ptr<const Tokenizer>(new Tokenizer(std::move(impl.value())));
  } catch (const std::exception& e) {  // a JSON value of an unexpected type, out of memory
    return Error(fmt::format("{}: cannot be read as a tokenizer.json: {}", source, e.what()));
  }
}

Expected<std::shared_ptr<const Tokenizer>> Tokenizer::load(
    const std::filesystem::path& tokenizer_json) {
  std::string error;
  const std::string text = read_file(tokenizer_json, &error);
  if (!error.empty()) return Error(error);
  return from_json_text(text, tokenizer_json.string());
}

// ---- Encode / decode ---------------------------------------------------------------------------

Expected<std::vector<int32_t>> Tokenizer::encode(std::string_view text,
                                                 bool add_special_tokens) const {
  if (const std::size_t bad = find_invalid_utf8(text); bad != std::string_view::npos)
    return Error(fmt::format("encode: the text is not valid UTF-8 (byte {} of {}: 0x{:02X})", bad,
                             text.size(), static_cast<unsigned char>(text[bad])));
  std::vector<int32_t> ids;
  try {
    impl_->encode_into(text, ids);
    if (impl_->post_processor) impl_->post_processor->process(ids, add_special_tokens);
  } catch (const std::exception& e) {
    return Error(fmt::format("encode with {}: {}", impl_->source, e.what()));
  }
  return ids;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  impl_->decode_tokens(ids, skip_special_tokens, tokens);
  std::string out;
  if (impl_->decoder) {
    impl_->decoder->decode_chain(tokens);
    for (const std::string& t : tokens) out += t;
  } else {
    for (std::size_t k = 0; k < tokens.size(); ++k) {
      if (k > 0) out.push_back(' ');
      out += tokens[k];
    }
  }
  return out;
}

int64_t Tokenizer::vocab_size() const {
  return impl_->vocab_size;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  return impl_->token_to_id(token);
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  const std::string* t = impl_->id_to_token(id);
  if (t == nullptr) return std::nullopt;
  return *t;
}

int64_t Tokenizer::dropped_characters() const {
  return impl_->model->dropped_characters();
}

int64_t Tokenizer::skipped_ids() const {
  return impl_->skipped_ids.load(std::memory_order_relaxed);
}

bool Tokenizer::is_special(int32_t id) const {
  auto it = impl_->added_by_id.find(id);
  return it != impl_->added_by_id.end() && it->second.special;
}

// ---- DecodeStream ------------------------------------------------------------------------------

namespace {
constexpr std::size_t kPromptContext = 8;  // prompt tokens that seed the window
}

DecodeStream::DecodeStream(std::shared_ptr<const Tokenizer> tokenizer, bool skip_special_tokens,
                           std::span<const int32_t> prompt_ids)
    : tokenizer_(std::move(tokenizer)), skip_special_tokens_(skip_special_tokens) {
  std::size_t from = prompt_ids.size() > kPromptContext ? prompt_ids.size() - kPromptContext : 0;
  const Tokenizer::Impl& impl = *tokenizer_->impl_;
  if (impl.decoder && impl.decoder->joins_byte_tokens()) {
    // Not inside a run of byte tokens, which decodes differently in parts: back to the start of
    // the run, or past it when it is long.
    const auto in_run = [&](int32_t id) {
      const std::string* t = impl.id_to_token(id);
      return t == nullptr || (skip_special_tokens_ && impl.special_contents.contains(*t)) ||
             parse_byte_token(*t) >= 0;
    };
    std::size_t start = from;
    while (start > 0 && from - start < 64 && in_run(prompt_ids[start - 1])) --start;
    if (start == 0 || !in_run(prompt_ids[start - 1])) {
      from = start;
    } else {
      while (from < prompt_ids.size() && in_run(prompt_ids[from])) ++from;
    }
  }
  ids_.assign(prompt_ids.begin() + static_cast<std::ptrdiff_t>(from), prompt_ids.end());
  // The prompt's text counts as emitted, except an incomplete character at its end, which the
  // generated tokens may complete.
  prefix_index_ = ids_.size();
  prefix_ = tokenizer_->decode(ids_, skip_special_tokens_);
  while (prefix_index_ > 0 && prefix_.ends_with(kReplacementChar)) {
    --prefix_index_;
    prefix_ = tokenizer_->decode(std::span(ids_).first(prefix_index_), skip_special_tokens_);
  }
}

bool DecodeStream::holds_back(const std::string& text) const {
  if (text.ends_with(kReplacementChar)) return true;  // maybe an incomplete character
  const Tokenizer::Impl& impl = *tokenizer_->impl_;
  if (!impl.decoder || !impl.decoder->joins_byte_tokens()) return false;
  // The last token the decoder sees: a byte token may still join with the next ones.
  for (auto it = ids_.rbegin(); it != ids_.rend(); ++it) {
    const std::string* t = impl.id_to_token(*it);
    if (t == nullptr) continue;
    if (skip_special_tokens_ && impl.special_contents.contains(*t)) continue;
    return parse_byte_token(*t) >= 0;
  }
  return false;
}

std::string DecodeStream::step(int32_t id) {
  // An id decode() skips (out of range, or a special token when skipping them) changes nothing;
  // leaving it out keeps the window short.
  const Tokenizer::Impl& impl = *tokenizer_->impl_;
  const std::string* token = impl.id_to_token(id);
  if (token == nullptr) {
    impl.skipped_ids.fetch_add(1, std::memory_order_relaxed);
    return {};
  }
  if (skip_special_tokens_ && impl.special_contents.contains(*token)) return {};
  ids_.push_back(id);
  std::string text = tokenizer_->decode(ids_, skip_special_tokens_);
  if (text.size() <= prefix_.size() || holds_back(text) || !text.starts_with(prefix_)) return {};
  std::string new_text = text.substr(prefix_.size());
  // Every token is context now; the window drops the old context's tokens unless the rest would
  // decode differently on its own than as the tail of the window (a Strip decoder that removes
  // more than one leading character, or a Replace of a pattern of several characters, decodes a
  // window that starts inside a run of spaces otherwise): then it keeps as many more as needed,
  // all of them at worst.
  std::size_t cut = prefix_index_;
  for (; cut > 0; --cut) {
    const std::string head =
        cut == prefix_index_ ? prefix_
                             : tokenizer_->decode(std::span(ids_).first(cut), skip_special_tokens_);
    if (text.starts_with(head) &&
        tokenizer_->decode(std::span(ids_).subspan(cut), skip_special_tokens_) ==
            std::string_view(text).substr(head.size()))
      break;
  }
  ids_.erase(ids_.begin(), ids_.begin() + static_cast<std::ptrdiff_t>(cut));
  prefix_ = tokenizer_->decode(ids_, skip_special_tokens_);
  prefix_index_ = ids_.size();
  return new_text;
}

std::string DecodeStream::flush() {
  const std::string text = tokenizer_->decode(ids_, skip_special_tokens_);
  std::string out;
  if (text.starts_with(prefix_)) {
    out = text.substr(prefix_.size());
  } else {
    // Cannot happen with the supported decoders; emit what differs, from a character boundary.
    std::size_t common = 0;
    while (common < text.size() && common < prefix_.size() && text[common] == prefix_[common])
      ++common;
    while (common > 0 && (static_cast<unsigned char>(text[common]) & 0xC0) == 0x80) --common;
    out = text.substr(common);
  }
  ids_.clear();
  prefix_.clear();
  prefix_index_ = 0;
  return out;
}

}  // namespace moemesh
