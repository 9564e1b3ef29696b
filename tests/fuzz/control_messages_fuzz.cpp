// Fuzzes the protobuf control-plane messages (proto/engine.proto, proto/cluster.proto) that roles
// receive from other processes, through the code that consumes them:
//   mode 0  GenerateRequest at an attention worker's engine: SamplingParams from the wire
//           (actors/sampling_proto.h from_proto), validate(), then a Sampler on a row of logits;
//   mode 1  Placement at the router: plan_placement / plan_balanced with it as the current
//           placement, experts_by_worker, placement_complete, worker_balancedness, copies_moved
//           (actors/placement.h);
//   mode 2  Assignment at an expert worker: the expert list as ExpertWorker::assign and release
//           read it, bound on the tiny Mixtral fixture (core/expert_shard.h);
//   mode 3  SequenceDelta stream at the gateway: gateway/detail/request_state.h turning engine
//           deltas into response text, SSE events, logprobs and the final body.
// Input: byte 0 picks the mode (and flags); the rest is the serialized message (modes 0-2) or a
// sequence of [2-byte little-endian length][serialized SequenceDelta] (mode 3).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "actors/placement.h"
#include "actors/sampling_proto.h"
#include "core/expert_shard.h"
#include "core/sampling.h"
#include "gateway/detail/request_state.h"
#include "proto/cluster.pb.h"
#include "proto/engine.pb.h"
#include "tests/fuzz/fuzz_common.h"

namespace {

using nlohmann::ordered_json;

constexpr int64_t kVocab = 64;

[[noreturn]] void fail_setup(const std::string& what) {
  std::fprintf(stderr, "control_messages_fuzz: %s\n", what.c_str());
  std::abort();
}

std::unique_ptr<moemesh::ExpertShard>& shard() {
  static std::unique_ptr<moemesh::ExpertShard> s;
  return s;
}

moemesh::gateway::ServedModel& served() {
  static moemesh::gateway::ServedModel m;
  return m;
}

void generate_request(uint8_t flags, const uint8_t* data, size_t size) {
  moemesh::proto::GenerateRequest msg;
  if (!msg.ParseFromArray(data, static_cast<int>(size))) return;
  const moemesh::SamplingParams params = moemesh::from_proto(msg.sampling());
  // The engine's checks (attention_worker/engine.cpp Engine::submit), in its order.
  if (msg.prompt_ids().empty() || msg.n() < 1 || msg.n() > 128) return;
  for (int32_t id : msg.prompt_ids())
    if (id < 0 || id >= kVocab) return;
  if (!params.validate(kVocab)) return;
  // What the gateway sends back over the wire must read back the same.
  const moemesh::SamplingParams again = moemesh::from_proto(moemesh::to_proto(params));
  if (again.max_tokens != params.max_tokens ||
      again.logit_bias.size() != params.logit_bias.size() || again.seed != params.seed ||
      again.stop_token_ids != params.stop_token_ids)
    __builtin_trap();

  const std::vector<int32_t> prompt(msg.prompt_ids().begin(), msg.prompt_ids().end());
  std::vector<int32_t> output;
  moemesh::Sampler sampler(params, {1, 2});
  std::vector<float> logits(kVocab);
  const int steps = 1 + (flags & 7);
  for (int step = 0; step < steps; ++step) {
    for (int64_t i = 0; i < kVocab; ++i)
      logits[static_cast<size_t>(i)] = std::sin(static_cast<float>(i * (step + 3))) * 4.0f;
    if (flags & 8) logits[static_cast<size_t>(step % kVocab)] = -INFINITY;
    const moemesh::SampledToken t = sampler.sample(logits, prompt, output);
    if (t.id < 0 || t.id >= kVocab) __builtin_trap();
    if (params.logprobs >= 0 && t.top.size() != static_cast<size_t>(params.logprobs))
      __builtin_trap();
    output.push_back(t.id);
    if (t.stop) break;
  }
}

void placement(uint8_t flags, const uint8_t* data, size_t size) {
  if (size < 4) return;
  moemesh::proto::Placement current;
  if (!current.ParseFromArray(data + 4, static_cast<int>(size - 4))) return;
  moemesh::actors::PlacementRequest req;
  const int layers = 1 + data[0] % 4;
  for (int l = 0; l < layers; ++l) req.moe_layers.push_back(l * (1 + (data[0] >> 4)));
  req.num_experts = data[1] % 17;
  req.replicas = data[2] % 4;
  req.redundant = (data[2] >> 2) % 4;
  req.fill = flags & 8;
  for (int w = 0; w < 8; ++w)
    if (data[3] & (1 << w)) req.live_workers.push_back(w);

  std::map<std::pair<int32_t, int32_t>, uint64_t> load;
  for (int32_t l : req.moe_layers)
    for (int32_t e = 0; e < req.num_experts; ++e)
      load[{l, e}] = static_cast<uint64_t>((l + 1) * (e * 7 % 5 + (flags & 16 ? 0 : 1)));

  const moemesh::proto::Placement& before = current;
  const moemesh::proto::Placement planned = moemesh::actors::plan_placement(current, req);
  const moemesh::proto::Placement balanced = moemesh::actors::plan_balanced(req, load, current);
  for (const auto* p : {&before, &planned, &balanced}) {
    (void)moemesh::actors::experts_by_worker(*p);
    (void)moemesh::actors::placement_complete(*p, req.num_experts);
    (void)moemesh::actors::worker_balancedness(*p, load);
    (void)moemesh::actors::copies_moved(current, *p);
  }
  // A plan over live workers never places a copy on a worker that is not live.
  for (const auto* p : {&planned, &balanced})
    for (const auto& [worker, held] : moemesh::actors::experts_by_worker(*p))
      if (std::find(req.live_workers.begin(), req.live_workers.end(), worker) ==
          req.live_workers.end())
        __builtin_trap();
}

void assignment(uint8_t flags, const uint8_t* data, size_t size) {
  moemesh::proto::Assignment a;
  if (!a.ParseFromArray(data, static_cast<int>(size))) return;
  const moemesh::proto::ExpertRefs& e = a.experts();
  if (e.layer_size() != e.expert_size()) return;  // refused by ExpertWorker::assign
  std::vector<moemesh::ExpertRef> refs;
  for (int i = 0; i < e.layer_size() && i < 64; ++i) refs.push_back({e.layer(i), e.expert(i)});
  auto& s = *shard();
  if (flags & 8) {
    s.release(refs);
  } else if (s.add(refs)) {
    for (const auto& r : refs)
      if (!s.holds(r.layer, r.expert)) __builtin_trap();
  }
  (void)s.weight_bytes();
  if (s.experts().size() > 16) s.release(s.experts());  // keep the shard small
}

void sequence_deltas(uint8_t flags, const uint8_t* data, size_t size) {
  static const char* kBodies[] = {
      R"({"prompt": "Hello", "max_tokens": 8})",
      R"({"prompt": ["Hi", "there"], "max_tokens": 8, "n": 2, "stream": true,
          "stream_options": {"include_usage": true}, "stop": ["\n", "ab"]})",
      R"({"prompt": "Hello", "max_tokens": 8, "echo": true, "logprobs": 3})",
      R"({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": true,
          "logprobs": true, "top_logprobs": 2})",
  };
  const int which = flags >> 3 & 3;
  const auto endpoint =
      which == 3 ? moemesh::gateway::Endpoint::Chat : moemesh::gateway::Endpoint::Completions;
  auto parsed =
      moemesh::gateway::parse_request(ordered_json::parse(kBodies[which]), endpoint, served());
  auto* request = std::get_if<moemesh::gateway::CompletionRequest>(&parsed);
  if (!request) fail_setup(std::get<moemesh::gateway::ApiError>(parsed).message);
  moemesh::gateway::RequestState state(*request, served(), "cmpl-fuzz", 0);

  std::vector<std::string> events;
  std::vector<int> cancel;
  size_t at = 0;
  while (at + 2 <= size && !state.done()) {
    const size_t n = std::min<size_t>(data[at] | size_t{data[at + 1]} << 8, size - at - 2);
    moemesh::proto::SequenceDelta d;
    const bool parsed_ok = d.ParseFromArray(data + at + 2, static_cast<int>(n));
    at += 2 + n;
    if (!parsed_ok) continue;
    // As the server routes it: by request id, which the engine echoes (here mostly a right one).
    if (!(flags & 4) && state.num_prompts() > 0)
      d.set_request_id(state.engine_id(static_cast<size_t>(d.index() & 0xff) %
                                       static_cast<size_t>(state.num_prompts())));
    const int p = state.prompt_of(d.request_id());
    if (p < 0) continue;
    state.on_delta(static_cast<size_t>(p), d, events, cancel);
    (void)state.take_inter_token_gaps();
  }
  if (state.request().stream) {
    (void)state.closing_events();
  } else if (state.done() && !state.failed()) {
    (void)state.response().dump(-1, ' ', false, ordered_json::error_handler_t::replace);
  }
  (void)state.record();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  moemesh::fuzz::quiet_logs();
  const auto fixtures = moemesh::fuzz::fixtures_dir();
  moemesh::ExpertShardOptions options;
  options.threads = 1;
  auto s = moemesh::ExpertShard::load(fixtures / "models" / "mixtral-tiny", {}, options);
  if (!s) fail_setup(s.error().message());
  shard() = std::move(*s);

  auto tok = moemesh::Tokenizer::load(fixtures / "tokenizers" / "qwen2" / "tokenizer.json");
  if (!tok) fail_setup(tok.error().message());
  auto tmpl = moemesh::load_chat_template(fixtures / "chat_templates" / "qwen2_5");
  if (!tmpl) fail_setup(tmpl.error().message());
  auto& m = served();
  m.name = "qwen2-fuzz";
  m.max_model_len = 2048;
  m.tokenizer = *tok;
  m.vocab_size = (*tok)->vocab_size();
  m.chat_template = std::make_shared<moemesh::ChatTemplateConfig>(std::move(*tmpl));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t flags = data[0];
  switch (flags & 3) {
    case 0:
      generate_request(flags, data + 1, size - 1);
      break;
    case 1:
      placement(flags, data + 1, size - 1);
      break;
    case 2:
      assignment(flags, data + 1, size - 1);
      break;
    case 3:
      sequence_deltas(flags, data + 1, size - 1);
      break;
  }
  return 0;
}
