// Internal: one rank of the GPU forward pass (core/detail/cuda_forward.h), shared by the files
// that implement it: cuda_forward.cpp (loading, the layer loop, the MoE layer) and cuda_mla.cpp
// (multi-head latent attention).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/detail/cuda_context.h"
#include "core/detail/cuda_forward.h"
#include "core/detail/tensor_parallel.h"
#include "kernels/cuda/cuda_kernels.h"

namespace moemesh::detail {

namespace cu = kernels::cuda;

// One rank of the forward pass: the whole model on one GPU, or (tensor parallelism) one rank's
// shard of it (core/detail/tensor_parallel.h) on its GPU. Driven by one thread at a time.
struct CudaForward::Impl : CudaContext {
  ModelConfig c;     // what this rank holds: heads, KV heads and MLP widths divided by `ranks`
  ModelConfig full;  // the whole model's
  CudaOptions options;
  int rank = 0, ranks = 1;
  kernels::cuda::Collective* group = nullptr;  // null with one rank; owned by CudaForward
  std::unique_ptr<cu::GroupedGemm> grouped;

  // Weights (device). A dense layer's matrix [rows, cols]: bf16, or FP8 E4M3 codes with float32
  // scales per 128x128 block, as the checkpoint (or --quantization fp8) holds it, where this
  // rank's share takes whole scale blocks (dense_fp8_refusal); linear() multiplies by either.
  struct Dense {
    cu::DeviceBuffer w, scale;
    int64_t rows = 0, cols = 0;
    bool fp8 = false;
  };
  struct Ffn {
    Dense gate_up;  // [2 * inter, hidden]
    Dense down;     // [hidden, inter]
    int64_t inter = 0;
  };
  struct Layer {
    cu::DeviceBuffer input_norm, post_norm;
    Dense q, k, v, o;
    cu::DeviceBuffer q_bias, k_bias, v_bias, o_bias, q_norm, k_norm;
    // Multi-head latent attention (c.mla): q holds q_proj, or q_a -> q_a_norm -> q_b; kv_a is
    // kv_a_proj_with_mqa, kv_b this rank's heads of kv_b_proj. The rotary rows of q / q_b and
    // kv_a are de-interleaved (rope_interleave) and scaled by the YaRN attention factor at upload.
    Dense q_a, q_b, kv_a;
    cu::DeviceBuffer q_a_bias, q_a_norm, kv_a_bias, kv_a_norm, kv_b;
    bool moe = false;
    cu::DeviceBuffer router, router_bias;
    cu::DeviceBuffer experts_gate_up;  // [E, 2 * inter, hidden] bf16, or FP8 E4M3 codes
    cu::DeviceBuffer experts_down;     // [E, hidden, inter] likewise
    bool experts_fp8 = false;          // FP8 codes with 128x128 block scales (fp8_expert_refusal)
    cu::DeviceBuffer experts_gate_up_scale, experts_down_scale;  // [E, blocks] float32 (FP8 only)
    std::vector<cu::GroupWeight> gate_up_groups, down_groups;
    bool shared = false;
    Ffn shared_expert;
    cu::DeviceBuffer shared_gate;  // [1, hidden]
    Ffn mlp;
  };
  cu::DeviceBuffer embed, lm_head_own, final_norm, inv_freq;
  const uint16_t* lm_head = nullptr;  // this rank's rows of it: [vocab_first, + vocab_count)
  int64_t vocab_first = 0, vocab_count = 0;
  std::vector<Layer> layers;
  bool routed_experts = false;
  int64_t weight_bytes = 0;
  int64_t fp8_dense = 0;  // dense matrices held in FP8 (Dense::fp8)

  // Paged KV cache: [layers][k|v][blocks][block_size][kv_dim] bf16, or FP8 codes (options.kv_fp8)
  // with their scales in kv_scale, [layers][k|v][blocks][block_size][kv heads] float32; with
  // multi-head latent attention one plane per layer, [layers][blocks][block_size][latent + rotary
  // key], and one scale per row.
  cu::DeviceBuffer kv, kv_scale;
  int64_t num_blocks = 0;
  int64_t kv_planes() const { return c.mla ? 1 : 2; }
  int64_t kv_heads() const { return c.mla ? 1 : c.num_kv_heads; }  // rows (and scales) per slot
  int64_t kv_row() const { return c.mla ? c.mla->cache_row() : c.num_kv_heads * c.head_dim; }
  int64_t kv_value_bytes() const { return options.kv_fp8 ? 1 : 2; }
  // Bytes of one slot (a token of every layer and plane), scales included.
  int64_t kv_slot_bytes() const {
    return c.num_layers * kv_planes() *
           (kv_row() * kv_value_bytes() + (options.kv_fp8 ? kv_heads() * 4 : 0));
  }
  // Layer l's view of the pool (k and v the same plane under latent attention).
  cu::PagedKv layer_cache(int64_t l) const;
  // Widths of a token's queries and attention output over this rank's heads.
  int64_t q_width() const { return c.num_heads * (c.mla ? c.mla->qk_head_dim() : c.head_dim); }
  int64_t attn_width() const { return c.num_heads * (c.mla ? c.mla->v_head_dim : c.head_dim); }

  // Scratch, grown on demand.
  cu::DeviceBuffer x, delta, xn, xn_f32, q, k, v, attn, attn_bf16, gu, act, router_logits, ids, wts,
      counts, offsets, row_of_slot, slot_of_row, xe, ge, ae, ye, shared_out, shared_gate_out, meta,
      logits, sum_squares, dense_bf16;
  cu::DeviceBuffer mla_qa, mla_qa_bf16, mla_ckv, mla_latent, mla_q_abs, mla_lat, mla_bf16;
  // The expanded form of latent attention (cuda_mla.cpp, mla_expanded): a sequence's cached rows,
  // its keys and values per head, the chunk's queries and output, and an identity matrix.
  cu::DeviceBuffer mla_rows, mla_k, mla_v, mla_k16, mla_v16, mla_q, mla_out, mla_zeros,
      mla_identity, mla_slots;
  std::vector<int32_t> mla_slots_host;

  cu::PinnedBuffer counts_host, stage_x, stage_ids, stage_w, stage_out;
  std::vector<int32_t> meta_host;
  std::vector<int64_t> rows, offs;

  Status upload(cu::DeviceBuffer& dst, const void* src, std::size_t bytes) {
    if (Status s = ensure(dst, bytes); !s) return s;
    cu::copy(dst.data(), src, bytes, stream);
    weight_bytes += static_cast<int64_t>(bytes);
    return {};
  }
  Status upload_f32(cu::DeviceBuffer& dst, const std::vector<float>& values) {
    if (values.empty()) return {};
    return upload(dst, values.data(), values.size() * sizeof(float));
  }
  Status upload_bf16(cu::DeviceBuffer& dst, const std::vector<uint16_t>& values) {
    Status s = upload(dst, values.data(), values.size() * 2);
    // The copy reads `values` on the stream: finish it before the caller frees them.
    if (s) s = from(cu::synchronize(stream, "uploading weights"));
    return s;
  }
  // This rank's rows or columns of w (all of it with one rank).
  Status upload_matrix(cu::DeviceBuffer& dst, const kernels::WeightView& w, Split split) {
    return upload_bf16(dst, shard_bf16(w, split, rank, ranks));
  }
  // A dense layer: rank `r` of `rs`'s rows or columns of w, FP8 where w is FP8 and the share
  // takes whole scale blocks, else bf16.
  Status upload_dense(Dense& d, const kernels::WeightView& w, Split split, int r, int rs);
  Status upload_dense(Dense& d, const kernels::WeightView& w, Split split) {
    return upload_dense(d, w, split, rank, ranks);
  }
  Status upload_dense_bf16(Dense& d, const std::vector<uint16_t>& values, int64_t n_rows,
                           int64_t n_cols) {
    d.rows = n_rows;
    d.cols = n_cols;
    d.fp8 = false;
    return upload_bf16(d.w, values);
  }
  Status upload_dense_fp8(Dense& d, const Fp8Matrix& m);
  // y [m, d.rows] (float32) = x [m, d.cols] (bf16) times d^T: cuBLAS for bf16; for FP8, a few
  // rows read the codes once (cu::fp8_gemv), more go through a bf16 copy of the weights
  // (dense_bf16) and cuBLAS.
  Status linear(const Dense& d, const uint16_t* in, float* out, int64_t m);
  // All of w, on every rank.
  Status upload_whole(cu::DeviceBuffer& dst, const kernels::WeightView& w) {
    return upload_bf16(dst, shard_bf16(w, Split::Rows, 0, 1));
  }
  // gate and up: this rank's rows, one [2 * inter, hidden] tensor; down: the matching columns.
  static std::vector<uint16_t> gate_up_rows(const kernels::FfnWeights& w, int rank, int ranks) {
    std::vector<uint16_t> gu = shard_bf16(w.gate, Split::Rows, rank, ranks);
    const std::vector<uint16_t> up = shard_bf16(w.up, Split::Rows, rank, ranks);
    gu.insert(gu.end(), up.begin(), up.end());
    return gu;
  }
  Status upload_ffn(Ffn& f, const kernels::FfnWeights& w);

  Status load(const ModelWeights& w);
  // Multi-head latent attention's weights of layer L into D (cuda_mla.cpp).
  Status load_mla(Layer& D, const LayerWeights& L);
  struct Step {
    const int32_t* pos;   // device [n]
    const int32_t* slot;  // device [n]
    cu::AttentionBatch batch;
    std::span<const Segment> segments;  // host: the sequences' chunks of the n tokens
  };
  // The attention of n tokens (xn bf16 in, this rank's part of o's product into `out`), caching
  // their keys and values: grouped-query attention here, multi-head latent attention there.
  Status attention(int64_t l, int64_t n, const Step& step, float* out);
  Status mla_attention(int64_t l, int64_t n, const Step& step, float* out);
  // Whether a sequence's chunk attends in the expanded form, and that form (cuda_mla.cpp).
  bool mla_expands(const Segment& s) const;
  Status mla_expanded(int64_t l, const Segment& s, const Step& step, const cu::PagedKv& cache);
  // Layer l's routed experts, in FP8 when every one can stay FP8 (fp8_expert_refusal), else bf16.
  Status upload_experts(Layer& D, const std::vector<kernels::FfnWeights>& experts, std::size_t l);
  Status upload_experts_fp8(Layer& D, const std::vector<kernels::FfnWeights>& experts);
  bool fp8_fallback_logged = false;

  // The MoE layer's input rows (xn bf16, xn_f32) for a backend that sends them from device
  // memory: one message buffer per destination slot, assembled on this rank's stream.
  struct Rows : DeviceRows {
    Impl* m = nullptr;
    std::vector<cu::DeviceBuffer> messages;
    cu::DeviceBuffer tokens;
    cu::PinnedBuffer head_host, tokens_host;
    Expected<const void*> assemble(int slot, const void* head, std::size_t head_bytes,
                                   std::span<const int32_t> rows, bool bf16) override;
    bool cuda_memory() const override { return !cu::device_memory_is_host(); }
  } device_rows;
  Status ensure_scratch(int64_t n, int64_t segments, int64_t max_blocks, bool staged);
  Status ffn(int64_t l, int64_t n, ExpertBackend* external, bool remote, Status& deferred);
  Status ffn_dense(const Ffn& f, int64_t n, float* out);
  // The model's norm of the residual stream: RMSNorm, or LayerNorm without bias (dbrx), with
  // cu::rmsnorm's arguments.
  void norm(float* stream_rows, const float* residual, const float* weight, int64_t n, int64_t dim,
            float eps, float* y_f32, uint16_t* y_bf16, cu::Stream s) const {
    if (c.layer_norm)
      cu::layernorm(stream_rows, residual, weight, n, dim, eps, y_f32, y_bf16, s);
    else
      cu::rmsnorm(stream_rows, residual, weight, n, dim, eps, y_f32, y_bf16, s);
  }
  // Sums `count` floats at `data` over the ranks (nothing with one rank).
  Status all_reduce(float* data, int64_t count) {
    return group ? from(group->all_reduce_sum(data, count, stream)) : Status{};
  }
  // q and k normalised over all of their features (QkNorm::Full), each rank holding a part.
  void full_qk_norm(const Layer& D, float* qs, float* ks, int64_t n, Status& s);
};

}  // namespace moemesh::detail
