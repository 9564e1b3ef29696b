// moemesh CPU kernels: the contract of the kernel family.
//
// Every op takes raw pointers, sizes and (where it parallelises) a ThreadPool, and nothing of
// moemesh outside this folder. Activations are float32, row-major and contiguous unless a stride
// is given. Weight matrices stay in their checkpoint dtype (F32, F16, BF16, or FP8 E4M3 with
// 128x128 block scales), or are int8 with a float32 scale per row (I8, made at load), and are read
// through a WeightView; all arithmetic accumulates in float32. Ops never allocate on the caller's
// behalf except for small per-thread scratch; sizes are the caller's responsibility (they are
// checked once, where a model is loaded, not on every call).
//
// Each op is defined in its own .cpp file and has a reference test in tests/kernels/.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "kernels/cpu/thread_pool.h"

namespace moemesh::kernels {

// ---- Element types -----------------------------------------------------------------------------

// I8 is signed int8 with a float32 scale per row (WeightView::scale); it is never a checkpoint
// dtype, only what a weight is quantized to at load. F8E4M3 is FP8 E4M3 in the OCP "fn" format
// (see fp8_e4m3_to_f32) with a float32 scale per 128x128 block (WeightView::scale), the layout of
// DeepSeek-V3 / Kimi K2 FP8 checkpoints (safetensors dtype "F8_E4M3" plus "weight_scale_inv"), or
// made at load (--quantization fp8).
enum class DType : uint8_t { F32, F16, BF16, I8, F8E4M3 };

// The block edge of F8E4M3 weights: one scale per kFp8Block x kFp8Block block of a matrix.
constexpr int64_t kFp8Block = 128;
// Blocks along a dimension of n elements: ceil(n / kFp8Block).
constexpr int64_t fp8_blocks(int64_t n) {
  return (n + kFp8Block - 1) / kFp8Block;
}

std::size_t dtype_size(DType t);
const char* dtype_name(DType t);

float bf16_to_f32(uint16_t bits);
float f16_to_f32(uint16_t bits);
// Round to nearest even, as torch does when it casts float32 to bfloat16.
uint16_t f32_to_bf16(float v);
uint16_t f32_to_f16(float v);

// Converts n elements of type `t` at `src` to float32 (I8: the integers, F8E4M3: the decoded
// codes, without any scale).
void to_f32(const void* src, DType t, int64_t n, float* dst);

// A read-only row-major matrix [rows, cols] in its storage dtype (e.g. an nn.Linear weight
// [out_features, in_features], or an embedding table [vocab, hidden]).
struct WeightView {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0;
  int64_t cols = 0;
  // I8: `rows` floats, value = int8 * scale[row]. F8E4M3: [fp8_blocks(rows), fp8_blocks(cols)]
  // floats, row-major, value = fp8(w[r, c]) * scale[(r / 128) * fp8_blocks(cols) + c / 128] (the
  // checkpoint's weight_scale_inv). Other dtypes: unused.
  const float* scale = nullptr;
  // Optional, BF16, I8 and F8E4M3 only: the matrix in the AMX tile layout (pack_amx), which
  // linear() reads on Isa::Avx512Bf16 and Isa::Amx instead of packing the rows on every call
  // (F8E4M3: instead of the Avx512 kernels; its packed copy holds the weights rounded to bf16).
  const uint32_t* packed = nullptr;

  bool empty() const { return data == nullptr; }
  // Row r as a pointer into `data` (of the storage dtype).
  const void* row(int64_t r) const {
    return static_cast<const char*>(data) + r * cols * static_cast<int64_t>(dtype_size(dtype));
  }
};

// Rows [row_begin, row_end) of w as float32, scales applied (I8: per row; F8E4M3: per block;
// the product rounded once to float32), into out [row_end - row_begin, w.cols].
void dequantize_rows(const WeightView& w, int64_t row_begin, int64_t row_end, float* out);

// The AMX tile layout of a BF16, I8 or F8E4M3 matrix, made once at load so that linear() on
// Isa::Avx512Bf16 and Isa::Amx reads it as it is: panels of 32 rows (zero past w.rows), each two
// strips of 16 rows, each strip the column tiles of 64 bytes of each row (zero past w.cols), each
// tile 16 x 16 32-bit words (word p of each of the 16 rows: a column pair of bf16, a column quad of
// int8). F8E4M3 is packed as bf16: each weight dequantized (code x block scale, in float32, as
// dequantize_rows) and rounded to bf16. pack_amx makes it (parallel over panels on `pool`, may be
// null) in a 64-byte aligned buffer (a tile row is a cache line), to be set as WeightView::packed
// for as long as the buffer lives. Requires detected_isa() >= Isa::Avx512Bf16.
class PackedWeights {
 public:
  const uint32_t* data() const { return words_.get(); }
  int64_t bytes() const { return n_words_ * static_cast<int64_t>(sizeof(uint32_t)); }

 private:
  friend PackedWeights pack_amx(const WeightView& w, ThreadPool* pool);
  struct Free {
    void operator()(uint32_t* p) const;
  };
  std::unique_ptr<uint32_t[], Free> words_;
  int64_t n_words_ = 0;
};
PackedWeights pack_amx(const WeightView& w, ThreadPool* pool);

// ---- Ops -------------------------------------------------------------------------------------

// y[t, r] = sum_c x[t, c] * w[r, c] (+ bias[r]) for t < n_tokens; x is [n_tokens, w.cols],
// y is [n_tokens, w.rows]; bias (float32, w.rows) may be null. Parallel over rows of w.
// For I8 weights the int8 values are widened to float32 and the dot product is summed as for the
// other dtypes; the row's scale multiplies the finished sum once: y = scale[r] * sum + bias[r].
// For F8E4M3 weights each weight is decoded and multiplied by its block's scale in float32 (the
// value dequantize_rows gives) before it enters the sum, so on each ISA the result is the same
// bits as linear() over the dequantized float32 matrix. The AVX2 / AVX-512 kernels decode 8 / 16
// codes at a time in registers (through the f16 conversion) from one byte per weight; the NaN codes
// 0x7F / 0xFF, which no quantizer writes, read as +-480 there (NaN on the baseline path).
void linear(const float* x, int64_t n_tokens, const WeightView& w, const float* bias, float* y,
            ThreadPool* pool);

// out[t, :] = w.row(ids[t]) as float32 (scales applied, as dequantize_rows does): an embedding
// lookup. ids must be < w.rows.
void embedding(const WeightView& w, const int32_t* ids, int64_t n_tokens, float* out);

// y[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * weight, for n rows of `dim`. In-place safe.
void rmsnorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* y);

// Inverse frequencies of rotary embeddings, as Hugging Face computes them for the default rope
// type: inv_freq[i] = 1 / theta^(2i / rotary_dim), i < rotary_dim / 2.
void rope_inv_freq(double theta, int64_t rotary_dim, float* inv_freq);

// Rotates, in place, the first rotary_dim features of each of n_heads heads of n_tokens tokens
// (the "rotate_half" convention: feature i pairs with i + rotary_dim / 2). Token t sits at
// positions[t]; its heads start at x + t * token_stride, head_dim floats apart.
void rope(float* x, int64_t n_tokens, int64_t token_stride, int64_t n_heads, int64_t head_dim,
          int64_t rotary_dim, const int32_t* positions, const float* inv_freq);

// Causal grouped-query attention of n_q new tokens against a key/value cache.
//   q:   [n_q, n_heads * head_dim]; query t sits at position past + t.
//   k,v: [past + n_q, n_kv_heads * head_dim] (the cache, new tokens already appended).
//   out: [n_q, n_heads * head_dim].
// Query head h reads kv head h / (n_heads / n_kv_heads). scores are scaled by `scale`; when
// window > 0 a query at position p sees keys at positions > p - window only. Softmax in float32.
void attention(const float* q, int64_t n_q, const float* k, const float* v, int64_t past,
               int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale, int64_t window,
               float* out, ThreadPool* pool);

// Router of a sparse MoE layer: softmax over n_experts logits in float32, then the top_k largest
// probabilities (ties go to the lower expert id), optionally renormalised to sum to one.
// ids and weights are [n_tokens, top_k], in decreasing order of weight.
void softmax_topk(const float* logits, int64_t n_tokens, int64_t n_experts, int64_t top_k,
                  bool renormalize, int32_t* ids, float* weights);

// The general router (DeepSeek-V2 group_limited_greedy, DeepSeek-V3 noaux_tc): scores are the
// softmax (or, with `sigmoid`, the elementwise sigmoid) of the logits in float32; bias (n_experts
// floats, may be null: e_score_correction_bias) is added to the scores for choosing only. The
// experts form n_groups equal groups; a group ranks by the max of its biased scores (or, with
// group_top2_sum, the sum of its two largest), and only the experts of the topk_groups best groups
// (ties to the lower group id) compete. ids receives the top_k competing experts by biased score
// (ties to the lower id) in decreasing order, weights their unbiased scores, divided by the sum of
// those top_k scores when renormalize, then multiplied by scaling. NaN ranks as -inf. Should the
// chosen groups hold fewer than top_k experts, the rest are the best of the other groups. With
// n_groups == 1, softmax, no bias and scaling 1 this is softmax_topk.
void grouped_topk(const float* logits, const float* bias, int64_t n_tokens, int64_t n_experts,
                  int64_t top_k, bool sigmoid, bool renormalize, float scaling, int64_t n_groups,
                  int64_t topk_groups, bool group_top2_sum, int32_t* ids, float* weights);

// out[i] = silu(gate[i]) * up[i] for i < n, silu(x) = x / (1 + exp(-x)). In-place safe.
void swiglu(const float* gate, const float* up, int64_t n, float* out);

// A SwiGLU feed-forward block (an expert, a shared expert or a dense MLP):
//   out = down(silu(gate(x)) * up(x)), x [n_tokens, hidden], out [n_tokens, hidden].
// gate and up are [inter, hidden]; down is [hidden, inter]. scratch holds 2 * n_tokens * inter
// floats.
struct FfnWeights {
  WeightView gate;
  WeightView up;
  WeightView down;
};
void swiglu_ffn(const float* x, int64_t n_tokens, const FfnWeights& w, float* scratch, float* out,
                ThreadPool* pool);

// ---- Paged KV cache ----------------------------------------------------------------------------

// How a paged KV cache stores its values. FP8 is E4M3 in the OCP "fn" format (bias 7, no
// infinities, S.1111.111 is NaN, largest finite value 448) with a float32 scale per stored row.
enum class KvDtype : uint8_t { F32, BF16, FP8 };

const char* kv_dtype_name(KvDtype t);
std::size_t kv_dtype_size(KvDtype t);

// FP8 E4M3 conversions on the CPU. f32_to_fp8_e4m3 rounds to nearest even and saturates to
// +-448 (NaN becomes 0x7F).
float fp8_e4m3_to_f32(uint8_t bits);
uint8_t f32_to_fp8_e4m3(float v);
// The 256 values of fp8_e4m3_to_f32, indexed by code.
const float* fp8_e4m3_table();

// Block-quantizes w (any dtype, scales applied as dequantize_rows does) to F8E4M3: for each
// 128x128 block (the last ones partial), scale = max|finite value| / 448 (1 when that is not
// positive: an all-zero block), code = f32_to_fp8_e4m3(value / scale), so that every finite value
// saturates to +-448 * scale at most; NaN becomes code 0, +-inf +-448. codes is [w.rows, w.cols],
// scale [fp8_blocks(w.rows), fp8_blocks(w.cols)]. Parallel over row blocks on `pool` (may be null).
void quantize_fp8_e4m3(const WeightView& w, uint8_t* codes, float* scale, ThreadPool* pool);

// One layer's view of a paged KV cache. Blocks live anywhere in memory: block b starts at
// blocks[b]; within a block, this layer's keys start k_offset bytes in and are
// [block_size][n_kv_heads][head_dim] values of `dtype`; values likewise at v_offset. For FP8, each
// stored row (one token, one kv head: head_dim values) has a float32 scale, value = fp8 * scale,
// at k_scale_offset / v_scale_offset: [block_size][n_kv_heads] floats. A sequence's token at
// position p lives in block block_table[p / block_size], row p % block_size. F32 and BF16 values
// must be aligned to their size (scales need no alignment).
struct PagedKv {
  char* const* blocks = nullptr;
  int64_t k_offset = 0, v_offset = 0;
  int64_t k_scale_offset = 0, v_scale_offset = 0;  // FP8 only
  KvDtype dtype = KvDtype::BF16;
  int64_t block_size = 16, n_kv_heads = 0, head_dim = 0;
};

// Writes n tokens' keys and values (float32 [n, n_kv_heads * head_dim]) at positions
// first_pos .. first_pos + n - 1 of the sequence whose blocks are block_table. BF16 rounds to
// nearest even; FP8 takes scale = max|row| / 448 per (token, kv head) row (1 when the row is all
// zero, or when max|row| / 448 underflows to zero) and rounds value / scale to nearest even.
void paged_kv_write(const float* k, const float* v, int64_t n, const int32_t* block_table,
                    int64_t first_pos, const PagedKv& cache);

// attention() over a paged cache: n_q new queries at positions past .. past + n_q - 1 of one
// sequence (their keys and values already written), against that sequence's keys at positions
// 0 .. past + n_q - 1 (causal; window > 0 limits as attention() does). Same q/out layout, GQA
// mapping, scale and float32 softmax as attention(); for F32 and BF16 it computes the same sums in
// the same order as attention() on the stored values (FP8: but for where a row's scale is applied),
// so the results agree to the bit. Parallel over tasks of (a tile of queries, one kv head): a task
// reads each key and value row once for all of its queries and the query heads of the kv head's
// GQA group (a group is split across tasks only when there are too few tasks for the pool).
void paged_attention(const float* q, int64_t n_q, const PagedKv& cache, const int32_t* block_table,
                     int64_t past, int64_t n_heads, float scale, int64_t window, float* out,
                     ThreadPool* pool);

// Copies one block's contents (every layer, all of the block's bytes) — the caller passes the
// block's byte size; a helper for copy-on-write of a partially filled block.
void copy_kv_block(const PagedKv& cache, int32_t src, int32_t dst, int64_t block_bytes);

// ---- Instruction sets --------------------------------------------------------------------------

// The instruction sets with dedicated kernels (linear). The library is built without -march
// flags; ISA-specific code is compiled per function and chosen at run time, so one binary runs
// on any x86-64 machine and uses the best kernels it finds.
//   Baseline: portable C++, whatever the compiler makes of it.
//   Avx2:     AVX2 + FMA + F16C.
//   Avx512:   AVX-512 F + BW + VL + DQ.
//   Avx512Bf16: Avx512 + AVX512-BF16 + AVX512-VNNI. linear() with BF16 weights rounds the
//             activations to bf16 (nearest even, subnormals to zero) and sums the exact products
//             in float32 (VDPBF16PS); with I8 weights it quantizes each token's activations to
//             int8 (scale absmax / 127, round to nearest even), sums the products exactly in int32
//             (VPDPBUSD) and gives y = fma(float(sum) * token scale, row scale, bias). F8E4M3
//             weights with a packed copy (pack_amx: rounded to bf16 at load) run as BF16 ones; F32,
//             F16 and F8E4M3 without one run the Avx512 kernels.
//   Amx:      Avx512Bf16 + AMX-TILE + AMX-INT8 + AMX-BF16 (and the kernel's permission to use the
//             tiles): the same as Avx512Bf16 on AMX tiles (TDPBF16PS, TDPBSSD). Its I8 results are
//             Avx512Bf16's bits; its BF16 sums run in the tile unit's order.
//   Avx512Bf16 and Amx change the numerics (bf16 / int8 activations), so they are used only when
//   asked for (MOEMESH_ISA=avx512bf16|amx or force_isa), never by default.
// For a given ISA, every op computes the same sums in the same order whatever the number of
// tokens in a call, so a token's results do not depend on the batch it is in; across ISAs only
// the order of float32 accumulation differs (and, on Avx512Bf16 and Amx, the activations' dtype).
enum class Isa : uint8_t { Baseline, Avx2, Avx512, Avx512Bf16, Amx };

// The best ISA of this CPU (and operating system), found once by cpuid.
Isa detected_isa();

// The ISA the kernels use: detected_isa() capped at Avx512, unless the environment variable
// MOEMESH_ISA (baseline | avx2 | avx512 | avx512bf16 | amx, read once at the first call of any
// ISA function) or force_isa() asks for another one the CPU supports. A MOEMESH_ISA naming no ISA,
// or one above detected_isa(), is ignored (isa_env_rejected() says so, for the caller to report).
Isa active_isa();

// "baseline", "avx2", "avx512", "avx512bf16" or "amx".
const char* isa_name(Isa isa);

// Makes the kernels use `isa` from now on (for tests and benchmarks). Refuses, returning false
// and changing nothing, an ISA above detected_isa(). Not to be called while kernels run.
bool force_isa(Isa isa);

// True when MOEMESH_ISA was set but not honoured (unknown name, or above detected_isa()).
bool isa_env_rejected();

}  // namespace moemesh::kernels
