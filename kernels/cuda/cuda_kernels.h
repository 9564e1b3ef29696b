// moemesh CUDA kernels: the contract of the GPU kernel family.
//
// Every op is a host function that enqueues work on a CUDA stream and returns at once; pointers
// are device pointers unless a comment says otherwise. Activations are float32 (the residual
// stream, logits) or bfloat16 (the inputs of matrix products), row-major and contiguous; bf16
// values travel as uint16_t bit patterns, so this header needs no CUDA header. All arithmetic
// accumulates in float32. Each op computes what its CPU counterpart in kernels/cpu computes
// (named in its comment) and is checked against it by tests/kernels/cuda_*_test.cpp, which skip
// where no GPU is present.
//
// Errors: launches do not throw. check() reports the first error since the last check (a failed
// launch or a fault in earlier asynchronous work) as a message naming `what`; an empty string
// means no error. Matrix-product objects (Blas, GroupedGemm) return such messages directly.
//
// Threads: free functions may be called from any thread; a Blas or GroupedGemm object belongs to
// one thread at a time (it keeps a cuBLAS handle and scratch).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct CUstream_st;

namespace moemesh::kernels::cuda {

using Stream = CUstream_st*;  // cudaStream_t; nullptr is the legacy default stream

// ---- Runtime -----------------------------------------------------------------------------------

// Number of usable CUDA devices; 0 when there is no GPU or no driver (never fails).
int device_count();
// Whether device memory is host memory: false here; true in the CPU stand-in of the tests
// (tests/cuda_emulator), whose "device" pointers a transport must treat as host memory.
bool device_memory_is_host();
// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)"; empty when `device` does not exist.
std::string device_description(int device);
// Makes `device` current on the calling thread. Returns an error message or "".
std::string set_device(int device);
// The first CUDA error since the last call (a failed launch, or a fault in earlier asynchronous
// work), as "WHAT: CUDA error NAME (DESCRIPTION)"; "" when there was none.
std::string check(const char* what);
// Blocks until all work on `stream` is done; returns check(what).
std::string synchronize(Stream stream, const char* what);
// Free and total memory of the current device, in bytes (cudaMemGetInfo). Returns an error or "".
std::string memory_info(int64_t* free_bytes, int64_t* total_bytes);

// Owned memory of one kind, released on destruction. Move-only. Kind is DeviceMemory (cudaMalloc)
// or PinnedMemory (page-locked host memory, cudaMallocHost, for staging copies).
struct DeviceMemory;
struct PinnedMemory;
template <typename Kind>
class Buffer {
 public:
  Buffer() = default;
  // Empty (data() == nullptr) when the allocation fails; allocate() says why.
  static Buffer allocate(std::size_t bytes, std::string* error = nullptr);
  ~Buffer() { reset(); }
  Buffer(Buffer&& other) noexcept : data_(other.data_), size_(other.size_) {
    other.data_ = nullptr;
    other.size_ = 0;
  }
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = other.data_;
      size_ = other.size_;
      other.data_ = nullptr;
      other.size_ = 0;
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  std::size_t size() const { return size_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  void reset();
  void* data_ = nullptr;
  std::size_t size_ = 0;
};
using DeviceBuffer = Buffer<DeviceMemory>;
using PinnedBuffer = Buffer<PinnedMemory>;

// Asynchronous copies on `stream` (cudaMemcpyAsync); direction inferred from the pointers.
void copy(void* dst, const void* src, std::size_t bytes, Stream stream);
// `rows` rows of `width` bytes, src_pitch bytes apart at src, to dst_pitch bytes apart at dst
// (cudaMemcpy2DAsync): a column range of a row-major matrix into another's.
void copy_rows(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch,
               std::size_t width, std::size_t rows, Stream stream);
// Fills `bytes` bytes at dst with `value` (cudaMemsetAsync).
void fill_bytes(void* dst, int value, std::size_t bytes, Stream stream);

// A stream owned by the caller (cudaStreamCreateWithFlags non-blocking). Move-only.
class StreamHandle {
 public:
  StreamHandle() = default;
  static StreamHandle create(std::string* error = nullptr);
  ~StreamHandle();
  StreamHandle(StreamHandle&& other) noexcept;
  StreamHandle& operator=(StreamHandle&& other) noexcept;
  StreamHandle(const StreamHandle&) = delete;
  StreamHandle& operator=(const StreamHandle&) = delete;
  Stream get() const { return stream_; }

 private:
  Stream stream_ = nullptr;
};

// ---- Conversions (kernels/cpu dtype.cpp) -------------------------------------------------------

// dst[i] = bf16(src[i]), rounded to nearest even (f32_to_bf16).
void f32_to_bf16(const float* src, int64_t n, uint16_t* dst, Stream stream);
// dst[i] = float(src[i]) (bf16_to_f32).
void bf16_to_f32(const uint16_t* src, int64_t n, float* dst, Stream stream);

// ---- Elementwise and row ops -------------------------------------------------------------------

// out[t, :] = float(table[ids[t], :]) for t < n: an embedding lookup in a bf16 table [*, hidden]
// (embedding).
void embedding(const uint16_t* table, int64_t hidden, const int32_t* ids, int64_t n, float* out,
               Stream stream);

// RMSNorm of n rows of `dim` (rmsnorm): y = x / sqrt(mean(x^2) + eps) * weight. When `residual`
// is not null, x[t, :] += residual[t, :] first (x is updated in place: the residual stream). The
// result goes to y_f32 and/or y_bf16 (either may be null; y_f32 may be x itself).
void rmsnorm(float* x, const float* residual, const float* weight, int64_t n, int64_t dim,
             float eps, float* y_f32, uint16_t* y_bf16, Stream stream);

// LayerNorm without bias (dbrx; nn.LayerNorm(bias=False)): y = (x - mean) / sqrt(var + eps) *
// weight with the biased variance, otherwise as rmsnorm (the fused residual add, the outputs).
void layernorm(float* x, const float* residual, const float* weight, int64_t n, int64_t dim,
               float eps, float* y_f32, uint16_t* y_bf16, Stream stream);

// An RMSNorm split over the ranks of a tensor-parallel group, each holding `dim` of a row's
// total_dim features: out[t] = sum of x[t, i]^2 over i < dim for t < n (the rank's part of the
// sum) ...
void row_sum_squares(const float* x, int64_t n, int64_t dim, float* out, Stream stream);
// ... and, once the parts are summed over the ranks (Collective::all_reduce_sum), in place
// x[t, i] = x[t, i] / sqrt(sum_squares[t] / total_dim + eps) * weight[i] for t < n, i < dim. With
// one rank (total_dim == dim) the two compute rmsnorm(x, nullptr, weight, n, dim, eps, x, ...).
void rmsnorm_apply(float* x, const float* sum_squares, int64_t total_dim, const float* weight,
                   int64_t n, int64_t dim, float eps, Stream stream);
// x[i] += d[i] for i < n.
void add(float* x, const float* d, int64_t n, Stream stream);

// x[i] = clamp(x[i], -limit, limit) for i < n.
void clamp(float* x, int64_t n, float limit, Stream stream);

// x[i] += bias[i % dim] for i < n * dim.
void add_bias(float* x, const float* bias, int64_t n, int64_t dim, Stream stream);

// Rotary embeddings in place (rope): the first rotary_dim features of each of n_heads heads of
// n_tokens tokens, the rotate_half pairing (i with i + rotary_dim / 2); token t at positions[t];
// its heads start at x + t * token_stride, head_dim floats apart. inv_freq has rotary_dim / 2
// entries (rope_inv_freq, computed on the host).
void rope(float* x, int64_t n_tokens, int64_t token_stride, int64_t n_heads, int64_t head_dim,
          int64_t rotary_dim, const int32_t* positions, const float* inv_freq, Stream stream);

// out[t, i] = bf16(silu(gate_up[t, i]) * gate_up[t, inter + i]) for t < n, i < inter: the SwiGLU
// of a fused gate/up projection [n, 2 * inter] (swiglu).
void swiglu(const float* gate_up, int64_t n, int64_t inter, uint16_t* out, Stream stream);

// out[t, :] += s(t) * x[t, :] for n rows of dim, where s(t) = 1 when row_gate is null, else
// sigmoid(row_gate[t]) (a shared expert and its gate).
void add_gated_rows(float* out, const float* x, const float* row_gate, int64_t n, int64_t dim,
                    Stream stream);

// ---- MoE routing -------------------------------------------------------------------------------

// How the router turns logits into scores, and how a grouped router ranks groups.
enum class Scoring : uint8_t { Softmax, Sigmoid };
enum class GroupScore : uint8_t { Max, Top2Sum };

struct RouterSpec {
  int64_t n_experts = 0;
  int64_t top_k = 0;
  Scoring scoring = Scoring::Softmax;
  bool renormalize = false;  // weights of the chosen experts divided by their sum
  float scaling = 1.0f;      // final weights multiplied by this (routed_scaling_factor)
  int64_t n_groups = 1;      // experts split into n_groups equal groups
  int64_t topk_groups = 1;   // only experts of the topk_groups best groups compete
  GroupScore group_score = GroupScore::Max;
};

// The router of a MoE layer for n tokens of logits [n, n_experts] (kernels/cpu grouped_topk;
// with n_groups == 1, scoring Softmax and scaling 1 it equals softmax_topk). Scores are softmax or
// sigmoid of the logits; `bias` (n_experts floats, may be null: DeepSeek-V3's
// e_score_correction_bias) is added to the scores for choosing only. With groups, a group's rank
// is the max (or the sum of the top two) of its biased scores, and only the topk_groups best
// groups' experts compete. The top_k experts by biased score (ties to the lower id) are written
// to ids [n, top_k] in decreasing order, their unbiased scores to weights (renormalised, then
// scaled).
void route_topk(const float* logits, const float* bias, int64_t n, const RouterSpec& spec,
                int32_t* ids, float* weights, Stream stream);

// weights[t, :] /= p-norm of weights[t, :] (sum |w|^p)^(1/p), for n rows of k (dbrx's
// moe_normalize_expert_weights; sums in double as the CPU's).
void divide_by_p_norm(float* weights, int64_t n, int64_t k, double p, Stream stream);

// Token permutation by expert. For n_slots = n_tokens * top_k routing slots with expert ids
// `ids` (< n_experts): counts[e] = slots routed to e; offsets[e] = sum of counts before e
// (n_experts + 1 entries); row_of_slot[s] = the row in expert order where slot s goes (rows of
// expert e are offsets[e] .. offsets[e + 1] - 1; order within an expert is unspecified);
// slot_of_row is its inverse. All outputs are device arrays. n_experts <= 1024.
void moe_align(const int32_t* ids, int64_t n_slots, int64_t n_experts, int32_t* counts,
               int32_t* offsets, int32_t* row_of_slot, int32_t* slot_of_row, Stream stream);

// out[r, :] = x[slot_of_row[r] / top_k, :] for r < n_rows: the tokens gathered in expert order
// (bf16 rows of hidden).
void moe_gather(const uint16_t* x, const int32_t* slot_of_row, int64_t n_rows, int64_t top_k,
                int64_t hidden, uint16_t* out, Stream stream);

// out[t, :] (+)= sum_j weights[t * top_k + j] * y[row_of_slot[t * top_k + j], :] for t < n_tokens,
// j in order (deterministic; the CPU experts add in expert order, so the two agree to rounding);
// y is [n_tokens * top_k, hidden] in expert order.
// accumulate false overwrites out.
void moe_combine(const float* y, const int32_t* row_of_slot, const float* weights, int64_t n_tokens,
                 int64_t top_k, int64_t hidden, bool accumulate, float* out, Stream stream);

// out[o, :] = sum over i in [offsets[o], offsets[o + 1]), in order, of weights[i] * y[rows[i], :],
// from 0 (each product and sum rounded once: the bits of the same loop on the host), for
// o < n_out; into out (float32) or, rounded to bf16 once, out_bf16 (exactly one non-null). y is
// [*, hidden]; offsets has n_out + 1 ascending entries. An expert worker's weighted sums of a
// layer's expert outputs per token, whose slots vary in number.
void combine_rows(const float* y, const int64_t* offsets, const int32_t* rows, const float* weights,
                  int64_t n_out, int64_t hidden, float* out, uint16_t* out_bf16, Stream stream);

// ---- Paged KV cache and attention --------------------------------------------------------------

// A paged KV cache of one layer: k and v are [num_blocks, block_size, n_kv_heads, head_dim]
// values, bf16 (uint16_t bits), or with fp8 FP8 E4M3 codes (one byte each) whose stored rows
// (one token, one kv head) each have a float32 scale in k_scale / v_scale
// [num_blocks, block_size, n_kv_heads]: value = fp8 * scale, as the CPU's FP8 cache stores them
// (kernels::PagedKv, KvDtype::FP8). A sequence's token at position p lives in block
// block_table[p / block_size], offset p % block_size; its slot is that block * block_size +
// offset.
struct PagedKv {
  void* k = nullptr;
  void* v = nullptr;
  int64_t block_size = 16;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  bool fp8 = false;
  float* k_scale = nullptr;  // fp8 only
  float* v_scale = nullptr;
};

// Writes n tokens' keys and values (float32 [n, n_kv_heads * head_dim]) into their slots
// (slots[t] < num_blocks * block_size; negative: skipped): rounded to bf16, or with fp8 each row
// scaled by max |value| / 448 (1 for a row of zeros) and rounded to the nearest E4M3 code, the
// bits the CPU's FP8 cache stores. k and v may be the same cache (one plane: latent attention).
void paged_kv_write(const float* k, const float* v, int64_t n, const int32_t* slots,
                    const PagedKv& cache, Stream stream);

// out[r, :] = the stored keys (values: false) or values (true) of slot slots[r], every kv head,
// as bf16 [n, n_kv_heads * head_dim]: a bf16 cache's bits, an fp8 one's code * scale rounded.
void paged_kv_read_bf16(const PagedKv& cache, bool values, const int32_t* slots, int64_t n,
                        uint16_t* out, Stream stream);

// Causal grouped-query attention of n_q queries over a paged cache (attention): query t belongs
// to sequence seq[t] and sits at position pos[t]; it sees that sequence's keys at positions
// max(0, pos[t] - window + 1) .. pos[t] (window 0: from 0), which must already be in the cache.
// block_tables is [n_seqs, max_blocks] (row seq[t]). q and out are [n_q, n_heads * head_dim]
// float32; query head h reads kv head h / (n_heads / n_kv_heads); scores scaled by `scale`;
// softmax in float32. Covers decode (one query per sequence) and prefill (a chunk of queries per
// sequence) alike. head_dim: even (fp8 above 256: a multiple of 4), at most 640 (above 256 a
// second kernel runs: multi-head latent attention's 576-wide rows); k and v may be the same array
// (and then, with fp8, k_scale and v_scale too).
struct AttentionBatch {
  const int32_t* seq = nullptr;
  const int32_t* pos = nullptr;
  const int32_t* block_tables = nullptr;
  int64_t max_blocks = 0;
  int64_t max_pos = 0;  // an upper bound of every pos[t] (host value; sizes the launch)
};
void paged_attention(const float* q, int64_t n_q, const PagedKv& cache, const AttentionBatch& batch,
                     int64_t n_heads, float scale, int64_t window, float* out, Stream stream);

// ---- Sampling ----------------------------------------------------------------------------------

// Per-row sampling of n rows of logits [n, vocab] (core/sampling.h steps 5-10): a row with
// temperature[t] < 1e-5 takes the argmax (ties to the lower id); otherwise logits / temperature,
// then min_p, top_k (exactly k; ties to the lower ids; 0 = off), top_p, and one draw by inverse
// CDF on uniform[t] in [0, 1) over the kept tokens in decreasing probability (ties: lower id
// first) or, as core/sampling.cpp draws when neither top_k (< the tokens min_p left) nor top_p
// (< 1) applies, in id order. Parameters are device arrays of n entries. ids receives n token ids.
struct SamplingBatch {
  const float* temperature = nullptr;
  const float* top_p = nullptr;
  const int32_t* top_k = nullptr;
  const float* min_p = nullptr;
  const float* uniform = nullptr;
};
void sample(const float* logits, int64_t n, int64_t vocab, const SamplingBatch& params,
            int32_t* ids, Stream stream);

// ids[t] = argmax of row t of logits [n, vocab] (ties to the lower id).
void argmax(const float* logits, int64_t n, int64_t vocab, int32_t* ids, Stream stream);

// ---- Collectives (tensor parallelism) ----------------------------------------------------------
// One rank of a group whose ranks sum float32 arrays together. Each rank is driven by its own
// thread with its GPU current; every rank makes the same calls in the same order, and a call
// returns once the sum is enqueued on (or done before) the rank's stream. Every rank receives the
// same bits.
class Collective {
 public:
  virtual ~Collective() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* kind() const = 0;  // "nccl" or "one-gpu"
  // data[i] = the sum over the ranks of their data[i], for i < count. Returns an error or "".
  virtual std::string all_reduce_sum(float* data, int64_t count, Stream stream) = 0;
  // After an error on one rank: releases the others from sums they wait in (those return an
  // error, as does every later call). Any thread.
  virtual void abort() = 0;
};

// NCCL communicators for ranks on `devices` (distinct GPUs of this process), created together
// (ncclCommInitAll); rank r runs on devices[r]. NCCL (libnccl.so.2) is loaded on the first call,
// so a process that never asks for it runs without it. Empty, with *error set, when NCCL is
// missing or refuses the devices.
std::vector<std::unique_ptr<Collective>> nccl_group(const std::vector<int>& devices,
                                                    std::string* error);
// `size` ranks that all run on one GPU and sum through device memory and host barriers: the
// arithmetic of tensor parallelism on a machine with one GPU (NCCL refuses two ranks on one
// device). No speed-up: it is for checking results.
std::vector<std::unique_ptr<Collective>> one_gpu_group(int size);

// ---- Matrix products (cuBLAS) ------------------------------------------------------------------

// y[m, n] = x[m, k] * w[n, k]^T (+ beta * y): activations times an nn.Linear weight, bf16
// operands, float32 accumulation and output (linear).
class Blas {
 public:
  static std::unique_ptr<Blas> create(Stream stream, std::string* error = nullptr);
  ~Blas();
  std::string gemm(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t n, int64_t k,
                   float beta = 0.0f);
  // The same with a bf16 output.
  std::string gemm_bf16_out(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t m, int64_t n,
                            int64_t k);
  // `batch` products of equal shapes at fixed distances (cublasGemmStridedBatchedEx): for
  // b < batch, y_b[m, n] = x_b[m, k] * w_b^T with x_b = x + b * x_stride (rows ldx apart),
  // y_b = y + b * y_stride (rows ldy apart) and w_b = w + b * w_stride, laid out [n, k] (rows
  // ldw apart: an nn.Linear weight) or, with w_k_major, [k, n] (rows ldw apart: its transpose).
  // bf16 operands, float32 accumulation and output. Multi-head latent attention's per-head
  // products with kv_b_proj use it.
  struct StridedBatch {
    const uint16_t* x = nullptr;
    int64_t ldx = 0, x_stride = 0;
    const uint16_t* w = nullptr;
    int64_t ldw = 0, w_stride = 0;
    bool w_k_major = false;
    float* y = nullptr;
    int64_t ldy = 0, y_stride = 0;
  };
  std::string gemm_strided_batched(const StridedBatch& b, int64_t m, int64_t n, int64_t k,
                                   int64_t batch);
  Stream stream() const;

  struct Impl;

 private:
  explicit Blas(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// How a grouped product is issued: one cuBLAS GEMM per group on the stream (Loop), the same
// spread over several streams (Streams), one cublasGemmGroupedBatchedEx call with a bf16 result
// widened to float32 (Batched), this library's own WMMA tensor-core kernel in one launch (Wmma;
// n % 64 == 0 and k % 32 == 0), or per call: Batched when the non-empty groups average under 256
// rows, else Streams (Auto; the split bench/cuda_gemm_bench measured on an H200).
enum class GroupedMethod : uint8_t { Loop, Streams, Batched, Wmma, Auto };
const char* grouped_method_name(GroupedMethod m);

// One weight matrix per group (an expert's projection [n, k], bf16, or FP8 E4M3 with float32
// scales per 128x128 block: scale[(row / 128) * ceil(k / 128) + col / 128], as DeepSeek-V3's
// weight_scale_inv).
struct GroupWeight {
  const void* w = nullptr;
  const float* block_scale = nullptr;  // FP8 only
};

// The grouped expert GEMM: for each group g with rows[g] > 0, the rows offset[g] ..
// offset[g] + rows[g] - 1 of x [*, k] times group g's weight [n, k]^T into the same rows of
// y [*, n] (float32). rows and offsets are host values (the token counts per expert).
class GroupedGemm {
 public:
  static std::unique_ptr<GroupedGemm> create(Stream stream, GroupedMethod method,
                                             std::string* error = nullptr);
  ~GroupedGemm();
  // BF16 weights.
  std::string run_bf16(const uint16_t* x, const std::vector<GroupWeight>& weights,
                       const std::vector<int64_t>& rows, const std::vector<int64_t>& offsets,
                       int64_t n, int64_t k, float* y);
  // FP8 E4M3 weights with 128x128 block scales, bf16 activations, float32 accumulation (weight-
  // only FP8 kernels of this library; method does not apply). When no group has more rows than
  // fp8_gemv_rows (default kFp8GroupedGemvRows) and k % 16 == 0, fp8_gemv's kernel runs over
  // every group (8 rows a pass, each pass reading the group's codes once); else the WMMA tile
  // kernel (n % 64 == 0, k % 32 == 0).
  std::string run_fp8(const uint16_t* x, const std::vector<GroupWeight>& weights,
                      const std::vector<int64_t>& rows, const std::vector<int64_t>& offsets,
                      int64_t n, int64_t k, float* y);
  // 0: always the tile kernel (benchmarks and tests choose the kernel with it).
  void set_fp8_gemv_rows(int64_t rows);
  GroupedMethod method() const;

  struct Impl;

 private:
  explicit GroupedGemm(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Dense layers with FP8 E4M3 weights w [n, k] and 128x128 float32 block scales (the layout of
// GroupWeight): y [m, n] (float32) = x [m, k] (bf16) times the dequantised w^T.
// Every FP8 product multiplies by code x block scale rounded to bf16, as the bf16 copy does, so
// a layer's result does not depend on which kernel its number of rows picks.
// fp8_gemv: for 1 <= m <= kFp8GemvMaxRows (decode), reading each code once; k a multiple of 16,
// x and w 16-byte aligned, else an error and nothing launched.
constexpr int64_t kFp8GemvMaxRows = 8;
// GroupedGemm::run_fp8 takes the GEMV up to this many rows in a group: on an H200 it beat the
// tile kernel in decode at batch 1 (one row for each of a token's experts), and lost to it from
// 2 rows per expert on (cuda_gemm_bench's fp8_gemv and fp8_wmma lines, docs/gpu.md).
constexpr int64_t kFp8GroupedGemvRows = 1;
std::string fp8_gemv(const uint16_t* x, const uint8_t* w, const float* scale, int64_t m, int64_t n,
                     int64_t k, float* y, Stream stream);
// w dequantised to bf16 [rows, cols] (code * its block's scale, rounded to nearest even), for a
// bf16 GEMM over many rows.
void fp8_dequantize_bf16(const uint8_t* w, const float* scale, int64_t rows, int64_t cols,
                         uint16_t* out, Stream stream);

// FP8 E4M3 <-> float (the OCP e4m3fn format of DeepSeek-V3 checkpoints), on the host, for
// quantising weights at load and for tests.
float fp8_e4m3_to_f32(uint8_t bits);
uint8_t f32_to_fp8_e4m3(float v);  // round to nearest even, saturating to +-448

}  // namespace moemesh::kernels::cuda
