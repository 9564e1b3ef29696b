#include "core/sampling.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <random>

namespace moemesh {
namespace {

constexpr float kGreedyEpsilon = 1e-5f;  // vLLM's _SAMPLING_EPS: below it, temperature is greedy
constexpr float kInf = std::numeric_limits<float>::infinity();

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t rotl(uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}

uint64_t random_seed() {
  uint64_t seed =
      static_cast<uint64_t>(std::chrono::high_resolution_clock::now().time_since_epoch().count());
  try {
    std::random_device rd;
    seed ^= (static_cast<uint64_t>(rd()) << 32) ^ rd();
  } catch (...) {  // no entropy source: the clock alone
  }
  return seed;
}

// NaN sorts as -inf, so that comparisons stay a strict weak order.
float key(float v) {
  return std::isnan(v) ? -kInf : v;
}

// Orders token ids by decreasing value, ties to the lower id.
struct MoreLikely {
  const float* v;
  bool operator()(int32_t a, int32_t b) const {
    const float ka = key(v[a]), kb = key(v[b]);
    return ka != kb ? ka > kb : a < b;
  }
};

// The largest value (NaN ignored; -inf when there is nothing else), in 8 independent lanes so
// that the compiler can vectorise it.
float max_value(std::span<const float> v) {
  float lane[8];
  std::fill(lane, lane + 8, -kInf);
  std::size_t i = 0;
  for (; i + 8 <= v.size(); i += 8)
    for (int j = 0; j < 8; ++j) lane[j] = v[i + j] > lane[j] ? v[i + j] : lane[j];
  float mx = -kInf;
  for (float l : lane) mx = l > mx ? l : mx;
  for (; i < v.size(); ++i) mx = v[i] > mx ? v[i] : mx;
  return mx;
}

// The index of the largest value, ties to the lower id; NaN and -inf never win, and 0 is returned
// when nothing is larger than -inf.
int32_t argmax(std::span<const float> v) {
  const float mx = max_value(v);
  if (!(mx > -kInf)) return 0;
  return static_cast<int32_t>(std::find(v.begin(), v.end(), mx) - v.begin());
}

// The (at most) k most likely ids i < n with eligible(i), most likely first (ties: lower id), in
// O(n log k): a heap of the best k so far whose top is the least likely of them.
template <class Eligible>
void top_ids(const float* v, std::size_t n, std::size_t k, Eligible eligible,
             std::vector<int32_t>& out) {
  out.clear();
  if (k == 0) return;
  out.reserve(std::min(k, n));
  const MoreLikely more{v};
  float worst = -kInf;  // key of out.front() once the heap is full
  for (std::size_t i = 0; i < n; ++i) {
    if (!eligible(i)) continue;
    const auto id = static_cast<int32_t>(i);
    if (out.size() < k) {
      out.push_back(id);
      std::push_heap(out.begin(), out.end(), more);
      if (out.size() == k) worst = key(v[out.front()]);
    } else if (key(v[i]) > worst) {  // an equal value has a higher id: not better
      std::pop_heap(out.begin(), out.end(), more);
      out.back() = id;
      std::push_heap(out.begin(), out.end(), more);
      worst = key(v[out.front()]);
    }
  }
  std::sort_heap(out.begin(), out.end(), more);
}

Status invalid(std::string message) {
  return Error(std::move(message));
}

}  // namespace

Status SamplingParams::validate(int64_t vocab_size) const {
  if (!(temperature >= 0))
    return invalid(fmt::format("temperature must be >= 0, got {}", temperature));
  if (!std::isfinite(temperature))
    return invalid(fmt::format("temperature must be a finite number, got {}", temperature));
  if (!(top_p > 0 && top_p <= 1))
    return invalid(fmt::format("top_p must be in (0, 1], got {}", top_p));
  if (top_k < -1)
    return invalid(fmt::format("top_k must be -1 or 0 (off) or a positive number, got {}", top_k));
  if (!(min_p >= 0 && min_p <= 1))
    return invalid(fmt::format("min_p must be in [0, 1], got {}", min_p));
  if (!(presence_penalty >= -2 && presence_penalty <= 2))
    return invalid(fmt::format("presence_penalty must be in [-2, 2], got {}", presence_penalty));
  if (!(frequency_penalty >= -2 && frequency_penalty <= 2))
    return invalid(fmt::format("frequency_penalty must be in [-2, 2], got {}", frequency_penalty));
  if (!(repetition_penalty > 0) || !std::isfinite(repetition_penalty))
    return invalid(
        fmt::format("repetition_penalty must be a finite number > 0, got {}", repetition_penalty));
  for (const auto& [id, bias] : logit_bias) {
    if (id < 0 || id >= vocab_size)
      return invalid(
          fmt::format("logit_bias: token id {} is out of range [0, {})", id, vocab_size));
    if (!(bias >= -100 && bias <= 100))
      return invalid(fmt::format(
          "logit_bias: the bias of token id {} must be in [-100, 100], got {}", id, bias));
  }
  if (max_tokens < 0) return invalid(fmt::format("max_tokens must be >= 0, got {}", max_tokens));
  // No context is longer: a larger value (from a cluster peer) could overflow prompt + max_tokens.
  if (max_tokens > int64_t{INT32_MAX})
    return invalid(fmt::format("max_tokens must be <= {}, got {}", INT32_MAX, max_tokens));
  if (min_tokens < 0) return invalid(fmt::format("min_tokens must be >= 0, got {}", min_tokens));
  if (min_tokens > max_tokens)
    return invalid(
        fmt::format("min_tokens must be <= max_tokens ({}), got {}", max_tokens, min_tokens));
  for (int32_t id : stop_token_ids)
    if (id < 0 || id >= vocab_size)
      return invalid(
          fmt::format("stop_token_ids: token id {} is out of range [0, {})", id, vocab_size));
  if (logprobs < -1)
    return invalid(fmt::format("logprobs must be -1 (none) or >= 0, got {}", logprobs));
  if (logprobs > vocab_size)
    return invalid(
        fmt::format("logprobs must be <= the vocabulary size ({}), got {}", vocab_size, logprobs));
  return {};
}

Sampler::Sampler(SamplingParams params, std::vector<int64_t> eos_token_ids)
    : params_(std::move(params)), eos_token_ids_(std::move(eos_token_ids)) {
  seed_ = params_.seed ? *params_.seed : random_seed();
  uint64_t s = seed_;
  for (uint64_t& word : rng_) word = splitmix64(s);
}

bool Sampler::is_eos(int32_t id) const {
  return std::find(eos_token_ids_.begin(), eos_token_ids_.end(), id) != eos_token_ids_.end();
}

bool Sampler::is_stop_id(int32_t id) const {
  return std::find(params_.stop_token_ids.begin(), params_.stop_token_ids.end(), id) !=
         params_.stop_token_ids.end();
}

double Sampler::next_uniform() {
  // xoshiro256**
  uint64_t* s = rng_;
  const uint64_t result = rotl(s[1] * 5, 7) * 9;
  const uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return static_cast<double>(result >> 11) * 0x1.0p-53;
}

SampledToken token_logprobs(std::span<const float> raw, int32_t id, int32_t k) {
  // log_softmax over the raw row, in double.
  const float mx = max_value(raw);
  double sum = 0;
  for (float v : raw)
    if (v == mx)
      sum += 1;
    else if (v > -kInf)
      sum += std::exp(static_cast<double>(v) - mx);
  const double lse = static_cast<double>(mx) + std::log(sum);
  auto logprob = [&](int32_t i) {
    return static_cast<float>(static_cast<double>(raw[static_cast<std::size_t>(i)]) - lse);
  };
  SampledToken out;
  out.id = id;
  out.logprob = logprob(id);
  const auto top = std::min<std::size_t>(static_cast<std::size_t>(std::max(k, 0)), raw.size());
  if (top == 0) return out;
  std::vector<int32_t> ids;
  top_ids(
      raw.data(), raw.size(), top, [](std::size_t) { return true; }, ids);
  out.top.reserve(top);
  for (int32_t i : ids) out.top.push_back({i, logprob(i)});
  return out;
}

void Sampler::apply_penalties(std::span<float> logits, std::span<const int32_t> prompt,
                              std::span<const int32_t> output) {
  const auto V = static_cast<int64_t>(logits.size());
  auto in_range = [V](int32_t t) { return t >= 0 && t < V; };
  if (params_.repetition_penalty != 1.0f) {
    const float r = params_.repetition_penalty;
    if (seen_.size() < logits.size()) seen_.resize(logits.size(), 0);
    auto visit = [&](int32_t t) {
      if (!in_range(t) || seen_[t]) return;
      seen_[t] = 1;
      float& l = logits[t];
      l = l > 0 ? l / r : l * r;
    };
    for (int32_t t : prompt) visit(t);
    for (int32_t t : output) visit(t);
    for (int32_t t : prompt)
      if (in_range(t)) seen_[t] = 0;
    for (int32_t t : output)
      if (in_range(t)) seen_[t] = 0;
  }
  if (params_.frequency_penalty != 0.0f || params_.presence_penalty != 0.0f) {
    if (counts_.size() < logits.size()) counts_.resize(logits.size(), 0);
    for (int32_t t : output)
      if (in_range(t)) ++counts_[t];
    for (int32_t t : output) {
      if (!in_range(t) || counts_[t] == 0) continue;
      logits[t] -= params_.frequency_penalty * static_cast<float>(counts_[t]);
      logits[t] -= params_.presence_penalty;
      counts_[t] = 0;
    }
  }
}

int32_t Sampler::sample_random(std::span<float> logits) {
  const std::size_t V = logits.size();
  const float temperature = params_.temperature;
  for (float& l : logits) l /= temperature;
  const float mx = max_value(logits);
  if (!(mx > -kInf)) return 0;  // everything masked

  // Weights proportional to the probabilities, the largest being 1 (so min_p compares directly).
  if (weights_.size() < V) weights_.resize(V);
  const float min_p = params_.min_p;
  double total = 0;
  std::size_t n_left = 0;
  for (std::size_t i = 0; i < V; ++i) {
    float w = logits[i] == mx ? 1.0f : std::exp(logits[i] - mx);
    if (!(w >= min_p) || !(w > 0)) w = 0;  // NaN, masked, or below min_p
    weights_[i] = w;
    total += w;
    n_left += w > 0;
  }

  const bool use_k = params_.top_k > 0 && static_cast<std::size_t>(params_.top_k) < n_left;
  const bool use_p = params_.top_p < 1.0f;
  if (!use_k && !use_p) {  // O(vocab): draw straight from the weights
    double u = next_uniform() * total;
    int32_t last = 0;
    for (std::size_t i = 0; i < V; ++i) {
      if (weights_[i] == 0) continue;
      if (u < weights_[i]) return static_cast<int32_t>(i);
      u -= weights_[i];
      last = static_cast<int32_t>(i);
    }
    return last;  // rounding left u just past the end
  }

  // The candidates, most likely first.
  const auto left = [this](std::size_t i) { return weights_[i] > 0; };
  if (use_k) {
    top_ids(logits.data(), V, static_cast<std::size_t>(params_.top_k), left, candidates_);
    total = 0;
    for (int32_t c : candidates_) total += weights_[c];
  } else {
    // top_p alone: the most likely tokens, in growing batches until they reach the mass, so that
    // a peaked distribution costs O(vocab log batch) rather than a sort of the vocabulary.
    const double target = static_cast<double>(params_.top_p) * total;
    bool reached = false;
    for (std::size_t k = 64; !reached && k < n_left / 8; k *= 4) {
      top_ids(logits.data(), V, k, left, candidates_);
      double mass = 0;
      for (int32_t c : candidates_) mass += weights_[c];
      reached = mass >= target;
    }
    if (!reached) {  // a flat distribution: sort what is left
      candidates_.clear();
      for (std::size_t i = 0; i < V; ++i)
        if (weights_[i] > 0) candidates_.push_back(static_cast<int32_t>(i));
      const float* l = logits.data();  // no NaN among the candidates
      std::sort(candidates_.begin(), candidates_.end(),
                [l](int32_t a, int32_t b) { return l[a] != l[b] ? l[a] > l[b] : a < b; });
    }
  }
  if (use_p) {
    const double target = static_cast<double>(params_.top_p) * total;
    double mass = 0;
    std::size_t keep = 0;
    while (keep < candidates_.size() && mass < target) mass += weights_[candidates_[keep++]];
    candidates_.resize(std::max<std::size_t>(keep, 1));
    total = 0;
    for (int32_t c : candidates_) total += weights_[c];
  }
  double u = next_uniform() * total;
  for (int32_t c : candidates_) {
    if (u < weights_[c]) return c;
    u -= weights_[c];
  }
  return candidates_.back();
}

SampledToken Sampler::sample(std::span<float> logits, std::span<const int32_t> prompt,
                             std::span<const int32_t> output) {
  SampledToken out;
  const auto V = static_cast<int64_t>(logits.size());
  if (V == 0) return out;
  const bool want_logprobs = params_.logprobs >= 0;
  if (want_logprobs) raw_.assign(logits.begin(), logits.end());

  // min_tokens: no end of sequence yet.
  const bool too_short = static_cast<int64_t>(output.size()) < params_.min_tokens;
  if (too_short) {
    for (int32_t id : params_.stop_token_ids)
      if (id >= 0 && id < V) logits[id] = -kInf;
    if (!params_.ignore_eos)
      for (int64_t id : eos_token_ids_)
        if (id >= 0 && id < V) logits[id] = -kInf;
  }
  for (const auto& [id, bias] : params_.logit_bias)
    if (id >= 0 && id < V) logits[id] += bias;
  apply_penalties(logits, prompt, output);

  out.id = params_.temperature < kGreedyEpsilon ? argmax(logits) : sample_random(logits);
  out.stop = !too_short && (is_stop_id(out.id) || (!params_.ignore_eos && is_eos(out.id)));
  if (want_logprobs) {
    SampledToken lp = token_logprobs(raw_, out.id, params_.logprobs);
    out.logprob = lp.logprob;
    out.top = std::move(lp.top);
  }
  return out;
}

}  // namespace moemesh
