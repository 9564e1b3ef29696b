// Internal: the ISA-specific row kernels behind kernels::linear (kernels/cpu/linear.cpp picks one
// by active_isa()). Each computes y[t, r] for rows [row_begin, row_end) and every token, with the
// contract of linear(); the caller must only call a kernel the CPU supports.
//
// Batch invariance: a kernel sums each (token, row) in one fixed order that depends on cols
// only, never on n_tokens or on which tokens share a call, so a token's outputs are the same bits
// alone or in any batch. An I8 row's scale multiplies its finished sum once, on every path.
// F8E4M3 weights (linear_rows_fp8_*, called by the kernels above for that dtype) are multiplied by
// their block scale before they enter the sum, which is then the F32 kernel's sum over the
// dequantized weights: the same bits.
#pragma once

#include <cstdint>

#include "kernels/cpu/cpu_kernels.h"

namespace moemesh::kernels::detail {

void linear_rows_avx2(const float* x, int64_t n_tokens, const WeightView& w, const float* bias,
                      float* y, int64_t row_begin, int64_t row_end);

void linear_rows_avx512(const float* x, int64_t n_tokens, const WeightView& w, const float* bias,
                        float* y, int64_t row_begin, int64_t row_end);

// F8E4M3 weights: few tokens decode the codes in registers; many tokens dequantize panels of rows
// to float32 once and run the F32 kernel over them.
void linear_rows_fp8_avx2(const float* x, int64_t n_tokens, const WeightView& w, const float* bias,
                          float* y, int64_t row_begin, int64_t row_end);

void linear_rows_fp8_avx512(const float* x, int64_t n_tokens, const WeightView& w,
                            const float* bias, float* y, int64_t row_begin, int64_t row_end);

// The packed layout (pack_amx) of linear_amx.cpp and linear_avx512_bf16.cpp: panels of
// kPackedPanelRows rows, column tiles of kPackedTileBytes bytes a row (int8, else bf16: F8E4M3 is
// packed as bf16).
constexpr int64_t kPackedPanelRows = 32;
constexpr int64_t kPackedTileBytes = 64;
inline int64_t packed_column_tiles(DType dtype, int64_t cols) {
  return (cols * (dtype == DType::I8 ? 1 : 2) + kPackedTileBytes - 1) / kPackedTileBytes;
}
// 32-bit words of one packed panel.
inline int64_t packed_panel_words(DType dtype, int64_t cols) {
  return kPackedPanelRows * packed_column_tiles(dtype, cols) * kPackedTileBytes / 4;
}

// Isa::Amx, BF16 and I8 weights (linear_amx.cpp). The activations are first prepared into xq:
// amx_padded_tokens(n_tokens) rows of amx_row_stride(dtype, cols) bytes, zero past n_tokens and
// cols; BF16: rounded to bf16 (subnormal values become zero, as the tile unit reads them); I8:
// quantized to int8 with one scale per token into token_scale (amx_prepare_activations fills rows
// [t_begin, t_end)). linear_rows_amx then computes rows [row_begin, row_end) of y, row_begin a
// multiple of 32, from xq, and from w.packed where it is set (else it packs the rows itself).
// The calling thread must hold the tile permission (amx_request_permission, once per process).
int64_t amx_padded_tokens(int64_t n_tokens);
int64_t amx_row_stride(DType dtype, int64_t cols);
void amx_prepare_activations(const float* x, int64_t n_tokens, int64_t cols, DType dtype,
                             int64_t t_begin, int64_t t_end, uint8_t* xq, float* token_scale);
void linear_rows_amx(const uint8_t* xq, const float* token_scale, int64_t n_tokens,
                     const WeightView& w, const float* bias, float* y, int64_t row_begin,
                     int64_t row_end);
bool amx_request_permission();
// Packs rows [r0, r0 + 32) of w (BF16 or I8) as one panel of pack_amx's layout.
void pack_tile_panel(const WeightView& w, int64_t r0, uint32_t* packed);

// Isa::Avx512Bf16 (linear_avx512_bf16.cpp): the same prepared activations and packed layout as
// linear_rows_amx, the same results for I8 (exact integer sums, then the same fma), and for BF16
// and F8E4M3 the exact bf16 products summed in float32 by VDPBF16PS (another order than the tile
// unit's, fixed by cols alone).
void linear_rows_avx512_bf16(const uint8_t* xq, const float* token_scale, int64_t n_tokens,
                             const WeightView& w, const float* bias, float* y, int64_t row_begin,
                             int64_t row_end);
// Panels [panel_begin, panel_end) of pack_amx's layout.
void amx_pack_panels(const WeightView& w, int64_t panel_begin, int64_t panel_end, uint32_t* out);

}  // namespace moemesh::kernels::detail
