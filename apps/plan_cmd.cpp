// `moemesh plan`: parameters, memory per dtype, KV cache and the smallest GPU layout of a model
// described by its config.json (core/plan.h; every rule in docs/plan.md).
#include <fmt/format.h>

#include <filesystem>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "apps/commands.h"
#include "core/plan.h"

namespace moemesh::apps {
namespace {

using nlohmann::json;
namespace pl = moemesh::plan;

struct PlanFlags {
  std::string config;
  std::string model;
  std::string dtype = "bf16";
  std::string kv_dtype = "bf16";
  std::string gpu;
  int64_t context = 0;  // 0: the model's max_position_embeddings
  int64_t batch = 1;
  bool json = false;
};

std::string params_str(int64_t n) {
  const double v = static_cast<double>(n);
  if (v >= 1e12) return fmt::format("{:.2f}T", v / 1e12);
  if (v >= 1e9) return fmt::format("{:.2f}B", v / 1e9);
  if (v >= 1e6) return fmt::format("{:.2f}M", v / 1e6);
  if (v >= 1e3) return fmt::format("{:.1f}K", v / 1e3);
  return fmt::format("{}", n);
}

// "93.4 GB (87.0 GiB)"
std::string bytes_str(int64_t b) {
  const double v = static_cast<double>(b);
  if (v >= 1e9) return fmt::format("{:.1f} GB ({:.1f} GiB)", v / 1e9, v / double(1LL << 30));
  if (v >= 1e6) return fmt::format("{:.1f} MB ({:.1f} MiB)", v / 1e6, v / double(1LL << 20));
  return fmt::format("{} B", b);
}

std::string gib(int64_t b) {
  return fmt::format("{:.1f} GiB", static_cast<double>(b) / (1LL << 30));
}

std::string layout_str(const pl::Plan& p, const pl::GpuSpec& gpu, const pl::PlanModel& m) {
  const pl::Layout& l = p.layout;
  std::string s = fmt::format("{} x {}", l.gpus, gpu.gpu);
  if (l.nodes > 1 || gpu.instance)
    s += fmt::format(" ({} node{} of {})", l.nodes, l.nodes > 1 ? "s" : "", gpu.gpus_per_node);
  s += fmt::format(": TP {} x PP {}", l.tp, l.pp);
  if (m.num_experts > 0) {
    if (l.ep > 1)
      s += fmt::format(", EP {} ({} experts per GPU per MoE layer)", l.ep, l.experts_per_gpu);
    else if (l.tp > 1)
      s += ", experts tensor-parallel (EP 1)";
  }
  return s;
}

json memory_json(const pl::GpuMemory& g, int64_t memory_bytes) {
  return {{"weights_bytes", g.weights},
          {"kv_cache_bytes", g.kv_cache},
          {"activation_bytes", g.activations},
          {"cuda_context_bytes", g.cuda_context},
          {"used_bytes", g.used()},
          {"usable_bytes", g.capacity},
          {"headroom_bytes", g.headroom},
          {"memory_bytes", memory_bytes}};
}

int run_plan(const PlanFlags& f) {
  auto fail = [](const std::string& message) {
    std::cerr << "moemesh plan: error: " << message << "\n";
    return 1;
  };
  Expected<pl::WeightDType> dtype = pl::parse_weight_dtype(f.dtype, "--dtype");
  if (!dtype) return fail(dtype.error().message());
  Expected<pl::KvDType> kv_dtype = pl::parse_kv_dtype(f.kv_dtype, "--kv-dtype");
  if (!kv_dtype) return fail(kv_dtype.error().message());
  const bool default_gpu = f.gpu.empty();
  Expected<pl::GpuSpec> gpu = pl::find_gpu(default_gpu ? pl::kDefaultGpu : f.gpu);
  if (!gpu) return fail(gpu.error().message());

  std::filesystem::path config_file = f.config;
  if (!f.model.empty()) {
    if (!std::filesystem::is_directory(f.model))
      return fail(fmt::format("--model: {} is not a directory", f.model));
    config_file = std::filesystem::path(f.model) / "config.json";
  }
  Expected<pl::PlanModel> model = pl::load_plan_model(config_file);
  if (!model) return fail(model.error().message());
  const pl::PlanModel& m = *model;
  std::optional<pl::CheckpointTotals> checkpoint;
  if (!f.model.empty()) {
    Expected<std::optional<pl::CheckpointTotals>> c = pl::count_checkpoint(f.model);
    if (!c) return fail(c.error().message());
    checkpoint = *c;
  }

  pl::PlanOptions o;
  o.dtype = *dtype;
  o.kv_dtype = *kv_dtype;
  o.gpu = *gpu;
  o.context = f.context > 0 ? f.context : m.max_position_embeddings;
  o.batch = f.batch;
  Expected<pl::Plan> plan = pl::make_plan(m, o);
  if (!plan) return fail(plan.error().message());
  const pl::ParamCounts c = pl::count_params(m);

  // The GPU count for every weight dtype (same KV, context and batch).
  json weights = json::object();
  json gpus_by_dtype = json::object();
  for (pl::WeightDType d : pl::all_weight_dtypes()) {
    const std::string name(pl::dtype_name(d));
    weights[name] = pl::weight_bytes(m, d);
    pl::PlanOptions od = o;
    od.dtype = d;
    Expected<pl::Plan> pd = pl::make_plan(m, od);
    gpus_by_dtype[name] = pd && pd->fits ? json(pd->layout.gpus) : json(nullptr);
  }

  if (f.json) {
    json out;
    out["config"] = config_file.string();
    out["model_type"] = m.model_type;
    out["family"] = m.family;
    out["architecture"] = {{"hidden_size", m.hidden_size},
                           {"num_layers", m.num_layers},
                           {"moe_layers", m.num_moe_layers},
                           {"dense_layers", m.num_dense_layers},
                           {"num_attention_heads", m.num_heads},
                           {"num_key_value_heads", m.num_kv_heads},
                           {"head_dim", m.head_dim},
                           {"attention", m.mla ? "mla" : "gqa"},
                           {"vocab_size", m.vocab_size},
                           {"num_experts", m.num_experts},
                           {"experts_per_token", m.top_k},
                           {"moe_intermediate_size", m.moe_intermediate_size},
                           {"shared_intermediate_size", m.shared_intermediate_size},
                           {"tie_word_embeddings", m.tie_word_embeddings},
                           {"max_position_embeddings", m.max_position_embeddings}};
    if (m.mla)
      out["architecture"]["mla"] = {{"q_lora_rank", m.q_lora_rank},
                                    {"kv_lora_rank", m.kv_lora_rank},
                                    {"qk_nope_head_dim", m.qk_nope_head_dim},
                                    {"qk_rope_head_dim", m.qk_rope_head_dim},
                                    {"v_head_dim", m.v_head_dim}};
    out["total_params"] = c.total;
    out["active_params"] = c.active;
    out["active_non_embedding_params"] = c.active_non_embedding;
    out["params"] = {{"embedding", c.embedding},
                     {"lm_head", c.lm_head},
                     {"attention", c.attention},
                     {"norms", c.norms},
                     {"router", c.router},
                     {"routed_experts", c.routed_experts},
                     {"shared_experts", c.shared_experts},
                     {"dense_mlp", c.dense_mlp}};
    out["mtp"] = {{"layers", m.mtp_layers},
                  {"params", c.mtp},
                  {"checkpoint_extra_params", c.mtp_checkpoint_extra},
                  {"counted", false}};
    out["weights_bytes"] = weights;
    out["dtype"] = pl::dtype_name(o.dtype);
    out["kv_dtype"] = pl::kv_dtype_name(o.kv_dtype);
    out["kv_bytes_per_token"] = plan->kv_per_token;
    out["context"] = o.context;
    out["batch"] = o.batch;
    out["kv_cache_bytes"] = plan->kv_total;
    out["activation_bytes"] = plan->activation_bytes;
    out["cuda_context_bytes"] = pl::kCudaContextBytes;
    out["headroom_fraction"] = pl::kHeadroomFraction;
    out["gpu"] = {{"name", o.gpu.name},
                  {"gpu", o.gpu.gpu},
                  {"memory_bytes", o.gpu.memory_bytes},
                  {"gpus_per_node", o.gpu.gpus_per_node},
                  {"default", default_gpu}};
    const pl::Layout& l = plan->layout;
    out["plan"] = {{"fits", plan->fits},
                   {"gpus", l.gpus},
                   {"nodes", l.nodes},
                   {"tp", l.tp},
                   {"pp", l.pp},
                   {"ep", l.ep},
                   {"experts_per_gpu", l.experts_per_gpu},
                   {"layers_per_stage", l.max_layers_per_stage},
                   {"per_gpu", memory_json(plan->per_gpu, o.gpu.memory_bytes)}};
    out["gpus_by_dtype"] = gpus_by_dtype;
    if (checkpoint)
      out["checkpoint"] = {{"files", checkpoint->files},
                           {"tensors", checkpoint->tensors},
                           {"params", checkpoint->params},
                           {"bytes", checkpoint->bytes}};
    std::cout << out.dump() << std::endl;
    return 0;
  }

  std::string t;
  t += fmt::format("model        {}{} from {}\n", m.model_type,
                   m.family == m.model_type ? std::string() : " (" + m.family + " layout)",
                   config_file.string());
  std::string attn = m.mla ? fmt::format("MLA (kv_lora_rank {}, qk_rope_head_dim {})",
                                         m.kv_lora_rank, m.qk_rope_head_dim)
                           : fmt::format("{} KV heads x {}", m.num_kv_heads, m.head_dim);
  t += fmt::format("layers       {} ({} MoE, {} dense), hidden {}, {} heads, {}\n", m.num_layers,
                   m.num_moe_layers, m.num_dense_layers, m.hidden_size, m.num_heads, attn);
  if (m.num_experts > 0)
    t += fmt::format("experts      {} routed x {} wide, top-{}{}\n", m.num_experts,
                     m.moe_intermediate_size, m.top_k,
                     m.shared_intermediate_size > 0
                         ? fmt::format(", shared {} wide", m.shared_intermediate_size)
                         : std::string());
  t += fmt::format("parameters   total {} ({}), active {} ({}), active without embeddings {}\n",
                   params_str(c.total), c.total, params_str(c.active), c.active,
                   params_str(c.active_non_embedding));
  t += fmt::format(
      "  embedding {}, lm_head {}, attention {}, routed experts {}, shared experts {}, dense MLP "
      "{}, router {}, norms {}\n",
      params_str(c.embedding), params_str(c.lm_head), params_str(c.attention),
      params_str(c.routed_experts), params_str(c.shared_experts), params_str(c.dense_mlp),
      params_str(c.router), params_str(c.norms));
  if (m.mtp_layers > 0)
    t += fmt::format(
        "MTP          {} layer(s), {} (+{} embedding/head copies in checkpoints); not counted "
        "above nor planned\n",
        m.mtp_layers, params_str(c.mtp), params_str(c.mtp_checkpoint_extra));
  if (checkpoint)
    t += fmt::format("checkpoint   {} tensors in {} files: {} params ({}), {}\n",
                     checkpoint->tensors, checkpoint->files, params_str(checkpoint->params),
                     checkpoint->params, bytes_str(checkpoint->bytes));
  t += fmt::format("\nweights      {:<6} {:>26}  {:>6}\n", "dtype", "bytes", fmt::format("GPUs*"));
  for (pl::WeightDType d : pl::all_weight_dtypes()) {
    const std::string name(pl::dtype_name(d));
    const json& g = gpus_by_dtype[name];
    t += fmt::format("             {:<6} {:>26}  {:>6}{}\n", name, bytes_str(weights[name]),
                     g.is_null() ? std::string("-") : std::to_string(g.get<int>()),
                     d == o.dtype ? "  <- --dtype" : "");
  }
  t += fmt::format("             * {} GPUs for the weights plus the KV cache below\n", o.gpu.gpu);
  t += fmt::format("KV cache     {} B per token ({}); {} tokens x {} sequences = {}\n",
                   plan->kv_per_token, pl::kv_dtype_name(o.kv_dtype), o.context, o.batch,
                   bytes_str(plan->kv_total));
  t += fmt::format("GPU          {}{}: {} ({})\n", o.gpu.name,
                   default_gpu ? " (default; choose with --gpu)" : "", gib(o.gpu.memory_bytes),
                   o.gpu.description);
  const pl::GpuMemory& g = plan->per_gpu;
  if (plan->fits) {
    t += fmt::format("plan         {}\n", layout_str(*plan, o.gpu, m));
  } else {
    t += fmt::format("plan         does not fit in {} nodes; the largest layout tried: {}\n",
                     pl::kMaxNodes, layout_str(*plan, o.gpu, m));
  }
  t += fmt::format(
      "per GPU      weights {} + KV cache {} + activations {} + CUDA context {} = {} of {} "
      "usable ({} less {:.0f}% headroom)\n",
      gib(g.weights), gib(g.kv_cache), gib(g.activations), gib(g.cuda_context), gib(g.used()),
      gib(g.capacity), gib(o.gpu.memory_bytes), pl::kHeadroomFraction * 100);
  std::cout << t << std::flush;
  return 0;
}

}  // namespace

Runner add_plan(CLI::App& app) {
  auto f = std::make_shared<PlanFlags>();
  // Required flags are checked in the callback, so that an unknown flag is reported first.
  auto* config = app.add_option("--config", f->config, "A model's config.json");
  auto* model = app.add_option("--model", f->model,
                               "A checkpoint directory: its config.json (and the tensor sizes "
                               "of its *.safetensors headers)");
  config->excludes(model);
  model->excludes(config);
  app.add_option("--dtype", f->dtype, "Weight dtype: bf16, fp16, fp8, int8 or int4")
      ->capture_default_str();
  app.add_option("--kv-dtype", f->kv_dtype, "KV cache dtype: bf16, fp16 or fp8")
      ->capture_default_str();
  app.add_option("--gpu", f->gpu,
                 "GPU or node: A100-40, A100-80 (A100), H100-80 (H100), H200, B200, L40S, or AWS "
                 "p4d, p4de, p5, p5e, p5en (default: H100-80)");
  app.add_option("--context", f->context,
                 "Tokens per sequence (default: the model's max_position_embeddings)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  app.add_option("--batch", f->batch, "Sequences whose KV cache is resident at once")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 24))
      ->capture_default_str();
  app.add_flag("--json", f->json,
               "Print one JSON object (total_params, active_params, memory figures, plan)");
  app.footer("Supported model_type values: " + pl::supported_model_types() +
             ".\nThe rules and constants are in docs/plan.md.");
  app.callback([config, model] {
    if (config->count() == 0 && model->count() == 0)
      throw CLI::RequiredError("--config or --model");
  });
  return [f] { return run_plan(*f); };
}

}  // namespace moemesh::apps
