// paged_kv_write and paged_attention against kernels::attention: the test builds a paged bf16 cache
// with shuffled block tables (every unused slot NaN, so a read outside a sequence shows), and
// compares every query with the CPU kernel run on that sequence's bf16-rounded keys and values in
// contiguous order. Covers decode batches of mixed lengths, chunked prefill mixed with decode,
// GQA ratios 1 to 16, head_dim 6 to 576, block sizes 1 to 32, sliding windows and long contexts
// (the split path), keys that are also the values (multi-head latent attention), and shapes no
// kernel supports. The same with an FP8 cache (E4M3 codes and a float32 scale per row, quantized
// as the CPU's FP8 cache does), whose reference is the CPU kernel on the decoded values; FP8 writes
// store the CPU's codes and scales bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "tests/kernels/cuda_test_util.h"

namespace moemesh::kernels::cuda {
namespace {

using testing::bf16_round;
using testing::download;
using testing::poisoned;
using testing::random_floats;
using testing::rel_error;
using testing::upload;

constexpr uint16_t kNanBf16 = 0xFFFF;
constexpr uint8_t kNanFp8 = 0x7F;

// The CPU FP8 cache's quantization of one row (kernels/cpu paged_kv.cpp): scale = max |x| / 448
// (1 for a row of zeros), code = e4m3(x / scale). decoded[i] = code * scale.
float quantize_row(const float* x, int64_t n, uint8_t* codes, float* decoded) {
  float amax = 0;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  float scale = amax / 448.0f;
  if (!(scale > 0)) scale = 1.0f;
  for (int64_t i = 0; i < n; ++i) {
    codes[i] = kernels::f32_to_fp8_e4m3(x[i] / scale);
    if (decoded) decoded[i] = kernels::fp8_e4m3_to_f32(codes[i]) * scale;
  }
  return scale;
}

struct Layout {
  int64_t n_heads;
  int64_t n_kv;
  int64_t head_dim;
  int64_t block_size;
};

std::string describe(const Layout& l) {
  std::string s = "heads=";  // appended, not "literal" + string (a GCC 12 -Wrestrict false alarm)
  s += std::to_string(l.n_heads) + " kv_heads=" + std::to_string(l.n_kv) +
       " head_dim=" + std::to_string(l.head_dim) + " block_size=" + std::to_string(l.block_size);
  return s;
}

// A paged cache holding sequences of the given lengths in shuffled physical blocks.
struct PagedCache {
  int64_t row = 0;  // n_kv * head_dim
  int64_t max_blocks = 0;
  std::vector<int32_t> tables;           // [n_seqs, max_blocks]
  std::vector<std::vector<float>> k, v;  // per sequence [len, row], as stored (bf16 or decoded)
  std::vector<uint16_t> cache_k, cache_v;
  // FP8: the codes (unwritten slots NaN) and a scale per (slot, kv head) (unwritten: NaN).
  std::vector<uint8_t> fp8_k, fp8_v;
  std::vector<float> scale_k, scale_v;
};

// shared_kv: the values are the keys (one array), as multi-head latent attention caches them.
// fp8: an FP8 cache instead of a bf16 one.
PagedCache make_cache(const Layout& l, const std::vector<int64_t>& lens, uint32_t seed,
                      bool shared_kv = false, bool fp8 = false) {
  PagedCache c;
  c.row = l.n_kv * l.head_dim;
  int64_t used_blocks = 0;
  for (int64_t len : lens) {
    const int64_t blocks = (len + l.block_size - 1) / l.block_size;
    used_blocks += blocks;
    c.max_blocks = std::max(c.max_blocks, blocks + 1);  // one column more than any needs
  }
  const int64_t spare = 3;  // never-written blocks: table entries past a sequence point at them
  const int64_t num_blocks = used_blocks + spare;
  std::vector<int32_t> physical(static_cast<std::size_t>(num_blocks));
  std::iota(physical.begin(), physical.end(), 0);
  std::shuffle(physical.begin(), physical.end(), std::mt19937(seed));

  c.cache_k.assign(static_cast<std::size_t>(num_blocks * l.block_size * c.row), kNanBf16);
  c.cache_v = c.cache_k;
  if (fp8) {
    c.fp8_k.assign(c.cache_k.size(), kNanFp8);
    c.fp8_v = c.fp8_k;
    c.scale_k.assign(static_cast<std::size_t>(num_blocks * l.block_size * l.n_kv), NAN);
    c.scale_v = c.scale_k;
  }
  c.tables.assign(lens.size() * static_cast<std::size_t>(c.max_blocks),
                  physical[static_cast<std::size_t>(used_blocks)]);
  std::size_t next = 0;
  for (std::size_t s = 0; s < lens.size(); ++s) {
    const int64_t len = lens[s];
    int32_t* table = c.tables.data() + s * static_cast<std::size_t>(c.max_blocks);
    for (int64_t b = 0; b * l.block_size < len; ++b) table[b] = physical[next++];
    const auto n = static_cast<std::size_t>(len * c.row);
    if (fp8) {
      // Rows of varied magnitude (one in 9 all zero): each stored row has its own scale.
      std::vector<float> k = random_floats(n, seed + 101 * static_cast<uint32_t>(s) + 1, -3, 3);
      std::vector<float> v =
          shared_kv ? k : random_floats(n, seed + 101 * static_cast<uint32_t>(s) + 2, -3, 3);
      for (int64_t p = 0; p < len; ++p) {
        const int64_t slot = int64_t{table[p / l.block_size]} * l.block_size + p % l.block_size;
        for (int64_t h = 0; h < l.n_kv; ++h) {
          const auto at = static_cast<std::size_t>(p * c.row + h * l.head_dim);
          const float factor =
              (p + h) % 9 == 4 ? 0.0f : std::ldexp(1.0f, static_cast<int>((p * 7 + h) % 11) - 5);
          for (int64_t i = 0; i < l.head_dim; ++i) {
            k[at + i] *= factor;
            if (!shared_kv) v[at + i] *= factor;
          }
          const auto dst = static_cast<std::size_t>(slot * c.row + h * l.head_dim);
          const auto sc = static_cast<std::size_t>(slot * l.n_kv + h);
          c.scale_k[sc] =
              quantize_row(k.data() + at, l.head_dim, c.fp8_k.data() + dst, k.data() + at);
          c.scale_v[sc] = shared_kv ? c.scale_k[sc]
                                    : quantize_row(v.data() + at, l.head_dim, c.fp8_v.data() + dst,
                                                   v.data() + at);
        }
      }
      if (shared_kv) {
        v = k;
        c.fp8_v = c.fp8_k;
      }
      c.k.push_back(std::move(k));
      c.v.push_back(std::move(v));
      continue;
    }
    c.k.push_back(bf16_round(random_floats(n, seed + 101 * static_cast<uint32_t>(s) + 1)));
    c.v.push_back(shared_kv
                      ? c.k.back()
                      : bf16_round(random_floats(n, seed + 101 * static_cast<uint32_t>(s) + 2)));
    for (int64_t p = 0; p < len; ++p) {
      const int64_t slot = int64_t{table[p / l.block_size]} * l.block_size + p % l.block_size;
      for (int64_t i = 0; i < c.row; ++i) {
        c.cache_k[static_cast<std::size_t>(slot * c.row + i)] =
            kernels::f32_to_bf16(c.k[s][static_cast<std::size_t>(p * c.row + i)]);
        c.cache_v[static_cast<std::size_t>(slot * c.row + i)] =
            kernels::f32_to_bf16(c.v[s][static_cast<std::size_t>(p * c.row + i)]);
      }
    }
  }
  return c;
}

struct Query {
  int32_t seq;
  int32_t pos;
};

// Runs paged_attention for `queries` over sequences of `lens` and compares each query's output
// with kernels::attention. max_pos_slack loosens the host bound max_pos above the largest pos.
void expect_matches_cpu(const Layout& l, const std::vector<int64_t>& lens,
                        const std::vector<Query>& queries, int64_t window, uint32_t seed,
                        int64_t max_pos_slack = 0, bool shared_kv = false, bool fp8 = false) {
  SCOPED_TRACE(describe(l) + " window=" + std::to_string(window) + (fp8 ? " fp8" : ""));
  const PagedCache c = make_cache(l, lens, seed, shared_kv, fp8);
  const auto n_q = static_cast<int64_t>(queries.size());
  const int64_t q_row = l.n_heads * l.head_dim;
  const auto q = random_floats(static_cast<std::size_t>(n_q * q_row), seed + 7, -3.0f, 3.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(l.head_dim));

  std::vector<int32_t> seq, pos;
  int64_t max_pos = 0;
  for (const Query& x : queries) {
    seq.push_back(x.seq);
    pos.push_back(x.pos);
    max_pos = std::max<int64_t>(max_pos, x.pos);
  }

  std::vector<float> want(static_cast<std::size_t>(n_q * q_row));
  for (int64_t t = 0; t < n_q; ++t) {
    const Query& x = queries[static_cast<std::size_t>(t)];
    kernels::attention(q.data() + t * q_row, 1, c.k[static_cast<std::size_t>(x.seq)].data(),
                       c.v[static_cast<std::size_t>(x.seq)].data(), x.pos, l.n_heads, l.n_kv,
                       l.head_dim, scale, window, want.data() + t * q_row, nullptr);
  }

  const DeviceBuffer d_q = upload(q);
  const DeviceBuffer d_k = fp8 ? upload(c.fp8_k) : upload(c.cache_k);
  const DeviceBuffer d_v = fp8 ? upload(c.fp8_v) : upload(c.cache_v);
  const DeviceBuffer d_ks = upload(c.scale_k);
  const DeviceBuffer d_vs = upload(c.scale_v);
  const DeviceBuffer d_seq = upload(seq);
  const DeviceBuffer d_pos = upload(pos);
  const DeviceBuffer d_tables = upload(c.tables);
  const DeviceBuffer d_out = poisoned<float>(want.size());
  PagedKv cache{d_k.data(), shared_kv ? d_k.data() : d_v.data(), l.block_size, l.n_kv, l.head_dim};
  if (fp8) {
    cache.fp8 = true;
    cache.k_scale = d_ks.as<float>();
    cache.v_scale = shared_kv ? d_ks.as<float>() : d_vs.as<float>();
  }
  AttentionBatch batch;
  batch.seq = d_seq.as<int32_t>();
  batch.pos = d_pos.as<int32_t>();
  batch.block_tables = d_tables.as<int32_t>();
  batch.max_blocks = c.max_blocks;
  batch.max_pos = max_pos + max_pos_slack;
  paged_attention(d_q.as<float>(), n_q, cache, batch, l.n_heads, scale, window, d_out.as<float>(),
                  nullptr);
  ASSERT_EQ(synchronize(nullptr, "paged_attention"), "");
  const auto got = download<float>(d_out, want.size());

  EXPECT_LT(rel_error(got, want), 1e-3);
  for (int64_t t = 0; t < n_q; ++t) {
    const auto begin = static_cast<std::ptrdiff_t>(t * q_row);
    const std::vector<float> g(got.begin() + begin, got.begin() + begin + q_row);
    const std::vector<float> w(want.begin() + begin, want.begin() + begin + q_row);
    EXPECT_LT(rel_error(g, w), 1e-3) << "query " << t << " (sequence " << queries[t].seq
                                     << ", position " << queries[t].pos << ")";
  }
}

// One decode query per sequence, the last position of each, in an order unlike the sequences'.
std::vector<Query> decode_queries(const std::vector<int64_t>& lens,
                                  const std::vector<int32_t>& order) {
  std::vector<Query> qs;
  for (int32_t s : order)
    qs.push_back({s, static_cast<int32_t>(lens[static_cast<std::size_t>(s)] - 1)});
  return qs;
}

class CudaPagedAttentionLayouts : public ::testing::TestWithParam<Layout> {};

TEST_P(CudaPagedAttentionLayouts, DecodeBatchOfDifferentLengths) {
  MOEMESH_REQUIRE_GPU();
  const std::vector<int64_t> lens = {1, 17, 300, 2049};
  expect_matches_cpu(GetParam(), lens, decode_queries(lens, {2, 0, 3, 1}), 0, 11);
}

// Queries at positions past .. past + n - 1 of one sequence (a prefill chunk after earlier
// chunks, and a first chunk), interleaved with decode queries of other sequences.
TEST_P(CudaPagedAttentionLayouts, ChunkedPrefillMixedWithDecode) {
  MOEMESH_REQUIRE_GPU();
  const std::vector<int64_t> lens = {87, 501, 20, 1};
  std::vector<Query> qs;
  for (int32_t p = 37; p < 60; ++p) qs.push_back({0, p});
  qs.push_back({1, 500});
  for (int32_t p = 60; p < 87; ++p) qs.push_back({0, p});
  for (int32_t p = 0; p < 20; ++p) qs.push_back({2, p});
  qs.push_back({3, 0});
  expect_matches_cpu(GetParam(), lens, qs, 0, 23);
}

TEST_P(CudaPagedAttentionLayouts, SlidingWindow) {
  MOEMESH_REQUIRE_GPU();
  const std::vector<int64_t> lens = {1, 17, 300, 2049, 140};
  std::vector<Query> qs = decode_queries(lens, {3, 1, 0, 2});
  for (int32_t p = 90; p < 140; ++p) qs.push_back({4, p});  // the window's start moves
  expect_matches_cpu(GetParam(), lens, qs, 100, 37);
  expect_matches_cpu(GetParam(), lens, qs, 1000, 38);  // longer than most, split over blocks
  expect_matches_cpu(GetParam(), lens, qs, 1, 39);
}

// An FP8 cache: decode queries and a prefill chunk against the CPU kernel on the decoded values.
TEST_P(CudaPagedAttentionLayouts, Fp8CacheDecodeAndPrefill) {
  MOEMESH_REQUIRE_GPU();
  const std::vector<int64_t> lens = {1, 17, 300, 87};
  std::vector<Query> qs = decode_queries(lens, {2, 0, 1});
  for (int32_t p = 37; p < 87; ++p) qs.push_back({3, p});
  expect_matches_cpu(GetParam(), lens, qs, 0, 81, 0, false, true);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaPagedAttentionLayouts,
    ::testing::Values(Layout{32, 8, 128, 16},  // GQA 4
                      Layout{8, 8, 128, 16},   // MHA
                      Layout{32, 4, 128, 32},  // GQA 8
                      Layout{16, 2, 64, 1},    // GQA 8, one token per block
                      Layout{8, 8, 64, 32},    // MHA
                      Layout{16, 1, 64, 16},   // MQA: 16 q heads in two blocks
                      Layout{12, 4, 96, 16},   // GQA 3: a padded row block; generic head_dim
                      Layout{24, 2, 80, 7},    // GQA 12: 8 + 4 q heads; odd block size
                      Layout{8, 2, 256, 16},   // widest head of the main kernel
                      Layout{6, 3, 6, 3},      // tiny head
                      Layout{16, 1, 576, 16},  // the wide kernel: MLA's latent row
                      Layout{20, 2, 320, 7}),  // the wide kernel: GQA 10 (8 + 2 q heads)
    [](const ::testing::TestParamInfo<Layout>& param_info) {
      const Layout& l = param_info.param;
      std::string name = "h";
      name += std::to_string(l.n_heads) + "kv" + std::to_string(l.n_kv) + "d" +
              std::to_string(l.head_dim) + "bs" + std::to_string(l.block_size);
      return name;
    });

// One query deep in a long sequence: the keys are split over many blocks (flash-decoding).
TEST(CudaPagedAttention, LongDecodeSplitsTheKeys) {
  MOEMESH_REQUIRE_GPU();
  expect_matches_cpu({32, 8, 128, 16}, {8192}, {{0, 8191}}, 0, 41);
  expect_matches_cpu({16, 2, 128, 16}, {32768}, {{0, 32767}}, 0, 42);
  expect_matches_cpu({8, 1, 64, 16}, {32000, 5000}, {{1, 4999}, {0, 31999}}, 0, 43);
  // A loose max_pos: most splits of the short sequences see no keys.
  expect_matches_cpu({32, 8, 128, 16}, {3000, 40}, {{0, 2999}, {1, 39}}, 0, 44, 20000);
  // The wide kernel (latent attention's rows, keys that are the values) splits too.
  expect_matches_cpu({16, 1, 576, 16}, {8192}, {{0, 8191}}, 0, 45, 0, true);
  expect_matches_cpu({128, 1, 576, 64}, {3000, 40}, {{0, 2999}, {1, 39}}, 0, 46, 20000, true);
  expect_matches_cpu({20, 2, 320, 16}, {5000}, {{0, 4999}}, 700, 47);
}

// Multi-head latent attention's shape: one kv head whose 576-wide rows are keys and values (one
// array), 16 and 128 q heads (DeepSeek-V3 has 128), decode and a prefill chunk; and the narrow
// kernel with one array for both.
TEST(CudaPagedAttention, KeysThatAreTheValues) {
  MOEMESH_REQUIRE_GPU();
  const std::vector<int64_t> lens = {5, 700, 33};
  std::vector<Query> qs = decode_queries(lens, {1, 2, 0});
  for (int32_t p = 10; p < 33; ++p) qs.push_back({2, p});
  expect_matches_cpu({16, 1, 576, 16}, lens, qs, 0, 61, 0, true);
  expect_matches_cpu({128, 1, 576, 64}, lens, decode_queries(lens, {0, 1, 2}), 0, 62, 0, true);
  expect_matches_cpu({16, 1, 128, 16}, lens, qs, 0, 63, 0, true);
}

// FP8 caches on the paths the layouts above do not take: long decodes split over blocks (the
// main and the wide kernel), latent attention's rows that are keys and values with one scale.
TEST(CudaPagedAttention, Fp8LongDecodeAndKeysThatAreTheValues) {
  MOEMESH_REQUIRE_GPU();
  expect_matches_cpu({32, 8, 128, 16}, {8192}, {{0, 8191}}, 0, 91, 0, false, true);
  expect_matches_cpu({16, 1, 576, 16}, {8192}, {{0, 8191}}, 0, 92, 0, true, true);
  const std::vector<int64_t> lens = {5, 700, 33};
  std::vector<Query> qs = decode_queries(lens, {1, 2, 0});
  for (int32_t p = 10; p < 33; ++p) qs.push_back({2, p});
  expect_matches_cpu({16, 1, 576, 16}, lens, qs, 0, 93, 0, true, true);
  expect_matches_cpu({128, 1, 576, 64}, lens, decode_queries(lens, {0, 1, 2}), 0, 94, 0, true,
                     true);
}

// Enough (query, kv head) pairs to fill the GPU without splitting: each block walks several
// chunks of keys.
TEST(CudaPagedAttention, LongPrefillChunkWithoutSplits) {
  MOEMESH_REQUIRE_GPU();
  std::vector<Query> qs;
  for (int32_t p = 700; p < 1000; ++p) qs.push_back({0, p});
  qs.push_back({1, 1500});
  expect_matches_cpu({8, 4, 64, 16}, {1000, 1501}, qs, 0, 51);
  expect_matches_cpu({8, 4, 128, 16}, {1000, 1501}, qs, 300, 52);
}

struct WriteCase {
  int64_t n_kv, head_dim, block_size, num_blocks, n;
  int64_t offset;  // floats between the buffer start and k / v (misaligned rows)
};

// w.n distinct slots of the cache's num_blocks * block_size, in a seeded shuffled order.
std::vector<int32_t> shuffled_slots(const WriteCase& w) {
  std::vector<int32_t> slots(static_cast<std::size_t>(w.num_blocks * w.block_size));
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), std::mt19937(static_cast<uint32_t>(w.n)));
  slots.resize(static_cast<std::size_t>(w.n));
  return slots;
}

TEST(CudaPagedAttention, KvWriteRoundTrip) {
  MOEMESH_REQUIRE_GPU();
  for (const WriteCase& w : {WriteCase{8, 128, 16, 12, 150, 0}, WriteCase{2, 64, 1, 80, 50, 1},
                             WriteCase{1, 6, 3, 9, 20, 0}, WriteCase{3, 96, 32, 2, 37, 0}}) {
    std::string trace = "kv_heads=";
    trace += std::to_string(w.n_kv) + " head_dim=" + std::to_string(w.head_dim) +
             " offset=" + std::to_string(w.offset);
    SCOPED_TRACE(trace);
    const int64_t row = w.n_kv * w.head_dim;
    const int64_t n_slots = w.num_blocks * w.block_size;
    std::vector<int32_t> slots = shuffled_slots(w);
    const auto k = random_floats(static_cast<std::size_t>(w.offset + w.n * row), 61, -5.0f, 5.0f);
    const auto v = random_floats(static_cast<std::size_t>(w.offset + w.n * row), 62, -5.0f, 5.0f);

    const DeviceBuffer d_k = upload(k);
    const DeviceBuffer d_v = upload(v);
    const DeviceBuffer d_slots = upload(slots);
    const DeviceBuffer cache_k = poisoned<uint16_t>(static_cast<std::size_t>(n_slots * row));
    const DeviceBuffer cache_v = poisoned<uint16_t>(static_cast<std::size_t>(n_slots * row));
    const PagedKv cache{cache_k.as<uint16_t>(), cache_v.as<uint16_t>(), w.block_size, w.n_kv,
                        w.head_dim};
    paged_kv_write(d_k.as<float>() + w.offset, d_v.as<float>() + w.offset, w.n,
                   d_slots.as<int32_t>(), cache, nullptr);
    ASSERT_EQ(synchronize(nullptr, "paged_kv_write"), "");
    const auto got_k = download<uint16_t>(cache_k, static_cast<std::size_t>(n_slots * row));
    const auto got_v = download<uint16_t>(cache_v, static_cast<std::size_t>(n_slots * row));

    std::vector<uint16_t> want_k(got_k.size(), 0xFFFF), want_v(got_v.size(), 0xFFFF);
    for (int64_t t = 0; t < w.n; ++t)
      for (int64_t i = 0; i < row; ++i) {
        const auto dst = static_cast<std::size_t>(slots[static_cast<std::size_t>(t)] * row + i);
        const auto src = static_cast<std::size_t>(w.offset + t * row + i);
        want_k[dst] = kernels::f32_to_bf16(k[src]);
        want_v[dst] = kernels::f32_to_bf16(v[src]);
      }
    EXPECT_EQ(got_k, want_k);
    EXPECT_EQ(got_v, want_v);
  }
}

// FP8 writes store the CPU FP8 cache's codes and scales bit for bit (rows of zeros included, and
// one plane when the keys are the values), and paged_kv_read_bf16 reads them back as
// bf16(code * scale); a bf16 cache reads back as stored.
TEST(CudaPagedAttention, Fp8KvWriteStoresTheCpusCodesAndScales) {
  MOEMESH_REQUIRE_GPU();
  struct Fp8Case {
    WriteCase w;
    bool one_plane;
  };
  for (const Fp8Case& fc :
       {Fp8Case{{8, 128, 16, 12, 150, 0}, false}, Fp8Case{{2, 64, 1, 80, 50, 1}, false},
        Fp8Case{{1, 6, 3, 9, 20, 0}, false}, Fp8Case{{1, 576, 16, 4, 40, 0}, true}}) {
    const WriteCase& w = fc.w;
    std::string trace = "kv_heads=";
    trace += std::to_string(w.n_kv) + " head_dim=" + std::to_string(w.head_dim) +
             (fc.one_plane ? " one plane" : "");
    SCOPED_TRACE(trace);
    const int64_t row = w.n_kv * w.head_dim;
    const int64_t n_slots = w.num_blocks * w.block_size;
    std::vector<int32_t> slots = shuffled_slots(w);
    slots[1] = -1;  // a padding token: nothing written
    auto k = random_floats(static_cast<std::size_t>(w.offset + w.n * row), 161, -5.0f, 5.0f);
    auto v = fc.one_plane ? k : random_floats(k.size(), 162, -5.0f, 5.0f);
    for (int64_t i = 0; i < row; ++i) k[static_cast<std::size_t>(w.offset + 2 * row + i)] = 0.0f;
    if (fc.one_plane) v = k;

    const DeviceBuffer d_k = upload(k);
    const DeviceBuffer d_v = upload(v);
    const DeviceBuffer d_slots = upload(slots);
    const DeviceBuffer cache_k = poisoned<uint8_t>(static_cast<std::size_t>(n_slots * row));
    const DeviceBuffer cache_v = poisoned<uint8_t>(static_cast<std::size_t>(n_slots * row));
    const DeviceBuffer scale_k = poisoned<float>(static_cast<std::size_t>(n_slots * w.n_kv));
    const DeviceBuffer scale_v = poisoned<float>(static_cast<std::size_t>(n_slots * w.n_kv));
    PagedKv cache{cache_k.data(),      fc.one_plane ? cache_k.data() : cache_v.data(),
                  w.block_size,        w.n_kv,
                  w.head_dim,          true,
                  scale_k.as<float>(), fc.one_plane ? scale_k.as<float>() : scale_v.as<float>()};
    const float* vsrc = fc.one_plane ? d_k.as<float>() : d_v.as<float>();
    paged_kv_write(d_k.as<float>() + w.offset, vsrc + w.offset, w.n, d_slots.as<int32_t>(), cache,
                   nullptr);
    ASSERT_EQ(synchronize(nullptr, "paged_kv_write"), "");

    std::vector<uint8_t> want_k(static_cast<std::size_t>(n_slots * row), 0xFF), want_v = want_k;
    std::vector<float> want_ks(static_cast<std::size_t>(n_slots * w.n_kv)), want_vs;
    std::memset(want_ks.data(), 0xFF, want_ks.size() * sizeof(float));
    want_vs = want_ks;
    for (int64_t t = 0; t < w.n; ++t) {
      const int32_t slot = slots[static_cast<std::size_t>(t)];
      if (slot < 0) continue;
      for (int64_t h = 0; h < w.n_kv; ++h) {
        const auto src = static_cast<std::size_t>(w.offset + t * row + h * w.head_dim);
        const auto dst = static_cast<std::size_t>(slot * row + h * w.head_dim);
        const auto sc = static_cast<std::size_t>(slot * w.n_kv + h);
        want_ks[sc] = quantize_row(k.data() + src, w.head_dim, want_k.data() + dst, nullptr);
        want_vs[sc] = quantize_row(v.data() + src, w.head_dim, want_v.data() + dst, nullptr);
      }
    }
    auto bits = [](const std::vector<float>& f) {
      std::vector<uint32_t> b(f.size());
      std::memcpy(b.data(), f.data(), f.size() * sizeof(float));
      return b;
    };
    const auto got_k = download<uint8_t>(cache_k, want_k.size());
    const auto got_ks = download<float>(scale_k, want_ks.size());
    EXPECT_EQ(got_k, want_k);
    EXPECT_EQ(bits(got_ks), bits(want_ks));
    if (!fc.one_plane) {
      EXPECT_EQ(download<uint8_t>(cache_v, want_v.size()), want_v);
      EXPECT_EQ(bits(download<float>(scale_v, want_vs.size())), bits(want_vs));
    } else {
      EXPECT_EQ(got_k, want_v);
    }

    // Read back the written slots (the padding one skipped) as bf16.
    std::vector<int32_t> written;
    for (int32_t slot : slots)
      if (slot >= 0) written.push_back(slot);
    const DeviceBuffer d_written = upload(written);
    const DeviceBuffer d_rows = poisoned<uint16_t>(written.size() * static_cast<std::size_t>(row));
    paged_kv_read_bf16(cache, true, d_written.as<int32_t>(), static_cast<int64_t>(written.size()),
                       d_rows.as<uint16_t>(), nullptr);
    const auto rows = download<uint16_t>(d_rows, written.size() * static_cast<std::size_t>(row));
    std::vector<uint16_t> want_rows(rows.size());
    for (std::size_t r = 0; r < written.size(); ++r)
      for (int64_t i = 0; i < row; ++i)
        want_rows[r * static_cast<std::size_t>(row) + static_cast<std::size_t>(i)] =
            kernels::f32_to_bf16(
                kernels::fp8_e4m3_to_f32(want_v[static_cast<std::size_t>(written[r] * row + i)]) *
                want_vs[static_cast<std::size_t>(written[r] * w.n_kv + i / w.head_dim)]);
    EXPECT_EQ(rows, want_rows);
  }

  // A bf16 cache reads back its bits.
  const std::vector<uint16_t> stored = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  const std::vector<int32_t> pick = {2, 0};
  const DeviceBuffer d_stored = upload(stored);
  const DeviceBuffer d_pick = upload(pick);
  const DeviceBuffer d_out = poisoned<uint16_t>(8);
  const PagedKv bf16{d_stored.data(), d_stored.data(), 1, 2, 2};
  paged_kv_read_bf16(bf16, false, d_pick.as<int32_t>(), 2, d_out.as<uint16_t>(), nullptr);
  EXPECT_EQ(download<uint16_t>(d_out, 8), (std::vector<uint16_t>{9, 10, 11, 12, 1, 2, 3, 4}));
}

// The cache written by paged_kv_write is the cache paged_attention reads.
TEST(CudaPagedAttention, WriteThenAttend) {
  MOEMESH_REQUIRE_GPU();
  const Layout l{16, 4, 128, 16};
  const int64_t len = 333;
  const PagedCache c = make_cache(l, {len}, 71);
  std::vector<int32_t> slots(static_cast<std::size_t>(len));
  for (int64_t p = 0; p < len; ++p)
    slots[static_cast<std::size_t>(p)] =
        c.tables[static_cast<std::size_t>(p / l.block_size)] * static_cast<int32_t>(l.block_size) +
        static_cast<int32_t>(p % l.block_size);
  const auto q = random_floats(static_cast<std::size_t>(l.n_heads * l.head_dim), 72);
  const float scale = 1.0f / std::sqrt(static_cast<float>(l.head_dim));
  std::vector<float> want(q.size());
  kernels::attention(q.data(), 1, c.k[0].data(), c.v[0].data(), len - 1, l.n_heads, l.n_kv,
                     l.head_dim, scale, 0, want.data(), nullptr);

  const DeviceBuffer d_knew = upload(c.k[0]);
  const DeviceBuffer d_vnew = upload(c.v[0]);
  const DeviceBuffer d_slots = upload(slots);
  const DeviceBuffer d_k = poisoned<uint16_t>(c.cache_k.size());
  const DeviceBuffer d_v = poisoned<uint16_t>(c.cache_v.size());
  const PagedKv cache{d_k.as<uint16_t>(), d_v.as<uint16_t>(), l.block_size, l.n_kv, l.head_dim};
  paged_kv_write(d_knew.as<float>(), d_vnew.as<float>(), len, d_slots.as<int32_t>(), cache,
                 nullptr);
  ASSERT_EQ(check("paged_kv_write"), "");

  const std::vector<int32_t> seq = {0}, pos = {static_cast<int32_t>(len - 1)};
  const DeviceBuffer d_q = upload(q);
  const DeviceBuffer d_seq = upload(seq);
  const DeviceBuffer d_pos = upload(pos);
  const DeviceBuffer d_tables = upload(c.tables);
  const DeviceBuffer d_out = poisoned<float>(want.size());
  AttentionBatch batch;
  batch.seq = d_seq.as<int32_t>();
  batch.pos = d_pos.as<int32_t>();
  batch.block_tables = d_tables.as<int32_t>();
  batch.max_blocks = c.max_blocks;
  batch.max_pos = len - 1;
  paged_attention(d_q.as<float>(), 1, cache, batch, l.n_heads, scale, 0, d_out.as<float>(),
                  nullptr);
  ASSERT_EQ(synchronize(nullptr, "paged_attention"), "");
  EXPECT_LT(rel_error(download<float>(d_out, want.size()), want), 1e-3);
}

// Shapes no kernel supports fail at check() instead of computing garbage.
TEST(CudaPagedAttention, UnsupportedShapesAreReported) {
  MOEMESH_REQUIRE_GPU();
  ASSERT_EQ(check("before"), "");
  const DeviceBuffer buf = poisoned<float>(1024);
  const std::vector<int32_t> zeros = {0};
  const DeviceBuffer d_zero = upload(zeros);
  AttentionBatch batch;
  batch.seq = d_zero.as<int32_t>();
  batch.pos = d_zero.as<int32_t>();
  batch.block_tables = d_zero.as<int32_t>();
  batch.max_blocks = 1;
  for (const PagedKv& cache :
       {PagedKv{buf.data(), buf.data(), 16, 1, 642}, PagedKv{buf.data(), buf.data(), 16, 1, 7},
        PagedKv{buf.data(), buf.data(), 16, 3, 64},
        PagedKv{buf.data(), buf.data(), 16, 1, 578, true, buf.as<float>(), buf.as<float>()},
        PagedKv{buf.data(), buf.data(), 16, 1, 64, true, nullptr, nullptr}}) {
    paged_attention(buf.as<float>(), 1, cache, batch, 4, 1.0f, 0, buf.as<float>(), nullptr);
    EXPECT_NE(check("paged_attention"), "")
        << "head_dim " << cache.head_dim << " kv_heads " << cache.n_kv_heads;
  }
  EXPECT_EQ(synchronize(nullptr, "after"), "");
}

}  // namespace
}  // namespace moemesh::kernels::cuda
