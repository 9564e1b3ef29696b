// The components of a Hugging Face tokenizer.json around its model (internal to
// core/tokenizer*.cpp): normalizers, pre-tokenizers, decoders and post-processors, each
// behaving as the `tokenizers` library (0.23) does, and parsed from their JSON objects.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"

namespace moemesh::tokenizer_detail {

// One split of the text being encoded (tokenizers' PreTokenizedString split).
struct Piece {
  std::string text;
  int32_t id = -1;         // >= 0: an added token already recognised; no further processing
  bool at_origin = false;  // starts at byte 0 of the original input (Metaspace "first")
};

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void normalize(std::string& text) const = 0;
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Splits (and may transform) every piece that is not an added token; empty pieces vanish.
  virtual void pre_tokenize(std::vector<Piece>& pieces) const = 0;
};

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
  // The tokenizer holds a DecodeStream back while the last token is one this decoder may still
  // combine with the next tokens (a byte-fallback token of an unfinished byte run).
  virtual bool joins_byte_tokens() const { return false; }
};

class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  virtual void process(std::vector<int32_t>& ids, bool add_special_tokens) const = 0;
};

// Parsers. `where` is the JSON path of the component ("pre_tokenizer.pretokenizers[1]") and
// appears in error messages; the caller adds the file name. A null JSON value gives nullptr.
Expected<std::unique_ptr<Normalizer>> parse_normalizer(const nlohmann::json& j,
                                                       const std::string& where);
Expected<std::unique_ptr<PreTokenizer>> parse_pre_tokenizer(const nlohmann::json& j,
                                                            const std::string& where);
Expected<std::unique_ptr<Decoder>> parse_decoder(const nlohmann::json& j, const std::string& where);
Expected<std::unique_ptr<PostProcessor>> parse_post_processor(const nlohmann::json& j,
                                                              const std::string& where);

// The GPT-2 byte-to-character table of the ByteLevel components.
const std::string& byte_level_char(uint8_t b);  // UTF-8 of the character standing for byte b
int byte_level_byte(char32_t c);                // the byte character c stands for, or -1

// "<0x41>" -> 0x41, as the ByteFallback decoder reads a byte token; -1 when s is not one.
int parse_byte_token(std::string_view s);

}  // namespace moemesh::tokenizer_detail
