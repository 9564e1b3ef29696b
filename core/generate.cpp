#include "core/generate.h"

#include <fmt/format.h>

#include <chrono>

namespace moemesh {

Expected<GenerateResult> generate(Model& model, std::span<const int32_t> prompt,
                                  const SamplingParams& params, bool want_prompt_logits) {
  const ModelConfig& c = model.config();
  if (prompt.empty()) return Error("the prompt is empty; give at least one token");
  if (Status s = params.validate(c.vocab_size); !s) return s.error();
  const auto total = static_cast<int64_t>(prompt.size()) + params.max_tokens;
  if (total > c.max_position_embeddings)
    return Error(
        fmt::format("this model's maximum context length is {} tokens, but the prompt "
                    "({} tokens) plus max_tokens ({}) needs {}",
                    c.max_position_embeddings, prompt.size(), params.max_tokens, total));

  using Clock = std::chrono::steady_clock;
  GenerateResult result;
  KVCache cache = model.new_cache(total);
  std::vector<float> logits;
  const auto prefill_start = Clock::now();
  if (Status s =
          model.forward(cache, prompt, want_prompt_logits ? Logits::All : Logits::Last, logits);
      !s)
    return s.error();
  result.prefill_seconds = std::chrono::duration<double>(Clock::now() - prefill_start).count();
  const auto V = static_cast<std::size_t>(c.vocab_size);
  if (want_prompt_logits) result.prompt_logits = logits;
  std::span<float> last(logits.data() + logits.size() - V, V);

  Sampler sampler(params, c.eos_token_ids);
  result.seed = sampler.seed();
  result.finish_reason = "length";
  result.output_ids.reserve(static_cast<std::size_t>(params.max_tokens));
  for (int64_t i = 0; i < params.max_tokens; ++i) {
    SampledToken token = sampler.sample(last, prompt, result.output_ids);
    const int32_t next = token.id;
    result.output_ids.push_back(next);
    const bool stop = token.stop;
    if (params.logprobs >= 0) result.logprobs.push_back(std::move(token));
    if (stop) {
      result.finish_reason = "stop";
      break;
    }
    if (i + 1 == params.max_tokens) break;
    const auto step_start = Clock::now();
    if (Status s = model.forward(cache, std::span<const int32_t>(&next, 1), Logits::Last, logits);
        !s)
      return s.error();
    result.decode_seconds += std::chrono::duration<double>(Clock::now() - step_start).count();
    ++result.decode_steps;
    last = std::span<float>(logits.data(), V);
  }
  return result;
}

}  // namespace moemesh
