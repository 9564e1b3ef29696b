// The KV store of a GPU model (core/detail/kv_store.h with device_copy): block ids of a pool that
// lives elsewhere, no host memory, copies through the device's hook, and the same prefix cache as
// a CPU store.
#include "core/detail/kv_store.h"

#include <gtest/gtest.h>

#include <utility>
#include <vector>

#include "core/config.h"
#include "tests/core/expert_shard_helpers.h"

namespace moemesh::detail {
namespace {

TEST(DeviceKvStore, ManagesBlockIdsAndCopiesThroughTheDevice) {
  auto config = load_model_config(test::fixture("qwen3moe-tiny"));
  ASSERT_TRUE(config) << config.error().message();
  std::vector<std::pair<int32_t, int32_t>> copies;
  KvStoreOptions o;
  o.dtype = kernels::KvDtype::BF16;
  o.block_size = 4;
  o.max_tokens = 8 * 4;
  o.prefix_caching = true;
  o.device_copy = [&](int32_t src, int32_t dst) { copies.emplace_back(src, dst); };
  KvStore store(*config, o);
  EXPECT_EQ(store.stats().num_blocks, 8);

  std::optional<std::vector<int32_t>> a = store.allocate(3);
  ASSERT_TRUE(a);
  const kernels::PagedKv view = store.layer_view(0);
  for (int32_t b : *a) EXPECT_EQ(view.blocks[b], nullptr) << "no host memory for block " << b;

  // Full blocks registered as they fill are found by a later sequence with the same prefix.
  const std::vector<int32_t> tokens = {5, 6, 7, 8, 9, 10, 11, 12, 13};
  uint64_t hash = store.commit((*a)[0], 0, std::span<const int32_t>(tokens).subspan(0, 4));
  store.commit((*a)[1], hash, std::span<const int32_t>(tokens).subspan(4, 4));
  const std::vector<int32_t> hit = store.match_prefix(tokens, 2);
  EXPECT_EQ(hit, (std::vector<int32_t>{(*a)[0], (*a)[1]}));
  EXPECT_EQ(store.stats().prefix_hits_tokens, 8u);

  store.copy_block((*a)[2], (*a)[1]);
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0], std::make_pair((*a)[2], (*a)[1]));

  store.release(*a);
  store.release(hit);
  EXPECT_FALSE(store.allocate(9)) << "more blocks than the pool has";
  EXPECT_TRUE(store.allocate(8)) << "every block comes back (cached ones are evicted)";
}

}  // namespace
}  // namespace moemesh::detail
