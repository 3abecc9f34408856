// Launch of one (bits, head_dim, per-half key metadata) family of the paged decode kernel;
// included by the per-variant translation units that decode_cuda.py generates.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include "paged_decode.cuh"

namespace {

template <int BITS, int D, int NT, int U, bool KH, int W>
void launch(const sawkv::DecodeParams& p, dim3 grid, cudaStream_t stream) {
  constexpr int bytes = sawkv::detail::Smem<BITS, D, NT, U, KH, W>::kBytes;
  auto* kernel = sawkv::paged_decode_kernel<BITS, D, NT, U, KH, W>;
  static const bool ready = [&] {  // > 48 KB of dynamic shared memory needs an opt-in, once
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) ==
           cudaSuccess;
  }();
  TORCH_CHECK(ready, "paged decode: cannot reserve ", bytes, " bytes of shared memory");
  kernel<<<grid, 32 * W, bytes, stream>>>(p);
}

// U (16-token groups per warp step): 1 at d >= 128 keeps 5 CTAs (20 warps) per SM within 96
// registers; 2 at d = 64. Larger U adds independent work per warp but costs occupancy.
// `u` = 0 takes the default; only these combinations are compiled.
template <int BITS, int D, int NT, bool KH>
void dispatch_u(const sawkv::DecodeParams& p, dim3 grid, cudaStream_t stream, int64_t u) {
  if (u == 0) u = D >= 128 ? 1 : 2;
  if (u == 1) return launch<BITS, D, NT, 1, KH, 4>(p, grid, stream);
  if constexpr (D <= 128) {
    if (u == 2) return launch<BITS, D, NT, 2, KH, 4>(p, grid, stream);
  }
  if constexpr (D <= 64) {
    if (u == 4) return launch<BITS, D, NT, 4, KH, 4>(p, grid, stream);
  }
  TORCH_CHECK(false, "paged decode: unsupported groups per step ", u, " at head_dim ", D);
}

// warps per CTA: 4 (the default) or 8 (see paged_decode_kernel). 8 is compiled for head_dim
// 128 at one group per warp step only, so the first-use build stays short.
template <int BITS, int D, int NT, bool KH>
void dispatch_w(const sawkv::DecodeParams& p, dim3 grid, cudaStream_t stream, int64_t u,
                int64_t warps) {
  if (warps == 0 || warps == 4) return dispatch_u<BITS, D, NT, KH>(p, grid, stream, u);
  if constexpr (D == 128) {
    if (warps == 8 && (u == 0 || u == 1)) return launch<BITS, D, NT, 1, KH, 8>(p, grid, stream);
  }
  TORCH_CHECK(false, "paged decode: ", warps, " warps per CTA at head_dim ", D,
              " and groups per step ", u, " are not compiled (4 always; 8 at d=128, u=1)");
}

}  // namespace

template <int BITS, int D, bool KH>
void dispatch_nt(const sawkv::DecodeParams& p, dim3 grid, cudaStream_t stream, int64_t u,
                 int64_t warps) {
  // query heads per KV head: one n8 tile up to 8, two up to 16
  if (p.G > 8) return dispatch_w<BITS, D, 2, KH>(p, grid, stream, u, warps);
  return dispatch_w<BITS, D, 1, KH>(p, grid, stream, u, warps);
}

#define SAWKV_INSTANTIATE_DECODE(B, DD, KH)                                              \
  template void dispatch_nt<B, DD, KH>(const sawkv::DecodeParams&, dim3, cudaStream_t, int64_t, \
                                       int64_t);
