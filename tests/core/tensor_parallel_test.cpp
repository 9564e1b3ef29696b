// How a model splits over the ranks of a tensor-parallel group (core/detail/tensor_parallel.h):
// which sizes are refused, what each rank holds, and that the ranks' partial products add up to
// the whole model's (MLP and attention output, and a q/k norm over split features), checked on
// the CPU with the shards the GPU ranks upload.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/detail/tensor_parallel.h"
#include "core/model.h"
#include "tests/core/expert_shard_helpers.h"

namespace moemesh::detail {
namespace {

using test::fixture;

ModelConfig config_of(const char* name) {
  auto c = load_model_config(fixture(name));
  EXPECT_TRUE(c) << c.error().message();
  return *c;
}

TEST(TensorParallel, SizesThatDoNotDivideAreRefusedWithTheReason) {
  const ModelConfig odd = config_of("mixtral-odd-sharded");  // 5 heads, 1 KV head, MLP 23
  EXPECT_TRUE(check_tensor_parallel(odd, 1));
  Status s = check_tensor_parallel(odd, 5);  // the KV head replicates; the MLP does not divide
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("23 MLP features"), std::string::npos) << s.error().message();
  s = check_tensor_parallel(odd, 2);
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("5 attention heads"), std::string::npos)
      << s.error().message();
  EXPECT_NE(s.error().message().find("--tensor-parallel-size 2"), std::string::npos);
  EXPECT_FALSE(check_tensor_parallel(odd, 0));

  const ModelConfig q2 = config_of("qwen2moe-bf16");  // 8 heads, 4 KV, experts 12, shared 24
  EXPECT_TRUE(check_tensor_parallel(q2, 2));
  EXPECT_TRUE(check_tensor_parallel(q2, 4));
  s = check_tensor_parallel(q2, 8);  // 8 ranks replicate the 4 KV heads; the MLP does not split
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("36 MLP features"), std::string::npos) << s.error().message();

  // KV heads that neither divide nor replicate evenly: 6 ranks over 4.
  ModelConfig six = q2;
  six.num_heads = 12;
  six.moe_intermediate_size = six.intermediate_size = six.shared_expert_intermediate_size = 36;
  s = check_tensor_parallel(six, 6);
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("4 key/value heads, which neither divide"), std::string::npos)
      << s.error().message();
  // A k norm over all KV heads (OLMoE) cannot be replicated.
  const ModelConfig olmoe = config_of("olmoe-bf16-clip");  // 6 heads, 2 KV heads, full q/k norm
  ASSERT_EQ(olmoe.qk_norm, QkNorm::Full);
  EXPECT_TRUE(check_tensor_parallel(olmoe, 2));
  ModelConfig wide = olmoe;
  wide.num_heads = 8;
  wide.intermediate_size = 40;
  s = check_tensor_parallel(wide, 4);
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("cannot be replicated"), std::string::npos)
      << s.error().message();
}

TEST(TensorParallel, EachRankHoldsItsShareOfHeadsAndWidths) {
  const ModelConfig c = config_of("qwen2moe-bf16");
  const ModelConfig r = rank_config(c, 4);
  EXPECT_EQ(r.num_heads, c.num_heads / 4);
  EXPECT_EQ(r.num_kv_heads, c.num_kv_heads / 4);
  EXPECT_EQ(r.moe_intermediate_size, c.moe_intermediate_size / 4);
  EXPECT_EQ(r.shared_expert_intermediate_size, c.shared_expert_intermediate_size / 4);
  EXPECT_EQ(r.intermediate_size, c.intermediate_size / 4);
  EXPECT_EQ(r.hidden_size, c.hidden_size);
  EXPECT_EQ(r.head_dim, c.head_dim);
  EXPECT_EQ(r.num_experts, c.num_experts);
  EXPECT_EQ(r.vocab_size, c.vocab_size);
}

// A float32 matrix with a WeightView over it.
struct Matrix {
  std::vector<float> v;
  int64_t rows, cols;
  kernels::WeightView view() const {
    kernels::WeightView w;
    w.data = v.data();
    w.dtype = kernels::DType::F32;
    w.rows = rows;
    w.cols = cols;
    return w;
  }
  // The value as the GPU holds it (bf16).
  float at(int64_t r, int64_t c) const {
    return kernels::bf16_to_f32(kernels::f32_to_bf16(v[r * cols + c]));
  }
};

Matrix random_matrix(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  Matrix m{std::vector<float>(static_cast<std::size_t>(rows * cols)), rows, cols};
  for (float& x : m.v) x = d(rng);
  return m;
}

TEST(TensorParallel, ShardsAreTheRowsOrColumnsOfTheRankInBf16) {
  const Matrix m = random_matrix(12, 10, 7);
  for (int ranks : {1, 2}) {
    for (int rank = 0; rank < ranks; ++rank) {
      const std::vector<uint16_t> rows = shard_bf16(m.view(), Split::Rows, rank, ranks);
      const int64_t nr = m.rows / ranks;
      ASSERT_EQ(rows.size(), static_cast<std::size_t>(nr * m.cols));
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t c = 0; c < m.cols; ++c)
          EXPECT_EQ(kernels::bf16_to_f32(rows[r * m.cols + c]), m.at(rank * nr + r, c));
      const std::vector<uint16_t> cols = shard_bf16(m.view(), Split::Cols, rank, ranks);
      const int64_t nc = m.cols / ranks;
      ASSERT_EQ(cols.size(), static_cast<std::size_t>(m.rows * nc));
      for (int64_t r = 0; r < m.rows; ++r)
        for (int64_t c = 0; c < nc; ++c)
          EXPECT_EQ(kernels::bf16_to_f32(cols[r * nc + c]), m.at(r, rank * nc + c));
    }
  }
  const std::vector<float> v = {1, 2, 3, 4, 5, 6};
  EXPECT_EQ(shard_vector(v, 1, 3), (std::vector<float>{3, 4}));
  EXPECT_EQ(shard_vector(v, 0, 1), v);
  EXPECT_TRUE(shard_vector({}, 1, 2).empty());
}

// Ranks beyond the KV heads each hold one, the KV head their q heads read: rank r of N holds
// KV head r / (N / kv_heads), and its rows of k and v.
TEST(TensorParallel, KvHeadsReplicateOverRanksThatOutnumberThem) {
  const ModelConfig c = config_of("qwen3moe-tiny");  // 4 heads, 2 KV heads of 16
  ASSERT_TRUE(check_tensor_parallel(c, 4));
  const ModelConfig r = rank_config(c, 4);
  EXPECT_EQ(r.num_heads, 1);
  EXPECT_EQ(r.num_kv_heads, 1);
  for (int rank = 0; rank < 4; ++rank) {
    const KvShare share = kv_share(c, rank, 4);
    EXPECT_EQ(share.count, 1);
    EXPECT_EQ(share.first, rank / 2);
    // The q head this rank holds reads that KV head in the whole model (GQA: heads / kv_heads
    // q heads per KV head).
    EXPECT_EQ(rank / (c.num_heads / c.num_kv_heads), share.first);
  }
  EXPECT_EQ(kv_share(c, 1, 2).first, 1);  // dividing: one each
  EXPECT_EQ(kv_share(c, 0, 1).count, 2);  // one rank: all
  const Matrix k = random_matrix(2 * 16, 8, 9);
  const std::vector<uint16_t> rows = rows_bf16(k.view(), 16, 16);
  ASSERT_EQ(rows.size(), 16u * 8);
  for (int64_t i = 0; i < 16; ++i)
    for (int64_t j = 0; j < 8; ++j)
      EXPECT_EQ(kernels::bf16_to_f32(rows[i * 8 + j]), k.at(16 + i, j));
  EXPECT_EQ(slice_vector({1, 2, 3, 4}, 1, 2), (std::vector<float>{2, 3}));
  EXPECT_TRUE(slice_vector({}, 1, 2).empty());
}

// y = x * w^T for a bf16 shard [n, k] as the GPU computes it (float32 accumulation).
std::vector<float> times(const std::vector<float>& x, int64_t m, const std::vector<uint16_t>& w,
                         int64_t n, int64_t k) {
  std::vector<float> y(static_cast<std::size_t>(m * n), 0.0f);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t t = 0; t < k; ++t)
        s += double(x[i * k + t]) * kernels::bf16_to_f32(w[j * k + t]);
      y[i * n + j] = static_cast<float>(s);
    }
  return y;
}

double max_rel(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0, norm = 0;
  for (float v : b) norm = std::max(norm, std::abs(double(v)));
  for (std::size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, std::abs(double(a[i]) - b[i]) / std::max(norm, 1e-30));
  return worst;
}

// The SwiGLU MLP of each rank (its rows of gate and up, its columns of down) adds up to the
// whole MLP, for every group size that divides the width.
TEST(TensorParallel, MlpShardsAddUpToTheWholeMlp) {
  const int64_t H = 16, I = 12, T = 3;
  const Matrix gate = random_matrix(I, H, 1), up = random_matrix(I, H, 2),
               down = random_matrix(H, I, 3), x = random_matrix(T, H, 4);
  auto mlp = [&](int rank, int ranks) {
    const int64_t i = I / ranks;
    const std::vector<float> g =
        times(x.v, T, shard_bf16(gate.view(), Split::Rows, rank, ranks), i, H);
    const std::vector<float> u =
        times(x.v, T, shard_bf16(up.view(), Split::Rows, rank, ranks), i, H);
    std::vector<float> a(g.size());
    for (std::size_t j = 0; j < a.size(); ++j) a[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
    return times(a, T, shard_bf16(down.view(), Split::Cols, rank, ranks), H, i);
  };
  const std::vector<float> whole = mlp(0, 1);
  for (int ranks : {2, 3, 4, 6}) {
    std::vector<float> sum(whole.size(), 0.0f);
    for (int r = 0; r < ranks; ++r) {
      const std::vector<float> part = mlp(r, ranks);
      for (std::size_t j = 0; j < sum.size(); ++j) sum[j] += part[j];
    }
    EXPECT_LT(max_rel(sum, whole), 1e-5) << ranks << " ranks";
  }
}

// Attention's output projection: each rank's heads times its columns of o add up to o over all
// heads; and a q norm over all features, computed from the ranks' sums of squares and their parts
// of the norm weight, equals the whole norm.
TEST(TensorParallel, OutputProjectionAndFullQkNormSplitByHeads) {
  const int64_t heads = 4, hd = 6, H = 10, T = 2, qd = heads * hd;
  const Matrix o = random_matrix(H, qd, 5), attn = random_matrix(T, qd, 6);
  const std::vector<float> whole = times(attn.v, T, shard_bf16(o.view(), Split::Cols, 0, 1), H, qd);
  const Matrix norm = random_matrix(1, qd, 8);
  std::vector<float> normed(attn.v.size());
  kernels::rmsnorm(attn.v.data(), norm.v.data(), T, qd, 1e-6f, normed.data());
  for (int ranks : {2, 4}) {
    const int64_t part = qd / ranks;
    std::vector<float> sum(whole.size(), 0.0f), ss(T, 0.0f);
    for (int r = 0; r < ranks; ++r) {
      std::vector<float> a(static_cast<std::size_t>(T * part));
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < part; ++j) {
          a[t * part + j] = attn.v[t * qd + r * part + j];
          ss[t] += a[t * part + j] * a[t * part + j];
        }
      const std::vector<float> y =
          times(a, T, shard_bf16(o.view(), Split::Cols, r, ranks), H, part);
      for (std::size_t j = 0; j < sum.size(); ++j) sum[j] += y[j];
    }
    EXPECT_LT(max_rel(sum, whole), 1e-5) << ranks << " ranks";
    for (int r = 0; r < ranks; ++r) {
      const std::vector<float> weight = shard_vector(norm.v, r, ranks);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < part; ++j) {
          const float inv = 1.0f / std::sqrt(ss[t] / static_cast<float>(qd) + 1e-6f);
          const float got = weight[j] * (attn.v[t * qd + r * part + j] * inv);
          EXPECT_NEAR(got, normed[t * qd + r * part + j], 1e-5f);
        }
    }
  }
}

TEST(TensorParallel, TheCpuRefusesASizeOverOne) {
  ModelOptions o;
  o.tensor_parallel_size = 2;
  auto m = Model::load(fixture("qwen3moe-tiny"), o);
  ASSERT_FALSE(m);
  EXPECT_NE(m.error().message().find("needs --device cuda"), std::string::npos)
      << m.error().message();
}

// ---- FP8 shards (routed experts kept in FP8 on the GPU) ----

struct Fp8Weight {
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  kernels::WeightView view;
};

// A random [rows, cols] matrix block-quantized to FP8 (kernels::quantize_fp8_e4m3).
Fp8Weight fp8_weight(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> dense(static_cast<std::size_t>(rows * cols));
  for (std::size_t i = 0; i < dense.size(); ++i)
    dense[i] = dist(rng) * (1.0f + static_cast<float>(i % 7));  // blocks get different scales
  Fp8Weight w;
  w.codes.resize(dense.size());
  w.scales.resize(static_cast<std::size_t>(kernels::fp8_blocks(rows) * kernels::fp8_blocks(cols)));
  kernels::quantize_fp8_e4m3({dense.data(), kernels::DType::F32, rows, cols}, w.codes.data(),
                             w.scales.data(), nullptr);
  w.view = {w.codes.data(), kernels::DType::F8E4M3, rows, cols, w.scales.data()};
  return w;
}

std::vector<float> dequantized(const Fp8Matrix& m) {
  std::vector<float> out(static_cast<std::size_t>(m.rows * m.cols));
  kernels::dequantize_rows(
      {m.codes.data(), kernels::DType::F8E4M3, m.rows, m.cols, m.scales.data()}, 0, m.rows,
      out.data());
  return out;
}

// Each rank's FP8 shard (codes and the scales of its blocks) dequantizes to that rank's rows or
// columns of the whole matrix, for 1, 2 and 4 ranks; gate|up stacks gate's rows on up's.
TEST(TensorParallel, Fp8ShardsAreTheRanksRowsAndColumnsWithTheirScales) {
  const Fp8Weight w = fp8_weight(512, 320, 7);  // 4 x 3 blocks, the last columns partial
  std::vector<float> whole(512 * 320);
  kernels::dequantize_rows(w.view, 0, 512, whole.data());
  for (int ranks : {1, 2, 4}) {
    for (int r = 0; r < ranks; ++r) {
      const Fp8Matrix rows = shard_fp8(w.view, Split::Rows, r, ranks);
      ASSERT_EQ(rows.rows, 512 / ranks);
      ASSERT_EQ(rows.cols, 320);
      EXPECT_EQ(rows.scales.size(), static_cast<std::size_t>(kernels::fp8_blocks(rows.rows) * 3));
      const std::vector<float> got = dequantized(rows);
      EXPECT_TRUE(std::equal(got.begin(), got.end(), whole.begin() + r * rows.rows * 320))
          << ranks << " ranks, rank " << r;
    }
  }
  const Fp8Weight down = fp8_weight(192, 512, 8);  // [hidden, inter]: columns split
  std::vector<float> dwhole(192 * 512);
  kernels::dequantize_rows(down.view, 0, 192, dwhole.data());
  for (int ranks : {1, 2, 4}) {
    for (int r = 0; r < ranks; ++r) {
      const Fp8Matrix cols = shard_fp8(down.view, Split::Cols, r, ranks);
      ASSERT_EQ(cols.cols, 512 / ranks);
      const std::vector<float> got = dequantized(cols);
      for (int64_t i = 0; i < 192; ++i)
        ASSERT_TRUE(std::equal(got.begin() + i * cols.cols, got.begin() + (i + 1) * cols.cols,
                               dwhole.begin() + i * 512 + r * cols.cols))
            << ranks << " ranks, rank " << r << ", row " << i;
    }
  }
  const Fp8Weight gate = fp8_weight(256, 192, 9), up = fp8_weight(256, 192, 10);
  const kernels::FfnWeights ffn{gate.view, up.view, fp8_weight(192, 256, 11).view};
  const Fp8Matrix gu = gate_up_fp8(ffn, 1, 2);
  ASSERT_EQ(gu.rows, 256);
  const std::vector<float> got = dequantized(gu);
  const Fp8Matrix g1 = shard_fp8(gate.view, Split::Rows, 1, 2),
                  u1 = shard_fp8(up.view, Split::Rows, 1, 2);
  std::vector<float> want = dequantized(g1);
  const std::vector<float> want_up = dequantized(u1);
  want.insert(want.end(), want_up.begin(), want_up.end());
  EXPECT_EQ(got, want);
}

TEST(TensorParallel, Fp8ExpertsStayFp8OnlyOnWholeScaleBlocks) {
  const Fp8Weight gate = fp8_weight(256, 128, 1), up = fp8_weight(256, 128, 2),
                  down = fp8_weight(128, 256, 3);
  const kernels::FfnWeights ffn{gate.view, up.view, down.view};
  EXPECT_EQ(fp8_expert_refusal(ffn, 1), "");
  EXPECT_EQ(fp8_expert_refusal(ffn, 2), "");  // 128 features a rank
  EXPECT_EQ(fp8_expert_refusal(ffn, 4), "its width 256 over 4 rank(s) is not a multiple of 128");
  const Fp8Weight narrow_gate = fp8_weight(256, 96, 4), narrow_up = fp8_weight(256, 96, 5),
                  narrow_down = fp8_weight(96, 256, 6);
  EXPECT_EQ(fp8_expert_refusal({narrow_gate.view, narrow_up.view, narrow_down.view}, 1),
            "hidden 96 is not a multiple of 64");
  std::vector<uint16_t> bits(256 * 128);
  kernels::FfnWeights mixed = ffn;
  mixed.up = {bits.data(), kernels::DType::BF16, 256, 128};
  EXPECT_EQ(fp8_expert_refusal(mixed, 1), "its weights are BF16, not FP8 with block scales");
}

// Dense layers: any rows or columns that take whole scale blocks (a KV head's rows, the tail of
// a matrix whose size is not a multiple of 128) come out as the slice of the whole.
TEST(TensorParallel, Fp8DenseSlicesTakeWholeScaleBlocks) {
  const Fp8Weight w = fp8_weight(300, 200, 12);  // partial last blocks both ways
  std::vector<float> whole(300 * 200);
  kernels::dequantize_rows(w.view, 0, 300, whole.data());
  EXPECT_TRUE(dense_fp8_rows(w.view, 0, 300));
  EXPECT_TRUE(dense_fp8_rows(w.view, 128, 128));
  EXPECT_TRUE(dense_fp8_rows(w.view, 256, 44));   // the tail
  EXPECT_FALSE(dense_fp8_rows(w.view, 64, 128));  // starts inside a block
  EXPECT_FALSE(dense_fp8_rows(w.view, 0, 100));   // ends inside one
  EXPECT_FALSE(dense_fp8_rows(w.view, 256, 64));  // past the end
  EXPECT_TRUE(dense_fp8_cols(w.view, 128, 72));
  EXPECT_FALSE(dense_fp8_cols(w.view, 0, 64));
  for (auto [first, count] : {std::pair<int64_t, int64_t>{0, 300}, {128, 128}, {256, 44}}) {
    const Fp8Matrix rows = rows_fp8(w.view, first, count);
    ASSERT_EQ(rows.rows, count);
    const std::vector<float> got = dequantized(rows);
    EXPECT_TRUE(std::equal(got.begin(), got.end(), whole.begin() + first * 200)) << first;
  }
  const Fp8Matrix cols = cols_fp8(w.view, 128, 72);
  ASSERT_EQ(cols.cols, 72);
  const std::vector<float> got = dequantized(cols);
  for (int64_t r = 0; r < 300; ++r)
    ASSERT_TRUE(
        std::equal(got.begin() + r * 72, got.begin() + (r + 1) * 72, whole.begin() + r * 200 + 128))
        << "row " << r;
  std::vector<uint16_t> bits(300 * 200);
  EXPECT_FALSE(dense_fp8_rows({bits.data(), kernels::DType::BF16, 300, 200}, 0, 300));
}

}  // namespace
}  // namespace moemesh::detail
