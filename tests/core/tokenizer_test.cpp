// Tokenizer and DecodeStream against the Python `tokenizers` library: the fixtures of
// tests/fixtures/tokenizers/<style>/ (made by tools/make_tokenizer_fixtures.py) hold a small
// tokenizer.json per tokenizer family and the ids and strings `tokenizers` 0.23 produced.
#include "core/tokenizer.h"

#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <thread>

namespace moemesh {
namespace {

using nlohmann::json;

const std::filesystem::path kFixtures =
    std::filesystem::path(MOEMESH_SOURCE_DIR) / "tests" / "fixtures" / "tokenizers";

const char* const kStyles[] = {"gpt2",    "qwen2",     "llama3",     "deepseek_v3", "llama2",
                               "mistral", "misc_bert", "misc_split", "misc_meta",   "misc_affix"};

// Strict UTF-8 check, independent of the tokenizer's own.
bool valid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<unsigned char>(s[i]);
    int n;
    uint32_t c;
    if (b < 0x80) {
      ++i;
      continue;
    } else if ((b & 0xE0) == 0xC0) {
      n = 1, c = b & 0x1F;
    } else if ((b & 0xF0) == 0xE0) {
      n = 2, c = b & 0x0F;
    } else if ((b & 0xF8) == 0xF0) {
      n = 3, c = b & 0x07;
    } else {
      return false;
    }
    for (int k = 1; k <= n; ++k) {
      if (i + k >= s.size()) return false;
      const auto cb = static_cast<unsigned char>(s[i + k]);
      if ((cb & 0xC0) != 0x80) return false;
      c = (c << 6) | (cb & 0x3F);
    }
    const uint32_t min = n == 1 ? 0x80 : n == 2 ? 0x800 : 0x10000;
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return false;
    i += static_cast<std::size_t>(n) + 1;
  }
  return true;
}

json read_json(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::stringstream s;
  s << in.rdbuf();
  return json::parse(s.str());
}

std::vector<int32_t> ids_of(const json& j) {
  return j.get<std::vector<int32_t>>();
}

std::string show(std::string_view text) {
  return json(std::string(text)).dump();
}

// The concatenation of a DecodeStream's output over ids, checking each piece is valid UTF-8.
std::string stream_decode(const std::shared_ptr<const Tokenizer>& tok, std::span<const int32_t> ids,
                          bool skip, std::span<const int32_t> prompt = {}) {
  DecodeStream stream(tok, skip, prompt);
  std::string all;
  for (int32_t id : ids) {
    const std::string piece = stream.step(id);
    EXPECT_TRUE(valid_utf8(piece)) << "step(" << id << ") returned invalid UTF-8";
    all += piece;
  }
  const std::string rest = stream.flush();
  EXPECT_TRUE(valid_utf8(rest)) << "flush() returned invalid UTF-8";
  return all + rest;
}

class TokenizerStyle : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    const std::filesystem::path dir = kFixtures / GetParam();
    auto tok = Tokenizer::load(dir / "tokenizer.json");
    ASSERT_TRUE(tok.ok()) << tok.error().message();
    tok_ = std::move(tok.value());
    cases_ = read_json(dir / "cases.json");
  }
  std::shared_ptr<const Tokenizer> tok_;
  json cases_;
};

TEST_P(TokenizerStyle, EncodeMatchesTokenizers) {
  int checked = 0;
  for (const json& c : cases_.at("cases")) {
    const std::string text = c.at("text").get<std::string>();
    auto with = tok_->encode(text, true);
    ASSERT_TRUE(with.ok()) << show(text) << ": " << with.error().message();
    EXPECT_EQ(*with, ids_of(c.at("ids"))) << "encode(" << show(text) << ", true)";
    auto without = tok_->encode(text, false);
    ASSERT_TRUE(without.ok()) << without.error().message();
    EXPECT_EQ(*without, ids_of(c.at("ids_no_special"))) << "encode(" << show(text) << ", false)";
    ++checked;
  }
  EXPECT_GE(checked, 55);
}

TEST_P(TokenizerStyle, DecodeMatchesTokenizers) {
  for (const json& c : cases_.at("cases")) {
    const std::vector<int32_t> ids = ids_of(c.at("ids"));
    EXPECT_EQ(tok_->decode(ids, true), c.at("decoded_skip").get<std::string>())
        << "decode(encode(" << show(c.at("text").get<std::string>()) << "), skip)";
    EXPECT_EQ(tok_->decode(ids, false), c.at("decoded_keep").get<std::string>())
        << "decode(encode(" << show(c.at("text").get<std::string>()) << "), keep)";
  }
  for (const json& c : cases_.at("decode_cases")) {
    const std::vector<int32_t> ids = ids_of(c.at("ids"));
    EXPECT_EQ(tok_->decode(ids, true), c.at("skip").get<std::string>())
        << "decode(" << c.at("ids").dump() << ", skip)";
    EXPECT_EQ(tok_->decode(ids, false), c.at("keep").get<std::string>())
        << "decode(" << c.at("ids").dump() << ", keep)";
  }
}

TEST_P(TokenizerStyle, DecodeStreamReproducesDecode) {
  std::vector<std::vector<int32_t>> lists;
  for (const json& c : cases_.at("cases")) {
    lists.push_back(ids_of(c.at("ids")));
    lists.push_back(ids_of(c.at("ids_no_special")));
  }
  for (const json& c : cases_.at("decode_cases")) lists.push_back(ids_of(c.at("ids")));
  for (const auto& ids : lists) {
    for (bool skip : {true, false}) {
      EXPECT_EQ(stream_decode(tok_, ids, skip), tok_->decode(ids, skip))
          << "ids " << json(ids).dump() << " skip " << skip;
    }
  }
}

// Random id sequences, biased towards byte tokens and special tokens, which split characters
// and byte runs in every possible way.
TEST_P(TokenizerStyle, DecodeStreamReproducesDecodeOfRandomIds) {
  std::mt19937 rng(42);
  const auto n = static_cast<int32_t>(tok_->vocab_size());
  std::vector<int32_t> interesting;
  for (int32_t id = 0; id < n; ++id) {
    const std::optional<std::string> t = tok_->id_to_token(id);
    if (!t) continue;
    // Byte-fallback tokens, single byte-level characters, specials and space markers.
    if (t->starts_with("<0x") || t->size() <= 2 || tok_->is_special(id) ||
        t->find("\xE2\x96\x81") != std::string::npos)
      interesting.push_back(id);
  }
  ASSERT_FALSE(interesting.empty());
  for (int round = 0; round < 300; ++round) {
    std::vector<int32_t> ids(1 + rng() % 24);
    for (int32_t& id : ids)
      id = rng() % 3 == 0 ? static_cast<int32_t>(rng() % (n + 2))
                          : interesting[rng() % interesting.size()];
    for (bool skip : {true, false})
      ASSERT_EQ(stream_decode(tok_, ids, skip), tok_->decode(ids, skip))
          << "ids " << json(ids).dump() << " skip " << skip;
  }
}

// misc_split decodes with Replace("  " -> " ") and Strip(" ", start 2): a window of the stream
// that starts inside a run of spaces would decode it differently from the whole text (its spaces
// stripped, or paired differently). Runs of spaces after text, at the start and between text.
TEST(DecodeStream, RunsOfSpacesUnderStripAndReplaceDecoders) {
  auto tok = Tokenizer::load(kFixtures / "misc_split" / "tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.error().message();
  const int32_t bang = *(*tok)->token_to_id("!");
  const int32_t space = *(*tok)->token_to_id("\xC4\xA0");  // byte-level space
  const std::vector<std::vector<int32_t>> lists = {
      {bang, bang, bang, space, space, 18432, space, space, 15198},  // the fuzzer's case
      {bang, space, space, space, space, space, bang},
      {space, space, space, bang, space, space, space},
      {space, space, space, space, space, space, space}};
  for (const auto& ids : lists)
    for (bool skip : {true, false})
      EXPECT_EQ(stream_decode(*tok, ids, skip), (*tok)->decode(ids, skip))
          << "ids " << json(ids).dump();
}

TEST_P(TokenizerStyle, DecodeStreamContinuesAPrompt) {
  for (const json& c : cases_.at("cases")) {
    const std::vector<int32_t> all = ids_of(c.at("ids"));
    if (all.size() < 2) continue;
    for (std::size_t cut : {std::size_t{1}, all.size() / 2, all.size() - 1}) {
      const std::span<const int32_t> prompt(all.data(), cut);
      const std::span<const int32_t> generated(all.data() + cut, all.size() - cut);
      const std::string before = tok_->decode(prompt, true);
      const std::string whole = tok_->decode(all, true);
      if (!whole.starts_with(before) || before.ends_with("\xEF\xBF\xBD")) continue;
      EXPECT_EQ(stream_decode(tok_, generated, true, prompt), whole.substr(before.size()))
          << "ids " << json(all).dump() << " prompt length " << cut;
    }
  }
}

TEST_P(TokenizerStyle, VocabularyLookups) {
  EXPECT_EQ(tok_->vocab_size(), cases_.at("vocab_size").get<int64_t>());
  const json& id_to_token = cases_.at("id_to_token");
  for (int32_t id = 0; id < static_cast<int32_t>(id_to_token.size()); ++id) {
    const std::optional<std::string> t = tok_->id_to_token(id);
    if (id_to_token[id].is_null()) {
      EXPECT_FALSE(t.has_value()) << id;
    } else {
      EXPECT_EQ(t.value_or("<none>"), id_to_token[id].get<std::string>()) << id;
    }
  }
  for (const auto& [token, id] : cases_.at("vocab").items())
    EXPECT_EQ(tok_->token_to_id(token), id.get<int32_t>()) << token;
  std::vector<int32_t> specials;
  for (int32_t id = 0; id < tok_->vocab_size(); ++id)
    if (tok_->is_special(id)) specials.push_back(id);
  EXPECT_EQ(specials, ids_of(cases_.at("special_ids")));
  EXPECT_FALSE(tok_->id_to_token(-1).has_value());
  EXPECT_FALSE(tok_->id_to_token(static_cast<int32_t>(tok_->vocab_size())).has_value());
  EXPECT_FALSE(tok_->token_to_id("no such token \x01").has_value());
  EXPECT_FALSE(tok_->is_special(-5));
}

TEST_P(TokenizerStyle, InvalidUtf8IsAnError) {
  for (std::string_view bad :
       {std::string_view("\xFF"), std::string_view("abc\xC3"),
        std::string_view("\xED\xA0\x80 surrogate"), std::string_view("\xC0\xAF overlong"),
        std::string_view("ok \x80")}) {
    auto r = tok_->encode(bad);
    ASSERT_FALSE(r.ok()) << show(bad);
    EXPECT_NE(r.error().message().find("UTF-8"), std::string::npos) << r.error().message();
  }
  std::string with_nul("a\0b", 3);
  EXPECT_TRUE(tok_->encode(with_nul).ok());
}

TEST_P(TokenizerStyle, DecodeSkipsIdsOutOfRange) {
  const std::vector<int32_t> ids = {-1, static_cast<int32_t>(tok_->vocab_size()), INT32_MAX};
  const int64_t before = tok_->skipped_ids();
  EXPECT_EQ(tok_->decode(ids, false), tok_->decode(std::vector<int32_t>{}, false));
  EXPECT_EQ(tok_->skipped_ids(), before + 3);
  DecodeStream stream(tok_);
  for (int32_t id : ids) EXPECT_EQ(stream.step(id), "");
  EXPECT_EQ(stream.flush(), tok_->decode(std::vector<int32_t>{}, true));
  EXPECT_EQ(tok_->skipped_ids(), before + 6);
}

TEST_P(TokenizerStyle, EncodesConcurrently) {
  std::vector<std::string> texts;
  std::vector<std::vector<int32_t>> expected;
  for (const json& c : cases_.at("cases")) {
    texts.push_back(c.at("text").get<std::string>());
    expected.push_back(ids_of(c.at("ids")));
  }
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 5; ++round)
        for (std::size_t k = 0; k < texts.size(); ++k) {
          const std::size_t i = (k + t * 7) % texts.size();
          auto r = tok_->encode(texts[i]);
          if (!r.ok() || *r != expected[i]) ++mismatches;
        }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}

INSTANTIATE_TEST_SUITE_P(TokenizerFixtures, TokenizerStyle, ::testing::ValuesIn(kStyles),
                         [](const auto& param_info) { return std::string(param_info.param); });

// ---- Streaming of characters split over tokens -------------------------------------------------

std::shared_ptr<const Tokenizer> load_style(const char* style) {
  auto tok = Tokenizer::load(kFixtures / style / "tokenizer.json");
  EXPECT_TRUE(tok.ok()) << tok.error().message();
  return tok.ok() ? tok.value() : nullptr;
}

// The GPT-2 byte-level character that stands for byte b (UTF-8).
std::string byte_level_char(uint8_t b) {
  const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
  uint32_t c = b;
  if (!printable) {
    c = 256;
    for (int k = 0; k < b; ++k)
      if (!((k >= '!' && k <= '~') || (k >= 0xA1 && k <= 0xAC) || k >= 0xAE)) ++c;
  }
  std::string s;
  if (c < 0x80) {
    s.push_back(static_cast<char>(c));
  } else {
    s.push_back(static_cast<char>(0xC0 | (c >> 6)));
    s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
  return s;
}

TEST(TokenizerStream, HoldsBackAnEmojiSplitOverByteLevelTokens) {
  auto tok = load_style("gpt2");
  ASSERT_TRUE(tok);
  // F0 9F 98 80 (U+1F600) as four single-byte tokens of the byte-level alphabet.
  std::vector<int32_t> ids;
  for (uint8_t b : {0xF0, 0x9F, 0x98, 0x80}) {
    auto id = tok->token_to_id(byte_level_char(b));
    ASSERT_TRUE(id.has_value()) << int{b};
    ids.push_back(*id);
  }
  EXPECT_EQ(tok->decode(ids), "\xF0\x9F\x98\x80");
  DecodeStream stream(tok);
  EXPECT_EQ(stream.step(*tok->token_to_id("a")), "a");
  EXPECT_EQ(stream.step(ids[0]), "");
  EXPECT_EQ(stream.step(ids[1]), "");
  EXPECT_EQ(stream.step(ids[2]), "");
  EXPECT_EQ(stream.step(ids[3]), "\xF0\x9F\x98\x80");
  EXPECT_EQ(stream.step(*tok->token_to_id("b")), "b");
  EXPECT_EQ(stream.flush(), "");
}

TEST(TokenizerStream, HoldsBackByteFallbackTokensUntilTheRunEnds) {
  for (const char* style : {"llama2", "mistral"}) {
    auto tok = load_style(style);
    ASSERT_TRUE(tok);
    std::vector<int32_t> bytes;
    for (const char* b : {"<0xF0>", "<0x9F>", "<0x98>", "<0x80>"})
      bytes.push_back(*tok->token_to_id(b));
    const std::optional<int32_t> word = tok->token_to_id(
        "\xE2\x96\x81"
        "a");  // "▁a"
    ASSERT_TRUE(word.has_value()) << style;
    DecodeStream stream(tok);
    EXPECT_EQ(stream.step(*word), "a") << style;
    for (int32_t id : bytes) EXPECT_EQ(stream.step(id), "") << style;
    EXPECT_EQ(stream.step(*word), "\xF0\x9F\x98\x80 a") << style;
    EXPECT_EQ(stream.flush(), "") << style;

    // An invalid run: each byte becomes U+FFFD, as decode() shows it.
    DecodeStream bad(tok);
    std::string out = bad.step(bytes[0]);
    out += bad.step(*tok->token_to_id("<0x41>"));
    out += bad.flush();
    EXPECT_EQ(out, "\xEF\xBF\xBD\xEF\xBF\xBD") << style;
  }
}

TEST(TokenizerStream, KeepsTheLeadingSpaceOfMetaspaceTokens) {
  for (const char* style : {"llama2", "mistral", "misc_meta"}) {
    auto tok = load_style(style);
    ASSERT_TRUE(tok);
    auto ids = tok->encode("over the lazy dog", false);
    ASSERT_TRUE(ids.ok());
    std::vector<std::string> pieces;
    DecodeStream stream(tok);
    std::string all;
    for (int32_t id : *ids) all += stream.step(id);
    all += stream.flush();
    EXPECT_EQ(all, "over the lazy dog") << style;

    // After a prompt, the first generated word keeps its space.
    auto prompt = tok->encode("over the", true);
    auto generated = tok->encode(" lazy", false);
    ASSERT_TRUE(prompt.ok() && generated.ok());
    std::vector<int32_t> both = *prompt;
    both.insert(both.end(), generated->begin(), generated->end());
    const std::string whole = tok->decode(both);
    const std::string before = tok->decode(*prompt);
    ASSERT_TRUE(whole.starts_with(before)) << style;
    EXPECT_EQ(stream_decode(tok, *generated, true, *prompt), whole.substr(before.size())) << style;
  }
}

// ---- Loading errors ----------------------------------------------------------------------------

class TokenizerFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("moemesh_tokenizer_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::filesystem::path write(const std::string& name, const std::string& text) {
    const std::filesystem::path p = dir_ / name;
    std::ofstream(p) << text;
    return p;
  }

  // A minimal valid tokenizer.json with one component replaced.
  static json minimal() {
    return json::parse(R"({
      "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
      "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
      "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}})");
  }

  // Loads `j` from a file and expects an error naming the file and every fragment.
  void expect_error(const json& j, std::initializer_list<std::string> fragments) {
    const std::filesystem::path p = write("tokenizer.json", j.dump());
    auto tok = Tokenizer::load(p);
    ASSERT_FALSE(tok.ok()) << j.dump();
    const std::string& m = tok.error().message();
    EXPECT_NE(m.find(p.string()), std::string::npos) << m;
    for (const std::string& f : fragments) EXPECT_NE(m.find(f), std::string::npos) << m;
  }

  std::filesystem::path dir_;
};

TEST_F(TokenizerFiles, MinimalFileLoads) {
  auto tok = Tokenizer::load(write("tokenizer.json", minimal().dump()));
  ASSERT_TRUE(tok.ok()) << tok.error().message();
  EXPECT_EQ(*(*tok)->encode("abba"), (std::vector<int32_t>{2, 1, 0}));
  EXPECT_EQ((*tok)->decode(std::vector<int32_t>{2, 1}), "ab b");  // no decoder: joined by spaces
}

// Without unk_token or byte_fallback, tokenizers drops characters it has no token for; moemesh
// drops them too (the ids must match) but counts them, also when the word comes from the cache.
TEST_F(TokenizerFiles, DroppedCharactersAreCounted) {
  auto tok = Tokenizer::load(write("tokenizer.json", minimal().dump()));
  ASSERT_TRUE(tok.ok()) << tok.error().message();
  EXPECT_EQ((*tok)->dropped_characters(), 0);
  EXPECT_EQ(*(*tok)->encode("a?b\xC3\xA9"), (std::vector<int32_t>{2}));
  EXPECT_EQ((*tok)->dropped_characters(), 2);
  EXPECT_EQ(*(*tok)->encode("a?b\xC3\xA9"), (std::vector<int32_t>{2}));
  EXPECT_EQ((*tok)->dropped_characters(), 4);
}

TEST_F(TokenizerFiles, MissingFileNamesTheFile) {
  const std::filesystem::path p = dir_ / "absent" / "tokenizer.json";
  auto tok = Tokenizer::load(p);
  ASSERT_FALSE(tok.ok());
  EXPECT_NE(tok.error().message().find(p.string()), std::string::npos) << tok.error().message();
  EXPECT_NE(tok.error().message().find("does not exist"), std::string::npos);
}

TEST_F(TokenizerFiles, InvalidJsonNamesTheFile) {
  const std::filesystem::path p = write("tokenizer.json", "{\"model\": {\"type\": \"BPE\",");
  auto tok = Tokenizer::load(p);
  ASSERT_FALSE(tok.ok());
  EXPECT_NE(tok.error().message().find(p.string()), std::string::npos);
  EXPECT_NE(tok.error().message().find("not valid JSON"), std::string::npos);
  expect_error(json::array(), {"JSON object"});
}

TEST_F(TokenizerFiles, UnsupportedModelTypeIsNamed) {
  json j = minimal();
  j["model"] = {{"type", "WordPiece"}, {"unk_token", "[UNK]"}, {"vocab", {{"a", 0}}}};
  expect_error(j, {"model type \"WordPiece\"", "not supported"});
  j["model"] = {{"type", "Unigram"}, {"unk_id", 0}, {"vocab", json::array({{"a", -1.0}})}};
  expect_error(j, {"model type \"Unigram\"", "not supported"});
}

TEST_F(TokenizerFiles, UnsupportedComponentsAreNamed) {
  json j = minimal();
  j["pre_tokenizer"] = {{"type", "BertPreTokenizer"}};
  expect_error(j, {"pre_tokenizer type \"BertPreTokenizer\"", "not supported"});
  j = minimal();
  j["pre_tokenizer"] = json::parse(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Digits", "individual_digits": true}, {"type": "UnicodeScripts"}]})");
  expect_error(j, {"pre_tokenizer.pretokenizers[1] type \"UnicodeScripts\""});
  j = minimal();
  j["normalizer"] = {{"type", "Precompiled"}, {"precompiled_charsmap", "AAAA"}};
  expect_error(j, {"normalizer type \"Precompiled\""});
  j = minimal();
  j["decoder"] = {{"type", "WordPiece"}, {"prefix", "##"}};
  expect_error(j, {"decoder type \"WordPiece\""});
  j = minimal();
  j["post_processor"] = {{"type", "Mystery"}};
  expect_error(j, {"post_processor type \"Mystery\""});
}

TEST_F(TokenizerFiles, BadFieldsAreNamed) {
  json j = minimal();
  j["model"]["merges"] = json::parse(R"([["a", "zz"]])");
  expect_error(j, {"merges", "\"zz\"", "not in the vocabulary"});
  j = minimal();
  j["model"]["dropout"] = 0.1;
  expect_error(j, {"dropout"});
  j = minimal();
  j["pre_tokenizer"] = {{"type", "Split"},
                        {"pattern", {{"Regex", "(unclosed"}}},
                        {"behavior", "Isolated"},
                        {"invert", false}};
  expect_error(j, {"pre_tokenizer (Split)", "(unclosed", "does not compile"});
  j = minimal();
  j["pre_tokenizer"] = {{"type", "Split"},
                        {"pattern", {{"String", " "}}},
                        {"behavior", "Sideways"},
                        {"invert", false}};
  expect_error(j, {"behavior", "Sideways"});
  j = minimal();
  j["model"]["vocab"] = {{"a", -3}};
  expect_error(j, {"vocab", "-3"});
  j = minimal();
  j["added_tokens"] = json::parse(R"([{"id": 5, "content": 7}])");
  expect_error(j, {"added_tokens[0]"});
  j = minimal();
  j["post_processor"] = json::parse(R"({"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}], "special_tokens": {}})");
  expect_error(j, {"post_processor (TemplateProcessing)", "<s>"});
}

// tokenizers panics on this decoder when a token is shorter than "stop"; moemesh clamps. The
// expected string is what tokenizers 0.23 returns for decoders.Strip(" ", 1, 2).decode(...).
TEST_F(TokenizerFiles, StripDecoderStripsBothEnds) {
  json j = minimal();
  j["model"]["vocab"] = {{"  a  ", 0}, {" b ", 1}, {" ", 2}};
  j["model"]["merges"] = json::array();
  j["decoder"] = {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 2}};
  auto tok = Tokenizer::load(write("tokenizer.json", j.dump()));
  ASSERT_TRUE(tok.ok()) << tok.error().message();
  EXPECT_EQ((*tok)->decode(std::vector<int32_t>{0, 1}), " ab");
  EXPECT_EQ((*tok)->decode(std::vector<int32_t>{2, 2}), "");
  EXPECT_EQ((*tok)->decode(std::vector<int32_t>{}), "");
}

// Added-token ids are assigned as tokenizers assigns them on load, not taken from the file.
TEST_F(TokenizerFiles, AddedTokenIdsFollowTheVocabulary) {
  json j = minimal();
  j["model"]["vocab"] = {{"a", 0}, {"b", 1}, {"c", 5}};
  j["model"]["merges"] = json::array();
  const auto token = [](int id, const char* content) {
    return json{{"id", id},        {"content", content},  {"single_word", false}, {"lstrip", false},
                {"rstrip", false}, {"normalized", false}, {"special", true}};
  };
  j["added_tokens"] = {token(10, "<x>"), token(3, "<y>"), token(7, "b")};
  auto tok = Tokenizer::load(write("tokenizer.json", j.dump()));
  ASSERT_TRUE(tok.ok()) << tok.error().message();
  // tokenizers 0.23: <x> -> 3 (the vocabulary has 3 entries), <y> -> 4, b stays 1.
  EXPECT_EQ(*(*tok)->encode("a<x>b<y>c"), (std::vector<int32_t>{0, 3, 1, 4, 5}));
  EXPECT_EQ((*tok)->decode(std::vector<int32_t>{0, 10, 3, 1, 99, 5}, true), "a c");
  EXPECT_EQ((*tok)->decode(std::vector<int32_t>{0, 10, 3, 1, 99, 5}, false), "a <x> b c");
  EXPECT_TRUE((*tok)->is_special(1));
  EXPECT_EQ((*tok)->vocab_size(), 6);
}

}  // namespace
}  // namespace moemesh
