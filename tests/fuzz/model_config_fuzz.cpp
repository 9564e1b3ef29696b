// Fuzzes config.json parsing: core/config.h parse_model_config (what every role loads) and
// core/plan.h parse_plan_model + count_params (what `moemesh plan --config FILE` reads).
// Input: config.json text.
#include <cstddef>
#include <cstdint>

#include "core/config.h"
#include "core/plan.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  moemesh::fuzz::quiet_logs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text = moemesh::fuzz::as_text(data, size);
  auto config = moemesh::parse_model_config(text, "config.json");
  if (config) {
    (void)config->num_moe_layers();
    (void)config->kv_values_per_token_layer();
    (void)moemesh::arch_name(config->arch);
  }
  auto plan = moemesh::plan::parse_plan_model(text, "config.json");
  if (plan) (void)moemesh::plan::count_params(*plan);
  return 0;
}
