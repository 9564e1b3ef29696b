// Flags that several subcommands share: joining a cluster (attention, expert), the HTTP server
// (serve, gateway), the engine (serve, attention) and the remote experts (serve, attention).
#pragma once

#include <unistd.h>

#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "actors/node.h"
#include "actors/router.h"
#include "apps/role_common.h"
#include "attention_worker/engine.h"
#include "gateway/gateway.h"
#include "proto/cluster.pb.h"
#include "transport/data_plane.h"

namespace moemesh::apps {

inline void add_cpus_flag(CLI::App& app, std::string& cpus) {
  app.add_option("--cpus", cpus,
                 "CPUs to run on, as taskset -c takes them (e.g. 0-3,8): the process is bound to "
                 "them and its compute threads pinned one per CPU (default: not bound)");
}

struct WorkerFlags {
  std::string model;
  std::string join;
  std::string cluster_token;
  std::string bind_host = "127.0.0.1";
  uint16_t control_port = 0;
  double join_timeout_s = 60;
  int threads = 0;
  std::string cpus;
  std::string transports;
  std::string net_devices;
  std::string name;

  void add(CLI::App& app) {
    app.add_option("--join", join, "HOST:PORT of the router (see /admin/cluster \"join\")")
        ->required();
    app.add_option("--model", model,
                   "Hugging Face checkpoint directory (default: the built-in demo model)");
    app.add_option("--cluster-token", cluster_token,
                   "Shared secret of the cluster (default: $MOEMESH_CLUSTER_TOKEN)");
    app.add_option("--bind-host", bind_host, "Interface of this node's control port")
        ->capture_default_str();
    app.add_option("--control-port", control_port, "This node's control port (0: any)");
    app.add_option("--join-timeout", join_timeout_s, "Seconds to keep trying to reach the router")
        ->check(CLI::Range(0.0, 3600.0))
        ->capture_default_str();
    app.add_option(
           "--threads", threads,
           "Compute threads (0: one per CPU of --cpus, else one per CPU the process may use)")
        ->check(CLI::Range(0, 4096));
    add_cpus_flag(app, cpus);
    app.add_option("--transports", transports,
                   "UCX transports of the data plane (UCX_TLS), e.g. tcp or sm,self (default: "
                   "UCX's choice)");
    app.add_option("--net-devices", net_devices,
                   "Network devices of the data plane (UCX_NET_DEVICES), e.g. eth0");
    app.add_option("--name", name, "Node name shown in /admin/cluster (default: ROLE-PID@HOST)");
  }

  actors::JoinOptions join_options() const {
    actors::JoinOptions o;
    o.join = join;
    o.cluster_token = actors::cluster_token_from(cluster_token);
    o.bind_host = bind_host;
    o.control_port = control_port;
    o.timeout = std::chrono::milliseconds(static_cast<int64_t>(join_timeout_s * 1000));
    return o;
  }

  // What this node tells the router when it joins.
  proto::NodeInfo node_info(const std::string& role, const std::filesystem::path& model_dir,
                            const ModelConfig& config) const {
    proto::NodeInfo info;
    info.set_role(role);
    info.set_name(name.empty() ? node_name(role) : name);
    info.set_host(host_name());
    info.set_pid(getpid());
    info.set_model(model_dir.string());
    info.set_model_fingerprint(actors::model_fingerprint(config));
    info.set_threads(threads);
    return info;
  }
};

// The elastic expert pool of a router: --redundant-experts, --rebalance-interval,
// --rebalance-threshold.
struct ElasticFlags {
  int redundant_experts = 0;
  double rebalance_interval_s = 0;
  double rebalance_threshold = 0.9;

  void add(CLI::App& app) {
    app.add_option("--redundant-experts", redundant_experts,
                   "Spare expert copies per MoE layer, given to the experts with the most load per "
                   "copy")
        ->check(CLI::Range(0, 1 << 16))
        ->capture_default_str();
    app.add_option("--rebalance-interval", rebalance_interval_s,
                   "Seconds between rebalances of the expert placement by load (0: only on POST "
                   "/admin/rebalance)")
        ->check(CLI::Range(0.0, 1e6))
        ->capture_default_str();
    app.add_option("--rebalance-threshold", rebalance_threshold,
                   "A scheduled rebalance is skipped while every layer's worker balancedness "
                   "(mean / max load) is at least this")
        ->check(CLI::Range(0.0, 1.0))
        ->capture_default_str();
  }
  void apply(actors::RouterOptions& o) const {
    o.redundant_experts = redundant_experts;
    o.rebalance_interval =
        std::chrono::milliseconds(static_cast<int64_t>(rebalance_interval_s * 1000));
    o.rebalance_threshold = rebalance_threshold;
  }
};

// --host, --port, --api-key, --admin-token and the request limits (--max-body-bytes, --max-n,
// --max-tokens-limit, --max-streams-per-client, --max-queued-requests, --max-open-requests).
inline void add_http_flags(CLI::App& app, GatewayOptions& o) {
  app.add_option("--host", o.host, "Address to listen on")->capture_default_str();
  app.add_option("--port", o.port, "HTTP port (0: any free port)")->capture_default_str();
  app.add_option("--api-key", o.api_key,
                 "Require \"Authorization: Bearer KEY\" on the API (or $MOEMESH_API_KEY)")
      ->envname("MOEMESH_API_KEY");
  app.add_option("--admin-token", o.admin_token,
                 "Allow POST /admin/* with \"Authorization: Bearer TOKEN\" (or "
                 "$MOEMESH_ADMIN_TOKEN)")
      ->envname("MOEMESH_ADMIN_TOKEN");
  app.add_option("--max-body-bytes", o.max_body_bytes, "Largest request body accepted (413)")
      ->check(CLI::Range(std::size_t{1024}, std::size_t{1} << 30))
      ->capture_default_str();
  app.add_option("--max-n", o.max_n, "Largest \"n\" (choices per prompt) a request may ask (400)")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--max-tokens-limit", o.max_tokens_limit,
                 "Largest max_tokens a request may ask, besides the context (400; 0: the context "
                 "only); also caps chat's default of the rest of the context")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 32))
      ->capture_default_str();
  app.add_option("--max-streams-per-client", o.max_streams_per_client,
                 "Generation requests in flight per client IP address (429 with Retry-After)")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--max-queued-requests", o.max_queued_requests,
                 "Requests waiting for the engine (accepted, no token yet) before new ones get "
                 "429 with Retry-After")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--max-open-requests", o.max_open_requests,
                 "Generation requests in flight at the gateway before new ones get 429 with "
                 "Retry-After")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--expert-metrics", o.expert_metrics,
                 "Series of moemesh_expert_tokens_total on /metrics: the N busiest experts "
                 "(0: none, -1: all)")
      ->check(CLI::Range(-1, 1 << 20))
      ->capture_default_str();
  app.add_option("--console-assets", o.console_assets,
                 "Folder of Chart.js for /console (Debian package libjs-chart.js)")
      ->capture_default_str();
}

// --max-num-seqs, --max-num-batched-tokens, --max-model-len, --kv-cache-gib, --kv-cache-dtype,
// --block-size, --enable-prefix-caching / --no-enable-prefix-caching.
struct EngineFlags {
  EngineOptions engine;
  double kv_cache_gib = 2.0;

  void add(CLI::App& app) {
    app.add_option("--max-num-seqs", engine.max_num_seqs, "Sequences scheduled together")
        ->check(CLI::Range(1, 4096))
        ->capture_default_str();
    app.add_option("--max-num-batched-tokens", engine.max_num_batched_tokens,
                   "Tokens per scheduler step: decode tokens plus prefill chunks (long prompts "
                   "are prefilled in chunks of what is left)")
        ->check(CLI::Range(int64_t{1}, int64_t{1} << 24))
        ->capture_default_str();
    app.add_option("--max-model-len", engine.max_model_len,
                   "Cap on prompt + completion tokens (0: the model's)")
        ->check(CLI::Range(int64_t{0}, int64_t{1} << 32));
    app.add_option("--kv-cache-gib", kv_cache_gib, "Memory for the KV cache, GiB")
        ->check(CLI::Range(0.001, 4096.0))
        ->capture_default_str();
    app.add_option("--kv-cache-dtype", engine.kv_cache_dtype,
                   "KV cache values: auto (the checkpoint's dtype), bf16, fp8 (e4m3 with "
                   "per-row scales) or f32")
        ->check(CLI::IsMember({"auto", "bf16", "fp8", "f32"}))
        ->capture_default_str();
    app.add_option("--block-size", engine.block_size, "Tokens per KV cache block")
        ->check(CLI::Range(int64_t{1}, int64_t{4096}))
        ->capture_default_str();
    app.add_flag("--enable-prefix-caching,!--no-enable-prefix-caching", engine.prefix_caching,
                 "Reuse the KV cache of full blocks shared by prompts (default on)");
  }

  EngineOptions options() const {
    EngineOptions o = engine;
    o.kv_cache_bytes = static_cast<int64_t>(kv_cache_gib * double(int64_t{1} << 30));
    return o;
  }

  // The same flags for a role process that serve starts.
  std::vector<std::string> args() const {
    std::vector<std::string> a = {
        "--max-num-seqs",
        std::to_string(engine.max_num_seqs),
        "--max-num-batched-tokens",
        std::to_string(engine.max_num_batched_tokens),
        "--kv-cache-gib",
        fmt::format("{}", kv_cache_gib),
        "--kv-cache-dtype",
        engine.kv_cache_dtype,
        "--block-size",
        std::to_string(engine.block_size),
        engine.prefix_caching ? "--enable-prefix-caching" : "--no-enable-prefix-caching"};
    if (engine.max_model_len > 0)
      a.insert(a.end(), {"--max-model-len", std::to_string(engine.max_model_len)});
    return a;
  }
};

// --quantization: the weights' dtype after load (generate, serve, attention, expert).
inline void add_quantization_flag(CLI::App& app, std::string& quantization) {
  app.add_option(
         "--quantization", quantization,
         "Weight quantization at load: none (the checkpoint's dtypes), int8 (weight-only, "
         "a float32 scale per output channel; CPU only) or fp8 (weight-only E4M3, a float32 "
         "scale per 128x128 block; on a GPU the routed experts only, which stay FP8 there). "
         "Routers, embeddings and the LM head stay unquantized; FP8 checkpoints load as FP8 "
         "without this flag")
      ->check(CLI::IsMember({"none", "int8", "fp8"}))
      ->capture_default_str();
}

// --tensor-parallel-size: GPUs one model's forward pass splits over.
inline void add_tensor_parallel_flag(CLI::App& app, int& size) {
  app.add_option("--tensor-parallel-size", size,
                 "GPUs the attention heads and MLP widths split over (--device cuda:N and the "
                 "ones after it), adding their parts with NCCL; 1: one GPU")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
}

// --device, --grouped-gemm, --tensor-parallel-size, --quantization: where a model's forward pass
// runs, and on what weights.
struct DeviceFlags {
  std::string device = "cpu";
  std::string grouped_gemm = "auto";
  std::string quantization = "none";
  int tensor_parallel_size = 1;

  void add(CLI::App& app) {
    app.add_option("--device", device,
                   "cpu, or cuda / cuda:N (a GPU; needs the CUDA backend). On a GPU the KV cache "
                   "is a paged pool on the device")
        ->capture_default_str();
    app.add_option(
           "--grouped-gemm", grouped_gemm,
           "How a GPU issues a MoE layer's expert GEMMs: auto, loop, streams, batched or wmma")
        ->check(CLI::IsMember({"auto", "loop", "streams", "batched", "wmma"}))
        ->capture_default_str();
    add_tensor_parallel_flag(app, tensor_parallel_size);
    add_quantization_flag(app, quantization);
  }

  // The engine's KV cache flags make a GPU's pool at load: its bytes (0: half the GPU memory left
  // by the weights), dtype and block size.
  void apply(ModelOptions& o, const EngineOptions& engine) const {
    o.device = device;
    o.grouped_gemm = grouped_gemm;
    o.tensor_parallel_size = tensor_parallel_size;
    o.gpu_kv_cache_bytes = engine.kv_cache_bytes;
    o.kv_cache_dtype = engine.kv_cache_dtype;
    o.kv_block_size = engine.block_size;
    o.quantization = quantization;
  }
  // Flag combinations that cannot work: an error message, or "".
  std::string conflict(const EngineOptions& engine) const {
    if (device != "cpu" && engine.kv_cache_dtype == "f32")
      return fmt::format(
          "--kv-cache-dtype f32 needs --device cpu: a GPU's KV cache holds bf16 or fp8 values "
          "(--device {})",
          device);
    return {};
  }
};

// --dispatch-timeout-ms, --wire-dtype, --dispatch-from-gpu-memory.
struct RemoteExpertFlags {
  double dispatch_timeout_ms = 1000;
  std::string wire_dtype = "f32";
  std::string from_gpu_memory = "auto";

  void add(CLI::App& app) {
    app.add_option("--dispatch-timeout-ms", dispatch_timeout_ms,
                   "Deadline of one MoE layer's round trip to the expert workers")
        ->check(CLI::Range(1.0, 600000.0))
        ->capture_default_str();
    app.add_option("--wire-dtype", wire_dtype,
                   "Hidden states on the data plane: f32 (exact) or bf16 (half the bytes)")
        ->check(CLI::IsMember({"f32", "bf16"}))
        ->capture_default_str();
    app.add_option("--dispatch-from-gpu-memory", from_gpu_memory,
                   "With --device cuda: auto sends hidden states to the expert workers straight "
                   "from GPU memory when UCX takes CUDA memory (GPUDirect RDMA or UCX's own "
                   "copies), off always stages them through pinned host memory")
        ->check(CLI::IsMember({"auto", "off"}))
        ->capture_default_str();
  }
};

}  // namespace moemesh::apps
