// Fuzzes the tokenizer.json loader (core/tokenizer.h Tokenizer::from_json_text): model, merges,
// normalizers, pre-tokenizers (regexes compiled with PCRE2), decoders, post-processors, added
// tokens. A tokenizer that loads must then encode and decode a short text without failing hard.
// Input: tokenizer.json text.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/tokenizer.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  moemesh::fuzz::quiet_logs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto tok =
      moemesh::Tokenizer::from_json_text(moemesh::fuzz::as_text(data, size), "tokenizer.json");
  if (!tok) return 0;
  const auto& t = **tok;
  for (const char* text : {"Hello world! 123", " \xc3\xa9t\xc3\xa9  <s>\n\t"}) {
    auto ids = t.encode(text, true);
    if (!ids) continue;
    (void)t.decode(*ids, true);
    (void)t.decode(*ids, false);
  }
  const int32_t probe[] = {0, 1, 2, static_cast<int32_t>(t.vocab_size()) - 1, -1};
  (void)t.decode(probe, false);
  for (int32_t id : probe) {
    if (auto s = t.id_to_token(id)) (void)t.token_to_id(*s);
    (void)t.is_special(id);
  }
  return 0;
}
