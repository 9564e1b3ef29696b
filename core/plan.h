// The memory and parallelism planner behind `moemesh plan` (docs/plan.md states every rule).
//
// parse_plan_model reads a Hugging Face config.json of any supported family, whether or not the
// engine runs it: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek (DeepSeek-MoE), deepseek_v2,
// deepseek_v3, kimi_k2, glm4_moe, dbrx, and the dense llama, mistral and qwen2. Fields that
// config.json leaves out take the defaults of the transformers config class. The result lists
// every weight tensor of the architecture (grouped: one entry per tensor shape and role) so that
// parameters, bytes per dtype (with quantization scales) and per-GPU shares are all computed from
// the same inventory.
//
// make_plan then sizes the KV cache, adds the activation workspace, the CUDA context and the
// headroom of each GPU, and finds the smallest GPU count (with a TP x PP layout and EP for the
// routed experts) whose most loaded GPU fits.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"

namespace moemesh::plan {

// ---- Model inventory --------------------------------------------------------------------------

// What a weight tensor is for; decides how it is quantized and sharded.
enum class Part {
  Embedding,      // token embedding (kept at 16 bits; sharded over TP by vocabulary)
  LmHead,         // output projection (kept at 16 bits; sharded over TP by vocabulary)
  Attention,      // attention projections (quantized; sharded over TP)
  Norm,           // RMSNorm / LayerNorm weights and biases (16 bits; replicated)
  Router,         // expert router and its score-correction bias (16 bits; replicated)
  RoutedExperts,  // routed expert FFNs (quantized; split over EP or TP)
  SharedExperts,  // always-active shared experts and their gate (quantized; sharded over TP)
  DenseMlp,       // the MLP of a dense layer (quantized; sharded over TP)
};
std::string_view part_name(Part p);

// `count` tensors of shape [rows, cols] (a vector is [rows, 1]). Only matrices of quantizable
// parts are quantized; their biases are listed as separate, unquantized groups.
struct TensorGroup {
  std::string name;  // e.g. "self_attn.q_proj.weight", "mlp.experts.*.down_proj.weight"
  Part part = Part::Attention;
  int64_t rows = 0;
  int64_t cols = 1;
  int64_t count = 1;
  bool quantizable = false;

  int64_t params() const { return rows * cols * count; }
};

struct LayerInventory {
  bool moe = false;
  std::vector<TensorGroup> tensors;
};

// A parsed config.json: the shape facts the planner reports, and the weight inventory.
struct PlanModel {
  std::string model_type;  // as written in config.json
  std::string family;      // the family whose layout is used, e.g. "deepseek_v3"
  std::string source;      // the file it came from (for messages)

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  bool tie_word_embeddings = false;

  // Multi-head latent attention (deepseek_v2, deepseek_v3, kimi_k2).
  bool mla = false;
  int64_t q_lora_rank = 0;  // 0: queries are projected directly (no low-rank q)
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;

  // Experts. Dense models have num_experts == 0.
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t moe_intermediate_size = 0;
  int64_t shared_intermediate_size = 0;  // all shared experts of a layer together
  int64_t intermediate_size = 0;         // dense MLP width
  int64_t num_moe_layers = 0;
  int64_t num_dense_layers = 0;
  int64_t mtp_layers = 0;  // DeepSeek-V3 / GLM-4.5 multi-token prediction layers

  std::vector<TensorGroup> globals;      // embedding, final norm, LM head
  std::vector<LayerInventory> layers;    // one per decoder layer
  std::vector<TensorGroup> mtp_tensors;  // all MTP layers together (not part of the model)
};

// The model_type values parse_plan_model accepts, comma separated (for messages and --help).
std::string supported_model_types();

// Parses config.json text; `source` names the file in error messages.
Expected<PlanModel> parse_plan_model(std::string_view json_text, const std::string& source);

// Reads and parses a config.json file.
Expected<PlanModel> load_plan_model(const std::filesystem::path& config_file);

struct ParamCounts {
  int64_t total = 0;   // every weight of the served model (MTP layers excluded)
  int64_t active = 0;  // per token: everything but the routed experts, plus top_k of them
  int64_t active_non_embedding = 0;  // `active` without the embedding and the LM head
  int64_t embedding = 0;
  int64_t lm_head = 0;  // 0 when tied to the embedding
  int64_t attention = 0;
  int64_t norms = 0;
  int64_t router = 0;
  int64_t routed_experts = 0;
  int64_t shared_experts = 0;
  int64_t dense_mlp = 0;
  // MTP layers: their own weights (decoder layer, enorm, hnorm, eh_proj, shared_head.norm). A
  // checkpoint also stores a copy of the embedding and LM head for each (mtp_checkpoint_extra).
  int64_t mtp = 0;
  int64_t mtp_checkpoint_extra = 0;
};
ParamCounts count_params(const PlanModel& m);

// ---- Dtypes and bytes -------------------------------------------------------------------------

enum class WeightDType { BF16, FP16, FP8, INT8, INT4 };
enum class KvDType { BF16, FP16, FP8 };

std::string_view dtype_name(WeightDType d);
std::string_view kv_dtype_name(KvDType d);
const std::vector<WeightDType>& all_weight_dtypes();
// `flag` names the flag in the error message.
Expected<WeightDType> parse_weight_dtype(std::string_view text, std::string_view flag);
Expected<KvDType> parse_kv_dtype(std::string_view text, std::string_view flag);

// Bytes of one group in `d`: 16-bit parts stay at 2 B; quantizable matrices take fp8 1 B + one
// fp32 scale per 128x128 block, int8 1 B + one fp32 scale per output row, int4 0.5 B + one fp16
// scale per group of 128 inputs of a row.
int64_t tensor_bytes(const TensorGroup& t, WeightDType d);

// Weights of the served model (MTP layers excluded) in `d`.
int64_t weight_bytes(const PlanModel& m, WeightDType d);

// KV cache bytes per token over all layers: MLA keeps (kv_lora_rank + qk_rope_head_dim) values
// per layer, other attention 2 * num_kv_heads * head_dim.
int64_t kv_bytes_per_token(const PlanModel& m, KvDType d);

// ---- GPUs -------------------------------------------------------------------------------------

struct GpuSpec {
  std::string name;          // canonical name, e.g. "H100-80" or "p5"
  std::string gpu;           // the GPU model, e.g. "H100-80"
  int64_t memory_bytes = 0;  // per GPU, as the driver reports it (see docs/plan.md)
  int gpus_per_node = 8;
  bool instance = false;  // an AWS instance type (8 GPUs per node, counted in nodes)
  std::string description;
};

// Every known GPU and node type.
const std::vector<GpuSpec>& gpu_catalogue();
// A GPU or node by name, case-insensitive; aliases A100 (A100-80), H100 (H100-80), and AWS names
// with a size suffix (p5.48xlarge). An unknown name is an error listing the known ones.
Expected<GpuSpec> find_gpu(std::string_view name);
inline constexpr std::string_view kDefaultGpu = "H100-80";

// ---- Plan -------------------------------------------------------------------------------------

inline constexpr double kHeadroomFraction = 0.10;           // of each GPU's memory, kept free
inline constexpr int64_t kCudaContextBytes = 1536LL << 20;  // per GPU: CUDA context, cuBLAS, NCCL
inline constexpr int64_t kPrefillChunkTokens = 8192;        // tokens in one forward pass
inline constexpr int64_t kActivationBytesPerValue = 2;      // activations in bf16
inline constexpr int64_t kLogitBytesPerValue = 4;           // logits in fp32
inline constexpr int kMaxNodes = 64;                        // the search stops here

struct PlanOptions {
  WeightDType dtype = WeightDType::BF16;
  KvDType kv_dtype = KvDType::BF16;
  GpuSpec gpu;
  int64_t context = 0;  // tokens per sequence
  int64_t batch = 1;    // sequences resident at once
};

struct Layout {
  int gpus = 0;
  int nodes = 0;
  int tp = 1;  // tensor parallel: GPUs of one pipeline stage (within a node)
  int pp = 1;  // pipeline stages (across nodes when one node is not enough)
  int ep = 1;  // expert parallel: GPUs the routed experts of a stage are split over (1: TP)
  int64_t experts_per_gpu = 0;  // routed experts per GPU per MoE layer with EP (0: TP-sharded)
  int64_t max_layers_per_stage = 0;
};

struct GpuMemory {  // the most loaded GPU of a layout
  int64_t weights = 0;
  int64_t kv_cache = 0;
  int64_t activations = 0;
  int64_t cuda_context = 0;
  int64_t used() const { return weights + kv_cache + activations + cuda_context; }
  int64_t capacity = 0;  // memory_bytes * (1 - kHeadroomFraction)
  int64_t headroom = 0;  // memory_bytes - capacity
};

struct Plan {
  bool fits = false;  // false: even kMaxNodes nodes are not enough (layout is the largest tried)
  Layout layout;
  GpuMemory per_gpu;
  int64_t weight_bytes = 0;  // the whole model in options.dtype
  int64_t kv_per_token = 0;  // bytes, all layers
  int64_t kv_total = 0;      // kv_per_token * context * batch
  int64_t activation_bytes = 0;
};

// Activation workspace of one GPU for `batch` sequences (see docs/plan.md).
int64_t activation_bytes(const PlanModel& m, int64_t batch);

// Memory of the most loaded GPU for a given layout (tp must divide num_heads, pp <= layers).
GpuMemory layout_memory(const PlanModel& m, const PlanOptions& o, int tp, int pp);

// The smallest GPU count that fits. Errors for options out of range (context or batch < 1).
Expected<Plan> make_plan(const PlanModel& m, const PlanOptions& o);

// ---- Checkpoints ------------------------------------------------------------------------------

// Totals of the tensors stored in DIR's *.safetensors files (headers only).
struct CheckpointTotals {
  int64_t files = 0;
  int64_t tensors = 0;
  int64_t params = 0;
  int64_t bytes = 0;
};
// nullopt when DIR has no *.safetensors file; an error when a header cannot be read.
Expected<std::optional<CheckpointTotals>> count_checkpoint(const std::filesystem::path& dir);

}  // namespace moemesh::plan
