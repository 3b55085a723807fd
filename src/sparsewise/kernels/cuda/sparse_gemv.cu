// Sparse decode kernels (CUDA cores) for sparsewise: y[M, N] = x[M, K] W^T + b, M small.
//
// Header-free on purpose: fp16/bf16 are raw 16-bit words converted with PTX, so NVRTC compiles
// this file without any CUDA toolkit headers (a pip-only machine has libnvrtc, not the headers).
//
// Families (each instantiated below as extern "C" kernels, one per template choice):
//   gemv24   2:4 weights: values [N, K/2] (2 kept per group of 4, in order) + meta [N, K/16]
//            16-bit words (nibble j = pos0 | pos1 << 2 of group j of a 16-input chunk).
//            Each lane owns 16-input chunks; a group's two inputs are picked out of the four
//            x halves with one byte permute (prmt), so there is no register gather.
//   gemvbm   unstructured weights, "bit planes": per 256-input tile 8 words, bit l of word w
//            = keep of input w*32 + l; kept values in (tile, word, bit) order; offsets [N, T]
//            = index of each (row, tile)'s first kept value. Lane l owns inputs w*32 + l, so x
//            loads are coalesced and register-indexed at compile time; a kept value's index is
//            offset + kept bits before it (popc), and the warp's value loads are contiguous.
//   actdense activation sparsity over a dense W^T [K, N]: each block compacts the inputs whose
//            |x_j| > t_j (any of the M rows) and streams only those rows of W^T.
//   actbm    the same over a sparse W^T stored as bit planes along N (2:4 or unstructured W).
//   splitsum fp32 partial sums over K splits -> y (+ bias), cast.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

struct alignas(16) U4 { u32 a, b, c, d; };

__device__ __forceinline__ U4 ld_stream(const void* ptr) {  // read once: do not keep in L1
  U4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.a), "=r"(r.b), "=r"(r.c), "=r"(r.d) : "l"(ptr));
  return r;
}
__device__ __forceinline__ U4 ld_cached(const void* ptr) {  // x: shared by every block
  U4 r;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.a), "=r"(r.b), "=r"(r.c), "=r"(r.d) : "l"(ptr));
  return r;
}
__device__ __forceinline__ u32 prmt(u32 lo, u32 hi, u32 sel) {
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(lo), "r"(hi), "r"(sel));
  return r;
}

struct F16 {
  static __device__ __forceinline__ float lo(u32 v) {
    float f;
    asm("{.reg .b16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, l;}" : "=f"(f) : "r"(v));
    return f;
  }
  static __device__ __forceinline__ float hi(u32 v) {
    float f;
    asm("{.reg .b16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, h;}" : "=f"(f) : "r"(v));
    return f;
  }
  static __device__ __forceinline__ float one(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
  }
  static __device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
    u32 r;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
  }
  static __device__ __forceinline__ u16 from_float(float f) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
  }
};

struct BF16 {
  static __device__ __forceinline__ float lo(u32 v) { return __uint_as_float(v << 16); }
  static __device__ __forceinline__ float hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }
  static __device__ __forceinline__ float one(u16 v) { return __uint_as_float(((u32)v) << 16); }
  static __device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
    u32 r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
  }
  static __device__ __forceinline__ u16 from_float(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
  }
};

__device__ __forceinline__ u32 word_of(const U4& v, int j) {
  return j == 0 ? v.a : j == 1 ? v.b : j == 2 ? v.c : v.d;  // j is a compile-time constant
}

// Sum V (a power of two <= 32) per-lane values over the warp with 4V shuffles+adds instead of
// 5V: each butterfly step sends half of the remaining values. Afterwards lane l holds the total
// of value index `reduced_index(l, V)`; lanes differing only in the low bits hold the same.
template <int V>
__device__ __forceinline__ float warp_reduce_scatter(float (&vals)[V], int lane) {
#pragma unroll
  for (int h = V / 2, bit = 16; h >= 1; h >>= 1, bit >>= 1) {
    const bool upper = lane & bit;
#pragma unroll
    for (int i = 0; i < h; ++i) {
      const float send = upper ? vals[i] : vals[i + h];
      const float keep = upper ? vals[i + h] : vals[i];
      vals[i] = keep + __shfl_xor_sync(0xffffffffu, send, bit);
    }
  }
  float total = vals[0];
#pragma unroll
  for (int bit = 16 / V; bit >= 1; bit >>= 1) total += __shfl_xor_sync(0xffffffffu, total, bit);
  return total;
}

template <int V>
__device__ __forceinline__ int reduced_index(int lane) {
  int index = 0;
#pragma unroll
  for (int h = V / 2, bit = 16; h >= 1; h >>= 1, bit >>= 1) index += (lane & bit) ? h : 0;
  return index;
}

// Per-lane partial sums acc[m][r] -> y[m, row0 + r] (+ bias): warp reduce, then across warps.
template <class T, int MR, int ROWS, int WARPS>
__device__ __forceinline__ void finish_rows(float (&acc)[MR * ROWS], const u16* __restrict__ bias,
                                           u16* __restrict__ y, int M, int N, int row0, int m0) {
  constexpr int V = MR * ROWS;
  __shared__ float partial[WARPS][V];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float total = warp_reduce_scatter<V>(acc, lane);
  if ((lane & (32 / V - 1)) == 0) partial[warp][reduced_index<V>(lane)] = total;
  if (WARPS > 1) __syncthreads();
  else __syncwarp();
  if (threadIdx.x < V) {
    const int m = threadIdx.x / ROWS, r = threadIdx.x % ROWS, row = row0 + r;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) sum += partial[w][threadIdx.x];
    if (row < N && m0 + m < M) {
      if (bias) sum += T::one(bias[row]);
      y[(size_t)(m0 + m) * N + row] = T::from_float(sum);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 2:4 GEMV. Block: ROWS output rows, WARPS warps splitting the chunks of K; gridDim.y walks the
// x rows in groups of MR. ACC16: products of a chunk summed in f16x2/bf16x2 (8 per half), then
// added to fp32 (halves the instructions at MR >= 4); else every product in fp32.
// Zero the halves of x whose |x| <= threshold (activation sparsity fused into the 2:4 GEMV).
template <class T>
__device__ __forceinline__ u32 mask_pair(u32 pair, float t_lo, float t_hi) {
  const u32 keep_lo = fabsf(T::lo(pair)) > t_lo ? 0x0000ffffu : 0u;
  const u32 keep_hi = fabsf(T::hi(pair)) > t_hi ? 0xffff0000u : 0u;
  return pair & (keep_lo | keep_hi);
}

template <class T>
__device__ __forceinline__ void mask_chunk(U4& xa, U4& xb, const float* __restrict__ thresholds, int c) {
  const float4* tp = reinterpret_cast<const float4*>(thresholds + (c << 4));
  const float4 t0 = tp[0], t1 = tp[1], t2 = tp[2], t3 = tp[3];
  xa.a = mask_pair<T>(xa.a, t0.x, t0.y);
  xa.b = mask_pair<T>(xa.b, t0.z, t0.w);
  xa.c = mask_pair<T>(xa.c, t1.x, t1.y);
  xa.d = mask_pair<T>(xa.d, t1.z, t1.w);
  xb.a = mask_pair<T>(xb.a, t2.x, t2.y);
  xb.b = mask_pair<T>(xb.b, t2.z, t2.w);
  xb.c = mask_pair<T>(xb.c, t3.x, t3.y);
  xb.d = mask_pair<T>(xb.d, t3.z, t3.w);
}

// `thresholds` (optional, fp32 [K]): x_k counts only where |x_k| > thresholds[k] (TEAL-style).
template <class T, int MR, int ROWS, int WARPS, bool ACC16, bool MASK>
__device__ __forceinline__ void gemv24_body(const u16* __restrict__ x, const u16* __restrict__ values,
                                            const u16* __restrict__ meta, const u16* __restrict__ bias,
                                            const float* __restrict__ thresholds, u16* __restrict__ y, int M,
                                            int N, int K) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = blockIdx.x * ROWS, m0 = blockIdx.y * MR;
  const int chunks = K >> 4;
  float acc[MR * ROWS];
#pragma unroll
  for (int i = 0; i < MR * ROWS; ++i) acc[i] = 0.f;
  const U4* vrow[ROWS];
  const u16* mrow[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = min(row0 + r, N - 1);  // rows past N read a valid row and are never stored
    vrow[r] = reinterpret_cast<const U4*>(values + (size_t)row * (K >> 1));
    mrow[r] = meta + (size_t)row * chunks;
  }
  int c = warp * 32 + lane;
  U4 v[ROWS];
  u32 mt[ROWS];
  if (c < chunks) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) { v[r] = ld_stream(vrow[r] + c); mt[r] = mrow[r][c]; }
  }
  for (; c < chunks; c += 32 * WARPS) {
    // issue the next chunk's weight loads before this chunk's arithmetic
    const int next = c + 32 * WARPS;
    U4 vn[ROWS];
    u32 mn[ROWS];
    if (next < chunks) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) { vn[r] = ld_stream(vrow[r] + next); mn[r] = mrow[r][next]; }
    }
    U4 xa[MR], xb[MR];  // 16 inputs of x per row: groups 0,1 in xa, 2,3 in xb
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      const int xm = min(m0 + m, M - 1);
      const U4* xp = reinterpret_cast<const U4*>(x + (size_t)xm * K + (c << 4));
      xa[m] = ld_cached(xp);
      xb[m] = ld_cached(xp + 1);
      if (MASK) mask_chunk<T>(xa[m], xb[m], thresholds, c);
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      u32 sel[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const u32 p0 = (mt[r] >> (4 * j)) & 3u, p1 = (mt[r] >> (4 * j + 2)) & 3u;
        sel[j] = 0x1010u + 34u * p0 + 8704u * p1;  // bytes of half p0 -> low half, half p1 -> high half
      }
      if (ACC16) {
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          u32 h = 0u;
          h = T::fma2(v[r].a, prmt(xa[m].a, xa[m].b, sel[0]), h);
          h = T::fma2(v[r].b, prmt(xa[m].c, xa[m].d, sel[1]), h);
          h = T::fma2(v[r].c, prmt(xb[m].a, xb[m].b, sel[2]), h);
          h = T::fma2(v[r].d, prmt(xb[m].c, xb[m].d, sel[3]), h);
          acc[m * ROWS + r] += T::lo(h) + T::hi(h);
        }
      } else {
        float wf[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          wf[2 * j] = T::lo(word_of(v[r], j));
          wf[2 * j + 1] = T::hi(word_of(v[r], j));
        }
#pragma unroll
        for (int m = 0; m < MR; ++m) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const U4& src = j < 2 ? xa[m] : xb[m];
            const u32 lo = (j & 1) ? src.c : src.a, hi = (j & 1) ? src.d : src.b;
            const u32 picked = prmt(lo, hi, sel[j]);
            acc[m * ROWS + r] = fmaf(wf[2 * j], T::lo(picked), acc[m * ROWS + r]);
            acc[m * ROWS + r] = fmaf(wf[2 * j + 1], T::hi(picked), acc[m * ROWS + r]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) { v[r] = vn[r]; mt[r] = mn[r]; }
  }
  finish_rows<T, MR, ROWS, WARPS>(acc, bias, y, M, N, row0, m0);
}

// ---------------------------------------------------------------------------------------------
// 2:4 on sparse tensor cores (mma.sp m16n8k32), for 4-16 rows of x, where the CUDA-core GEMV runs
// out of instructions. The Rows24 layout is the instruction's own operand format: a 16-input
// chunk's 16-bit meta word holds the four groups' (pos0 | pos1 << 2) nibbles, exactly the
// metadata one thread of a quad supplies for 16 logical k (threads 0/1 of each quad: k 0-15 /
// 16-31 of the 32-k step; low half row r, high half row r + 8). A warp owns 16*RT weight rows x
// 8*NT rows of x; its K steps of 32 are split over the block's warps, then summed in shared memory.
template <class T>
__device__ __forceinline__ void mma_sp(float (&d)[4], const u32 (&a)[4], const u32 (&b)[4], u32 e);

template <>
__device__ __forceinline__ void mma_sp<F16>(float (&d)[4], const u32 (&a)[4], const u32 (&b)[4], u32 e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

template <>
__device__ __forceinline__ void mma_sp<BF16>(float (&d)[4], const u32 (&a)[4], const u32 (&b)[4], u32 e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

__device__ __forceinline__ u32 ld_u32(const u16* ptr) {
  u32 r;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r) : "l"(ptr));
  return r;
}

template <class T, int RT, int NT, int WARPS, bool MASK>
__device__ __forceinline__ void gemv24tc_body(const u16* __restrict__ x, const u16* __restrict__ values,
                                              const u16* __restrict__ meta, const u16* __restrict__ bias,
                                              const float* __restrict__ thresholds, u16* __restrict__ y, int M,
                                              int N, int K) {
  __shared__ float partial[WARPS][RT][NT][4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int quad = lane >> 2, in_quad = lane & 3;
  const int row_base = blockIdx.x * 16 * RT, m_base = blockIdx.y * 8 * NT;
  const int steps = K >> 5, half_k = K >> 1, chunks = K >> 4;
  float acc[RT][NT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[rt][nt][i] = 0.f;
  const u16* vrow[RT][2];
  const u16* mrow[RT][2];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
    const int r0 = min(row_base + rt * 16 + quad, N - 1), r1 = min(row_base + rt * 16 + quad + 8, N - 1);
    vrow[rt][0] = values + (size_t)r0 * half_k + in_quad * 2;
    vrow[rt][1] = values + (size_t)r1 * half_k + in_quad * 2;
    mrow[rt][0] = meta + (size_t)r0 * chunks + (lane & 1);
    mrow[rt][1] = meta + (size_t)r1 * chunks + (lane & 1);
  }
  const u16* xrow[NT];
  bool xvalid[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int m = m_base + nt * 8 + quad;
    xvalid[nt] = m < M;
    xrow[nt] = x + (size_t)min(m, M - 1) * K + in_quad * 2;
  }
  // Software pipeline in program order: the loads of DEPTH steps are issued together, then their
  // mmas run. The loads are volatile asm (never reordered past each other or the mma asm), so a
  // plain load -> mma loop serializes on memory latency (measured 1.2-1.6 TB/s, 2026-12-03).
  constexpr int DEPTH = 4;
  for (int base = warp; base < steps; base += WARPS * DEPTH) {
    u32 a[DEPTH][RT][4], e[DEPTH][RT], b[DEPTH][NT][4];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int step = base + d * WARPS;
      const bool live = step < steps;
      const int col = (live ? step : 0) * 16;
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        a[d][rt][0] = live ? ld_u32(vrow[rt][0] + col) : 0u;
        a[d][rt][1] = live ? ld_u32(vrow[rt][1] + col) : 0u;
        a[d][rt][2] = live ? ld_u32(vrow[rt][0] + col + 8) : 0u;
        a[d][rt][3] = live ? ld_u32(vrow[rt][1] + col + 8) : 0u;
        e[d][rt] = live ? ((u32)mrow[rt][0][step * 2] | ((u32)mrow[rt][1][step * 2] << 16)) : 0u;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int k = (live ? step : 0) * 32 + in_quad * 2 + 8 * j;
          u32 pair = (live && xvalid[nt]) ? *reinterpret_cast<const u32*>(xrow[nt] + (live ? step : 0) * 32 + 8 * j)
                                          : 0u;
          if (MASK) pair = mask_pair<T>(pair, thresholds[k], thresholds[k + 1]);
          b[d][nt][j] = pair;
        }
      }
    }
#pragma unroll
    for (int d = 0; d < DEPTH; ++d)
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_sp<T>(acc[rt][nt], a[d][rt], b[d][nt], e[d][rt]);
  }
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp][rt][nt][i][lane] = acc[rt][nt][i];
  __syncthreads();
  // d[i] of lane l: weight row quad (+8 for i >= 2), x row 2*in_quad + (i & 1)
  for (int slot = threadIdx.x; slot < RT * NT * 4 * 32; slot += WARPS * 32) {
    const int l = slot & 31, i = (slot >> 5) & 3, nt = (slot >> 7) % NT, rt = (slot >> 7) / NT;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) sum += partial[w][rt][nt][i][l];
    const int row = row_base + rt * 16 + (l >> 2) + (i >= 2 ? 8 : 0);
    const int m = m_base + nt * 8 + 2 * (l & 3) + (i & 1);
    if (row < N && m < M) {
      if (bias) sum += T::one(bias[row]);
      y[(size_t)m * N + row] = T::from_float(sum);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Bit-plane tiles (unstructured weights). One warp decodes one (row, tile): the tile's kept values
// are contiguous from `off`, so the warp copies the 16-byte-aligned window [off & ~7, +264) into
// shared memory with one 16-byte load per lane (lane 0 one more), independent of the mask words;
// then lane l reads the value of bit l of word w at (off - start) + kept bits before it.
// `values` is padded by PLANE_PAD halves at pack time so the window never leaves the allocation.
constexpr int PLANE_WINDOW = 264;

struct PlaneTile {
  U4 lo, hi;   // the 8 mask words
  U4 window;   // this lane's 16 bytes of the value window
  U4 extra;    // lane 0: the window's last 16 bytes
  int shift;   // off - start
};

__device__ __forceinline__ void plane_tile_load(PlaneTile& tile, const u32* __restrict__ words,
                                                const u16* __restrict__ values, int off, int lane) {
  const U4* wp = reinterpret_cast<const U4*>(words);
  tile.lo = ld_cached(wp);  // the same 32 bytes for every lane: one broadcast
  tile.hi = ld_cached(wp + 1);
  const int start = off & ~7;
  tile.shift = off - start;
  const U4* vp = reinterpret_cast<const U4*>(values + start);
  tile.window = ld_stream(vp + lane);
  if (lane == 0) tile.extra = ld_stream(vp + 32);
}

// The 8 weights lane `lane` owns in the tile (bit lane of each word), as floats.
template <class T>
__device__ __forceinline__ void plane_tile_decode(const PlaneTile& tile, u16* buffer, int lane, float (&out)[8]) {
  reinterpret_cast<U4*>(buffer)[lane] = tile.window;
  if (lane == 0) reinterpret_cast<U4*>(buffer)[32] = tile.extra;
  __syncwarp();
  const u32 lower = (1u << lane) - 1u;
  int base = tile.shift;
#pragma unroll
  for (int w = 0; w < 8; ++w) {
    const u32 word = w < 4 ? word_of(tile.lo, w) : word_of(tile.hi, w - 4);
    out[w] = (word >> lane) & 1u ? T::one(buffer[base + __popc(word & lower)]) : 0.f;
    base += __popc(word);
  }
  __syncwarp();  // the buffer is refilled by the next tile
}

// Unstructured GEMV. Warp w takes tiles w, w + WARPS, ... of ROWS rows; the offsets of all its
// tiles are loaded once per 32 tiles (lane i holds tile i's) and passed around by shuffles, so a
// tile costs one round trip to memory (words and window loaded together).
template <class T, int MR, int ROWS, int WARPS>
__device__ __forceinline__ void gemvbm_body(const u16* __restrict__ x, const u16* __restrict__ values,
                                            const u32* __restrict__ words, const int* __restrict__ offsets,
                                            const u16* __restrict__ bias, u16* __restrict__ y, int M, int N,
                                            int K, int T_tiles) {
  __shared__ __align__(16) u16 windows[WARPS][ROWS][PLANE_WINDOW];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = blockIdx.x * ROWS, m0 = blockIdx.y * MR;
  float acc[MR * ROWS];
#pragma unroll
  for (int i = 0; i < MR * ROWS; ++i) acc[i] = 0.f;
  int rows[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) rows[r] = min(row0 + r, N - 1);
  int tile_offsets[ROWS];
  // software pipeline: tile i+1's words and value windows are requested before tile i is decoded
  PlaneTile tiles[ROWS];
  auto request = [&](int i, int t) {
    if ((i & 31) == 0) {
      const int mine = t + lane * WARPS;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) tile_offsets[r] = mine < T_tiles ? offsets[(size_t)rows[r] * T_tiles + mine] : 0;
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int off = __shfl_sync(0xffffffffu, tile_offsets[r], i & 31);
      plane_tile_load(tiles[r], words + ((size_t)rows[r] * T_tiles + t) * 8, values, off, lane);
    }
  };
  if (warp < T_tiles) request(0, warp);
  for (int i = 0, t = warp; t < T_tiles; ++i, t += WARPS) {
    PlaneTile current[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) current[r] = tiles[r];
    if (t + WARPS < T_tiles) request(i + 1, t + WARPS);
    float xf[MR][8];
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      const int xm = min(m0 + m, M - 1);
#pragma unroll
      for (int w = 0; w < 8; ++w) {
        const int k = t * 256 + w * 32 + lane;
        xf[m][w] = k < K ? T::one(x[(size_t)xm * K + k]) : 0.f;
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float wf[8];
      plane_tile_decode<T>(current[r], windows[warp][r], lane, wf);
#pragma unroll
      for (int w = 0; w < 8; ++w)
#pragma unroll
        for (int m = 0; m < MR; ++m) acc[m * ROWS + r] = fmaf(wf[w], xf[m][w], acc[m * ROWS + r]);
    }
  }
  finish_rows<T, MR, ROWS, WARPS>(acc, bias, y, M, N, row0, m0);
}

// ---------------------------------------------------------------------------------------------
// Activation sparsity. Block (8 warps): one 256-wide slice of the N outputs and the K range
// [k0, k0 + kper) of split blockIdx.y. Kept inputs are compacted in order (ballots: the sum
// order, so the result, is deterministic); then the warps take every 8th kept input, AHEAD rows
// in flight per warp, so a block's whole share is requested in about one round trip.
constexpr int ACT_WARPS = 8;
constexpr int ACT_THREADS = 32 * ACT_WARPS;
constexpr int ACT_MAX_KPER = 512;

// `tile_offsets` (bit-plane W^T only): offsets_t [T, K] of this block's tile, gathered with the list.
template <class T, int MR>
__device__ __forceinline__ int compact_inputs(const u16* __restrict__ x, const float* __restrict__ thresholds,
                                              int M, int K, int k0, int kper, int* idx, float (*xs)[ACT_MAX_KPER],
                                              const int* __restrict__ tile_offsets, int* offs) {
  __shared__ int warp_counts[ACT_WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int k_end = min(K, k0 + kper);
  int count = 0;
  for (int base = k0; base < k_end; base += ACT_THREADS) {
    const int k = base + threadIdx.x;
    const bool inside = k < k_end;
    float xv[MR];
    bool keep = false;
    const float limit = inside ? thresholds[k] : 0.f;
    const int off = (inside && tile_offsets) ? tile_offsets[k] : 0;
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      xv[m] = (inside && m < M) ? T::one(x[(size_t)m * K + k]) : 0.f;
      const bool kept_m = fabsf(xv[m]) > limit;
      xv[m] = kept_m ? xv[m] : 0.f;
      keep |= kept_m && inside && m < M;
    }
    const u32 ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = count;
    for (int w = 0; w < warp; ++w) before += warp_counts[w];
    if (keep) {
      const int pos = before + __popc(ballot & ((1u << lane) - 1u));
      idx[pos] = k;
      if (tile_offsets) offs[pos] = off;
#pragma unroll
      for (int m = 0; m < MR; ++m) xs[m][pos] = xv[m];
    }
#pragma unroll
    for (int w = 0; w < ACT_WARPS; ++w) count += warp_counts[w];
    __syncthreads();
  }
  return count;
}

// Cross-warp sum of acc[m][e] and the store: slot e*32 + lane of the 256-wide slice is output
// cols[slot]; into y directly when the launch has one K split, else into fp32 partials [splits, M, N].
template <class T, int MR>
__device__ __forceinline__ void finish_columns(float (&acc)[MR][8], float (*red)[ACT_WARPS][256],
                                               const int* __restrict__ cols, const u16* __restrict__ bias,
                                               u16* __restrict__ y, float* __restrict__ partial, int M, int N) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int e = 0; e < 8; ++e) red[m][warp][e * 32 + lane] = acc[m][e];
  __syncthreads();
  for (int slot = threadIdx.x; slot < MR * 256; slot += ACT_THREADS) {
    const int m = slot / 256, s = slot % 256;
    const int col = cols[s];
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < ACT_WARPS; ++w) sum += red[m][w][s];
    if (col < N && m < M) {
      if (gridDim.y == 1) {
        if (bias) sum += T::one(bias[col]);
        y[(size_t)m * N + col] = T::from_float(sum);
      } else {
        partial[((size_t)blockIdx.y * M + m) * N + col] = sum;
      }
    }
  }
}

template <class T, int MR>
__device__ __forceinline__ void actdense_body(const u16* __restrict__ x, const float* __restrict__ thresholds,
                                              const u16* __restrict__ wt, const u16* __restrict__ bias,
                                              u16* __restrict__ y, float* __restrict__ partial, int M, int N, int K,
                                              int kper) {
  __shared__ int idx[ACT_MAX_KPER];
  __shared__ float xs[MR][ACT_MAX_KPER];
  __shared__ float red[MR][ACT_WARPS][256];
  __shared__ int cols[256];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = blockIdx.x * 256 + lane * 8;
  const int count = compact_inputs<T, MR>(x, thresholds, M, K, blockIdx.y * kper, kper, idx, xs, nullptr, nullptr);
  for (int s = threadIdx.x; s < 256; s += ACT_THREADS) cols[s] = blockIdx.x * 256 + (s % 32) * 8 + s / 32;
  float acc[MR][8];
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[m][e] = 0.f;
  if (n0 < N) {
    constexpr int AHEAD = 8;  // weight rows in flight per lane
    for (int j0 = warp; j0 < count; j0 += ACT_WARPS * AHEAD) {
      U4 w[AHEAD];
#pragma unroll
      for (int a = 0; a < AHEAD; ++a) {
        const int j = j0 + ACT_WARPS * a;
        if (j < count) w[a] = ld_stream(wt + (size_t)idx[j] * N + n0);
      }
#pragma unroll
      for (int a = 0; a < AHEAD; ++a) {
        const int j = j0 + ACT_WARPS * a;
        if (j < count) {
#pragma unroll
          for (int m = 0; m < MR; ++m) {
            const float xv = xs[m][j];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              const u32 pair = word_of(w[a], q);
              acc[m][2 * q] = fmaf(T::lo(pair), xv, acc[m][2 * q]);
              acc[m][2 * q + 1] = fmaf(T::hi(pair), xv, acc[m][2 * q + 1]);
            }
          }
        }
      }
    }
  }
  finish_columns<T, MR>(acc, red, cols, bias, y, partial, M, N);
}

// W^T rows as bit planes along N: tile = 256 outputs, blockIdx.x = tile; lane l owns outputs
// tile*256 + w*32 + l. offsets_t [T, K]: the compaction gathers each kept row's offset.
template <class T, int MR>
__device__ __forceinline__ void actbm_body(const u16* __restrict__ x, const float* __restrict__ thresholds,
                                           const u16* __restrict__ values, const u32* __restrict__ words,
                                           const int* __restrict__ offsets_t, const u16* __restrict__ bias,
                                           u16* __restrict__ y, float* __restrict__ partial, int M, int N, int K,
                                           int kper) {
  __shared__ int idx[ACT_MAX_KPER];
  __shared__ int offs[ACT_MAX_KPER];
  __shared__ float xs[MR][ACT_MAX_KPER];
  __shared__ float red[MR][ACT_WARPS][256];
  __shared__ int cols[256];
  constexpr int AHEAD = 4;
  __shared__ __align__(16) u16 windows[ACT_WARPS][AHEAD][PLANE_WINDOW];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tile = blockIdx.x, tiles = gridDim.x;
  const int count = compact_inputs<T, MR>(x, thresholds, M, K, blockIdx.y * kper, kper, idx, xs,
                                          offsets_t + (size_t)tile * K, offs);
  for (int s = threadIdx.x; s < 256; s += ACT_THREADS) cols[s] = tile * 256 + s;
  float acc[MR][8];
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[m][e] = 0.f;
  for (int j0 = warp; j0 < count; j0 += ACT_WARPS * AHEAD) {
    PlaneTile planes[AHEAD];
#pragma unroll
    for (int a = 0; a < AHEAD; ++a) {
      const int j = min(j0 + ACT_WARPS * a, count - 1);
      plane_tile_load(planes[a], words + ((size_t)idx[j] * tiles + tile) * 8, values, offs[j], lane);
    }
#pragma unroll
    for (int a = 0; a < AHEAD; ++a) {
      const int j = j0 + ACT_WARPS * a;
      if (j < count) {  // uniform across the warp
        float wf[8];
        plane_tile_decode<T>(planes[a], windows[warp][a], lane, wf);
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          const float xv = xs[m][j];
#pragma unroll
          for (int w = 0; w < 8; ++w) acc[m][w] = fmaf(wf[w], xv, acc[m][w]);
        }
      }
    }
  }
  finish_columns<T, MR>(acc, red, cols, bias, y, partial, M, N);
}

template <class T>
__device__ __forceinline__ void splitsum_body(const float* __restrict__ partial, const u16* __restrict__ bias,
                                              u16* __restrict__ y, int M, int N, int splits) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= M * N) return;
  float sum = 0.f;
  for (int s = 0; s < splits; ++s) sum += partial[(size_t)s * M * N + i];
  if (bias) sum += T::one(bias[i % N]);
  y[i] = T::from_float(sum);
}

// ---------------------------------------------------------------------------------------------
// Instantiations: <family>_<dtype>_m<MR>_r<ROWS>_w<WARPS>[_h] (the Python side builds the names).
#define GEMV24_ONE(TN, T, MR, ROWS, WARPS, ACC16, MASK, SUFFIX)                                                \
  extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                    \
      gemv24_##TN##_m##MR##_r##ROWS##_w##WARPS##SUFFIX(const u16* x, const u16* values, const u16* meta,      \
                                                       const u16* bias, const float* thresholds, u16* y,      \
                                                       int M, int N, int K) {                                 \
    gemv24_body<T, MR, ROWS, WARPS, ACC16, MASK>(x, values, meta, bias, thresholds, y, M, N, K);             \
  }
// each variant twice: plain, and with the activation thresholds applied to x (suffix _t)
#define GEMV24(TN, T, MR, ROWS, WARPS, ACC16, SUFFIX)                                                          \
  GEMV24_ONE(TN, T, MR, ROWS, WARPS, ACC16, false, SUFFIX) GEMV24_ONE(TN, T, MR, ROWS, WARPS, ACC16, true, SUFFIX##_t)
#define GEMV24_ALL(TN, T)                                                                                      \
  GEMV24(TN, T, 1, 4, 4, false, ) GEMV24(TN, T, 1, 8, 4, false, ) GEMV24(TN, T, 1, 4, 8, false, )           \
  GEMV24(TN, T, 1, 2, 4, false, ) GEMV24(TN, T, 1, 8, 2, false, ) GEMV24(TN, T, 2, 4, 4, false, )           \
  GEMV24(TN, T, 2, 2, 4, false, ) GEMV24(TN, T, 2, 4, 4, true, _h) GEMV24(TN, T, 4, 4, 4, true, _h)         \
  GEMV24(TN, T, 4, 2, 4, true, _h) GEMV24(TN, T, 4, 2, 4, false, ) GEMV24(TN, T, 8, 2, 4, true, _h)         \
  GEMV24(TN, T, 8, 1, 4, true, _h)
GEMV24_ALL(f16, F16)
GEMV24_ALL(bf16, BF16)

#define GEMVBM(TN, T, MR, ROWS, WARPS)                                                                         \
  extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                    \
      gemvbm_##TN##_m##MR##_r##ROWS##_w##WARPS(const u16* x, const u16* values, const u32* words,             \
                                               const int* offsets, const u16* bias, u16* y, int M, int N,     \
                                               int K, int T_tiles) {                                          \
    gemvbm_body<T, MR, ROWS, WARPS>(x, values, words, offsets, bias, y, M, N, K, T_tiles);                   \
  }
#define GEMVBM_ALL(TN, T)                                                                                      \
  GEMVBM(TN, T, 1, 4, 4) GEMVBM(TN, T, 1, 2, 4) GEMVBM(TN, T, 1, 1, 4) GEMVBM(TN, T, 1, 2, 8)                \
  GEMVBM(TN, T, 2, 4, 4) GEMVBM(TN, T, 2, 2, 4) GEMVBM(TN, T, 4, 2, 4) GEMVBM(TN, T, 8, 1, 4)
GEMVBM_ALL(f16, F16)
GEMVBM_ALL(bf16, BF16)

#define ACTDENSE(TN, T, MR)                                                                                    \
  extern "C" __global__ void __launch_bounds__(ACT_THREADS)                                                   \
      actdense_##TN##_m##MR(const u16* x, const float* thresholds, const u16* wt, const u16* bias, u16* y,    \
                            float* partial, int M, int N, int K, int kper) {                                  \
    actdense_body<T, MR>(x, thresholds, wt, bias, y, partial, M, N, K, kper);                                \
  }
#define ACTBM(TN, T, MR)                                                                                       \
  extern "C" __global__ void __launch_bounds__(ACT_THREADS)                                                   \
      actbm_##TN##_m##MR(const u16* x, const float* thresholds, const u16* values, const u32* words,          \
                         const int* offsets_t, const u16* bias, u16* y, float* partial, int M, int N, int K,  \
                         int kper) {                                                                          \
    actbm_body<T, MR>(x, thresholds, values, words, offsets_t, bias, y, partial, M, N, K, kper);             \
  }
#define ACT_ALL(TN, T)                                                                                         \
  ACTDENSE(TN, T, 1) ACTDENSE(TN, T, 2) ACTDENSE(TN, T, 4) ACTBM(TN, T, 1) ACTBM(TN, T, 2)                    \
  extern "C" __global__ void splitsum_##TN(const float* partial, const u16* bias, u16* y, int M, int N,       \
                                           int splits) {                                                      \
    splitsum_body<T>(partial, bias, y, M, N, splits);                                                         \
  }
ACT_ALL(f16, F16)
ACT_ALL(bf16, BF16)

#define GEMV24TC_ONE(TN, T, RT, NT, WARPS, MASK, SUFFIX)                                                        \
  extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                    \
      gemv24tc_##TN##_r##RT##_n##NT##_w##WARPS##SUFFIX(const u16* x, const u16* values, const u16* meta,      \
                                                       const u16* bias, const float* thresholds, u16* y,      \
                                                       int M, int N, int K) {                                 \
    gemv24tc_body<T, RT, NT, WARPS, MASK>(x, values, meta, bias, thresholds, y, M, N, K);                    \
  }
#define GEMV24TC(TN, T, RT, NT, WARPS) GEMV24TC_ONE(TN, T, RT, NT, WARPS, false, ) GEMV24TC_ONE(TN, T, RT, NT, WARPS, true, _t)
#define GEMV24TC_ALL(TN, T)                                                                                    \
  GEMV24TC(TN, T, 1, 1, 4) GEMV24TC(TN, T, 2, 1, 4) GEMV24TC(TN, T, 1, 1, 8) GEMV24TC(TN, T, 2, 1, 8)        \
  GEMV24TC(TN, T, 1, 2, 4) GEMV24TC(TN, T, 2, 2, 4)
GEMV24TC_ALL(f16, F16)
GEMV24TC_ALL(bf16, BF16)
