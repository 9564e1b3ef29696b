// A shard of a checkpoint's routed experts: what an expert worker holds and computes.
//
// ExpertShard::load reads config.json, maps the checkpoint's safetensors files (lazily: pages are
// read when first touched) and binds only the listed (layer, expert) pairs, checking each of their
// tensors (name, shape, dtype) as Model::load does, with the same messages. Nothing else of the
// model is bound, so the checkpoint may lack the attention weights, the embeddings and the experts
// the shard does not hold. Every layout of expert weights is read: one tensor per expert and
// projection, fused gate_up_proj / down_proj tensors per layer, or dbrx's fused w1 / v1 / w2
// [E * ffn_hidden_size, d_model] tensors, of which only the held experts' rows are bound (w2's
// transposed into a copy the shard owns).
//
// The set of held experts can change at run time (add / release) for an elastic expert pool; add
// binds from the checkpoint already mapped. run() computes one held expert's SwiGLU FFN for a
// batch of tokens (no router weight applied: the caller scales and sums), in float32, with the
// weights in their checkpoint dtype (or int8 / fp8, with ExpertShardOptions::quantization), on the
// shard's own thread pool, with the kernel the model's local experts use.
//
// Threads: an ExpertShard is used by one thread at a time (run() reuses scratch buffers, and
// add/release change the held set); run() parallelises internally on the shard's thread pool.
#pragma once

#include <compare>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/error.h"

namespace moemesh {

// One routed expert: `layer` indexes all layers (dense ones included), `expert` the layer's
// experts (0 .. num_experts - 1).
struct ExpertRef {
  int32_t layer = 0;
  int32_t expert = 0;
  friend bool operator==(const ExpertRef&, const ExpertRef&) = default;
  friend auto operator<=>(const ExpertRef&, const ExpertRef&) = default;
};

// One expert's rows in a batch of one layer (ExpertShard::run_layer): rows [offset, offset + rows)
// of x and y.
struct ExpertRows {
  int32_t expert = 0;
  int64_t offset = 0;
  int64_t rows = 0;
};

// How a layer's expert outputs y [total_rows, hidden] combine into per-token sums
// (ExpertShard::run_layer_combined): output row o = the sum, in order, of weights[i] * y[rows[i]]
// for i in [offsets[o], offsets[o + 1]), from 0, in float32 (each product and sum rounded once).
struct RowCombine {
  std::span<const int64_t> offsets;  // output rows + 1 entries, from 0, ascending
  std::span<const int32_t> rows;     // rows of the batch, offsets.back() of them
  std::span<const float> weights;    // as many as rows
};

struct ExpertShardOptions {
  int threads = 0;  // compute threads of run(); 0 = one per CPU of `cpus`, else one per CPU the
                    // process may use
  std::vector<int> cpus = {};  // CPUs the compute threads are pinned to (as ModelOptions::cpus)
  // "cpu", or "cuda" / "cuda:N": held experts are uploaded to that GPU as bf16 when bound, and
  // run() computes there (host x and y, staged through pinned buffers).
  std::string device = "cpu";
  // "none", "int8" or "fp8": held experts are converted to int8 with a float32 scale per output
  // row, or to FP8 E4M3 with a float32 scale per 128x128 block, when bound (as
  // ModelOptions::quantization does; CPU only). The experts of an FP8 checkpoint are FP8 as they
  // are.
  std::string quantization = "none";
};

class ExpertShard {
 public:
  // Maps the checkpoint in `dir` and binds `experts` (duplicates are held once). Fails, naming the
  // problem, when the directory or its config.json or safetensors files are missing or bad, when
  // a layer is out of range or dense (not MoE), when an expert id is out of range, or when one of
  // the listed experts' tensors is missing or has the wrong shape or dtype.
  static Expected<std::unique_ptr<ExpertShard>> load(const std::filesystem::path& dir,
                                                     std::span<const ExpertRef> experts,
                                                     const ExpertShardOptions& options = {});
  ~ExpertShard();
  ExpertShard(const ExpertShard&) = delete;
  ExpertShard& operator=(const ExpertShard&) = delete;

  const ModelConfig& config() const;
  bool holds(int32_t layer, int32_t expert) const;
  // The held experts, sorted by (layer, expert).
  std::vector<ExpertRef> experts() const;

  // Binds more experts (already held ones are skipped). All or nothing: on an error (as load()
  // gives them) none of `experts` is added.
  Status add(std::span<const ExpertRef> experts);
  // Drops experts; ones not held are ignored.
  void release(std::span<const ExpertRef> experts);

  // y[m, hidden_size] = down(silu(gate(x)) * up(x)) for x [m, hidden_size] float32, with held
  // expert `expert` of layer `layer`. m == 0 does nothing. Fails when the expert is not held or
  // m < 0. x and y must not overlap.
  Status run(int32_t layer, int32_t expert, const float* x, int64_t m, float* y);
  // run() for several held experts of one layer at once: for every group g, rows [g.offset,
  // g.offset + g.rows) of y = expert g.expert of the same rows of x (x and y [total_rows,
  // hidden_size]; groups must not overlap; y's rows outside every group are unspecified). On a
  // GPU the rows go up and come back in one copy each and the experts multiply in grouped GEMMs,
  // with one synchronisation for the layer; on the CPU it is run() per group. Fails, computing
  // nothing, when an expert is not held or a group is not within [0, total_rows).
  Status run_layer(int32_t layer, std::span<const ExpertRows> groups, const float* x,
                   int64_t total_rows, float* y);
  // run_layer() with x as bf16 bits [total_rows, hidden_size] (rows as a bf16 wire carries them):
  // a GPU copies them up as they are (half the bytes of float32, no conversion on the host; its
  // products take bf16 operands anyway, so y is the same as run_layer()'s on the widened rows);
  // the CPU widens them to float32 first.
  Status run_layer_bf16(int32_t layer, std::span<const ExpertRows> groups, const uint16_t* x,
                        int64_t total_rows, float* y);
  // run_layer() (x float32) or run_layer_bf16() (x_bf16; exactly one set), then the combined rows
  // [offsets.size() - 1, hidden_size] of `combine`: float32 into out, or rounded to bf16 once into
  // out_bf16 (exactly one set). On a GPU the sums are added there and only the combined rows come
  // back (as bf16 for out_bf16); on the CPU they are added on the host. Fails, computing nothing,
  // as run_layer() does or when `combine` is malformed (offsets not ascending from 0, sizes that
  // disagree, a row outside the batch).
  Status run_layer_combined(int32_t layer, std::span<const ExpertRows> groups, const float* x,
                            const uint16_t* x_bf16, int64_t total_rows, const RowCombine& combine,
                            float* out, uint16_t* out_bf16);

  // Bytes of the held experts' weights in their dtype (int8, fp8: with the scales), for statistics
  // and logs.
  int64_t weight_bytes() const;
  // "cpu", or the GPU and what it holds.
  std::string device_description() const;

  struct Impl;

 private:
  explicit ExpertShard(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moemesh
