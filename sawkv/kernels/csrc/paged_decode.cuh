// Paged decode attention over INT4 / INT8 pages in fragment order (sawkv/kernels/page_layout.py).
//
// One CTA (4 warps; 8 as an option at d=128, see the kernel's W) owns one (sequence, KV head,
// split). Its G <= 16 query heads are the N side of mma.m16n8k16 (padded to 8 or 16); tokens
// and head dim are the M/K sides:
//   scores  S^T [16 tok x 8 q]  = K   [16 tok x 16 d]  . q^T [16 d x 8 q]   (K is operand A)
//   output  O^T [16 d x 8 q]   += V^T [16 d x 16 tok]  . P^T [16 tok x 8 q] (V^T is operand A)
// so the padding falls on the small side and every code feeds exactly one mma lane. The page
// bytes of a 16-token group are stored so that each lane's 16-byte loads unpack, with a shift,
// one lop3 (INT4) or prmt (INT8) and one exact fp16 subtraction, into its A registers.
//
// Numerics: codes become exact fp16 subnormals (c * 2^-24, no offset to cancel); the query is
// rotated, scaled (softmax scale * log2 e) and multiplied by a power of two that puts its
// largest element in [2^13, 2^14) before rounding to fp16, so any model's range keeps 11 bits;
// scores and softmax state are fp32. Each token's weight enters the P.V product as
// p * scale_v * 2^-E (E: running exponent of the largest value scale), so fp16 weights stay in
// [0, 1] and keep their relative precision at any context length.
//
// Keys with per-half metadata (KH, the `-kh` formats) carry (scale, min) for each half of the
// rotated head dim. The two halves' products are already separate accumulators (INT4: low and
// high nibbles; INT8: the k-steps of each half), so KH only changes how the score combines them:
//   s = s_lo (q_lo . c_lo) + m_lo sum(q_lo) + s_hi (q_hi . c_hi) + m_hi sum(q_hi).
//
// Splits: with num_splits > 1 each CTA writes its unnormalized partial state and the last CTA of
// a (sequence, KV head) to finish (atomic ticket) merges them, so no second launch is needed.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace sawkv {

struct DecodeParams {
  const void* q;             // [S, Hq, D] fp16 or bf16
  void* out;                 // [S, Hq, D] q's dtype
  const uint8_t* k_cache;    // [num_blocks, H, block_size, P] fragment-ordered codes
  const uint8_t* v_cache;
  const __half* k_meta;      // [num_blocks, H, block_size, 2] fp16 (scale, min); 4 with KH:
                             // (scale_lo, min_lo, scale_hi, min_hi) per half of d
  const __half* v_meta;      // [num_blocks, H, block_size, 2]
  const int* block_tables;   // [S, max_blocks]
  const int* seq_lens;       // [S]
  float* part_o;             // [S, Hq, num_splits, D] (num_splits > 1)
  float* part_ml;            // [S, Hq, num_splits, 2]
  int* tickets;              // [S * H] zeros; each merge resets its own
  float* lse;                // [S, Hq] natural log-sum-exp of the scaled scores, or null
  int64_t stride_qs, stride_qh, stride_os, stride_oh;  // elements
  int64_t stride_page_b, stride_page_h;                // bytes
  int64_t stride_meta_b, stride_meta_h;                // halves, of v_meta (k_meta: x2 with KH)
  int64_t stride_bt;
  int num_q_heads, G, block_size, block_shift, num_splits, window;
  int first;  // positions below it are not attended (attention sinks are merged outside)
  int single_split;  // spans up to this many tokens take one CTA (no split merge)
  float qscale;  // softmax scale * log2(e)
  int had_block;
  int rotate_v;
  int is_bf16;
};

namespace detail {

constexpr int kWarps = 4;
constexpr int kMinSplitTokens = 128;  // plan.py: _cuda_splits
constexpr int kThreads = 32 * kWarps;
constexpr unsigned kFull = 0xffffffffu;

// Codes become fp16 *subnormals* with no arithmetic: the bit pattern c (c < 1024) is exactly
// c * 2^-24, and the tensor cores multiply subnormal fp16 exactly. One AND per half2 register
// (no offset to cancel, which is what broke long-context accuracy with the 1024 magic number).
//
// 8 nibbles -> 4 half2 registers; register j holds nibbles j and j + 4. Registers 1 and 3 are
// masked in place, so they hold 16 c * 2^-24: they feed the second half of the head dim, whose
// query fragments (keys) are pre-scaled by 1/16 and whose accumulators (values) are scaled back.
__device__ __forceinline__ void unpack_int4(uint32_t w, uint32_t (&r)[4]) {
  const uint32_t top = w >> 8;
  r[0] = w & 0x000f000fu;
  r[1] = w & 0x00f000f0u;
  r[2] = top & 0x000f000fu;
  r[3] = top & 0x00f000f0u;
}

// 4 bytes -> 2 half2 registers of c * 2^-24: bytes (0, 1) and (2, 3), zero-extended by prmt.
__device__ __forceinline__ void unpack_int8(uint32_t w, uint32_t (&r)[2]) {
  asm("prmt.b32 %0, %1, 0, 0x4140;" : "=r"(r[0]) : "r"(w));
  asm("prmt.b32 %0, %1, 0, 0x4342;" : "=r"(r[1]) : "r"(w));
}

__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(x));
  return d;
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem_src));
}

// dst is a shared-state-space address (__cvta_generic_to_shared), precomputed once per lane
__device__ __forceinline__ void cp_async16_s(uint32_t dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem_src));
}

// the metadata copy of lanes 0-7, predicated in PTX (ptxas may still turn it into a short jump)
__device__ __forceinline__ void cp_async16_if(uint32_t dst, const void* gmem_src, bool pred) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p cp.async.cg.shared.global [%0], [%1], 16;\n}"
      ::"r"(dst), "l"(gmem_src), "r"((int)pred));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

__device__ __forceinline__ float2 half2_bits_to_float2(uint32_t x) {
  __half2 h = *reinterpret_cast<__half2*>(&x);
  return __half22float2(h);
}

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: exp2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float warp_max_rows(float x) {  // over lanes sharing lane % 4
  x = fmaxf(x, __shfl_xor_sync(kFull, x, 4));
  x = fmaxf(x, __shfl_xor_sync(kFull, x, 8));
  return fmaxf(x, __shfl_xor_sync(kFull, x, 16));
}

__device__ __forceinline__ float warp_max_all(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFull, x, 1));
  x = fmaxf(x, __shfl_xor_sync(kFull, x, 2));
  return warp_max_rows(x);
}

__device__ __forceinline__ float warp_sum_all(float x) {
  x += __shfl_xor_sync(kFull, x, 1);
  x += __shfl_xor_sync(kFull, x, 2);
  x += __shfl_xor_sync(kFull, x, 4);
  x += __shfl_xor_sync(kFull, x, 8);
  return x + __shfl_xor_sync(kFull, x, 16);
}

__device__ __forceinline__ float warp_sum_rows(float x) {
  x += __shfl_xor_sync(kFull, x, 4);
  x += __shfl_xor_sync(kFull, x, 8);
  return x + __shfl_xor_sync(kFull, x, 16);
}

// In-place Walsh-Hadamard transform of `rows` rows of length D in shared memory, blocks of
// `had` (a power of two dividing D), normalized by 1/sqrt(had): x -> x H (H symmetric).
template <int D, int T>  // T: threads in the CTA
__device__ void fwht_rows(float* x, int rows, int had) {
  for (int len = 1; len < had; len <<= 1) {
    for (int i = threadIdx.x; i < rows * (D / 2); i += T) {
      int r = i / (D / 2), j = i % (D / 2);
      int a = r * D + (j / len) * 2 * len + (j % len);
      float u = x[a], v = x[a + len];
      x[a] = u + v;
      x[a + len] = u - v;
    }
    __syncthreads();
  }
  float norm = rsqrtf((float)had);
  for (int i = threadIdx.x; i < rows * D; i += T) x[i] *= norm;
  __syncthreads();
}

// max of one value per warp (x[w], or x[w][q]) in shared memory
template <int W>
__device__ __forceinline__ float max_over_warps(const float* x, int stride = 1, int q = 0) {
  static_assert(W == 4 || W == 8, "4 or 8 warps per CTA");
  float m = fmaxf(fmaxf(x[q], x[stride + q]), fmaxf(x[2 * stride + q], x[3 * stride + q]));
  if constexpr (W == 8)
    m = fmaxf(m, fmaxf(fmaxf(x[4 * stride + q], x[5 * stride + q]),
                       fmaxf(x[6 * stride + q], x[7 * stride + q])));
  return m;
}
template <int W, int N>
__device__ __forceinline__ float max_over_warps(const float (&x)[W][N], int q) {
  return max_over_warps<W>(&x[0][0], N, q);
}

template <int BITS, int D>
struct Geometry {
  static constexpr int P = BITS == 4 ? D / 2 : D;       // bytes per token row
  static constexpr int kLaneBytes = 16 * P / 32;       // bytes per lane per 16-token group
  static constexpr int kVec = kLaneBytes / 16;         // 16-byte loads per lane per group
  static constexpr int kWords = kLaneBytes / 4;
  static constexpr int kSteps = D / 16;                // k-steps (keys) = m-tiles (values)
};

// Dynamic shared memory: the per-warp ring of the main loop (STAGES steps of U groups, each
// group K and V codes plus 128 (KH: 192) bytes of metadata), aliased with the merge buffer
// after the loop.
// The fp16 query lives in static shared memory, so the first loads fly during the prologue.
template <int BITS, int D, int NT, int U, bool KH, int W = kWarps>
struct Smem {
  static constexpr int kCodeBytes = 16 * Geometry<BITS, D>::P;  // one group's K (or V) codes
  // metadata of 16 tokens: K (scale, min) 64 bytes (KH: two pairs, 128), V 64 bytes
  static constexpr int kKMetaBytes = KH ? 128 : 64;
  static constexpr int kGroupBytes = 2 * kCodeBytes + kKMetaBytes + 64;
  static constexpr int kFit = 13056 / (U * kGroupBytes);
  static constexpr int kStages = kFit < 2 ? 2 : kFit > 4 ? 4 : kFit;
  static constexpr int kRing = W * kStages * U * kGroupBytes;
  static constexpr int kStaging = 8 * NT * D * 4;  // fp32 merge rows
  // + [G][num_splits <= 64] merge weights after the staging area
  static constexpr int kBytes = kRing > kStaging + 4096 ? kRing : kStaging + 4096;
};

}  // namespace detail

// W: warps per CTA. 4 by default; 8 gives the few CTAs of a small grid (c=1, or a long single
// sequence at ~2 CTAs per SM) twice the warps per scheduler to hide the group loop's latency,
// without the extra splits (merges, query prologues) that more CTAs would cost.
template <int BITS, int D, int NT, int U, bool KH, int W = detail::kWarps>
__global__ void __launch_bounds__(32 * W,
                                  W == 8 ? (NT == 1 ? 2 : 1) : ((D <= 128 && NT == 1) ? 4 : 3))
    paged_decode_kernel(const DecodeParams p) {
  using namespace detail;
  constexpr int kWarps = W;  // shadows detail::kWarps / kThreads in this kernel
  constexpr int kThreads = 32 * W;
  using Geo = Geometry<BITS, D>;
  constexpr int QROWS = 8 * NT;
  constexpr int STEPS = Geo::kSteps;
  constexpr int HALF_STEPS = D / 32;

  using Mem = Smem<BITS, D, NT, U, KH, W>;
  constexpr int kCodeBytes = Mem::kCodeBytes;
  constexpr int kGroupBytes = Mem::kGroupBytes;
  constexpr int STAGES = Mem::kStages;
  extern __shared__ __align__(16) uint8_t smem[];
  float* sbuf = reinterpret_cast<float*>(smem);  // the merge buffer after the loop
  __shared__ __align__(16) __half sq[QROWS * D];  // scaled fp16 query rows
  __shared__ float s_qsum[QROWS][KH ? 2 : 1];  // KH: sums of each half
  __shared__ float s_m[kWarps][QROWS], s_l[kWarps][QROWS], s_vm[kWarps][QROWS];
  __shared__ float s_red[kWarps];
  __shared__ int s_ticket;

  const int h = blockIdx.x, s = blockIdx.y, split = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int G = p.G;
  const int num_kv_heads = gridDim.x;

  const int seq_len = p.seq_lens[s];
  const int start = min(max(p.window > 0 ? max(seq_len - p.window, 0) : 0, p.first), seq_len);
  const int start16 = start & ~15;
  const int span = max(seq_len - start16, 0);
  // The host plans num_splits from the block-table width (fixed per CUDA graph), which can be
  // far above this sequence's length (a c=1 step of a 256-token chat under a 17K-wide table
  // planned 64 splits of one group each). Only the splits the real span needs (>= 128 tokens
  // each, the host's rule) do work: the others leave at once and the merge counts the rest.
  // Up to p.single_split tokens (default 512) one CTA takes the whole span: its few groups cost
  // less than the merge's chain of global round trips (partial store, fence, ticket, loads).
  const int num_splits =
      span <= p.single_split
          ? 1
          : min(p.num_splits, max(1, (span + kMinSplitTokens - 1) / kMinSplitTokens));
  if (split >= num_splits) return;
  const int per_split = (span + num_splits - 1) / num_splits;
  const int chunk = (per_split + 15) & ~15;
  const int lo = start16 + split * chunk;
  const int hi = min(seq_len, lo + chunk);

  // ---- this warp's 16-token groups, streamed through its own shared-memory ring ----------
  // cp.async keeps STAGES steps of U groups in flight per warp without holding them in
  // registers, so occupancy stays high; lanes copy and read back their own code bytes, the
  // group's metadata (K then V, 16 bytes a lane) is copied by lanes 0-7 (KH: 0-11) and read by
  // all after __syncwarp.
  // Addresses that do not change per group are computed once here; with fewer registers (5
  // CTAs per SM) the compiler rematerialized them every group (~50 of ~330 instructions).
  const int nsub = hi > lo ? (hi - lo + 15) >> 4 : 0;
  const int per_w = (nsub + kWarps - 1) / kWarps;
  const int sub_begin = warp * per_w, sub_end = min(nsub, sub_begin + per_w);
  const int* bt = p.block_tables + (int64_t)s * p.stride_bt;
  // the copy takes 512 contiguous bytes per instruction (chunk 32 i + lane), so each 32-byte
  // sector is requested from L2 once; the ring keeps the page's byte order, so lane r still
  // reads its kVec chunks at r * kLaneBytes
  const uint8_t* kbase = p.k_cache + (int64_t)h * p.stride_page_h + lane * 16;
  const uint8_t* vbase = p.v_cache + (int64_t)h * p.stride_page_h + lane * 16;
  // lanes [0, KL): K metadata, [KL, KL + 4): V, 16 bytes each. K rows hold 2 (KH: 4) halves
  // per token, V rows 2: a K lane's offsets are the V offsets shifted by kshift.
  constexpr int KL = Mem::kKMetaBytes / 16;
  const bool k_lane = lane < KL;
  const int kshift = KH && k_lane ? 1 : 0;
  const __half* mbase = k_lane ? p.k_meta + ((int64_t)h * p.stride_meta_h << kshift) + 8 * lane
                               : p.v_meta + (int64_t)h * p.stride_meta_h + 8 * (lane - KL);
  const bool meta_lane = lane < KL + 4;
  uint8_t* ring = smem + warp * (STAGES * U * kGroupBytes);
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  const uint32_t dst_code = ring_s + lane * 16;
  const uint32_t dst_meta = ring_s + 2 * kCodeBytes + 16 * (lane & (KH ? 15 : 7));
  const int64_t stride_page_b = p.stride_page_b, stride_meta_b = p.stride_meta_b;
  const int in_page_mask = p.block_size - 1, block_shift = p.block_shift;

  // lane l holds the byte offsets (codes; metadata in halves) of group pid_base + l, so each
  // group's addresses cost two shuffles and three adds instead of 64-bit products
  int pid_base = sub_begin;
  int64_t code_off_l = 0, meta_off_l = 0;
  auto refresh_pages = [&](int first) {
    pid_base = first;
    const int j = first + lane;
    if (j < sub_end) {
      const int tok = lo + 16 * j;
      const int64_t page = __ldg(bt + (tok >> block_shift));
      const int in_page = tok & in_page_mask;
      code_off_l = page * stride_page_b + in_page * Geo::P;
      meta_off_l = page * stride_meta_b + 2 * in_page;
    }
  };
  auto issue = [&](int j, int slot) {
    if (j >= sub_end) return;  // warp-uniform
    if (j - pid_base >= 32) refresh_pages(j);
    const int src = j - pid_base;
    const int64_t code_off = __shfl_sync(kFull, code_off_l, src);
    const int64_t meta_off = __shfl_sync(kFull, meta_off_l, src);
    const uint32_t dst = dst_code + slot * kGroupBytes;
#pragma unroll
    for (int i = 0; i < Geo::kVec; ++i) {
      cp_async16_s(dst + 512 * i, kbase + code_off + 512 * i);
      cp_async16_s(dst + kCodeBytes + 512 * i, vbase + code_off + 512 * i);
    }
    cp_async16_if(dst_meta + slot * kGroupBytes, mbase + (meta_off << kshift), meta_lane);
  };

  // the first stages' loads go out before the query prologue, which hides their latency
  const int num_steps = (sub_end - sub_begin + U - 1) / U;
  refresh_pages(sub_begin);
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
#pragma unroll
    for (int k = 0; k < U; ++k) issue(sub_begin + st * U + k, st * U + k);
    cp_async_commit();
  }

  // ---- query: load, rotate, scale, fp16 with a power-of-two range factor -------------------
  // Warp w holds rows w, w + 4, ...; lane l holds elements [l * EL, (l + 1) * EL) of a row, so
  // the Hadamard butterflies are in registers below distance EL and shuffles above it.
  constexpr int EL = D / 32;
  constexpr int RW = QROWS / kWarps;
  float qv[RW][EL];
#pragma unroll
  for (int rr = 0; rr < RW; ++rr) {
    const int r = warp + kWarps * rr;
    const int64_t off = (int64_t)s * p.stride_qs + (int64_t)(h * G + r) * p.stride_qh + lane * EL;
#pragma unroll
    for (int e = 0; e < EL; ++e) {
      float x = 0.f;
      if (r < G)
        x = p.is_bf16 ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.q)[off + e])
                      : __half2float(reinterpret_cast<const __half*>(p.q)[off + e]);
      qv[rr][e] = x;
    }
  }
  const int had = p.had_block;
  if (had > 0) {
#pragma unroll
    for (int len = 1; len < EL; len <<= 1) {
      if (len < had) {
#pragma unroll
        for (int rr = 0; rr < RW; ++rr)
#pragma unroll
          for (int e = 0; e < EL; ++e)
            if (!(e & len)) {
              const float u = qv[rr][e], v = qv[rr][e + len];
              qv[rr][e] = u + v;
              qv[rr][e + len] = u - v;
            }
      }
    }
    for (int lx = 1; lx * EL < had; lx <<= 1) {
      const bool upper = lane & lx;
#pragma unroll
      for (int rr = 0; rr < RW; ++rr)
#pragma unroll
        for (int e = 0; e < EL; ++e) {
          const float o = __shfl_xor_sync(kFull, qv[rr][e], lx);
          qv[rr][e] = upper ? o - qv[rr][e] : qv[rr][e] + o;
        }
    }
  }
  const float qmul = had > 0 ? p.qscale * rsqrtf((float)had) : p.qscale;
  float amax = 0.f;
#pragma unroll
  for (int rr = 0; rr < RW; ++rr)
#pragma unroll
    for (int e = 0; e < EL; ++e) {
      qv[rr][e] *= qmul;
      amax = fmaxf(amax, fabsf(qv[rr][e]));
    }
  amax = warp_max_all(amax);
  if (lane == 0) s_red[warp] = amax;
  __syncthreads();
  amax = max_over_warps<kWarps>(s_red);
  int e2 = 0;
  if (amax > 0.f && amax <= 3.0e38f) frexpf(amax, &e2);
  e2 = min(max(e2, -100), 100);
  const float f = ldexpf(1.f, 14 - e2), finv = ldexpf(1.f, e2 - 14);
#pragma unroll
  for (int rr = 0; rr < RW; ++rr) {
    const int r = warp + kWarps * rr;
    float acc = 0.f;
#pragma unroll
    for (int e = 0; e < EL; ++e) {
      const __half x = __float2half_rn(qv[rr][e] * f);
      sq[r * D + lane * EL + e] = x;
      acc += __half2float(x);
    }
    if constexpr (KH) {  // lanes 0-15 hold the first half of d
      const float hi = warp_sum_all(lane < 16 ? 0.f : acc);
      acc = warp_sum_all(lane < 16 ? acc : 0.f);
      if (lane == 0) s_qsum[r][1] = hi;
    } else {
      acc = warp_sum_all(acc);
    }
    if (lane == 0) s_qsum[r][0] = acc;
  }
  __syncthreads();

  uint32_t qf[STEPS][NT][2];
#pragma unroll
  for (int w = 0; w < STEPS; ++w)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const __half* row = sq + (nt * 8 + g) * D + 16 * w + 2 * t;
      __half2 b0 = *reinterpret_cast<const __half2*>(row);
      __half2 b1 = *reinterpret_cast<const __half2*>(row + 8);
      if (BITS == 4 && w >= HALF_STEPS) {  // meets codes scaled by 16 (see unpack_int4)
        b0 = __hmul2(b0, __float2half2_rn(0.0625f));
        b1 = __hmul2(b1, __float2half2_rn(0.0625f));
      }
      qf[w][nt][0] = *reinterpret_cast<uint32_t*>(&b0);
      qf[w][nt][1] = *reinterpret_cast<uint32_t*>(&b1);
    }
  // KH: [0] the first half's sum, [1] the second's; else [0] the whole row's
  float qsum[NT][2][KH ? 2 : 1];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int hh = 0; hh < (KH ? 2 : 1); ++hh)
        qsum[nt][c][hh] = s_qsum[nt * 8 + 2 * t + c][hh] * finv;

  float m_run[NT][2], l_run[NT][2], vm_run[NT][2];
  float acc[STEPS][NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) m_run[nt][c] = -INFINITY, l_run[nt][c] = 0.f, vm_run[nt][c] = 0.f;
#pragma unroll
  for (int w = 0; w < STEPS; ++w)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[w][nt][i] = 0.f;
  int E = -126;  // acc holds sum p * scale_v * 2^-E * code; value scales <= 2^(E + 4)
  float v_limit = 0.f, vnorm = ldexpf(1.f, 126);  // vnorm = 2^-E, changed only when E grows
  for (int it = 0; it < num_steps; ++it) {
    {
      const int st = it + STAGES - 1, slot = st % STAGES;
#pragma unroll
      for (int k = 0; k < U; ++k) issue(sub_begin + st * U + k, slot * U + k);
      cp_async_commit();
    }
    cp_async_wait<STAGES - 1>();
    __syncwarp();
    const int j0 = sub_begin + it * U;
    const uint8_t* slot_base = ring + (it % STAGES) * U * kGroupBytes;

    // scores S^T (tokens g, g+8 x queries 2t, 2t+1 of each n-tile), in log2 units
    float sc[U][NT][4];
    float vsc[U][2], vmn[U][2];
    float vmax = 0.f;
    uint4 vcode[U][Geo::kVec];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const uint8_t* gb = slot_base + k * kGroupBytes;
      uint4 kcode[Geo::kVec];
#pragma unroll
      for (int i = 0; i < Geo::kVec; ++i) {
        kcode[i] = *reinterpret_cast<const uint4*>(gb + lane * Geo::kLaneBytes + 16 * i);
        vcode[k][i] =
            *reinterpret_cast<const uint4*>(gb + kCodeBytes + lane * Geo::kLaneBytes + 16 * i);
      }
      const uint32_t* meta = reinterpret_cast<const uint32_t*>(gb + 2 * kCodeBytes);
      // per token row r: K (scale, min) [KH: lo pair, hi pair], V (scale, min), as half2 words
      constexpr int KW = KH ? 2 : 1, VOFF = 16 * KW;
      uint32_t kmeta[2][KW];
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int hh = 0; hh < KW; ++hh) kmeta[r][hh] = meta[KW * (g + 8 * r) + hh];
      const uint32_t vmeta[2] = {meta[VOFF + g], meta[VOFF + 8 + g]};
      // two accumulators per n-tile: the k-steps of the two halves of d are independent
      // chains, so the mma latency overlaps
      float sa[NT][4], sb[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) sa[nt][i] = 0.f, sb[nt][i] = 0.f;
      const uint32_t* kw = reinterpret_cast<const uint32_t*>(kcode);
      if constexpr (BITS == 4) {
#pragma unroll
        for (int w = 0; w < HALF_STEPS; ++w) {
          uint32_t x0[4], x1[4];
          unpack_int4(kw[2 * w], x0);
          unpack_int4(kw[2 * w + 1], x1);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            mma16816(sa[nt], x0[0], x0[2], x1[0], x1[2], qf[w][nt][0], qf[w][nt][1]);
            mma16816(sb[nt], x0[1], x0[3], x1[1], x1[3], qf[w + HALF_STEPS][nt][0],
                     qf[w + HALF_STEPS][nt][1]);
          }
        }
      } else if constexpr (KH) {  // sa: the first half's k-steps, sb: the second's
#pragma unroll
        for (int w = 0; w < STEPS / 2; ++w) {
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int ww = w + hh * (STEPS / 2);
            uint32_t x0[2], x1[2];
            unpack_int8(kw[2 * ww], x0);
            unpack_int8(kw[2 * ww + 1], x1);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
              mma16816(hh ? sb[nt] : sa[nt], x0[0], x0[1], x1[0], x1[1], qf[ww][nt][0],
                       qf[ww][nt][1]);
          }
        }
      } else {
#pragma unroll
        for (int w = 0; w < STEPS; ++w) {
          uint32_t x0[2], x1[2];
          unpack_int8(kw[2 * w], x0);
          unpack_int8(kw[2 * w + 1], x1);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            if (w % 2 == 0)
              mma16816(sa[nt], x0[0], x0[1], x1[0], x1[1], qf[w][nt][0], qf[w][nt][1]);
            else
              mma16816(sb[nt], x0[0], x0[1], x1[0], x1[1], qf[w][nt][0], qf[w][nt][1]);
          }
        }
      }
      const int j = j0 + k;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int tok = lo + 16 * j + g + 8 * r;
        const bool ok = j < sub_end && tok >= start && tok < hi;
        const float2 vm = half2_bits_to_float2(vmeta[r]);
        // selects, not products: masked rows may hold NaN metadata from another sequence
        float ks[KW], kmin[KW];
#pragma unroll
        for (int hh = 0; hh < KW; ++hh) {
          const float2 km = half2_bits_to_float2(kmeta[r][hh]);
          ks[hh] = ok ? km.x * (finv * 16777216.f) : 0.f;  // codes carry 2^-24
          kmin[hh] = ok ? km.y : 0.f;
        }
        vsc[k][r] = ok ? vm.x : 0.f;
        vmn[k][r] = ok ? vm.y : 0.f;
        vmax = fmaxf(vmax, vsc[k][r]);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int i = 2 * r + c;
            float x;
            if constexpr (KH)
              x = sa[nt][i] * ks[0] + sb[nt][i] * ks[1] + kmin[0] * qsum[nt][c][0] +
                  kmin[1] * qsum[nt][c][1];
            else
              x = (sa[nt][i] + sb[nt][i]) * ks[0] + kmin[0] * qsum[nt][c][0];
            sc[k][nt][i] = ok ? x : -INFINITY;
          }
      }
    }
    __syncwarp();  // every lane has read this slot before the next issue may overwrite it

    // online softmax with lazy rescaling: the running max only moves (three shuffles per
    // column and a rescale of acc) when a score exceeds it by more than 8 (weights <= 256) or
    // a value scale exceeds 2^(E+4); otherwise this step costs no cross-lane work
    float lmax[NT][2];
    bool grow = vmax > v_limit;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float mx = -INFINITY;
#pragma unroll
        for (int k = 0; k < U; ++k) mx = fmaxf(mx, fmaxf(sc[k][nt][c], sc[k][nt][2 + c]));
        lmax[nt][c] = mx;
        grow = grow || mx > m_run[nt][c] + 8.f;
      }
    if (__any_sync(kFull, grow)) {
      const float vm_all = warp_max_rows(vmax);
      int ev = -126;
      if (vm_all > 0.f) frexpf(vm_all, &ev);  // vm_all <= 2^ev
      const int E_new = max(E, ev);
      const float e_fac = exp2f((float)(E - E_new));
      E = E_new;
      v_limit = ldexpf(1.f, E + 4);
      vnorm = ldexpf(1.f, -E);
      float fac[NT][2];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float m_new = fmaxf(m_run[nt][c], warp_max_rows(lmax[nt][c]));
          const float alpha =
              m_new == -INFINITY ? 1.f : fast_exp2(m_run[nt][c] - m_new);  // 0 the first time
          m_run[nt][c] = m_new;
          l_run[nt][c] *= alpha;
          vm_run[nt][c] *= alpha;
          fac[nt][c] = alpha * e_fac;
        }
#pragma unroll
      for (int w = 0; w < STEPS; ++w)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[w][nt][i] *= fac[nt][i & 1];
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float m_sub = m_run[nt][c] == -INFINITY ? 0.f : m_run[nt][c];
        float lsum = 0.f, vsum = 0.f;
#pragma unroll
        for (int k = 0; k < U; ++k)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float pr = fast_exp2(sc[k][nt][2 * r + c] - m_sub);
            lsum += pr;
            vsum += pr * vmn[k][r];
            sc[k][nt][2 * r + c] = pr * (vsc[k][r] * vnorm);  // the P.V weight, <= 4096
          }
        l_run[nt][c] += lsum;
        vm_run[nt][c] += vsum;
      }

    // O^T += V^T P^T: P^T fragments are the transposed score fragments (movmatrix)
#pragma unroll
    for (int k = 0; k < U; ++k) {
      uint32_t pb[NT][2];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        pb[nt][0] = transpose8x8(pack_half2(sc[k][nt][0], sc[k][nt][1]));
        pb[nt][1] = transpose8x8(pack_half2(sc[k][nt][2], sc[k][nt][3]));
      }
      const uint32_t* vw = reinterpret_cast<const uint32_t*>(vcode[k]);
      if constexpr (BITS == 4) {
#pragma unroll
        for (int w = 0; w < HALF_STEPS; ++w) {
          uint32_t x0[4], x1[4];
          unpack_int4(vw[2 * w], x0);
          unpack_int4(vw[2 * w + 1], x1);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            mma16816(acc[w][nt], x0[0], x0[2], x1[0], x1[2], pb[nt][0], pb[nt][1]);
            mma16816(acc[w + HALF_STEPS][nt], x0[1], x0[3], x1[1], x1[3], pb[nt][0], pb[nt][1]);
          }
        }
      } else {
#pragma unroll
        for (int w = 0; w < STEPS; ++w) {
          uint32_t x0[2], x1[2];
          unpack_int8(vw[2 * w], x0);
          unpack_int8(vw[2 * w + 1], x1);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            mma16816(acc[w][nt], x0[0], x0[1], x1[0], x1[1], pb[nt][0], pb[nt][1]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring becomes the merge buffer
  for (int i = tid; i < QROWS * D; i += kThreads) sbuf[i] = 0.f;
  __syncthreads();

  // ---- merge the warps: common max per query, shared-memory sums ----------------------------
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      l_run[nt][c] = warp_sum_rows(l_run[nt][c]);
      vm_run[nt][c] = warp_sum_rows(vm_run[nt][c]);
      if (g == 0) {
        const int q = nt * 8 + 2 * t + c;
        s_m[warp][q] = m_run[nt][c];
        s_l[warp][q] = l_run[nt][c];
        s_vm[warp][q] = vm_run[nt][c];
      }
    }
  __syncthreads();
  const float e_scale = ldexpf(1.f, E + 24);  // weights carry 2^-E, codes 2^-24
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int q = nt * 8 + 2 * t + c;
      float M = max_over_warps<kWarps>(s_m, q);
      const float wgt = M == -INFINITY ? 0.f : fast_exp2(m_run[nt][c] - M) * e_scale;
#pragma unroll
      for (int w = 0; w < STEPS; ++w) {
        const float ww = BITS == 4 && w >= HALF_STEPS ? wgt * 0.0625f : wgt;
#pragma unroll
        for (int r = 0; r < 2; ++r)
          atomicAdd(&sbuf[q * D + 16 * w + g + 8 * r], acc[w][nt][2 * r + c] * ww);
      }
    }
  __syncthreads();

  // per query row: the CTA's max, sum of weights and min-term, then U = sbuf + vm
  const int Hq = p.num_q_heads;
  for (int q = tid; q < QROWS; q += kThreads) {
    float M = max_over_warps<kWarps>(s_m, q);
    float L = 0.f, VM = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const float wt = M == -INFINITY ? 0.f : fast_exp2(s_m[w][q] - M);
      L += wt * s_l[w][q];
      VM += wt * s_vm[w][q];
    }
    s_m[0][q] = M;
    s_l[0][q] = L;
    s_vm[0][q] = VM;
  }
  __syncthreads();

  const int64_t head0 = (int64_t)s * Hq + h * G;  // first query head of this CTA
  if (num_splits > 1) {
    for (int i = tid; i < G * D; i += kThreads) {
      const int q = i / D, d = i % D;
      p.part_o[((head0 + q) * p.num_splits + split) * D + d] = sbuf[q * D + d] + s_vm[0][q];
    }
    for (int q = tid; q < G; q += kThreads) {
      p.part_ml[((head0 + q) * p.num_splits + split) * 2] = s_m[0][q];
      p.part_ml[((head0 + q) * p.num_splits + split) * 2 + 1] = s_l[0][q];
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) {
      int* ticket = p.tickets + (int64_t)s * num_kv_heads + h;
      const int done = atomicAdd(ticket, 1);
      s_ticket = done == num_splits - 1;
      if (s_ticket) *ticket = 0;  // ready for the next launch (and CUDA graph replays)
    }
    __syncthreads();
    if (!s_ticket) return;
    __threadfence();
    // last CTA of this (sequence, KV head): merge the splits' states. Loads are spread over
    // threads and unrolled, so the merge costs a few L2 round trips, not one per split.
    const int ns = num_splits, stride = p.num_splits;  // splits used; workspace row length
    float* s_w = reinterpret_cast<float*>(smem + Mem::kStaging);  // [G][ns]
    for (int i = tid; i < G * ns; i += kThreads)
      s_w[i] = __ldcg(p.part_ml + ((head0 + i / ns) * stride + i % ns) * 2);
    __syncthreads();
    for (int q = warp; q < G; q += kWarps) {
      const float* ml = p.part_ml + (head0 + q) * stride * 2;
      float M = -INFINITY;
      for (int j = lane; j < ns; j += 32) M = fmaxf(M, s_w[q * ns + j]);
      M = warp_max_all(M);
      float L = 0.f;
      for (int j = lane; j < ns; j += 32) {
        const float wt = M == -INFINITY ? 0.f : fast_exp2(s_w[q * ns + j] - M);
        L += wt * __ldcg(ml + 2 * j + 1);
        s_w[q * ns + j] = wt;
      }
      L = warp_sum_all(L);
      if (lane == 0) s_l[0][q] = L, s_m[0][q] = M;
    }
    __syncthreads();
    // one thread per 4 outputs: 16-byte loads, 16 in flight (a few L2 round trips in all)
    for (int i = tid; i < G * (D / 4); i += kThreads) {
      const int q = i / (D / 4), d = 4 * (i % (D / 4));
      const float4* po = reinterpret_cast<const float4*>(p.part_o + (head0 + q) * stride * D + d);
      const float* wq = s_w + q * ns;
      float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 16
      for (int j = 0; j < ns; ++j) {
        const float4 x = __ldcg(po + (int64_t)j * (D / 4));
        const float w = wq[j];
        o.x += w * x.x, o.y += w * x.y, o.z += w * x.z, o.w += w * x.w;
      }
      const float L = s_l[0][q];
      const float inv = L > 0.f ? 1.f / L : 0.f;
      float* dst = sbuf + q * D + d;
      dst[0] = o.x * inv, dst[1] = o.y * inv, dst[2] = o.z * inv, dst[3] = o.w * inv;
    }
  } else {
    for (int i = tid; i < G * D; i += kThreads) {
      const int q = i / D;
      const float L = s_l[0][q];
      sbuf[i] = L > 0.f ? (sbuf[i] + s_vm[0][q]) / L : 0.f;
    }
  }
  if (p.lse != nullptr)
    for (int q = tid; q < G; q += kThreads) {
      const float M = s_m[0][q], L = s_l[0][q];
      p.lse[head0 + q] = L > 0.f ? (M + log2f(L)) * 0.6931471805599453f : -INFINITY;
    }
  __syncthreads();
  if (p.rotate_v && p.had_block > 0) fwht_rows<D, kThreads>(sbuf, G, p.had_block);
  for (int i = tid; i < G * D; i += kThreads) {
    const int q = i / D, d = i % D;
    const int64_t off = (int64_t)s * p.stride_os + (int64_t)(h * G + q) * p.stride_oh + d;
    if (p.is_bf16)
      reinterpret_cast<__nv_bfloat16*>(p.out)[off] = __float2bfloat16_rn(sbuf[i]);
    else
      reinterpret_cast<__half*>(p.out)[off] = __float2half_rn(sbuf[i]);
  }
}

}  // namespace sawkv
