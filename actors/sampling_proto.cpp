#include "actors/sampling_proto.h"

#include <algorithm>

namespace moemesh {

SamplingParams from_proto(const proto::SamplingParams& p) {
  SamplingParams s;
  s.temperature = p.temperature();
  s.top_p = p.top_p();
  s.top_k = p.top_k();
  s.min_p = p.min_p();
  if (p.has_seed()) s.seed = p.seed();
  s.presence_penalty = p.presence_penalty();
  s.frequency_penalty = p.frequency_penalty();
  s.repetition_penalty = p.repetition_penalty();
  for (const auto& [id, bias] : p.logit_bias()) s.logit_bias.emplace_back(id, bias);
  std::sort(s.logit_bias.begin(), s.logit_bias.end());
  s.max_tokens = p.max_tokens();
  s.min_tokens = p.min_tokens();
  s.ignore_eos = p.ignore_eos();
  s.stop_token_ids.assign(p.stop_token_ids().begin(), p.stop_token_ids().end());
  s.logprobs = p.logprobs();
  return s;
}

proto::SamplingParams to_proto(const SamplingParams& s) {
  proto::SamplingParams p;
  p.set_temperature(s.temperature);
  p.set_top_p(s.top_p);
  p.set_top_k(s.top_k);
  p.set_min_p(s.min_p);
  p.set_has_seed(s.seed.has_value());
  p.set_seed(s.seed.value_or(0));
  p.set_presence_penalty(s.presence_penalty);
  p.set_frequency_penalty(s.frequency_penalty);
  p.set_repetition_penalty(s.repetition_penalty);
  for (const auto& [id, bias] : s.logit_bias) (*p.mutable_logit_bias())[id] = bias;
  p.set_max_tokens(s.max_tokens);
  p.set_min_tokens(s.min_tokens);
  p.set_ignore_eos(s.ignore_eos);
  for (int32_t id : s.stop_token_ids) p.add_stop_token_ids(id);
  p.set_logprobs(s.logprobs);
  return p;
}

}  // namespace moemesh
