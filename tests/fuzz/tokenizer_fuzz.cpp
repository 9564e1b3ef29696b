// Fuzzes the tokenizer at work (core/tokenizer.h): encode of arbitrary text (also invalid UTF-8,
// added tokens, byte fallback), decode of arbitrary ids and the streaming DecodeStream, with the
// real tokenizers of tests/fixtures/tokenizers (GPT-2, Llama 2/3, Mistral, Qwen2, DeepSeek-V3 and
// the component fixtures). The stream's output must equal decode(), as the header promises.
// Input: byte 0 picks the tokenizer and flags; the rest is text to encode, whose bytes, read as
// little-endian 16-bit numbers, are also decoded as ids.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/tokenizer.h"
#include "tests/fuzz/fuzz_common.h"

namespace {

std::vector<std::shared_ptr<const moemesh::Tokenizer>>& tokenizers() {
  static std::vector<std::shared_ptr<const moemesh::Tokenizer>> all;
  return all;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  moemesh::fuzz::quiet_logs();
  const auto dir = moemesh::fuzz::fixtures_dir() / "tokenizers";
  for (const char* name : {"gpt2", "llama2", "llama3", "mistral", "qwen2", "deepseek_v3",
                           "misc_affix", "misc_bert", "misc_meta", "misc_split"}) {
    auto tok = moemesh::Tokenizer::load(dir / name / "tokenizer.json");
    if (!tok) {
      std::fprintf(stderr, "tokenizer_fuzz: %s\n", tok.error().message().c_str());
      std::abort();
    }
    tokenizers().push_back(*tok);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const auto& all = tokenizers();
  const auto& tok = all[data[0] % all.size()];
  const bool add_special = data[0] & 0x10;
  const bool skip_special = data[0] & 0x20;
  const std::string_view text = moemesh::fuzz::as_text(data + 1, size - 1);

  if (auto ids = tok->encode(text, add_special)) {
    const std::string decoded = tok->decode(*ids, skip_special);
    (void)decoded;
  }

  // Arbitrary ids, in and out of the vocabulary.
  std::vector<int32_t> ids;
  for (size_t i = 0; i + 1 < text.size(); i += 2) {
    uint16_t v;
    std::memcpy(&v, text.data() + i, 2);
    ids.push_back(v & 0x8000 ? -static_cast<int32_t>(v & 0x7fff) : static_cast<int32_t>(v));
  }
  const std::string whole = tok->decode(ids, skip_special);
  moemesh::DecodeStream stream(tok, skip_special);
  std::string streamed;
  for (int32_t id : ids) streamed += stream.step(id);
  streamed += stream.flush();
  if (streamed != whole) {
    std::fprintf(stderr, "DecodeStream gave \"%s\", decode gave \"%s\"\n", streamed.c_str(),
                 whole.c_str());
    std::abort();
  }
  return 0;
}
