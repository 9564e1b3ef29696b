#include "core/generate.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace moemesh {
namespace {

// splitmix64: a small, seedable generator whose sequence is the same on every platform.
uint64_t next_random(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace

int32_t sample_token(std::span<const float> logits, float temperature, uint64_t& rng_state) {
  const auto best = std::max_element(logits.begin(), logits.end());
  if (temperature <= 0.0f) return static_cast<int32_t>(best - logits.begin());
  const float mx = *best;
  std::vector<double> p(logits.size());
  double sum = 0;
  for (std::size_t i = 0; i < logits.size(); ++i) {
    p[i] = std::exp(static_cast<double>((logits[i] - mx) / temperature));
    sum += p[i];
  }
  // A uniform double in [0, sum) from the top 53 bits.
  double u = static_cast<double>(next_random(rng_state) >> 11) * 0x1.0p-53 * sum;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (u < p[i]) return static_cast<int32_t>(i);
    u -= p[i];
  }
  return static_cast<int32_t>(best - logits.begin());
}

Expected<GenerateResult> generate(Model& model, std::span<const int32_t> prompt,
                                  const SamplingParams& params, bool want_prompt_logits) {
  const ModelConfig& c = model.config();
  if (prompt.empty()) return Error("the prompt is empty; give at least one token");
  if (params.max_tokens < 0)
    return Error(fmt::format("max_tokens must be >= 0, got {}", params.max_tokens));
  if (params.temperature < 0 || !std::isfinite(params.temperature))
    return Error(
        fmt::format("temperature must be a finite number >= 0, got {}", params.temperature));
  const auto total = static_cast<int64_t>(prompt.size()) + params.max_tokens;
  if (total > c.max_position_embeddings)
    return Error(
        fmt::format("this model's maximum context length is {} tokens, but the prompt "
                    "({} tokens) plus max_tokens ({}) needs {}",
                    c.max_position_embeddings, prompt.size(), params.max_tokens, total));

  GenerateResult result;
  KVCache cache = model.new_cache(total);
  std::vector<float> logits;
  if (Status s =
          model.forward(cache, prompt, want_prompt_logits ? Logits::All : Logits::Last, logits);
      !s)
    return s.error();
  const auto V = static_cast<std::size_t>(c.vocab_size);
  if (want_prompt_logits) result.prompt_logits = logits;
  std::span<const float> last(logits.data() + logits.size() - V, V);

  uint64_t rng = params.seed;
  result.finish_reason = "length";
  for (int64_t i = 0; i < params.max_tokens; ++i) {
    const int32_t next = sample_token(last, params.temperature, rng);
    result.output_ids.push_back(next);
    const bool eos =
        std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), next) != c.eos_token_ids.end();
    if (eos && !params.ignore_eos) {
      result.finish_reason = "stop";
      break;
    }
    if (i + 1 == params.max_tokens) break;
    if (Status s = model.forward(cache, std::span<const int32_t>(&next, 1), Logits::Last, logits);
        !s)
      return s.error();
    last = std::span<const float>(logits.data(), V);
  }
  return result;
}

}  // namespace moemesh
