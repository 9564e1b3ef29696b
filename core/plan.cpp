// Bytes per dtype, the GPU catalogue, layouts and the plan search (plan.h, docs/plan.md).
#include "core/plan.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

namespace moemesh::plan {
namespace {

constexpr int64_t kMiB = int64_t{1} << 20;
constexpr int64_t kGiB = int64_t{1} << 30;
constexpr int64_t kBlock = 128;  // fp8 scale blocks are kBlock x kBlock; int4 groups kBlock wide

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Weight bytes of the tensors of layers [first, last) of `m`, split into what TP shards and
// what every GPU of a stage replicates (norms, routers).
struct StageBytes {
  int64_t sharded = 0;
  int64_t replicated = 0;
};

void add_bytes(StageBytes& s, const TensorGroup& t, WeightDType d) {
  const int64_t b = tensor_bytes(t, d);
  if (t.part == Part::Norm || t.part == Part::Router)
    s.replicated += b;
  else
    s.sharded += b;
}

}  // namespace

// ---- Dtypes -----------------------------------------------------------------------------------

std::string_view dtype_name(WeightDType d) {
  switch (d) {
    case WeightDType::BF16:
      return "bf16";
    case WeightDType::FP16:
      return "fp16";
    case WeightDType::FP8:
      return "fp8";
    case WeightDType::INT8:
      return "int8";
    case WeightDType::INT4:
      return "int4";
  }
  return "?";
}

std::string_view kv_dtype_name(KvDType d) {
  switch (d) {
    case KvDType::BF16:
      return "bf16";
    case KvDType::FP16:
      return "fp16";
    case KvDType::FP8:
      return "fp8";
  }
  return "?";
}

const std::vector<WeightDType>& all_weight_dtypes() {
  static const std::vector<WeightDType> kAll = {
      WeightDType::BF16, WeightDType::FP16, WeightDType::FP8, WeightDType::INT8, WeightDType::INT4};
  return kAll;
}

Expected<WeightDType> parse_weight_dtype(std::string_view text, std::string_view flag) {
  const std::string t = lower(text);
  for (WeightDType d : all_weight_dtypes())
    if (t == dtype_name(d)) return d;
  return Error(fmt::format(
      "{}: unknown weight dtype \"{}\"; expected bf16, fp16, fp8, int8 or int4", flag, text));
}

Expected<KvDType> parse_kv_dtype(std::string_view text, std::string_view flag) {
  const std::string t = lower(text);
  for (KvDType d : {KvDType::BF16, KvDType::FP16, KvDType::FP8})
    if (t == kv_dtype_name(d)) return d;
  return Error(
      fmt::format("{}: unknown KV cache dtype \"{}\"; expected bf16, fp16 or fp8", flag, text));
}

int64_t tensor_bytes(const TensorGroup& t, WeightDType d) {
  const int64_t n = t.rows * t.cols;
  int64_t one = 2 * n;  // 16 bits
  if (t.quantizable) {
    switch (d) {
      case WeightDType::BF16:
      case WeightDType::FP16:
        break;
      case WeightDType::FP8:  // e4m3 + an fp32 scale per 128x128 block
        one = n + ceil_div(t.rows, kBlock) * ceil_div(t.cols, kBlock) * 4;
        break;
      case WeightDType::INT8:  // + an fp32 scale per output channel
        one = n + t.rows * 4;
        break;
      case WeightDType::INT4:  // two per byte + an fp16 scale per 128 inputs of a row
        one = ceil_div(n, 2) + t.rows * ceil_div(t.cols, kBlock) * 2;
        break;
    }
  }
  return one * t.count;
}

int64_t weight_bytes(const PlanModel& m, WeightDType d) {
  int64_t total = 0;
  for (const TensorGroup& t : m.globals) total += tensor_bytes(t, d);
  for (const LayerInventory& l : m.layers)
    for (const TensorGroup& t : l.tensors) total += tensor_bytes(t, d);
  return total;
}

namespace {
int64_t kv_value_bytes(KvDType d) {
  return d == KvDType::FP8 ? 1 : 2;
}

// KV values per token per layer held by one GPU of a TP group of `tp`: MLA's latent is
// replicated on every rank; KV heads are split, and replicated when tp exceeds them.
int64_t kv_values_per_layer(const PlanModel& m, int tp) {
  if (m.mla) return m.kv_lora_rank + m.qk_rope_head_dim;
  return 2 * ceil_div(m.num_kv_heads, tp) * m.head_dim;
}
}  // namespace

int64_t kv_bytes_per_token(const PlanModel& m, KvDType d) {
  return kv_values_per_layer(m, 1) * m.num_layers * kv_value_bytes(d);
}

// ---- GPUs -------------------------------------------------------------------------------------

const std::vector<GpuSpec>& gpu_catalogue() {
  static const std::vector<GpuSpec> kGpus = [] {
    std::vector<GpuSpec> g = {
        {"A100-40", "A100-40", 40960 * kMiB, 8, false, "NVIDIA A100 40GB (SXM4), 40960 MiB"},
        {"A100-80", "A100-80", 81920 * kMiB, 8, false, "NVIDIA A100 80GB (SXM4), 81920 MiB"},
        {"H100-80", "H100-80", 81559 * kMiB, 8, false, "NVIDIA H100 80GB (SXM5), 81559 MiB"},
        {"H200", "H200", 143771 * kMiB, 8, false, "NVIDIA H200 141GB (SXM), 143771 MiB"},
        {"B200", "B200", 180 * kGiB, 8, false,
         "NVIDIA B200, 192 GB HBM3e of which 180 GB usable (DGX B200: 1,440 GB for 8)"},
        {"L40S", "L40S", 46068 * kMiB, 8, false, "NVIDIA L40S 48GB (PCIe, no NVLink), 46068 MiB"},
    };
    auto node = [&g](const char* name, const char* gpu, const char* what) {
      GpuSpec s =
          *std::find_if(g.begin(), g.end(), [&](const GpuSpec& e) { return e.name == gpu; });
      s.name = name;
      s.instance = true;
      s.description = what;
      return s;
    };
    std::vector<GpuSpec> nodes = {
        node("p4d", "A100-40", "AWS p4d.24xlarge: 8x A100-40"),
        node("p4de", "A100-80", "AWS p4de.24xlarge: 8x A100-80"),
        node("p5", "H100-80", "AWS p5.48xlarge: 8x H100-80"),
        node("p5e", "H200", "AWS p5e.48xlarge: 8x H200"),
        node("p5en", "H200", "AWS p5en.48xlarge: 8x H200"),
    };
    g.insert(g.end(), nodes.begin(), nodes.end());
    return g;
  }();
  return kGpus;
}

Expected<GpuSpec> find_gpu(std::string_view name) {
  std::string key = lower(name);
  if (key.rfind("p4", 0) == 0 || key.rfind("p5", 0) == 0) {
    const auto dot = key.find('.');  // p5.48xlarge
    if (dot != std::string::npos) key = key.substr(0, dot);
  }
  if (key == "a100") key = "a100-80";
  if (key == "h100") key = "h100-80";
  if (key == "h200-141") key = "h200";
  if (key == "b200-180") key = "b200";
  if (key == "l40s-48") key = "l40s";
  for (const GpuSpec& g : gpu_catalogue())
    if (lower(g.name) == key) return g;
  std::string known;
  for (const GpuSpec& g : gpu_catalogue()) known += (known.empty() ? "" : ", ") + g.name;
  return Error(
      fmt::format("--gpu: unknown GPU \"{}\"; known: {} (also A100, H100, and AWS names "
                  "such as p5.48xlarge)",
                  name, known));
}

// ---- Plan -------------------------------------------------------------------------------------

int64_t activation_bytes(const PlanModel& m, int64_t batch) {
  // One forward pass of kPrefillChunkTokens tokens: four hidden-sized buffers (residual, normed
  // input, attention output, MoE combine) and the MLP's gate and up outputs for the widest MLP
  // of a token (a dense MLP, or top_k routed experts plus the shared ones); plus fp32 logits of
  // the batch's last tokens.
  const int64_t moe_width = m.top_k * m.moe_intermediate_size + m.shared_intermediate_size;
  const int64_t ffn_width = std::max(m.num_dense_layers > 0 ? m.intermediate_size : 0,
                                     m.num_moe_layers > 0 ? moe_width : 0);
  return kPrefillChunkTokens * (4 * m.hidden_size + 2 * ffn_width) * kActivationBytesPerValue +
         batch * m.vocab_size * kLogitBytesPerValue;
}

GpuMemory layout_memory(const PlanModel& m, const PlanOptions& o, int tp, int pp) {
  GpuMemory worst;
  const int64_t layers = m.num_layers;
  const int64_t base = layers / pp;
  const int64_t extra = layers % pp;  // the first `extra` stages take one more layer
  const int64_t capacity =
      static_cast<int64_t>(static_cast<double>(o.gpu.memory_bytes) * (1.0 - kHeadroomFraction));
  const int64_t act = activation_bytes(m, o.batch);
  const int64_t kv_layer_token = kv_values_per_layer(m, tp) * kv_value_bytes(o.kv_dtype);
  int64_t first = 0;
  for (int s = 0; s < pp; ++s) {
    const int64_t n = base + (s < extra ? 1 : 0);
    StageBytes b;
    for (int64_t i = first; i < first + n; ++i)
      for (const TensorGroup& t : m.layers[static_cast<size_t>(i)].tensors)
        add_bytes(b, t, o.dtype);
    for (const TensorGroup& t : m.globals) {
      const bool first_stage = t.part == Part::Embedding;
      if ((first_stage && s == 0) || (!first_stage && s == pp - 1)) add_bytes(b, t, o.dtype);
      // A tied LM head is the embedding matrix: the last stage needs its own copy.
      if (first_stage && m.tie_word_embeddings && pp > 1 && s == pp - 1) add_bytes(b, t, o.dtype);
    }
    first += n;
    GpuMemory g;
    g.weights = ceil_div(b.sharded, tp) + b.replicated;
    g.kv_cache = o.batch * o.context * n * kv_layer_token;
    g.activations = act;
    g.cuda_context = kCudaContextBytes;
    g.capacity = capacity;
    g.headroom = o.gpu.memory_bytes - capacity;
    if (s == 0 || g.used() > worst.used()) worst = g;
  }
  return worst;
}

Expected<Plan> make_plan(const PlanModel& m, const PlanOptions& o) {
  if (o.context < 1 || o.context > (int64_t{1} << 30))
    return Error(
        fmt::format("--context: {} is out of range; expected 1 to 2^30 tokens", o.context));
  if (o.batch < 1 || o.batch > (int64_t{1} << 24))
    return Error(fmt::format("--batch: {} is out of range; expected 1 to 2^24 sequences", o.batch));
  if (o.gpu.memory_bytes <= 0) return Error("--gpu: no GPU given");
  Plan plan;
  plan.weight_bytes = weight_bytes(m, o.dtype);
  plan.kv_per_token = kv_bytes_per_token(m, o.kv_dtype);
  plan.kv_total = plan.kv_per_token * o.context * o.batch;
  plan.activation_bytes = activation_bytes(m, o.batch);

  const int per_node = o.gpu.gpus_per_node;
  std::vector<int> counts;
  for (int n = 1; n < per_node; n *= 2) counts.push_back(n);
  for (int nodes = 1; nodes <= kMaxNodes; ++nodes) counts.push_back(nodes * per_node);

  auto layout_for = [&](int n, int tp, int pp, const GpuMemory& mem) {
    Layout l;
    l.gpus = n;
    l.nodes = static_cast<int>(ceil_div(n, per_node));
    l.tp = tp;
    l.pp = pp;
    if (m.num_experts > 0 && m.num_experts % tp == 0) {
      l.ep = tp;
      l.experts_per_gpu = m.num_experts / tp;
    }
    l.max_layers_per_stage = ceil_div(m.num_layers, pp);
    plan.layout = l;
    plan.per_gpu = mem;
  };
  for (int n : counts) {
    // Every TP x PP split of n: TP within a node and a divisor of the attention heads, PP no
    // more stages than layers. The widest TP that fits wins.
    bool tried = false;
    for (int tp = std::min(n, per_node); tp >= 1; --tp) {
      if (n % tp != 0 || m.num_heads % tp != 0) continue;
      const int pp = n / tp;
      if (pp > m.num_layers) continue;
      const GpuMemory mem = layout_memory(m, o, tp, pp);
      if (!tried) layout_for(n, tp, pp, mem);  // the widest TP, reported when nothing fits
      tried = true;
      if (mem.used() <= mem.capacity) {
        layout_for(n, tp, pp, mem);
        plan.fits = true;
        return plan;
      }
    }
  }
  return plan;
}

// ---- Checkpoints ------------------------------------------------------------------------------

Expected<std::optional<CheckpointTotals>> count_checkpoint(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> files;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec))
    if (e.path().extension() == ".safetensors") files.push_back(e.path());
  if (ec) return Error(fmt::format("{}: cannot be listed: {}", dir.string(), ec.message()));
  if (files.empty()) return std::optional<CheckpointTotals>();
  std::sort(files.begin(), files.end());
  CheckpointTotals t;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    uint8_t len_bytes[8] = {};
    if (!in || !in.read(reinterpret_cast<char*>(len_bytes), 8))
      return Error(fmt::format("{}: cannot read the safetensors header length", f.string()));
    uint64_t len = 0;
    for (int i = 7; i >= 0; --i) len = (len << 8) | len_bytes[i];
    const auto size = std::filesystem::file_size(f, ec);
    if (ec || len > 100'000'000 || len + 8 > size)
      return Error(
          fmt::format("{}: safetensors header length {} does not fit the file", f.string(), len));
    std::string header(len, '\0');
    if (!in.read(header.data(), static_cast<std::streamsize>(len)))
      return Error(fmt::format("{}: cannot read the safetensors header", f.string()));
    try {
      const nlohmann::json h = nlohmann::json::parse(header);
      for (const auto& [name, v] : h.items()) {
        if (name == "__metadata__") continue;
        int64_t numel = 1;
        for (const auto& d : v.at("shape")) numel *= d.get<int64_t>();
        const auto& off = v.at("data_offsets");
        // FP8 block scales (X.weight_scale_inv) count as bytes, not as parameters.
        if (!name.ends_with("_scale_inv")) t.params += numel;
        t.bytes += off.at(1).get<int64_t>() - off.at(0).get<int64_t>();
        ++t.tensors;
      }
    } catch (const nlohmann::json::exception& e) {
      return Error(fmt::format("{}: bad safetensors header: {}", f.string(), e.what()));
    }
    ++t.files;
  }
  return std::optional<CheckpointTotals>(t);
}

}  // namespace moemesh::plan
