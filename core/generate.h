// Offline generation for one sequence: prefill the prompt, then sample token by token with a
// Sampler (core/sampling.h, which holds SamplingParams and the order in which they apply).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/model.h"
#include "core/sampling.h"

namespace moemesh {

struct GenerateResult {
  // Includes the end-of-sequence or stop token when one ended the sequence.
  std::vector<int32_t> output_ids;
  // "stop" (an end-of-sequence token, unless ignore_eos, or one of stop_token_ids ended it) or
  // "length" (max_tokens were generated).
  std::string finish_reason;
  std::vector<float> prompt_logits;    // [prompt, vocab] when asked for, else empty
  std::vector<SampledToken> logprobs;  // one per output token when params.logprobs >= 0, else empty
  uint64_t seed = 0;                   // the sampler's seed (params.seed or the random one drawn)
  // Wall time of the prompt's forward pass, and of the decode steps after it (one forward pass
  // of one token each; sampling not included).
  double prefill_seconds = 0;
  double decode_seconds = 0;
  int64_t decode_steps = 0;
};

// Generates up to params.max_tokens tokens after `prompt`. With want_prompt_logits the logits at
// every prompt position are returned too. Fails with a clear message when the prompt is empty,
// holds an id outside the vocabulary, params fail SamplingParams::validate, or prompt plus
// max_tokens exceeds the model's context.
Expected<GenerateResult> generate(Model& model, std::span<const int32_t> prompt,
                                  const SamplingParams& params, bool want_prompt_logits);

}  // namespace moemesh
