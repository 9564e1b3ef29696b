#include "attention_worker/engine.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <list>
#include <mutex>
#include <thread>

namespace moemesh {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

struct Request {
  proto::GenerateRequest msg;
  Engine::Sink sink;
  Clock::time_point arrival;
  std::vector<int32_t> prompt;
  SamplingParams params;
  uint64_t order = 0;  // arrival order: first come, first served
};

// One sequence of a request. Before its first token the request's prompt is prefilled once (by
// the sequence with `leads` set), and the request's n sequences are made from it; a preempted
// sequence is prefilled again from prompt + output (all but the last token, which is the next
// decode input).
struct Sequence {
  std::shared_ptr<Request> request;
  int index = 0;
  bool leads = false;  // prefills the prompt for all n sequences of its request
  KVCache cache;
  std::optional<Sampler> sampler;  // set once the sequence exists (after the prompt's prefill)
  std::vector<int32_t> output;
  std::vector<int32_t> pending;  // tokens still to prefill (empty: decoding)
  std::size_t done = 0;          // of `pending`, already in the cache
  Clock::time_point scheduled;   // when it first ran (queue time ends)
  bool started = false;
  uint64_t admitted = 0;  // admission order: the newest is preempted first
  uint64_t planned = 0;   // the last step that runs this sequence (Impl::step_id)

  bool prefilling() const { return done < pending.size(); }
};

void fill_token(const SampledToken& s, bool with_logprobs, proto::SampledToken* out) {
  out->set_id(s.id);
  if (!with_logprobs) return;
  out->set_logprob(s.logprob);
  for (const TokenLogprob& t : s.top) {
    proto::TokenLogprob* e = out->add_top();
    e->set_id(t.id);
    e->set_logprob(t.logprob);
  }
}

}  // namespace

struct Engine::Impl {
  std::unique_ptr<Model> model;
  EngineOptions options;
  int64_t pool_tokens = 0;  // the KV pool's size in tokens
  int64_t block_size = 1;   // tokens per block of the pool

  // Inbox, guarded by mu.
  mutable std::mutex mu;
  std::condition_variable wake;
  std::deque<std::shared_ptr<Request>> incoming;
  std::vector<std::pair<std::string, int>> cancels;
  bool stopping = false;

  // Owned by the loop thread.
  std::deque<std::shared_ptr<Request>> waiting;  // not yet admitted, in arrival order
  std::deque<Sequence> preempted;                // to recompute, in arrival order
  std::list<Sequence> running;                   // admitted, prefilling or decoding
  uint64_t next_order = 0;
  uint64_t next_admission = 0;
  uint64_t step_id = 0;  // of the step being planned

  // Published statistics.
  std::atomic<int> n_running{0};
  std::atomic<int> n_waiting{0};
  std::atomic<double> kv_usage{0};
  std::atomic<uint64_t> prompt_tokens{0};
  std::atomic<uint64_t> generation_tokens{0};
  std::atomic<uint64_t> failed{0};
  std::atomic<uint64_t> aborted{0};
  std::atomic<uint64_t> preemptions{0};
  std::atomic<uint64_t> prefix_queries{0};
  std::atomic<uint64_t> prefix_hits{0};
  std::atomic<int> batch_sequences{0};
  std::atomic<int> batch_tokens{0};
  std::atomic<uint64_t> steps{0};

  std::thread thread;

  void loop();
  // One scheduler step; false when there was nothing to run.
  bool step();
  // Admits waiting work (preempted sequences first) while room and budget last.
  void admit(int64_t& budget);
  // Decode: makes room for one more token in s's cache, preempting the newest sequences (s
  // itself when it is the newest: then false, and s is no longer in `running`).
  bool make_room(std::list<Sequence>::iterator s);
  // Prefill: the largest chunk (up to `want` tokens) s's cache can take, preempting sequences
  // admitted after s that this step does not already run; 0 when none fits.
  int64_t fit_chunk(std::list<Sequence>::iterator s, int64_t want);
  void preempt(std::list<Sequence>::iterator s);
  // Puts s in the preempted queue, by its request's arrival, to be recomputed from s.pending.
  void requeue(Sequence s);
  // After the prompt's prefill: samples the first token of each of the request's n sequences.
  void start_sequences(std::list<Sequence>::iterator leader, std::span<const float> logits);
  // Samples s's next token from `row` and sends it (with the prompt's logprobs when given);
  // true when the sequence finished.
  bool emit(Sequence& s, std::span<float> row, bool first,
            const std::vector<proto::SampledToken>* prompt_logprobs = nullptr);
  void apply_cancels(std::vector<std::pair<std::string, int>> list);
  // Sends sequence `index`'s last delta, carrying only its finish reason.
  void send_final(Request& r, int index, const std::string& reason, const std::string& error = "");
  void publish() {
    n_running = static_cast<int>(running.size());
    n_waiting = static_cast<int>(waiting.size() + preempted.size());
    const KvCacheStats kv = model->kv_stats();
    kv_usage = kv.usage;
    prefix_queries = kv.prefix_queries_tokens;
    prefix_hits = kv.prefix_hits_tokens;
  }
};

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Expected<std::unique_ptr<Engine>> Engine::start(std::unique_ptr<Model> model,
                                                const EngineOptions& options) {
  if (options.max_num_seqs < 1) return Error("max_num_seqs must be at least 1");
  if (options.max_num_batched_tokens < 1) return Error("max_num_batched_tokens must be at least 1");
  if (Status s = model->configure_kv_cache(options.kv_cache_dtype, options.block_size,
                                           options.kv_cache_tokens, options.kv_cache_bytes,
                                           options.prefix_caching);
      !s)
    return s.error();
  auto impl = std::make_unique<Impl>();
  const KvCacheStats kv = model->kv_stats();
  impl->pool_tokens = kv.num_blocks * kv.block_size;
  impl->block_size = kv.block_size;
  impl->model = std::move(model);
  impl->options = options;
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->loop(); });
  spdlog::info(
      "engine started max_num_seqs={} max_num_batched_tokens={} kv_cache_tokens={} "
      "block_size={} kv_cache_dtype={} prefix_caching={}",
      options.max_num_seqs, options.max_num_batched_tokens, impl->pool_tokens, kv.block_size,
      options.kv_cache_dtype, options.prefix_caching);
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stopping = true;
  }
  impl_->wake.notify_all();
  impl_->thread.join();
}

const ModelConfig& Engine::config() const {
  return impl_->model->config();
}
int64_t Engine::max_model_len() const {
  const int64_t model_len = impl_->model->config().max_position_embeddings;
  return impl_->options.max_model_len > 0 ? std::min(impl_->options.max_model_len, model_len)
                                          : model_len;
}

Status Engine::submit(const proto::GenerateRequest& msg, Sink sink) {
  const ModelConfig& c = config();
  auto r = std::make_shared<Request>();
  r->msg = msg;
  r->sink = std::move(sink);
  r->arrival = Clock::now();
  r->prompt.assign(msg.prompt_ids().begin(), msg.prompt_ids().end());
  r->params = from_proto(msg.sampling());
  if (r->prompt.empty()) return Error("the prompt is empty");
  for (int32_t id : r->prompt)
    if (id < 0 || id >= c.vocab_size)
      return Error(fmt::format("prompt token id {} is out of range: the vocabulary has {} tokens",
                               id, c.vocab_size));
  if (msg.n() < 1 || msg.n() > 128)
    return Error(fmt::format("n must be between 1 and 128, got {}", msg.n()));
  if (Status s = r->params.validate(c.vocab_size); !s) return s;
  const auto prompt_len = static_cast<int64_t>(r->prompt.size());
  const int64_t total = prompt_len + r->params.max_tokens;
  if (total > max_model_len())
    return Error(
        fmt::format("This model's maximum context length is {} tokens. However, you "
                    "requested {} tokens ({} in the prompt, {} in the completion). Please "
                    "reduce the prompt or the completion length.",
                    max_model_len(), total, prompt_len, r->params.max_tokens));
  // One sequence must fit the whole pool, or it could never run even alone (n sequences share
  // their prompt's blocks and run one after another when the pool is short).
  const int64_t block = std::max<int64_t>(1, impl_->block_size);
  if ((total + block - 1) / block * block > impl_->pool_tokens)
    return Error(fmt::format(
        "the request needs {} KV cache tokens, more than the engine's whole cache of {} tokens",
        total, impl_->pool_tokens));
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->stopping) return Error("the engine is shutting down");
    impl_->incoming.push_back(std::move(r));
    impl_->n_waiting++;
  }
  impl_->wake.notify_one();
  return {};
}

void Engine::cancel(const std::string& request_id, int index) {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->cancels.emplace_back(request_id, index);
  }
  impl_->wake.notify_one();
}

proto::EngineStats Engine::stats() const {
  proto::EngineStats s;
  s.set_running(impl_->n_running);
  s.set_waiting(impl_->n_waiting);
  s.set_kv_cache_tokens(impl_->pool_tokens);
  s.set_kv_cache_usage(impl_->kv_usage);
  s.set_prompt_tokens_total(impl_->prompt_tokens);
  s.set_generation_tokens_total(impl_->generation_tokens);
  s.set_requests_failed_total(impl_->failed);
  s.set_requests_aborted_total(impl_->aborted);
  s.set_preemptions_total(impl_->preemptions);
  s.set_prefix_cache_queries_total(impl_->prefix_queries);
  s.set_prefix_cache_hits_total(impl_->prefix_hits);
  s.set_batch_sequences(impl_->batch_sequences);
  s.set_batch_tokens(impl_->batch_tokens);
  s.set_steps_total(impl_->steps);
  s.set_ready(true);
  return s;
}

void Engine::Impl::send_final(Request& r, int index, const std::string& reason,
                              const std::string& error) {
  proto::SequenceDelta d;
  d.set_request_id(r.msg.request_id());
  d.set_index(index);
  d.set_finish_reason(reason);
  if (!error.empty()) d.set_error(error);
  r.sink(std::move(d));
}

void Engine::Impl::apply_cancels(std::vector<std::pair<std::string, int>> list) {
  for (const auto& [id, index] : list) {
    for (auto it = waiting.begin(); it != waiting.end();) {
      if ((*it)->msg.request_id() == id && index < 0) {
        for (int i = 0; i < (*it)->msg.n(); ++i) send_final(**it, i, "abort");
        ++aborted;
        it = waiting.erase(it);
      } else {
        ++it;
      }
    }
    // A leader still prefilling stands for all n sequences of its request, so only cancelling
    // the whole request removes it.
    auto matches = [&](const Sequence& s) {
      return s.request->msg.request_id() == id && (index < 0 || (!s.leads && s.index == index));
    };
    auto drop = [&](auto& queue) {
      for (auto it = queue.begin(); it != queue.end();) {
        if (!matches(*it)) {
          ++it;
          continue;
        }
        // A leader (matched only with index < 0) ends all n sequences; any other, its own.
        const int first = it->leads ? 0 : it->index;
        const int end = it->leads ? it->request->msg.n() : it->index + 1;
        for (int i = first; i < end; ++i) send_final(*it->request, i, "abort");
        ++aborted;
        it = queue.erase(it);  // frees its blocks at once
      }
    };
    drop(running);
    drop(preempted);
  }
}

void Engine::Impl::preempt(std::list<Sequence>::iterator s) {
  ++preemptions;
  Sequence victim = std::move(*s);
  running.erase(s);
  victim.cache = KVCache();  // frees its blocks
  if (!victim.output.empty()) {
    victim.pending = victim.request->prompt;
    victim.pending.insert(victim.pending.end(), victim.output.begin(), victim.output.end() - 1);
  }  // else: a leader that had not finished its prompt starts it again
  spdlog::debug("preempted request={} index={} tokens={}", victim.request->msg.request_id(),
                victim.index, victim.pending.size());
  requeue(std::move(victim));
}

void Engine::Impl::requeue(Sequence s) {
  s.done = 0;
  // Back in line by arrival order, ahead of later arrivals.
  const uint64_t order = s.request->order;
  auto at = std::find_if(preempted.begin(), preempted.end(),
                         [&](const Sequence& o) { return o.request->order > order; });
  preempted.insert(at, std::move(s));
}

bool Engine::Impl::make_room(std::list<Sequence>::iterator s) {
  for (;;) {
    if (model->reserve(s->cache, s->cache.length() + 1)) return true;
    auto newest = running.begin();
    for (auto it = running.begin(); it != running.end(); ++it)
      if (it->admitted > newest->admitted) newest = it;
    const bool self = newest == s;
    preempt(newest);
    if (self) return false;
  }
}

int64_t Engine::Impl::fit_chunk(std::list<Sequence>::iterator s, int64_t want) {
  for (;;) {
    if (model->reserve(s->cache, s->cache.length() + want)) return want;
    auto victim = running.end();
    for (auto it = running.begin(); it != running.end(); ++it) {
      if (it == s || it->admitted < s->admitted || it->planned == step_id) continue;
      if (victim == running.end() || it->admitted > victim->admitted) victim = it;
    }
    if (victim == running.end()) break;
    preempt(victim);
  }
  // No one left to preempt: take what the free blocks hold.
  const KvCacheStats kv = model->kv_stats();
  const int64_t room = s->cache.capacity() - s->cache.length() +
                       kv.free_blocks * std::max<int64_t>(1, kv.block_size);
  const int64_t chunk = std::min(want, room);
  if (chunk <= 0 || !model->reserve(s->cache, s->cache.length() + chunk)) return 0;
  return chunk;
}

bool Engine::Impl::emit(Sequence& s, std::span<float> row, bool first,
                        const std::vector<proto::SampledToken>* prompt_logprobs) {
  const SampledToken t = s.sampler->sample(row, s.request->prompt, s.output);
  s.output.push_back(t.id);
  ++generation_tokens;
  proto::SequenceDelta d;
  d.set_request_id(s.request->msg.request_id());
  d.set_index(s.index);
  fill_token(t, s.request->params.logprobs >= 0, d.add_tokens());
  if (first) {
    d.set_queue_seconds(seconds_between(s.request->arrival, s.scheduled));
    d.set_prefill_seconds(seconds_between(s.scheduled, Clock::now()));
  }
  if (prompt_logprobs) {
    proto::SampledToken head;  // the first prompt token has no logprob
    head.set_id(s.request->prompt[0]);
    head.set_logprob(std::nanf(""));
    *d.add_prompt_logprobs() = head;
    for (const auto& e : *prompt_logprobs) *d.add_prompt_logprobs() = e;
  }
  const bool length = static_cast<int64_t>(s.output.size()) >= s.request->params.max_tokens;
  if (t.stop || length) d.set_finish_reason(t.stop ? "stop" : "length");
  s.request->sink(std::move(d));
  return t.stop || length;
}

void Engine::Impl::start_sequences(std::list<Sequence>::iterator leader,
                                   std::span<const float> logits) {
  Request& r = *leader->request;
  const ModelConfig& c = model->config();
  const auto V = static_cast<std::size_t>(c.vocab_size);
  const int n = r.msg.n();
  prompt_tokens += r.prompt.size();
  std::vector<proto::SampledToken> prompt_lp;
  const bool all = r.msg.prompt_logprobs();
  const std::vector<float> last(logits.end() - static_cast<std::ptrdiff_t>(V), logits.end());
  if (all) {
    const int k = std::max(0, r.params.logprobs);
    for (std::size_t i = 0; i + 1 < r.prompt.size(); ++i) {
      const SampledToken t = token_logprobs(logits.subspan(i * V, V), r.prompt[i + 1], k);
      fill_token(t, /*with_logprobs=*/true, &prompt_lp.emplace_back());
    }
  }
  // Sequences 1..n-1 share the prompt's blocks (fork); when the pool has no room for their copy,
  // they wait to recompute the prompt instead.
  std::vector<Sequence> made;
  std::vector<bool> has_cache(static_cast<std::size_t>(n), true);
  for (int i = 0; i < n; ++i) {
    Sequence s;
    s.request = leader->request;
    s.index = i;
    s.scheduled = leader->scheduled;
    s.started = true;
    SamplingParams p = r.params;
    if (p.seed) p.seed = *p.seed + static_cast<uint64_t>(i);
    s.sampler.emplace(p, c.eos_token_ids);
    if (i > 0) {
      Expected<KVCache> copy = model->fork(leader->cache);
      if (copy)
        s.cache = std::move(*copy);
      else
        has_cache[i] = false;
    }
    made.push_back(std::move(s));
  }
  made[0].cache = std::move(leader->cache);
  made[0].admitted = leader->admitted;
  const auto at = std::next(leader);
  running.erase(leader);
  for (int i = 0; i < n; ++i) {
    Sequence& s = made[i];
    std::vector<float> row = last;
    const bool finished = emit(s, row, /*first=*/true, i == 0 && all ? &prompt_lp : nullptr);
    if (finished) continue;
    if (!has_cache[i]) {
      s.pending = r.prompt;  // recompute the prompt for this sequence when there is room
      requeue(std::move(s));
      continue;
    }
    s.admitted = i == 0 ? s.admitted : next_admission++;
    running.insert(at, std::move(s));
  }
}

void Engine::Impl::admit(int64_t& budget) {
  auto room = [&] { return static_cast<int>(running.size()) < options.max_num_seqs; };
  // Preempted sequences first: they arrived before anything still waiting.
  while (!preempted.empty() && room() && budget > 0) {
    Sequence s = std::move(preempted.front());
    preempted.pop_front();
    s.cache = model->new_cache(0);
    s.admitted = next_admission++;
    running.push_back(std::move(s));
  }
  while (!waiting.empty() && room() && budget > 0 && preempted.empty()) {
    std::shared_ptr<Request> r = waiting.front();
    waiting.pop_front();
    if (r->params.max_tokens == 0) {  // nothing to generate: finish at once
      for (int i = 0; i < r->msg.n(); ++i) send_final(*r, i, "length");
      continue;
    }
    Sequence s;
    s.request = r;
    s.index = 0;
    s.leads = true;
    int64_t cached = 0;
    // Prompt logprobs need every prompt position's logits: no prefix reuse for those.
    if (r->msg.prompt_logprobs())
      s.cache = model->new_cache(0);
    else
      s.cache = model->new_cache_from_prefix(r->prompt, &cached);
    s.pending = r->prompt;
    s.done = static_cast<std::size_t>(cached);
    s.admitted = next_admission++;
    running.push_back(std::move(s));
  }
}

bool Engine::Impl::step() {
  int64_t budget = options.max_num_batched_tokens;
  // Decode: every sequence past its prefill takes one token, the oldest admitted first, so that
  // when the pool runs short the newest are preempted.
  running.sort([](const Sequence& a, const Sequence& b) { return a.admitted < b.admitted; });
  for (auto it = running.begin(); it != running.end() && budget > 0;) {
    if (it->prefilling()) {
      ++it;
      continue;
    }
    const uint64_t admitted = it->admitted;
    if (make_room(it)) {  // may preempt sequences after `it`, never before
      --budget;
      ++it;
    } else {  // `it` itself was preempted: go on after it
      it = std::find_if(running.begin(), running.end(),
                        [&](const Sequence& s) { return s.admitted > admitted; });
    }
  }
  admit(budget);
  running.sort([](const Sequence& a, const Sequence& b) { return a.admitted < b.admitted; });

  // The step: decode tokens first, then prefill chunks while the token budget lasts.
  struct Planned {
    std::list<Sequence>::iterator seq;
    std::vector<int32_t> tokens;
    bool logits;
  };
  std::vector<Planned> plan;
  ++step_id;
  int64_t left = options.max_num_batched_tokens;
  for (auto it = running.begin(); it != running.end() && left > 0; ++it)
    if (!it->prefilling() && it->cache.length() < it->cache.capacity()) {
      plan.push_back({it, {it->output.back()}, true});
      it->planned = step_id;
      --left;
    }
  // A prompt whose logprobs were asked for needs every position's logits: it runs whole, alone,
  // through forward() after the step.
  std::optional<std::list<Sequence>::iterator> whole;
  for (auto it = running.begin(); it != running.end() && left > 0;) {
    if (!it->prefilling()) {
      ++it;
      continue;
    }
    const bool all_logits = it->leads && it->request->msg.prompt_logprobs();
    if (all_logits && whole) {
      ++it;
      continue;
    }
    const auto remaining = static_cast<int64_t>(it->pending.size() - it->done);
    // May preempt sequences admitted after `it` (never `it`, never one already planned).
    const int64_t chunk = fit_chunk(it, all_logits ? remaining : std::min(remaining, left));
    const auto next = std::next(it);
    if (chunk == 0 || (all_logits && chunk < remaining)) {
      it = next;  // no room this step
      continue;
    }
    if (!it->started) {
      it->started = true;
      it->scheduled = Clock::now();
    }
    it->planned = step_id;
    if (all_logits) {
      whole = it;
    } else {
      const auto from = it->pending.begin() + static_cast<std::ptrdiff_t>(it->done);
      plan.push_back({it, std::vector<int32_t>(from, from + chunk), chunk == remaining});
      left -= chunk;
    }
    it = next;
  }
  if (plan.empty() && !whole) return false;

  const auto V = static_cast<std::size_t>(model->config().vocab_size);
  auto fail = [&](std::list<Sequence>::iterator it, const Status& status) {
    Sequence& s = *it;
    if (s.leads)
      for (int i = 0; i < s.request->msg.n(); ++i)
        send_final(*s.request, i, "error", status.error().message());
    else
      send_final(*s.request, s.index, "error", status.error().message());
    ++failed;
    running.erase(it);
  };
  if (!plan.empty()) {
    std::vector<Model::Chunk> chunks;
    chunks.reserve(plan.size());
    for (Planned& p : plan) chunks.push_back({&p.seq->cache, p.tokens, p.logits});
    std::vector<float> logits;
    const Status status = model->forward_step(chunks, logits);
    int step_tokens = 0;
    for (const Planned& p : plan) step_tokens += static_cast<int>(p.tokens.size());
    batch_sequences = static_cast<int>(plan.size());
    batch_tokens = step_tokens;
    ++steps;
    std::size_t row = 0;
    for (Planned& p : plan) {
      Sequence& s = *p.seq;
      if (!status) {
        fail(p.seq, status);
        continue;
      }
      const bool prefill = s.prefilling();
      if (prefill) s.done += p.tokens.size();
      if (!p.logits) continue;
      std::span<float> out(logits.data() + row * V, V);
      ++row;
      if (prefill && s.leads) {
        start_sequences(p.seq, out);  // the prompt is in: its logits start every sequence
      } else if (prefill) {
        s.pending.clear();  // recomputed: its last token is the next decode input
        s.done = 0;
      } else if (emit(s, out, /*first=*/false)) {
        running.erase(p.seq);
      }
    }
  }
  if (whole) {
    Sequence& s = **whole;
    std::vector<float> logits;
    const std::vector<int32_t> rest(s.pending.begin() + static_cast<std::ptrdiff_t>(s.done),
                                    s.pending.end());
    if (Status status = model->forward(s.cache, rest, Logits::All, logits); !status) {
      fail(*whole, status);
    } else {
      s.done = s.pending.size();
      start_sequences(*whole, logits);
    }
  }
  return true;
}

void Engine::Impl::loop() {
  for (;;) {
    std::vector<std::pair<std::string, int>> cancel_list;
    bool stop = false;
    {
      std::unique_lock<std::mutex> lock(mu);
      wake.wait(lock, [&] {
        return stopping || !incoming.empty() || !cancels.empty() || !running.empty() ||
               !waiting.empty() || !preempted.empty();
      });
      while (!incoming.empty()) {
        incoming.front()->order = next_order++;
        waiting.push_back(std::move(incoming.front()));
        incoming.pop_front();
      }
      cancel_list.swap(cancels);
      stop = stopping;
      if (stop) {
        for (auto& r : waiting) cancel_list.emplace_back(r->msg.request_id(), -1);
        for (auto& s : running) cancel_list.emplace_back(s.request->msg.request_id(), -1);
        for (auto& s : preempted) cancel_list.emplace_back(s.request->msg.request_id(), -1);
      }
    }
    apply_cancels(std::move(cancel_list));
    if (stop) {
      publish();
      return;
    }
    const bool ran = step();
    publish();
    if (!ran && !running.empty()) {
      // Nothing could run although sequences are admitted: the pool cannot hold even the oldest
      // one's next chunk (submit() sizes requests so this does not happen); fail them rather than
      // spin.
      spdlog::error("engine: no sequence fits the KV cache pool; failing {} sequences",
                    running.size());
      for (Sequence& s : running) {
        send_final(*s.request, s.index, "error", "the KV cache pool cannot hold this sequence");
        ++failed;
      }
      running.clear();
    }
  }
}

}  // namespace moemesh
