// Offline generation for one sequence: prefill the prompt, then sample token by token.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/model.h"

namespace moemesh {

struct SamplingParams {
  int64_t max_tokens = 16;
  float temperature = 0.0f;  // 0: greedy (argmax; ties go to the lower token id)
  uint64_t seed = 0;
  bool ignore_eos = false;  // keep going after an end-of-sequence token
};

struct GenerateResult {
  std::vector<int32_t> output_ids;   // includes the end-of-sequence token when one stopped it
  std::string finish_reason;         // "stop" (end of sequence) or "length" (max_tokens)
  std::vector<float> prompt_logits;  // [prompt, vocab] when asked for, else empty
};

// Picks the next token from one row of logits.
int32_t sample_token(std::span<const float> logits, float temperature, uint64_t& rng_state);

// Generates up to params.max_tokens tokens after `prompt`. With want_prompt_logits the logits at
// every prompt position are returned too. Fails with a clear message when the prompt is empty,
// holds an id outside the vocabulary, or prompt plus max_tokens exceeds the model's context.
Expected<GenerateResult> generate(Model& model, std::span<const int32_t> prompt,
                                  const SamplingParams& params, bool want_prompt_logits);

}  // namespace moemesh
