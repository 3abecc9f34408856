// Torch binding of the fragment-order paged decode kernel (paged_decode.cuh). Built at first use
// by sawkv/kernels/decode_cuda.py through torch.utils.cpp_extension; argument checks live there.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "paged_decode.cuh"

// One translation unit per (bits, head_dim) instantiates this (decode_cuda.py writes them), so
// ninja compiles the kernel variants in parallel.
template <int BITS, int D, bool KH>
void dispatch_nt(const sawkv::DecodeParams& p, dim3 grid, cudaStream_t stream, int64_t u,
                 int64_t warps);

void paged_decode(torch::Tensor q, torch::Tensor out, torch::Tensor k_cache, torch::Tensor v_cache,
                  torch::Tensor k_meta, torch::Tensor v_meta, torch::Tensor block_tables,
                  torch::Tensor seq_lens, torch::Tensor part_o, torch::Tensor part_ml,
                  torch::Tensor tickets, int64_t bits, int64_t num_splits, double qscale,
                  int64_t had_block, bool rotate_v, int64_t window, int64_t groups_per_step,
                  int64_t single_split_tokens, int64_t first, torch::Tensor lse, bool write_lse, bool k_half_meta,
                  int64_t cta_warps) {
  const c10::cuda::CUDAGuard guard(q.device());
  sawkv::DecodeParams p;
  p.q = q.data_ptr();
  p.out = out.data_ptr();
  p.k_cache = k_cache.data_ptr<uint8_t>();
  p.v_cache = v_cache.data_ptr<uint8_t>();
  p.k_meta = reinterpret_cast<const __half*>(k_meta.data_ptr<at::Half>());
  p.v_meta = reinterpret_cast<const __half*>(v_meta.data_ptr<at::Half>());
  p.block_tables = block_tables.data_ptr<int>();
  p.seq_lens = seq_lens.data_ptr<int>();
  p.part_o = part_o.data_ptr<float>();
  p.part_ml = part_ml.data_ptr<float>();
  p.tickets = tickets.data_ptr<int>();
  p.lse = write_lse ? lse.data_ptr<float>() : nullptr;
  p.stride_qs = q.stride(0);
  p.stride_qh = q.stride(1);
  p.stride_os = out.stride(0);
  p.stride_oh = out.stride(1);
  p.stride_page_b = k_cache.stride(0);
  p.stride_page_h = k_cache.stride(1);
  // the kernel addresses K metadata with V's strides (doubled with per-half key metadata)
  const int64_t kmul = k_half_meta ? 2 : 1;
  TORCH_CHECK(k_meta.size(-1) == 2 * kmul && v_meta.size(-1) == 2 &&
                  k_meta.stride(0) == kmul * v_meta.stride(0) &&
                  k_meta.stride(1) == kmul * v_meta.stride(1) && k_meta.stride(2) == 2 * kmul &&
                  v_meta.stride(2) == 2 && k_meta.stride(3) == 1 && v_meta.stride(3) == 1,
              "paged decode: k_meta / v_meta must be contiguous pools of the same blocks and heads");
  p.stride_meta_b = v_meta.stride(0);
  p.stride_meta_h = v_meta.stride(1);
  p.stride_bt = block_tables.stride(0);
  const int num_seqs = q.size(0), num_q_heads = q.size(1), head_dim = q.size(2);
  const int num_kv_heads = k_cache.size(1);
  p.num_q_heads = num_q_heads;
  p.G = num_q_heads / num_kv_heads;
  p.block_size = k_cache.size(2);
  TORCH_CHECK((p.block_size & (p.block_size - 1)) == 0, "paged decode: block_size must be a power of two");
  p.block_shift = __builtin_ctz(p.block_size);
  p.num_splits = num_splits;
  p.window = window;
  p.single_split = single_split_tokens;
  p.first = first;
  p.qscale = qscale;
  p.had_block = had_block;
  p.rotate_v = rotate_v;
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  const dim3 grid(num_kv_heads, num_seqs, num_splits);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TORCH_CHECK(bits == 4 || bits == 8, "paged decode: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(head_dim == 64 || head_dim == 128 || head_dim == 256,
              "paged decode: head_dim must be 64, 128 or 256, got ", head_dim);
#define SAWKV_CASE(B, DD)                                                   \
  if (bits == B && head_dim == DD) {                                        \
    if (k_half_meta) dispatch_nt<B, DD, true>(p, grid, stream, groups_per_step, cta_warps); \
    else dispatch_nt<B, DD, false>(p, grid, stream, groups_per_step, cta_warps);       \
  }
  SAWKV_CASE(4, 64) SAWKV_CASE(4, 128) SAWKV_CASE(4, 256)
  SAWKV_CASE(8, 64) SAWKV_CASE(8, 128) SAWKV_CASE(8, 256)
#undef SAWKV_CASE
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode over fragment-ordered INT4/INT8 pages");
}
