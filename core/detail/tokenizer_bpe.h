// The BPE model of a Hugging Face tokenizer.json (internal to core/tokenizer*.cpp), as the
// `tokenizers` library 0.23 applies it: per word, characters (with byte fallback or unk) are
// merged by rank with a priority queue; results are cached per word.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/error.h"

namespace moemesh::tokenizer_detail {

struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

// Immutable after load except for the word cache, which its mutex guards; safe to share
// between threads.
class BpeModel {
 public:
  // `where` names the model in messages ("model"); the caller adds the file.
  static Expected<std::unique_ptr<BpeModel>> from_json(const nlohmann::json& model,
                                                       const std::string& where);

  // Appends the ids of one pre-tokenized word.
  void tokenize(std::string_view word, std::vector<int32_t>& out) const;

  std::optional<int32_t> token_to_id(std::string_view token) const;
  const std::string* id_to_token(int32_t id) const;
  std::size_t vocab_count() const { return vocab_.size(); }  // tokenizers' get_vocab_size
  int64_t max_id() const { return static_cast<int64_t>(vocab_r_.size()) - 1; }
  // Characters dropped because no token, unk or byte fallback covers them.
  int64_t dropped_characters() const { return dropped_.load(std::memory_order_relaxed); }

 private:
  struct Cached {
    std::vector<int32_t> ids;
    int64_t dropped;  // characters dropped from the word
  };
  // Returns how many characters were dropped.
  int64_t merge_word(std::string_view word, std::vector<int32_t>& out) const;

  StringMap<int32_t> vocab_;
  std::vector<std::string> vocab_r_;  // by id; holes are empty and absent from vocab_
  std::vector<bool> has_id_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a,b) -> (rank, new id)
  std::optional<int32_t> unk_id_;
  std::string continuing_subword_prefix_, end_of_word_suffix_;
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false;
  int32_t byte_ids_[256];  // the id of "<0xXX>" for byte fallback, or -1

  static constexpr std::size_t kCacheCapacity = 65536;
  static constexpr std::size_t kMaxCachedWord = 256;  // bytes, as tokenizers' MAX_LENGTH
  mutable std::shared_mutex cache_mutex_;
  mutable StringMap<Cached> cache_;  // guarded by cache_mutex_
  mutable std::atomic<int64_t> dropped_{0};
};

}  // namespace moemesh::tokenizer_detail
