// Binds the CUDA kernel of search.cu to torch.ops.codebook.topk_codes for CUDA tensors. Built
// only when torch has CUDA (codebook._build_extension); the op itself is declared in search.cpp.
// Inputs are prepared by the same function as on the CPU, so both devices score codes alike.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

extern "C" int codebook_topk_cuda(const float* x, long long x_head_stride, long long x_row_stride, const float* codes,
                                  const float* x_sq, const float* code_sq, int heads, int N, int C, int d, int k,
                                  float* out_scores, long long* out_ids, cudaStream_t stream);

// search.cpp: checks the arguments, returns {x, codes, x_sq, code_sq, code_norm} in float32
std::vector<at::Tensor> codebook_search_inputs(const at::Tensor& x, const at::Tensor& codebook, int64_t k,
                                               c10::string_view similarity);

namespace {

std::tuple<at::Tensor, at::Tensor> topk_codes_cuda(const at::Tensor& x_in, const at::Tensor& codebook_in,
                                                   int64_t k, c10::string_view similarity) {
  TORCH_CHECK(k <= 64, "topk_codes on CUDA keeps at most k=64 codes per row, got k=" + std::to_string(k));  // one string: search.cpp says why
  c10::cuda::CUDAGuard guard(x_in.device());
  auto inputs = codebook_search_inputs(x_in, codebook_in, k, similarity);
  const at::Tensor &x = inputs[0], &x_sq = inputs[2], &code_sq = inputs[3], &code_norm = inputs[4];
  const bool euclid = x_sq.defined();
  const at::Tensor codes = euclid ? inputs[1] : inputs[1] / code_norm.unsqueeze(-1);  // as codebook.code_scores
  const int64_t H = codes.size(0), C = codes.size(1), d = codes.size(2), N = x.size(1);
  auto scores = at::empty({H, N, k}, x.options());
  auto ids = at::empty({H, N, k}, x.options().dtype(at::kLong));
  const int err = codebook_topk_cuda(x.data_ptr<float>(), x.stride(0), x.stride(1), codes.data_ptr<float>(),
                                     euclid ? x_sq.data_ptr<float>() : nullptr, euclid ? code_sq.data_ptr<float>() : nullptr,
                                     int(H), int(N), int(C), int(d), int(k), scores.data_ptr<float>(),
                                     reinterpret_cast<long long*>(ids.data_ptr<int64_t>()),
                                     c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, std::string("topk_codes CUDA kernel failed: ") + cudaGetErrorString(cudaError_t(err)));
  return {scores, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(codebook, CUDA, m) {
  m.impl("topk_codes", &topk_codes_cuda);
}
