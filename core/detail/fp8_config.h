// Internal: the quantization_config of an FP8 checkpoint's config.json.
#pragma once

#include <filesystem>

#include "core/error.h"

namespace moemesh::detail {

// Checks config.json's "quantization_config", when there is one: moemesh reads FP8 block-quantized
// checkpoints ({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}; fmt and
// weight_block_size may be absent) and refuses any other method, format or block size, naming the
// file and field. Which tensors are FP8 is decided per tensor, by its weight_scale_inv.
Status check_fp8_quantization_config(const std::filesystem::path& dir);

}  // namespace moemesh::detail
