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
  int64_t reservation = 0;  // cache tokens held by each of its sequences
};

struct Sequence {
  std::shared_ptr<Request> request;
  int index = 0;
  KVCache cache;
  Sampler sampler;
  std::vector<int32_t> output;
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
  int64_t budget = 0;  // cache tokens

  // Inbox, guarded by mu.
  mutable std::mutex mu;
  std::condition_variable wake;
  std::deque<std::shared_ptr<Request>> incoming;
  std::vector<std::pair<std::string, int>> cancels;
  bool stopping = false;

  // Owned by the loop thread.
  std::deque<std::shared_ptr<Request>> waiting;
  std::list<Sequence> running;
  int64_t reserved = 0;

  // Published statistics.
  std::atomic<int> n_running{0};
  std::atomic<int> n_waiting{0};
  std::atomic<int64_t> reserved_pub{0};
  std::atomic<uint64_t> prompt_tokens{0};
  std::atomic<uint64_t> generation_tokens{0};
  std::atomic<uint64_t> failed{0};
  std::atomic<uint64_t> aborted{0};

  std::thread thread;

  void loop();
  void admit();
  void prefill(const std::shared_ptr<Request>& r);
  void decode_step();
  void apply_cancels(std::vector<std::pair<std::string, int>> list);
  // Sends sequence `index`'s last delta, carrying only its finish reason, and counts it.
  void send_final(Request& r, int index, const std::string& reason, const std::string& error = "");
  void fail_request(const std::shared_ptr<Request>& r, const std::string& error);
  void publish() {
    n_running = static_cast<int>(running.size());
    n_waiting = static_cast<int>(waiting.size());
    reserved_pub = reserved;
  }
};

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

std::unique_ptr<Engine> Engine::start(std::unique_ptr<Model> model, const EngineOptions& options) {
  auto impl = std::make_unique<Impl>();
  const ModelConfig& c = model->config();
  const int64_t bytes_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4;
  impl->budget = options.kv_cache_tokens > 0
                     ? options.kv_cache_tokens
                     : std::max<int64_t>(1, options.kv_cache_bytes / bytes_per_token);
  impl->model = std::move(model);
  impl->options = options;
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->loop(); });
  spdlog::info("engine started max_num_seqs={} kv_cache_tokens={}", options.max_num_seqs,
               impl->budget);
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
  r->reservation = total;
  if (total * msg.n() > impl_->budget)
    return Error(
        fmt::format("the request needs {} KV cache tokens ({} sequences of {}), more than "
                    "the engine's whole cache of {} tokens",
                    total * msg.n(), msg.n(), total, impl_->budget));
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
  s.set_kv_cache_tokens(impl_->budget);
  s.set_kv_cache_usage(static_cast<double>(impl_->reserved_pub) /
                       static_cast<double>(impl_->budget));
  s.set_prompt_tokens_total(impl_->prompt_tokens);
  s.set_generation_tokens_total(impl_->generation_tokens);
  s.set_requests_failed_total(impl_->failed);
  s.set_requests_aborted_total(impl_->aborted);
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

void Engine::Impl::fail_request(const std::shared_ptr<Request>& r, const std::string& error) {
  ++failed;
  for (int i = 0; i < r->msg.n(); ++i) send_final(*r, i, "error", error);
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
    for (auto it = running.begin(); it != running.end();) {
      if (it->request->msg.request_id() == id && (index < 0 || it->index == index)) {
        send_final(*it->request, it->index, "abort");
        ++aborted;
        reserved -= it->request->reservation;
        it = running.erase(it);
      } else {
        ++it;
      }
    }
  }
}

void Engine::Impl::prefill(const std::shared_ptr<Request>& r) {
  const auto start = Clock::now();
  const ModelConfig& c = model->config();
  const auto V = static_cast<std::size_t>(c.vocab_size);
  KVCache cache = model->new_cache(r->reservation);
  std::vector<float> logits;
  const bool all = r->msg.prompt_logprobs();
  if (Status s = model->forward(cache, r->prompt, all ? Logits::All : Logits::Last, logits); !s) {
    fail_request(r, s.error().message());
    return;
  }
  prompt_tokens += r->prompt.size();
  std::vector<proto::SampledToken> prompt_lp;
  if (all) {
    const int k = std::max(0, r->params.logprobs);
    for (std::size_t i = 0; i + 1 < r->prompt.size(); ++i) {
      const SampledToken t =
          token_logprobs(std::span<const float>(logits.data() + i * V, V), r->prompt[i + 1], k);
      fill_token(t, /*with_logprobs=*/true, &prompt_lp.emplace_back());
    }
  }
  const std::vector<float> last(logits.end() - static_cast<std::ptrdiff_t>(V), logits.end());
  const double queue_s = seconds_between(r->arrival, start);
  const double prefill_s = seconds_between(start, Clock::now());
  for (int i = 0; i < r->msg.n(); ++i) {
    SamplingParams p = r->params;
    if (p.seed) p.seed = *p.seed + static_cast<uint64_t>(i);
    Sequence s{
        r, i, i + 1 < r->msg.n() ? cache : std::move(cache), Sampler(p, c.eos_token_ids), {}};
    std::vector<float> row = last;
    const SampledToken t = s.sampler.sample(row, r->prompt, s.output);
    s.output.push_back(t.id);
    ++generation_tokens;
    proto::SequenceDelta d;
    d.set_request_id(r->msg.request_id());
    d.set_index(i);
    fill_token(t, r->params.logprobs >= 0, d.add_tokens());
    d.set_queue_seconds(queue_s);
    d.set_prefill_seconds(prefill_s);
    if (i == 0 && all) {
      proto::SampledToken first;  // the first prompt token has no logprob
      first.set_id(r->prompt[0]);
      first.set_logprob(std::nanf(""));
      *d.add_prompt_logprobs() = first;
      for (auto& e : prompt_lp) *d.add_prompt_logprobs() = e;
    }
    const bool length = static_cast<int64_t>(s.output.size()) >= r->params.max_tokens;
    if (t.stop || length) d.set_finish_reason(t.stop ? "stop" : "length");
    r->sink(std::move(d));
    if (!t.stop && !length) {
      reserved += r->reservation;
      running.push_back(std::move(s));
    }
  }
}

void Engine::Impl::admit() {
  while (!waiting.empty() && static_cast<int>(running.size()) < options.max_num_seqs) {
    const std::shared_ptr<Request>& r = waiting.front();
    if (reserved + r->reservation * r->msg.n() > budget && !running.empty()) break;
    std::shared_ptr<Request> next = r;
    waiting.pop_front();
    publish();
    if (next->params.max_tokens == 0) {  // nothing to generate: finish at once
      for (int i = 0; i < next->msg.n(); ++i) send_final(*next, i, "length");
      continue;
    }
    prefill(next);
  }
}

void Engine::Impl::decode_step() {
  if (running.empty()) return;
  // One forward over every running sequence: each MoE layer makes one expert call for the batch.
  std::vector<KVCache*> caches;
  std::vector<int32_t> last;
  caches.reserve(running.size());
  last.reserve(running.size());
  for (Sequence& s : running) {
    caches.push_back(&s.cache);
    last.push_back(s.output.back());
  }
  std::vector<float> logits;
  const Status step = model->forward_batch(caches, last, logits);
  const int64_t vocab = model->config().vocab_size;
  std::size_t b = 0;
  for (auto it = running.begin(); it != running.end(); ++b) {
    Sequence& s = *it;
    std::string reason;
    std::string error;
    if (!step) {
      reason = "error";
      error = step.error().message();
    } else {
      const std::span<float> row(logits.data() + static_cast<int64_t>(b) * vocab,
                                 static_cast<std::size_t>(vocab));
      const SampledToken t = s.sampler.sample(row, s.request->prompt, s.output);
      s.output.push_back(t.id);
      ++generation_tokens;
      proto::SequenceDelta d;
      d.set_request_id(s.request->msg.request_id());
      d.set_index(s.index);
      fill_token(t, s.request->params.logprobs >= 0, d.add_tokens());
      const bool length = static_cast<int64_t>(s.output.size()) >= s.request->params.max_tokens ||
                          s.cache.length() + 1 > s.cache.capacity();
      if (t.stop || length) {
        d.set_finish_reason(t.stop ? "stop" : "length");
        reason = d.finish_reason();
      }
      s.request->sink(std::move(d));
    }
    if (!reason.empty()) {
      if (reason == "error") {
        send_final(*s.request, s.index, reason, error);
        ++failed;
      }
      reserved -= s.request->reservation;
      it = running.erase(it);
    } else {
      ++it;
    }
  }
}

void Engine::Impl::loop() {
  for (;;) {
    std::vector<std::pair<std::string, int>> cancel_list;
    bool stop = false;
    {
      std::unique_lock<std::mutex> lock(mu);
      wake.wait(lock, [&] {
        return stopping || !incoming.empty() || !cancels.empty() || !running.empty() ||
               !waiting.empty();
      });
      while (!incoming.empty()) {
        waiting.push_back(std::move(incoming.front()));
        incoming.pop_front();
      }
      cancel_list.swap(cancels);
      stop = stopping;
      if (stop) {
        for (auto& r : waiting) cancel_list.emplace_back(r->msg.request_id(), -1);
        for (auto& s : running) cancel_list.emplace_back(s.request->msg.request_id(), -1);
      }
    }
    apply_cancels(std::move(cancel_list));
    if (stop) {
      publish();
      return;
    }
    admit();
    publish();
    decode_step();
    publish();
  }
}

}  // namespace moemesh
