// The BPE model of tokenizer.json (core/detail/tokenizer_bpe.h), ported from `tokenizers` 0.23
// (models/bpe/model.rs and word.rs).
#include <fmt/format.h>

#include <mutex>
#include <queue>

#include "core/detail/tokenizer_bpe.h"
#include "core/detail/tokenizer_text.h"

namespace moemesh::tokenizer_detail {

using nlohmann::json;

namespace {

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

// The largest id a vocabulary may use: the id -> token table is a vector.
constexpr int64_t kMaxVocabId = (int64_t{1} << 26) - 1;

}  // namespace

Expected<std::unique_ptr<BpeModel>> BpeModel::from_json(const json& m, const std::string& where) {
  auto model = std::make_unique<BpeModel>();
  const auto optional_string = [&](const char* key, std::string& out) -> Status {
    auto it = m.find(key);
    if (it == m.end() || it->is_null()) return {};
    if (!it->is_string())
      return Error(fmt::format("{} field \"{}\" must be a string or null, found {}", where, key,
                               it->dump()));
    out = it->get<std::string>();
    return {};
  };
  const auto optional_bool = [&](const char* key, bool& out) -> Status {
    auto it = m.find(key);
    if (it == m.end() || it->is_null()) return {};
    if (!it->is_boolean())
      return Error(
          fmt::format("{} field \"{}\" must be true or false, found {}", where, key, it->dump()));
    out = it->get<bool>();
    return {};
  };
  for (const char* key : {"fuse_unk", "byte_fallback", "ignore_merges"}) {
    bool v = false;
    if (Status s = optional_bool(key, v); !s) return s.error();
    if (std::string_view(key) == "fuse_unk") model->fuse_unk_ = v;
    if (std::string_view(key) == "byte_fallback") model->byte_fallback_ = v;
    if (std::string_view(key) == "ignore_merges") model->ignore_merges_ = v;
  }
  std::string unk;
  if (Status s = optional_string("unk_token", unk); !s) return s.error();
  if (Status s = optional_string("continuing_subword_prefix", model->continuing_subword_prefix_);
      !s)
    return s.error();
  if (Status s = optional_string("end_of_word_suffix", model->end_of_word_suffix_); !s)
    return s.error();
  if (auto it = m.find("dropout"); it != m.end() && !it->is_null()) {
    if (!it->is_number() || it->get<double>() < 0.0 || it->get<double>() > 1.0)
      return Error(fmt::format("{} field \"dropout\" must be a number in [0, 1], found {}", where,
                               it->dump()));
    if (it->get<double>() > 0.0)
      return Error(
          fmt::format("{} field \"dropout\" is {}; moemesh supports only deterministic "
                      "BPE (dropout null or 0)",
                      where, it->dump()));
  }

  // Vocabulary.
  auto vit = m.find("vocab");
  if (vit == m.end() || !vit->is_object())
    return Error(fmt::format("{} field \"vocab\" must be an object mapping tokens to ids", where));
  model->vocab_.reserve(vit->size());
  int64_t max_id = -1;
  for (auto it = vit->begin(); it != vit->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() > kMaxVocabId)
      return Error(
          fmt::format("{} field \"vocab\": token {} has id {}; expected an integer in "
                      "[0, {}]",
                      where, json(it.key()).dump(), it.value().dump(), kMaxVocabId));
    const int64_t id = it.value().get<int64_t>();
    model->vocab_[it.key()] = static_cast<int32_t>(id);
    max_id = std::max(max_id, id);
  }
  model->vocab_r_.resize(static_cast<std::size_t>(max_id + 1));
  model->has_id_.assign(static_cast<std::size_t>(max_id + 1), false);
  for (const auto& [token, id] : model->vocab_) {
    model->vocab_r_[id] = token;
    model->has_id_[id] = true;
  }

  // Merges: ["a b", ...] or [["a", "b"], ...]. A later duplicate pair replaces an earlier one,
  // as tokenizers' HashMap does.
  auto mit = m.find("merges");
  if (mit == m.end() || !mit->is_array())
    return Error(fmt::format("{} field \"merges\" must be a list", where));
  model->merges_.reserve(mit->size());
  const std::size_t prefix_len = model->continuing_subword_prefix_.size();
  for (std::size_t rank = 0; rank < mit->size(); ++rank) {
    const json& e = (*mit)[rank];
    std::string a, b;
    if (e.is_string()) {
      const std::string s = e.get<std::string>();
      const std::size_t sp = s.find(' ');
      if (sp == std::string::npos)
        return Error(
            fmt::format("{} field \"merges\"[{}] is {}; expected \"a b\"", where, rank, e.dump()));
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      return Error(fmt::format("{} field \"merges\"[{}] is {}; expected \"a b\" or [\"a\", \"b\"]",
                               where, rank, e.dump()));
    }
    if (prefix_len > 0 && b.compare(0, prefix_len, model->continuing_subword_prefix_) != 0)
      return Error(
          fmt::format("{} field \"merges\"[{}]: \"{}\" lacks the continuing subword "
                      "prefix \"{}\"",
                      where, rank, b, model->continuing_subword_prefix_));
    const std::string merged = a + b.substr(prefix_len);
    const auto ia = model->vocab_.find(a), ib = model->vocab_.find(b),
               im = model->vocab_.find(merged);
    for (const std::string* token : {&std::as_const(a), &std::as_const(b), &merged}) {
      if (!model->vocab_.contains(*token))
        return Error(
            fmt::format("{} field \"merges\"[{}] uses \"{}\", which is not in the "
                        "vocabulary",
                        where, rank, *token));
    }
    model->merges_[pair_key(ia->second, ib->second)] = {static_cast<int32_t>(rank), im->second};
  }

  if (!unk.empty()) {
    auto it = model->vocab_.find(unk);
    if (it == model->vocab_.end())
      return Error(fmt::format("{} field \"unk_token\" is \"{}\", which is not in the vocabulary",
                               where, unk));
    model->unk_id_ = it->second;
  }
  for (int b = 0; b < 256; ++b) {
    auto it = model->vocab_.find(fmt::format("<0x{:02X}>", b));
    model->byte_ids_[b] = it == model->vocab_.end() ? -1 : it->second;
  }
  return model;
}

std::optional<int32_t> BpeModel::token_to_id(std::string_view token) const {
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::id_to_token(int32_t id) const {
  if (id < 0 || static_cast<std::size_t>(id) >= vocab_r_.size() || !has_id_[id]) return nullptr;
  return &vocab_r_[id];
}

void BpeModel::tokenize(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (auto it = vocab_.find(word); it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() < kMaxCachedWord;
  if (cacheable) {
    std::shared_lock lock(cache_mutex_);
    if (auto it = cache_.find(word); it != cache_.end()) {
      out.insert(out.end(), it->second.ids.begin(), it->second.ids.end());
      if (it->second.dropped > 0) dropped_.fetch_add(it->second.dropped, std::memory_order_relaxed);
      return;
    }
  }
  const std::size_t first = out.size();
  const int64_t dropped = merge_word(word, out);
  if (dropped > 0) dropped_.fetch_add(dropped, std::memory_order_relaxed);
  if (cacheable) {
    Cached entry{{out.begin() + static_cast<std::ptrdiff_t>(first), out.end()}, dropped};
    std::unique_lock lock(cache_mutex_);
    if (cache_.size() >= kCacheCapacity) cache_.clear();
    cache_.emplace(std::string(word), std::move(entry));
  }
}

int64_t BpeModel::merge_word(std::string_view w, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t c;
    int32_t prev, next;
    std::size_t len;  // bytes; 0 once merged into its left neighbour
  };
  thread_local std::vector<Symbol> symbols;
  symbols.clear();
  const auto add = [&](int32_t id, std::size_t len) {
    const auto n = static_cast<int32_t>(symbols.size());
    if (n > 0) symbols.back().next = n;
    symbols.push_back({id, n - 1, -1, len});
  };

  // Characters to symbols (Word::add in merge_word).
  int64_t dropped = 0;
  bool unk = false;  // a pending run of unknown characters
  std::size_t unk_len = 0;
  std::string s;
  std::size_t i = 0;
  while (i < w.size()) {
    const std::size_t start = i;
    i += utf8_length(static_cast<unsigned char>(w[i]));
    if (i > w.size()) i = w.size();
    const std::size_t byte_len = i - start;
    std::string_view piece = w.substr(start, byte_len);
    if ((start > 0 && !continuing_subword_prefix_.empty()) ||
        (i == w.size() && !end_of_word_suffix_.empty())) {
      s.clear();
      if (start > 0) s += continuing_subword_prefix_;
      s += piece;
      if (i == w.size()) s += end_of_word_suffix_;
      piece = s;
    }
    if (auto it = vocab_.find(piece); it != vocab_.end()) {
      if (unk) {
        add(*unk_id_, unk_len);
        unk = false;
      }
      add(it->second, byte_len);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (char c : piece) all = all && byte_ids_[static_cast<uint8_t>(c)] >= 0;
      if (all) {
        for (char c : piece) add(byte_ids_[static_cast<uint8_t>(c)], 1);
        continue;
      }
    }
    if (unk_id_) {
      if (unk && fuse_unk_) {
        unk_len += byte_len;
      } else {
        if (unk) add(*unk_id_, unk_len);
        unk = true;
        unk_len = byte_len;
      }
    } else {
      ++dropped;  // without an unk token, tokenizers drops the character
    }
  }
  if (unk) add(*unk_id_, unk_len);

  // Word::merge_all: lowest rank first, then leftmost.
  struct Merge {
    int32_t pos, rank, new_id;
  };
  const auto lower = [](const Merge& a, const Merge& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  thread_local std::vector<Merge> heap_storage;
  heap_storage.clear();
  std::priority_queue<Merge, std::vector<Merge>, decltype(lower)> queue(lower,
                                                                        std::move(heap_storage));
  const auto find_merge = [&](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t>* {
    auto it = merges_.find(pair_key(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  for (std::size_t k = 0; k + 1 < symbols.size(); ++k) {
    if (const auto* m = find_merge(symbols[k].c, symbols[k + 1].c))
      queue.push({static_cast<int32_t>(k), m->first, m->second});
  }
  while (!queue.empty()) {
    const Merge top = queue.top();
    queue.pop();
    Symbol& cur = symbols[top.pos];
    if (cur.len == 0 || cur.next == -1) continue;
    const int32_t next_pos = cur.next;
    const Symbol right = symbols[next_pos];
    const auto* m = find_merge(cur.c, right.c);
    if (m == nullptr || m->second != top.new_id) continue;  // an expired entry
    cur.c = top.new_id;
    cur.len += right.len;
    cur.next = right.next;
    symbols[next_pos].len = 0;
    if (right.next > -1 && static_cast<std::size_t>(right.next) < symbols.size())
      symbols[right.next].prev = top.pos;
    if (cur.prev >= 0) {
      if (const auto* pm = find_merge(symbols[cur.prev].c, cur.c))
        queue.push({cur.prev, pm->first, pm->second});
    }
    if (cur.next >= 0 && static_cast<std::size_t>(cur.next) < symbols.size()) {
      if (const auto* nm = find_merge(cur.c, symbols[cur.next].c))
        queue.push({top.pos, nm->first, nm->second});
    }
  }
  for (const Symbol& sym : symbols)
    if (sym.len != 0) out.push_back(sym.c);
  return dropped;
}

}  // namespace moemesh::tokenizer_detail
