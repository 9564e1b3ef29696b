// Hugging Face tokenizer.json in C++: encode and decode exactly as the Python `tokenizers`
// library (0.23) does, plus an incremental detokenizer for streaming output.
//
// Supported components (anything else fails in Tokenizer::load, naming the component and file):
//   model           BPE: merges as "a b" strings or ["a", "b"] pairs, byte_fallback, ignore_merges,
//                   fuse_unk, unk_token, continuing_subword_prefix, end_of_word_suffix (dropout
//                   must be null or 0). WordPiece, WordLevel and Unigram are not supported.
//   normalizer      NFC, NFD, NFKC, NFKD, Lowercase, StripAccents, Replace (string or regex),
//                   Prepend, Strip, Sequence
//   pre_tokenizer   ByteLevel (add_prefix_space, use_regex with the GPT-2 regex), Split (string or
//                   regex; Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous;
//                   invert), Metaspace (replacement, prepend_scheme first/always/never, split),
//                   Digits, Whitespace, WhitespaceSplit, Sequence
//   decoder         ByteLevel, Metaspace, ByteFallback, Fuse, Strip, Replace, Sequence
//   post_processor  TemplateProcessing (the single-sequence template), ByteLevel,
//                   RobertaProcessing, BertProcessing, Sequence
//   added_tokens    special and non-special, with single_word, lstrip, rstrip and normalized;
//                   ids are assigned as tokenizers assigns them when it loads the file.
// "truncation" and "padding" are ignored: the server bounds sequence lengths itself.
//
// Regexes use Oniguruma's syntax in tokenizer.json; moemesh runs them with PCRE2, translating
// \s \S \w \W \h \H to Oniguruma's meaning. Unicode tables (utf8proc, PCRE2) may differ from
// Rust's for characters added in recent Unicode versions.
//
// Thread safety: a loaded Tokenizer is immutable apart from an internal word cache guarded by a
// mutex; share it freely between threads. A DecodeStream is owned by one thread (one request).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"

namespace moemesh {

class Tokenizer {
 public:
  // Reads a Hugging Face tokenizer.json. Unsupported components (a model type, pre-tokenizer,
  // normalizer, decoder or post-processor this code does not implement) fail here with a message
  // naming the component and the file.
  static Expected<std::shared_ptr<const Tokenizer>> load(
      const std::filesystem::path& tokenizer_json);
  // The same from JSON text; `source` names it in messages.
  static Expected<std::shared_ptr<const Tokenizer>> from_json_text(std::string_view json_text,
                                                                   const std::string& source);

  // As the Python `tokenizers` library encodes: added/special tokens in the text are matched first,
  // then normalizer, pre-tokenizer, model, and (with add_special_tokens) the post-processor
  // (e.g. a TemplateProcessing that adds <s>). Invalid UTF-8 input is an error.
  Expected<std::vector<int32_t>> encode(std::string_view text,
                                        bool add_special_tokens = true) const;

  // As `tokenizers` decodes (decoder chain, skip_special_tokens). Ids out of range are skipped.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = true) const;

  int64_t vocab_size() const;  // model vocab + added tokens (max id + 1)
  std::optional<int32_t> token_to_id(std::string_view token) const;
  std::optional<std::string> id_to_token(int32_t id) const;
  bool is_special(int32_t id) const;  // an added token with "special": true

  // What encode and decode drop, as `tokenizers` drops it silently, counted since load:
  // characters a BPE without unk_token or byte_fallback has no token for, and ids no token has
  // (skipped by decode() and DecodeStream).
  int64_t dropped_characters() const;
  int64_t skipped_ids() const;

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  struct Impl;

 private:
  friend class DecodeStream;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Incremental detokenizer for streaming: feed generated ids one at a time; each step returns only
// text that is final. It never returns a broken UTF-8 sequence (a multi-byte character split over
// tokens, or byte-fallback tokens, is held back until complete), and the concatenation of all
// step() results plus flush() equals decode(all ids) (same skip_special_tokens), including the
// leading-space handling of Metaspace/sentencepiece tokenizers.
//
// It decodes a short window of the previous tokens with and without the new one and emits the
// new suffix (the prefix-offset technique). Text is held back while it ends in an incomplete
// character (U+FFFD) or, for a ByteFallback decoder, while the last token is a byte token (a
// later byte could still make the whole run U+FFFD in decode(), so text a sentencepiece
// vocabulary spells in bytes, such as CJK for Llama-2 or Mistral, appears when its run of byte
// tokens ends). With prompt_ids, the prompt's last tokens are
// the starting context, so the first generated token keeps its leading space; the output is then
// the text decode(prompt + generated) adds to decode(prompt) (a character the prompt's last
// tokens leave incomplete is emitted whole once the generated tokens complete it).
//
// Owned by one thread.
class DecodeStream {
 public:
  DecodeStream(std::shared_ptr<const Tokenizer> tokenizer, bool skip_special_tokens = true,
               std::span<const int32_t> prompt_ids = {});
  std::string step(int32_t id);
  // Returns the text still held back (an incomplete character at the end becomes U+FFFD, as
  // decode() shows it) and starts over with an empty context.
  std::string flush();

 private:
  bool holds_back(const std::string& text) const;

  std::shared_ptr<const Tokenizer> tokenizer_;
  bool skip_special_tokens_;
  std::vector<int32_t> ids_;      // the window: context tokens, then tokens not yet emitted
  std::size_t prefix_index_ = 0;  // ids_[0, prefix_index_) is the context, already emitted
  std::string prefix_;            // decode(ids_[0, prefix_index_))
};

}  // namespace moemesh
