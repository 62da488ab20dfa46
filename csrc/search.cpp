// Fused top-k code search on the CPU (codebook.py, section 2): for queries x (heads, tokens, d)
// and codebooks (heads, codes, d), the k best codes of every query row, best first, without ever
// holding the (tokens x codes) score matrix. Registered as torch.ops.codebook.topk_codes.
//
// How: a task takes one head and a block of query rows and multiplies them by one tile of codes
// at a time (a BLAS call into a buffer that stays in cache). Each row keeps its k best codes so
// far, sorted; a score enters only if it beats the row's k-th best, which a vectorised compare
// checks for 64 scores at once: after the first few hundred codes almost every score fails it,
// so the top-k costs little next to the matrix product. Tasks run in parallel across heads and
// query blocks (at::parallel_for, OpenMP).
//
// Scores, as codebook._scores defines them (computed in float32 whatever the input dtype):
//   cosine     x . c / max(|c|, 1e-12)           (codes normalised, the query not)
//   euclidean  -sqrt(max(|x|^2 - 2 x.c + |c|^2, 0))
// Order: higher score first; equal scores: lower code id first.
// NaN / inf: scores follow IEEE arithmetic (an inf input gives +-inf or NaN scores), and a NaN
// score counts as -inf: it is returned as -inf and ranks with the -inf scores, below all others.
// A row whose scores are all NaN therefore returns codes 0..k-1 with score -inf.
// codebook._scores applies the same rule, so the torch paths agree.
//
// Extra memory: the normalised codebook (cosine) or code norms (euclidean); per thread one
// (block x tile) score buffer and (block x k) best-so-far keys; the (heads, tokens, k) outputs.
// Inputs that are not float32 are converted first (float32 copies of x and codebook).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 256;  // query rows per task
constexpr int64_t kTile = 512;   // codes per BLAS call
constexpr int64_t kLd = kTile + 16;  // buffer row stride: not a power of two, so rows do not alias in cache
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// (score, id) packed into one integer that sorts like the ranking: higher score first, then the
// lower id. Scores map to unsigned integers in float order; NaN has become -inf before this.
uint64_t pack(float score, int64_t id) {
  uint32_t bits;
  score += 0.0f;  // -0 -> +0: equal floats, equal keys
  std::memcpy(&bits, &score, 4);
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (uint64_t(bits) << 32) | uint32_t(~uint32_t(id));
}
float score_of(uint64_t key) {
  uint32_t bits = uint32_t(key >> 32);
  bits = (bits & 0x80000000u) ? (bits & 0x7fffffffu) : ~bits;
  float score;
  std::memcpy(&score, &bits, 4);
  return score;
}
int64_t id_of(uint64_t key) { return int64_t(~uint32_t(key)); }

// One query row's k best codes so far, as packed keys sorted best first. Slots not yet filled
// hold 0, below every real key, so inserting needs no bookkeeping: each slot becomes the larger
// of itself and what would shift into it, a branch-free loop the compiler vectorises.
struct Row {
  uint64_t* keys;  // k of them, zeroed
  int64_t k, size = 0;
  float worst = kNegInf;  // the k-th best score once k are held: what a new code must beat

  void add(float score, int64_t id) {
    const uint64_t key = pack(score, id);
    for (int64_t j = k - 1; j > 0; --j) keys[j] = std::max(keys[j], std::min(keys[j - 1], key));
    keys[0] = std::max(keys[0], key);
    if (size < k) ++size;
    if (size == k) worst = score_of(keys[k - 1]);
  }
};

// Bit u is set when s[u] > worst, for 64 scores (never for NaN).
inline uint64_t above64(const float* s, float worst) {
  uint64_t mask = 0;
#if defined(__AVX512F__)
  for (int u = 0; u < 64; u += 16)
    mask |= uint64_t(_mm512_cmp_ps_mask(_mm512_loadu_ps(s + u), _mm512_set1_ps(worst), _CMP_GT_OQ)) << u;
#elif defined(__AVX2__)
  for (int u = 0; u < 64; u += 8)
    mask |= uint64_t(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + u), _mm256_set1_ps(worst), _CMP_GT_OQ))) << u;
#else
  for (int u = 0; u < 64; ++u) mask |= uint64_t(s[u] > worst) << u;
#endif
  return mask;
}

// Folds n ranking keys of codes first_id, first_id + 1, ... into a row. Codes arrive in
// increasing id order, so a later code whose score equals the k-th best ranks below it: strict >
// is the whole test (false for NaN). The first k codes join unconditionally (NaN as -inf).
void fold(const float* key, int64_t n, int64_t first_id, Row& row) {
  int64_t j = 0;
  for (; j < n && row.size < row.k; ++j) row.add(std::isnan(key[j]) ? kNegInf : key[j], first_id + j);
  for (; j + 64 <= n; j += 64)
    for (uint64_t mask = above64(key + j, row.worst); mask; mask &= mask - 1) {
      int64_t at = j + __builtin_ctzll(mask);
      if (key[at] > row.worst) row.add(key[at], first_id + at);  // worst may have risen meanwhile
    }
  for (; j < n; ++j)
    if (key[j] > row.worst) row.add(key[j], first_id + j);
}

}  // namespace

// Checks the arguments and returns {x, codes, x_sq, code_sq} in float32 as both devices score
// them: x with unit stride along d; codes normalised (cosine), or the squared norms of x and codes
// (euclidean; otherwise undefined). Also used by search_cuda.cpp.
std::vector<at::Tensor> codebook_search_inputs(const at::Tensor& x_in, const at::Tensor& codebook_in, int64_t k,
                                               c10::string_view similarity) {
  TORCH_CHECK(x_in.dim() == 3 && codebook_in.dim() == 3, "topk_codes: x must be (heads, tokens, d) and codebook (heads, codes, d)");
  TORCH_CHECK(x_in.size(0) == codebook_in.size(0) && x_in.size(2) == codebook_in.size(2),
              "topk_codes: x ", x_in.sizes(), " and codebook ", codebook_in.sizes(), " disagree on heads or d");
  TORCH_CHECK(x_in.device() == codebook_in.device(), "topk_codes: x and codebook must be on the same device");
  TORCH_CHECK(x_in.is_floating_point() && codebook_in.is_floating_point(), "topk_codes: inputs must be floating point");
  TORCH_CHECK(similarity == "cosine" || similarity == "euclidean", "topk_codes: similarity must be 'cosine' or 'euclidean'");
  const int64_t C = codebook_in.size(1), d = codebook_in.size(2);
  TORCH_CHECK(1 <= k && k <= C, "topk_codes: k=", k, " must be between 1 and num_codes=", C);
  TORCH_CHECK(C < (int64_t(1) << 31) && x_in.size(1) < (int64_t(1) << 31), "topk_codes: at most 2^31 - 1 codes and tokens");
  // no gradient flows through a search: detached, the worker threads' ATen calls never record one
  at::Tensor x = x_in.detach().to(at::kFloat);
  if (x.stride(2) != 1 || x.stride(1) < d) x = x.contiguous();  // a transposed (tokens, heads, d) view is fine
  at::Tensor codes = codebook_in.detach().to(at::kFloat).contiguous();
  if (similarity == "euclidean")  // the same expressions as codebook._scores
    return {x, codes, (x * x).sum(-1).contiguous(), (codes * codes).sum(-1).contiguous()};
  return {x, codes / codes.norm(2, -1, true).clamp_min(1e-12), at::Tensor(), at::Tensor()};
}

namespace {

std::tuple<at::Tensor, at::Tensor> topk_codes_cpu(const at::Tensor& x_in, const at::Tensor& codebook_in,
                                                  int64_t k, c10::string_view similarity) {
  auto inputs = codebook_search_inputs(x_in, codebook_in, k, similarity);
  const at::Tensor &x = inputs[0], &codes = inputs[1], &x_sq = inputs[2], &code_sq = inputs[3];
  const bool euclid = x_sq.defined();
  const int64_t H = codes.size(0), C = codes.size(1), N = x.size(1);
  auto scores = at::empty({H, N, k}, x.options());
  auto ids = at::empty({H, N, k}, x.options().dtype(at::kLong));
  if (N == 0) return {scores, ids};

  const float* xx_all = euclid ? x_sq.data_ptr<float>() : nullptr;
  const float* cc_all = euclid ? code_sq.data_ptr<float>() : nullptr;
  float* scores_all = scores.data_ptr<float>();
  int64_t* ids_all = ids.data_ptr<int64_t>();
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, H * blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({kBlock, kLd}, x.options());
    float* buf = buffer.data_ptr<float>();
    std::vector<uint64_t> keys(kBlock * k);
    std::vector<Row> rows;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / blocks, r0 = (task % blocks) * kBlock, n_rows = std::min(kBlock, N - r0);
      at::Tensor x_block = x[h].narrow(0, r0, n_rows);
      rows.clear();
      std::fill(keys.begin(), keys.end(), 0);
      for (int64_t r = 0; r < n_rows; ++r) rows.push_back({keys.data() + r * k, k});
      for (int64_t c0 = 0; c0 < C; c0 += kTile) {
        const int64_t n = std::min(kTile, C - c0);
        at::Tensor dots = buffer.narrow(0, 0, n_rows).narrow(1, 0, n);
        at::mm_out(dots, x_block, codes[h].narrow(0, c0, n).t());
        for (int64_t r = 0; r < n_rows; ++r) {
          float* key = buf + r * kLd;
          if (euclid) {  // rank by -max(|x|^2 - 2 x.c + |c|^2, 0): the score's order, no sqrt
            const float xx = xx_all[h * N + r0 + r], *cc = cc_all + h * C + c0;
            for (int64_t j = 0; j < n; ++j) {
              float dist = (xx - 2.0f * key[j]) + cc[j];
              key[j] = -(dist < 0.0f ? 0.0f : dist);  // NaN stays NaN
            }
          }
          fold(key, n, c0, rows[r]);
        }
      }
      for (int64_t r = 0; r < n_rows; ++r) {  // best first
        const uint64_t* best = rows[r].keys;
        float* out_s = scores_all + (h * N + r0 + r) * k;
        int64_t* out_i = ids_all + (h * N + r0 + r) * k;
        for (int64_t j = 0; j < k; ++j) {
          float s = score_of(best[j]);
          out_s[j] = euclid ? -std::sqrt(-s) : s;
          out_i[j] = id_of(best[j]);
        }
      }
    }
  });
  return {scores, ids};
}

}  // namespace

TORCH_LIBRARY(codebook, m) {
  m.def("topk_codes(Tensor x, Tensor codebook, int k, str similarity) -> (Tensor scores, Tensor ids)");
}

TORCH_LIBRARY_IMPL(codebook, CPU, m) {
  m.impl("topk_codes", &topk_codes_cpu);
}
