// Internal: one OpenAI request in flight. Turns the engine's token deltas into response text:
// incremental detokenization, stop strings (never emitted, also across tokens), logprobs, echo,
// SSE chunks for streaming, the final JSON otherwise, and usage. Pure logic, no I/O.
//
// Thread ownership: used by one thread at a time (the HTTP session's strand).
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "gateway/detail/metrics.h"
#include "gateway/detail/openai.h"
#include "proto/engine.pb.h"

namespace moemesh::gateway {

class RequestState {
 public:
  using Clock = std::chrono::steady_clock;

  RequestState(CompletionRequest request, const ServedModel& model, std::string id,
               int64_t created);

  const CompletionRequest& request() const { return req_; }
  const std::string& id() const { return id_; }
  // The engine request id of prompt p: unique even when clients reuse an x-request-id.
  std::string engine_id(std::size_t p) const { return engine_prefix_ + std::to_string(p); }
  // The prompt index of an engine request id of this request, or -1.
  int prompt_of(const std::string& engine_id) const;
  int num_prompts() const { return static_cast<int>(req_.prompts.size()); }

  // Feeds one delta of prompt p. In streaming mode, SSE events to send are appended to `events`.
  // Sequences to stop in the engine (a stop string was found) are appended to `cancel` as
  // sequence indices of that prompt.
  void on_delta(std::size_t p, const proto::SequenceDelta& d, std::vector<std::string>& events,
                std::vector<int>& cancel);

  bool done() const { return finished_choices_ == static_cast<int>(choices_.size()); }
  bool failed() const { return !error_.empty(); }
  const std::string& error() const { return error_; }
  // The failure was the cluster losing capacity (a worker), not the request: answer 503.
  bool unavailable() const { return unavailable_; }

  // Streaming: the usage chunk (when asked for) and "data: [DONE]".
  std::string closing_events() const;
  // Not streaming: the whole response body.
  nlohmann::ordered_json response() const;

  Metrics::RequestRecord record() const;
  // Inter-token gaps observed since the last call (for the ITL histogram).
  std::vector<double> take_inter_token_gaps();

 private:
  struct LogprobEntry {
    std::string token;
    float logprob = 0;
    bool has_logprob = true;
    std::vector<std::pair<std::string, float>> top;
  };
  struct Choice {
    int index = 0;
    std::optional<DecodeStream> decoder;
    std::string text;         // accepted text (after stop-string truncation)
    std::size_t emitted = 0;  // bytes of `text` already sent (streaming)
    bool role_sent = false;
    bool finished = false;
    std::string finish_reason;
    nlohmann::ordered_json stop_reason;  // the stop string or token id that ended it, else null
    int64_t tokens = 0;
    std::vector<LogprobEntry> logprobs;  // all (non-streaming) or not yet sent (streaming)
    std::vector<LogprobEntry> prompt_logprobs;
    bool echo_sent = false;
    std::optional<Clock::time_point> last_token;
  };

  void accept_text(Choice& c, const std::string& piece, std::vector<int>& cancel, int seq_index);
  void finish_choice(Choice& c, const std::string& reason);
  std::string chunk(const Choice& c, const std::string& text, bool with_logprobs, bool final) const;
  nlohmann::ordered_json logprobs_json(const std::vector<LogprobEntry>& entries,
                                       std::size_t text_offset) const;
  LogprobEntry entry(const proto::SampledToken& t) const;

  CompletionRequest req_;
  const ServedModel& model_;
  std::string id_;
  std::string engine_prefix_;  // id_ + "#" + a per-process counter + "-"
  int64_t created_;
  std::vector<Choice> choices_;
  int finished_choices_ = 0;
  std::size_t max_stop_len_ = 0;
  std::string error_;
  bool unavailable_ = false;

  Clock::time_point arrival_;
  std::optional<Clock::time_point> first_token_;
  Clock::time_point last_event_;
  double queue_s_ = -1, prefill_s_ = -1;
  std::vector<double> gaps_;
};

}  // namespace moemesh::gateway
