#include <fmt/format.h>

#include <charconv>
#include <filesystem>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "apps/commands.h"
#include "apps/flags.h"
#include "core/core.h"

namespace moemesh::apps {
namespace {

struct GenerateFlags {
  std::string model;
  std::string prompt;
  std::string prompt_ids;
  int64_t max_tokens = 16;
  float temperature = 0.0f;  // greedy by default on the command line (the API's default is 1)
  float top_p = 1.0f;
  int32_t top_k = 0;
  float min_p = 0.0f;
  uint64_t seed = 0;
  bool has_seed = false;  // without --seed, a random one
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  float repetition_penalty = 1.0f;
  int64_t min_tokens = 0;
  std::string stop_token_ids;
  int32_t logprobs = -1;
  std::string logits_out;
  bool json = false;
  bool ignore_eos = false;
  int threads = 0;
  std::string cpus;
  std::string device = "cpu";
  std::string grouped_gemm = "auto";
  std::string quantization = "none";
  int tensor_parallel_size = 1;
};

// Token ids separated by commas; `flag` names the flag in the error message.
Expected<std::vector<int32_t>> parse_ids(const std::string& text, const char* flag) {
  std::vector<int32_t> ids;
  std::size_t pos = 0;
  while (pos <= text.size()) {
    std::size_t comma = text.find(',', pos);
    if (comma == std::string::npos) comma = text.size();
    std::string item = text.substr(pos, comma - pos);
    const auto a = item.find_first_not_of(" \t");
    const auto b = item.find_last_not_of(" \t");
    item = a == std::string::npos ? "" : item.substr(a, b - a + 1);
    int64_t v = 0;
    const auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (item.empty() || ec != std::errc() || end != item.data() + item.size() || v < 0 ||
        v > INT32_MAX)
      return Error(
          fmt::format("{}: \"{}\" is not a token id; expected non-negative "
                      "integers separated by commas, e.g. \"1,2,3\"",
                      flag, item));
    ids.push_back(static_cast<int32_t>(v));
    pos = comma + 1;
  }
  return ids;
}

int run_generate(const GenerateFlags& f) {
  auto fail = [](const std::string& message) {
    std::cerr << "moemesh generate: error: " << message << "\n";
    return 1;
  };
  Expected<CpuList> cpus = bind_process_cpus(f.cpus);
  if (!cpus) return fail(cpus.error().message());
  // The checkpoint's tokenizer, when it has one: --prompt needs it, and it decodes the output.
  const std::filesystem::path tokenizer_path = std::filesystem::path(f.model) / "tokenizer.json";
  std::shared_ptr<const Tokenizer> tokenizer;
  if (std::filesystem::exists(tokenizer_path)) {
    Expected<std::shared_ptr<const Tokenizer>> t = Tokenizer::load(tokenizer_path);
    if (!t) return fail(t.error().message());
    tokenizer = *t;
  }
  Expected<std::vector<int32_t>> prompt = std::vector<int32_t>{};
  if (!f.prompt.empty()) {
    if (!tokenizer)
      return fail(fmt::format("--prompt needs {}; give token ids with --prompt-ids instead",
                              tokenizer_path.string()));
    prompt = tokenizer->encode(f.prompt, /*add_special_tokens=*/true);
  } else {
    prompt = parse_ids(f.prompt_ids, "--prompt-ids");
  }
  if (!prompt) return fail(prompt.error().message());
  SamplingParams params;
  params.max_tokens = f.max_tokens;
  params.temperature = f.temperature;
  params.top_p = f.top_p;
  params.top_k = f.top_k;
  params.min_p = f.min_p;
  if (f.has_seed) params.seed = f.seed;
  params.presence_penalty = f.presence_penalty;
  params.frequency_penalty = f.frequency_penalty;
  params.repetition_penalty = f.repetition_penalty;
  params.min_tokens = f.min_tokens;
  params.ignore_eos = f.ignore_eos;
  params.logprobs = f.logprobs;
  if (!f.stop_token_ids.empty()) {
    Expected<std::vector<int32_t>> stop = parse_ids(f.stop_token_ids, "--stop-token-ids");
    if (!stop) return fail(stop.error().message());
    params.stop_token_ids = std::move(*stop);
  }
  // The ranges that do not depend on the model, before it is loaded.
  if (Status s = params.validate(INT64_MAX); !s) return fail(s.error().message());

  ModelOptions options;
  options.threads = f.threads;
  options.cpus = *cpus;
  options.device = f.device;
  options.grouped_gemm = f.grouped_gemm;
  options.tensor_parallel_size = f.tensor_parallel_size;
  options.quantization = f.quantization;
  Expected<std::unique_ptr<Model>> model = Model::load(f.model, options);
  if (!model) return fail(model.error().message());

  Expected<GenerateResult> result = generate(**model, *prompt, params, !f.logits_out.empty());
  if (!result) return fail(result.error().message());

  if (!f.logits_out.empty()) {
    const std::vector<int64_t> shape = {static_cast<int64_t>(prompt->size()),
                                        (*model)->config().vocab_size};
    if (Status s = write_npy_f32(f.logits_out, shape, result->prompt_logits.data()); !s)
      return fail(s.error().message());
  }
  if (f.json) {
    nlohmann::json out;
    out["prompt_ids"] = *prompt;
    out["output_ids"] = result->output_ids;
    out["timing"] = {{"prefill_seconds", result->prefill_seconds},
                     {"decode_seconds", result->decode_seconds},
                     {"decode_steps", result->decode_steps}};
    out["text"] = tokenizer ? tokenizer->decode(result->output_ids) : std::string();
    out["finish_reason"] = result->finish_reason;
    if (params.logprobs >= 0) {
      nlohmann::json lps = nlohmann::json::array();
      for (const SampledToken& t : result->logprobs) {
        nlohmann::json top = nlohmann::json::array();
        for (const TokenLogprob& e : t.top) top.push_back({e.id, e.logprob});
        lps.push_back({{"id", t.id}, {"logprob", t.logprob}, {"top", std::move(top)}});
      }
      out["logprobs"] = std::move(lps);
    }
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
  } else {
    if (tokenizer) std::cout << tokenizer->decode(result->output_ids) << "\n";
    std::cout << "output_ids:";
    for (int32_t id : result->output_ids) std::cout << ' ' << id;
    std::cout << "\nfinish_reason: " << result->finish_reason << "\n";
    for (const SampledToken& t : result->logprobs) {
      std::cout << fmt::format("logprob: {} {:.6f} top:", t.id, t.logprob);
      for (const TokenLogprob& e : t.top) std::cout << fmt::format(" {}:{:.6f}", e.id, e.logprob);
      std::cout << "\n";
    }
    std::cout << std::flush;
  }
  return 0;
}

}  // namespace

Runner add_generate(CLI::App& app) {
  auto f = std::make_shared<GenerateFlags>();
  // Required flags are checked in the callback, so that an unknown flag is reported first.
  auto* model = app.add_option("--model", f->model, "Hugging Face checkpoint directory (required)");
  auto* prompt = app.add_option("--prompt", f->prompt, "Prompt text (needs the model's tokenizer)");
  auto* ids = app.add_option("--prompt-ids", f->prompt_ids, "Prompt as token ids, e.g. \"1,2,3\"");
  prompt->excludes(ids);
  ids->excludes(prompt);
  app.add_option("--max-tokens", f->max_tokens, "Tokens to generate")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30))
      ->capture_default_str();
  // Sampling flags are range-checked by SamplingParams::validate, whose message names the
  // parameter as the OpenAI API spells it.
  app.add_option("--temperature", f->temperature, "Sampling temperature; 0 is greedy")
      ->capture_default_str();
  app.add_option("--top-p", f->top_p, "Keep the most likely tokens reaching this mass, (0, 1]")
      ->capture_default_str();
  app.add_option("--top-k", f->top_k, "Keep the k most likely tokens (0 or -1: off)")
      ->capture_default_str();
  app.add_option("--min-p", f->min_p,
                 "Drop tokens less likely than min-p times the most likely one, [0, 1]")
      ->capture_default_str();
  auto* seed = app.add_option("--seed", f->seed, "Seed of the sampler (default: a random one)");
  app.add_option("--presence-penalty", f->presence_penalty,
                 "Subtracted from the logits of tokens already generated, [-2, 2]")
      ->capture_default_str();
  app.add_option("--frequency-penalty", f->frequency_penalty,
                 "Subtracted per occurrence in the generated tokens, [-2, 2]")
      ->capture_default_str();
  app.add_option(
         "--repetition-penalty", f->repetition_penalty,
         "Divides positive / multiplies negative logits of prompt and generated tokens, > 0")
      ->capture_default_str();
  app.add_option("--min-tokens", f->min_tokens,
                 "Suppress end-of-sequence and stop tokens before this many tokens")
      ->capture_default_str();
  app.add_option("--stop-token-ids", f->stop_token_ids,
                 "Token ids that end the sequence (kept in the output), e.g. \"1,2\"");
  app.add_option("--logprobs", f->logprobs,
                 "Report the sampled token's logprob and the top N (-1: none); from the model's "
                 "raw distribution")
      ->capture_default_str();
  app.add_option(
      "--logits-out", f->logits_out,
      "Write the logits at every prompt position as float32 .npy [prompt_tokens, vocab]");
  app.add_flag("--json", f->json,
               "Print one JSON object: prompt_ids, output_ids, text, finish_reason (logprobs), "
               "timing (prefill and decode seconds)");
  app.add_flag("--ignore-eos", f->ignore_eos, "Do not stop at end-of-sequence tokens");
  app.add_option("--threads", f->threads,
                 "Compute threads (0: one per CPU of --cpus, else one per CPU the process may use)")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str();
  add_cpus_flag(app, f->cpus);
  app.add_option("--device", f->device, "cpu, or cuda / cuda:N (a GPU; needs the CUDA backend)")
      ->capture_default_str();
  app.add_option(
         "--grouped-gemm", f->grouped_gemm,
         "How a GPU issues a MoE layer's expert GEMMs: auto, loop, streams, batched or wmma")
      ->check(CLI::IsMember({"auto", "loop", "streams", "batched", "wmma"}))
      ->capture_default_str();
  add_tensor_parallel_flag(app, f->tensor_parallel_size);
  app.add_option(
         "--quantization", f->quantization,
         "Weight quantization at load: none (the checkpoint's dtypes), int8 (weight-only, "
         "a float32 scale per output channel) or fp8 (weight-only E4M3, a float32 scale per "
         "128x128 block); CPU only. FP8 checkpoints load as FP8 without this flag")
      ->check(CLI::IsMember({"none", "int8", "fp8"}))
      ->capture_default_str();
  app.callback([f, model, prompt, ids, seed] {
    f->has_seed = seed->count() > 0;
    if (model->count() == 0) throw CLI::RequiredError("--model");
    if (prompt->count() == 0 && ids->count() == 0)
      throw CLI::RequiredError("--prompt or --prompt-ids");
  });
  return [f] { return run_generate(*f); };
}

}  // namespace moemesh::apps
