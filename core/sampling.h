// Sampling of the next token from one row of logits: the parameter set of the OpenAI / vLLM API.
//
// Order (that of vLLM's v1 sampler), for one row of logits:
//   1. logprobs, when asked for: log_softmax of the *raw* logits, before anything below touches
//      them (vLLM's default `raw_logprobs` mode). So a returned logprob describes the model's own
//      distribution, not the penalised / tempered / truncated one the token was drawn from.
//   2. min_tokens: while the output holds fewer than min_tokens tokens, the end-of-sequence ids
//      (unless ignore_eos) and stop_token_ids get -inf.
//   3. logit_bias: added to the logits of the listed tokens.
//   4. penalties (each skipped when at its neutral value):
//        repetition_penalty r, on every token seen in prompt or output (once per distinct token):
//          logit > 0 ? logit / r : logit * r                  (the HF / vLLM rule)
//        frequency_penalty f: logit -= f * (times the token occurs in the output)
//        presence_penalty  p: logit -= p * (1 if the token occurs in the output)
//   5. temperature < 1e-5 (vLLM's epsilon): greedy, the argmax of the logits so far (ties go to
//      the lower id); steps 6-9 do not apply and no random number is drawn.
//   6. temperature: logits / temperature.
//   7. min_p: drop tokens whose probability is below min_p * (the largest probability).
//   8. top_k: keep the k most likely tokens (exactly k; among equal logits the lower ids).
//   9. top_p: keep the smallest set of most likely tokens whose probability, renormalised over what
//      steps 7-8 left, reaches top_p (a token is kept while the mass before it is < top_p).
//  10. draw one token from the softmax of what is left (inverse CDF on one uniform number).
// min_p before top_k / top_p is vLLM v1's order (its min_p logits processor runs before the
// top-k/top-p sampler). Where this differs from vLLM: top_k keeps exactly k tokens (vLLM keeps all
// that tie with the k-th); repeated logit_bias entries for one id add up; and the random draws
// are this file's own, so a seed gives the same tokens here on every platform, not vLLM's tokens.
// Cost per token: O(vocab), plus O(prompt + output) for the penalties; greedy is one argmax pass.
// top_k adds O(vocab log k) (a bounded heap); logprobs k the same over the raw row. top_p without
// top_k takes the most likely tokens in growing batches (64, 256, ...) until they hold the mass, so
// only a flat distribution costs a sort of the vocabulary (O(vocab log vocab)).
//
// Random numbers: xoshiro256** seeded through splitmix64, whose sequence is the same on every
// platform. A Sampler draws exactly one number per non-greedy token, so a given seed and given
// logits give the same tokens. With no seed a fresh random one is taken per Sampler (request).
// For n > 1 completions of one request the serving layer creates one Sampler per sequence, with
// seeds seed, seed + 1, ..., seed + n - 1 (when a seed is set).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "core/error.h"

namespace moemesh {

struct SamplingParams {
  float temperature = 1.0f;         // 0 (below 1e-5): greedy (argmax, ties to the lower id)
  float top_p = 1.0f;               // (0, 1]
  int32_t top_k = 0;                // 0 or -1: off; >= vocab: off
  float min_p = 0.0f;               // [0, 1]
  std::optional<uint64_t> seed;     // set: reproducible; unset: a random seed per request
  float presence_penalty = 0.0f;    // [-2, 2], on generated tokens
  float frequency_penalty = 0.0f;   // [-2, 2], on generated tokens
  float repetition_penalty = 1.0f;  // > 0, on prompt and generated tokens
  std::vector<std::pair<int32_t, float>> logit_bias;  // added to the logits; bias in [-100, 100]
  int64_t max_tokens = 16;                            // >= 0
  int64_t min_tokens = 0;   // [0, max_tokens]: EOS and stop_token_ids suppressed before this many
  bool ignore_eos = false;  // EOS is then an ordinary token: neither stops nor is suppressed
  std::vector<int32_t> stop_token_ids;  // end the sequence (the token is part of the output)
  int32_t logprobs = -1;  // -1: none; k >= 0: the sampled token's logprob + the top k (k <= vocab)

  // Checks every field's range, token ids against the vocabulary. The message names the parameter
  // as the OpenAI API spells it, e.g. "temperature must be >= 0, got -1" or
  // "logit_bias: token id 99999 is out of range [0, 256)".
  Status validate(int64_t vocab_size) const;
};

struct TokenLogprob {
  int32_t id;
  float logprob;
};

struct SampledToken {
  int32_t id = 0;
  float logprob = 0;              // of the sampled token (when params.logprobs >= 0)
  std::vector<TokenLogprob> top;  // the top `logprobs` tokens, most likely first (ties: lower id)
  bool stop = false;  // EOS (unless ignore_eos) or a stop_token_id, once min_tokens are out
};

// log_softmax of one row of raw logits: the logprob of `id` and the top `k` entries (most likely
// first, ties to the lower id). This is what Sampler reports when params.logprobs >= 0; the engine
// uses it for prompt logprobs too.
SampledToken token_logprobs(std::span<const float> logits, int32_t id, int32_t k);

// One sequence's sampler.
// Thread ownership: used by one thread at a time (it keeps its random state and scratch buffers).
class Sampler {
 public:
  // params should have passed validate(); ids outside the row given to sample() are ignored.
  Sampler(SamplingParams params, std::vector<int64_t> eos_token_ids);

  // logits: one row of the model's output [vocab], modified in place: on return it holds the
  // logits after steps 2-4 (greedy) or 2-6 (sampling) above; the filters of steps 7-9 are not
  // written back. prompt / output: the sequence so far (for the penalties and min_tokens); ids
  // outside [0, vocab) in them are ignored. Deterministic for a given seed and inputs. Should
  // every token be masked (-inf or NaN), the lowest id is returned.
  SampledToken sample(std::span<float> logits, std::span<const int32_t> prompt,
                      std::span<const int32_t> output);

  const SamplingParams& params() const { return params_; }
  // The seed in use (params().seed, or the random one drawn when it was unset).
  uint64_t seed() const { return seed_; }

 private:
  bool is_eos(int32_t id) const;
  bool is_stop_id(int32_t id) const;
  void apply_penalties(std::span<float> logits, std::span<const int32_t> prompt,
                       std::span<const int32_t> output);
  int32_t sample_random(std::span<float> logits);
  double next_uniform();  // [0, 1)

  SamplingParams params_;
  std::vector<int64_t> eos_token_ids_;
  uint64_t seed_ = 0;
  uint64_t rng_[4] = {};
  // Scratch, reused across calls.
  std::vector<uint32_t> counts_;  // [vocab], zero between calls
  std::vector<uint8_t> seen_;     // [vocab], zero between calls
  std::vector<float> weights_;    // [vocab]
  std::vector<float> raw_;        // [vocab], the raw logits when logprobs are asked for
  std::vector<int32_t> candidates_;
};

}  // namespace moemesh
