// Fused kernels for the GPT-NeoX decode path on CUDA (see worker/src/model/fused.rs).
//
// A decode step is bound by reading the weights once; what candle's one-kernel-per-op path
// adds on top is ~30 small kernels a layer (bias adds, head splits, rotary halves, scatters,
// gathers, masks, casts, softmax), each a few microseconds. These replace them with four:
//   add_layernorm   the parallel residual (x + attn + mlp + bias) and the next layer's two
//                   layer norms, one block per row;
//   rope_write_kv   the QKV bias, rotary on q and k, and the new keys/values written into the
//                   paged KV arenas;
//   paged_attention softmax(q·Kᵀ·scale)·V for each new token and head, reading the sequence's
//                   keys through its block table (no gather, no mask);
//   bias_act        the MLP's bias and activation.
// and one for the matmuls themselves when a step has only a few rows:
//   gemv            y = act(x·Wᵀ + bias) for up to 3 rows of x, each weight read once with
//                   16-byte loads that bypass L1 (cuBLAS's batch-1 GEMVs stay further from
//                   the bandwidth floor and add a split-K reduction kernel).
// Every kernel computes in f32 and rounds once to the storage type. Pointers are __restrict__:
// without it every store (x_out, o1, ...) would order the loads after it, serialising a row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// What a value is once stored as T (the unfused path rounds after every op).
template <typename T> __device__ __forceinline__ float rounded(float x) { return to_f(from_f<T>(x)); }

// Sum (or max) over the block; `shm` holds 33 floats. Every thread gets the result.
template <bool MAX> __device__ float block_reduce(float v, float *shm) {
  for (int o = 16; o > 0; o >>= 1) {
    float u = __shfl_xor_sync(0xffffffff, v, o);
    v = MAX ? fmaxf(v, u) : v + u;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  __syncthreads();
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? shm[lane] : (MAX ? -INFINITY : 0.f);
    for (int o = 16; o > 0; o >>= 1) {
      float u = __shfl_xor_sync(0xffffffff, v, o);
      v = MAX ? fmaxf(v, u) : v + u;
    }
    if (lane == 0) shm[32] = v;
  }
  __syncthreads();
  return shm[32];
}

// Most elements of a row each thread of `add_layernorm` holds (blocks of 1024 threads).
#define LN_PER_THREAD 16

// One row per block. x_out = x + a + m + bias (each of a, m, bias optional; without any of
// them x_out is not written and x is the residual), then o1 = LN(x_out; w1, b1) and, if w2 is
// given, o2 = LN(x_out; w2, b2): the two layer norms of a parallel-residual layer share the
// row's statistics. The row stays in registers (h <= LN_PER_THREAD · blockDim.x).
template <typename T>
__device__ void add_layernorm(const T *__restrict__ x, const T *__restrict__ a, const T *__restrict__ m, const T *__restrict__ bias, T *__restrict__ x_out, const T *__restrict__ w1,
                              const T *__restrict__ b1, T *__restrict__ o1, const T *__restrict__ w2, const T *__restrict__ b2, T *__restrict__ o2, int h, float eps) {
  __shared__ float shm[33];
  const size_t row = blockIdx.x;
  x += row * h;
  if (a) a += row * h;
  if (m) m += row * h;
  if (x_out) x_out += row * h;
  o1 += row * h;
  if (o2) o2 += row * h;
  float vals[LN_PER_THREAD];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < LN_PER_THREAD; k++) {
    const int i = threadIdx.x + k * blockDim.x;
    float v = 0.f;
    if (i < h) {
      v = to_f(x[i]);
      if (x_out) {
        if (a) v += to_f(a[i]);
        if (m) v += to_f(m[i]);
        if (bias) v += to_f(bias[i]);
        x_out[i] = from_f<T>(v);
        v = rounded<T>(v);
      }
    }
    vals[k] = v;
    sum += v;
  }
  const float mean = block_reduce<false>(sum, shm) / h;
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < LN_PER_THREAD; k++) {
    const float d = vals[k] - mean;
    if (threadIdx.x + k * blockDim.x < h) sq += d * d;
  }
  const float rstd = rsqrtf(block_reduce<false>(sq, shm) / h + eps);
#pragma unroll
  for (int k = 0; k < LN_PER_THREAD; k++) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < h) {
      const float n = (vals[k] - mean) * rstd;
      o1[i] = from_f<T>(n * to_f(w1[i]) + to_f(b1[i]));
      if (o2) o2[i] = from_f<T>(n * to_f(w2[i]) + to_f(b2[i]));
    }
  }
}

// The MLP activations by code: 0 GELU (erf), 1 GELU (tanh), 2 ReLU; any other: none.
__device__ __forceinline__ float activate(float v, int act) {
  if (act == 0) return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
  if (act == 1) return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
  if (act == 2) return fmaxf(v, 0.f);
  return v;
}

// y = act(x + bias[col]) over `rows · cols` elements.
template <typename T> __device__ void bias_act(const T *__restrict__ x, const T *__restrict__ bias, T *__restrict__ y, size_t n, int cols, int act) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float v = to_f(x[i]);
    if (bias) v = rounded<T>(v + to_f(bias[i % cols]));
    y[i] = from_f<T>(activate(v, act));
  }
}

// A weight load: read once per step, so it skips L1 and leaves it to x, which every warp reads.
__device__ __forceinline__ uint4 load_streaming(const uint4 *p) {
#if __CUDA_ARCH__ >= 700
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
#else
  return __ldg(p);
#endif
}

// The 16 bytes of `raw` as 16 / sizeof(T) floats.
template <typename T> __device__ __forceinline__ void widen(const uint4 &raw, float *f) {
  const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
  for (int u = 0; u < 16 / (int)sizeof(T); u++) f[u] = to_f(e[u]);
}
template <> __device__ __forceinline__ void widen<__half>(const uint4 &raw, float *f) {
  const __half2 *e = reinterpret_cast<const __half2 *>(&raw);
#pragma unroll
  for (int u = 0; u < 4; u++) {
    const float2 p = __half22float2(e[u]);
    f[2 * u] = p.x;
    f[2 * u + 1] = p.y;
  }
}


// y [M, n] = act(x [M, k] · w [n, k]ᵀ + bias [n]). A warp owns C output columns (rows of w),
// its lanes striding over k in 16-byte chunks; each x chunk, read from L1, serves all C
// columns and each weight chunk all M rows, so the weights are read once and x M / C times
// per weight byte (L1, not HBM, limits a warp with one column and 8 rows). x, w 16-byte
// aligned and k a multiple of 16 / sizeof(T) (the host checks). Rounds as the unfused path
// does: the product to T, then the bias sum to T.
// LOADS: weight loads in flight per lane before any is used (times 16 bytes, times 32 lanes),
// with enough warps resident to cover HBM's latency at full bandwidth.
template <typename T, int M, int C, int LOADS>
__device__ void gemv(const T *__restrict__ x, const T *__restrict__ w, const T *__restrict__ bias, T *__restrict__ y, int n, int k, int act) {
  constexpr int V = 16 / sizeof(T);
  constexpr int B = LOADS / C > 0 ? LOADS / C : 1;
  const int lane = threadIdx.x % 32;
  const int col0 = (blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * C;
  if (col0 >= n) return;
  const int chunks = k / V;
  const uint4 *xr = reinterpret_cast<const uint4 *>(x);
  const uint4 *wr[C];
#pragma unroll
  for (int j = 0; j < C; j++) wr[j] = reinterpret_cast<const uint4 *>(w + (size_t)min(col0 + j, n - 1) * k);
  float acc[M][C];
#pragma unroll
  for (int r = 0; r < M; r++)
#pragma unroll
    for (int j = 0; j < C; j++) acc[r][j] = 0.f;
  auto accumulate = [&](const uint4 *raw, int c) {
    float wf[C][V], xf[V];
#pragma unroll
    for (int j = 0; j < C; j++) widen<T>(raw[j], wf[j]);
#pragma unroll
    for (int r = 0; r < M; r++) {
      widen<T>(__ldg(xr + (size_t)r * chunks + c), xf);
#pragma unroll
      for (int j = 0; j < C; j++)
#pragma unroll
        for (int u = 0; u < V; u++) acc[r][j] = fmaf(wf[j][u], xf[u], acc[r][j]);
    }
  };
  int c = lane;
  for (; c + 32 * (B - 1) < chunks; c += 32 * B) {
    uint4 raw[B][C];
#pragma unroll
    for (int b = 0; b < B; b++)
#pragma unroll
      for (int j = 0; j < C; j++) raw[b][j] = load_streaming(wr[j] + c + 32 * b);
#pragma unroll
    for (int b = 0; b < B; b++) accumulate(raw[b], c + 32 * b);
  }
  for (; c < chunks; c += 32) {
    uint4 raw[C];
#pragma unroll
    for (int j = 0; j < C; j++) raw[j] = load_streaming(wr[j] + c);
    accumulate(raw, c);
  }
#pragma unroll
  for (int r = 0; r < M; r++)
#pragma unroll
    for (int j = 0; j < C; j++) {
      float v = acc[r][j];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
      const int col = col0 + j;
      if (lane == 0 && col < n) {
        v = rounded<T>(v);
        if (bias) v = rounded<T>(v + to_f(bias[col]));
        y[(size_t)r * n + col] = from_f<T>(activate(v, act));
      }
    }
}

// Grid (tokens, ceil(heads · hd / blockDim)): one (head, dim) per thread. qkv: [tokens, heads, 3, hd] (HF's query_key_value rows), bias [heads·3·hd]
// or null; cos/sin [positions, rot/2]; pos/slot [tokens]: the token's position and its place in
// the arenas. Writes q (rotated) to q_out [tokens, heads, hd] and k (rotated), v to the
// arenas [heads, arena_len, hd].
template <typename T>
__device__ void rope_write_kv(const T *__restrict__ qkv, const T *__restrict__ bias, const T *__restrict__ cos, const T *__restrict__ sin, const uint32_t *__restrict__ pos,
                              const uint32_t *__restrict__ slot, T *__restrict__ q_out, T *__restrict__ k_arena, T *__restrict__ v_arena, int heads, int hd, int rot,
                              size_t arena_len) {
  const size_t t = blockIdx.x;
  const int half = rot / 2;
  const size_t p = pos[t], s = slot[t];
  const T *row = qkv + t * (size_t)heads * 3 * hd;
  const int idx = blockIdx.y * blockDim.x + threadIdx.x;
  if (idx < heads * hd) {
    const int h = idx / hd, d = idx % hd;
    const int base = h * 3 * hd;
    auto load = [&](int i) { return bias ? rounded<T>(to_f(row[i]) + to_f(bias[i])) : to_f(row[i]); };
    float q = load(base + d), k = load(base + hd + d);
    const float v = load(base + 2 * hd + d);
    if (d < rot) {
      const int f = d < half ? d : d - half;
      const float c = to_f(cos[p * half + f]), sn = to_f(sin[p * half + f]);
      const int other = d < half ? d + half : d - half;
      const float qo = load(base + other), ko = load(base + hd + other);
      // rotate_half: the first half takes -x2·sin, the second +x1·sin.
      q = d < half ? q * c - qo * sn : q * c + qo * sn;
      k = d < half ? k * c - ko * sn : k * c + ko * sn;
    }
    q_out[t * heads * hd + idx] = from_f<T>(q);
    const size_t at = ((size_t)h * arena_len + s) * hd + d;
    k_arena[at] = from_f<T>(k);
    v_arena[at] = from_f<T>(v);
  }
}

// Most head_dim the attention kernel takes (accumulators per lane: MAX_HD / 32).
#define MAX_HD 256

// A row of head_dim elements as floats, 16 bytes a load where the row allows it.
template <typename T> __device__ __forceinline__ float dot_row(const float *qs, const T *row, int hd) {
  constexpr int V = 16 / sizeof(T);
  float dot = 0.f;
  if (hd % V == 0) {
    const uint4 *r4 = reinterpret_cast<const uint4 *>(row);
#pragma unroll 4
    for (int c = 0; c < hd / V; c++) {
      const uint4 raw = r4[c];
      const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
      for (int u = 0; u < V; u++) dot += qs[c * V + u] * to_f(e[u]);
    }
  } else {
    for (int d = 0; d < hd; d++) dot += qs[d] * to_f(row[d]);
  }
  return dot;
}

// One (token, head) per block. q [tokens, heads, hd]; token t of sequence seq_of[t] sees the
// first len_of[t] tokens of that sequence, whose arena places come from its row of `blocks`
// ([sequences, max_blocks], `block_size` tokens each). out: [tokens, heads · hd].
// Scores: one key per thread (whole rows, 16-byte loads); values: each warp a share of the
// keys, lanes across the dims, then the warps' partial sums added.
// Dynamic shared memory: hd + 33 + max(len) + warps · hd floats.
template <typename T>
__device__ void paged_attention(const T *__restrict__ q, const T *__restrict__ k_arena, const T *__restrict__ v_arena, const uint32_t *__restrict__ blocks,
                                const uint32_t *__restrict__ seq_of, const uint32_t *__restrict__ len_of, T *__restrict__ out, int heads, int hd,
                                size_t arena_len, int max_blocks, int block_size, float scale) {
  extern __shared__ float smem[];
  const size_t t = blockIdx.x;
  const int h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int len = len_of[t];
  const uint32_t *table = blocks + (size_t)seq_of[t] * max_blocks;
  float *qs = smem, *red = qs + hd, *scores = red + 33, *partial = scores + len;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = to_f(q[(t * heads + h) * hd + d]) * scale;
  __syncthreads();
  const T *kh = k_arena + (size_t)h * arena_len * hd;
  const T *vh = v_arena + (size_t)h * arena_len * hd;
  auto place = [&](int j) { return (size_t)table[j / block_size] * block_size + j % block_size; };
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < len; j += blockDim.x) {
    const float dot = dot_row(qs, kh + place(j) * hd, hd);
    scores[j] = dot;
    mx = fmaxf(mx, dot);
  }
  mx = block_reduce<true>(mx, red);
  float sum = 0.f;
  for (int j = threadIdx.x; j < len; j += blockDim.x) {
    const float e = __expf(scores[j] - mx);
    scores[j] = e;
    sum += e;
  }
  sum = block_reduce<false>(sum, red);
  float acc[MAX_HD / 32];
#pragma unroll
  for (int i = 0; i < MAX_HD / 32; i++) acc[i] = 0.f;
#pragma unroll 4
  for (int j = warp; j < len; j += warps) {
    const T *vr = vh + place(j) * hd;
    const float pj = scores[j];
#pragma unroll
    for (int i = 0; i < MAX_HD / 32; i++) {
      const int d = lane + 32 * i;
      if (d < hd) acc[i] += pj * to_f(vr[d]);
    }
  }
#pragma unroll
  for (int i = 0; i < MAX_HD / 32; i++) {
    const int d = lane + 32 * i;
    if (d < hd) partial[warp * hd + d] = acc[i];
  }
  __syncthreads();
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float o = 0.f;
    for (int w = 0; w < warps; w++) o += partial[w * hd + d];
    out[t * heads * hd + (size_t)h * hd + d] = from_f<T>(o / sum);
  }
}

#define INSTANTIATE(T, S)                                                                                     \
  extern "C" __global__ void add_layernorm_##S(const T *x, const T *a, const T *m, const T *bias, T *x_out,    \
                                               const T *w1, const T *b1, T *o1, const T *w2, const T *b2,     \
                                               T *o2, int h, float eps) {                                     \
    add_layernorm<T>(x, a, m, bias, x_out, w1, b1, o1, w2, b2, o2, h, eps);                                   \
  }                                                                                                           \
  extern "C" __global__ void bias_act_##S(const T *x, const T *bias, T *y, size_t n, int cols, int act) {      \
    bias_act<T>(x, bias, y, n, cols, act);                                                                    \
  }                                                                                                           \
  extern "C" __global__ void rope_write_kv_##S(const T *qkv, const T *bias, const T *cos, const T *sin,         \
                                               const uint32_t *pos, const uint32_t *slot, T *q_out,           \
                                               T *k_arena, T *v_arena, int heads, int hd, int rot,            \
                                               size_t arena_len) {                                            \
    rope_write_kv<T>(qkv, bias, cos, sin, pos, slot, q_out, k_arena, v_arena, heads, hd, rot, arena_len);     \
  }                                                                                                           \
  extern "C" __global__ void paged_attention_##S(const T *q, const T *k_arena, const T *v_arena,               \
                                                 const uint32_t *blocks, const uint32_t *seq_of,              \
                                                 const uint32_t *len_of, T *out, int heads, int hd,           \
                                                 size_t arena_len, int max_blocks, int block_size,            \
                                                 float scale) {                                               \
    paged_attention<T>(q, k_arena, v_arena, blocks, seq_of, len_of, out, heads, hd, arena_len, max_blocks,    \
                       block_size, scale);                                                                    \
  }

// Columns a warp owns and loads in flight by row count, as measured on an H100 over the 20B
// shapes (worker/benches/gpu_gemv.rs, results/h100-session16): one column for a single row,
// two beyond (four lost at every count up to 7); 8 loads rather than 4 gained 1-2% at one and
// two rows. From 4 rows on cuBLAS is as fast (0.96-1.00x), so there are no kernels for them.
#define INSTANTIATE_GEMV(T, S, M, C, L)                                                                       \
  extern "C" __global__ void gemv##M##_##S(const T *x, const T *w, const T *bias, T *y, int n, int k, int act) { \
    gemv<T, M, C, L>(x, w, bias, y, n, k, act);                                                               \
  }
#define INSTANTIATE_GEMVS(T, S)                                                                               \
  INSTANTIATE_GEMV(T, S, 1, 1, 8)                                                                             \
  INSTANTIATE_GEMV(T, S, 2, 2, 8)                                                                             \
  INSTANTIATE_GEMV(T, S, 3, 2, 4)

INSTANTIATE_GEMVS(float, f32)
INSTANTIATE_GEMVS(__half, f16)
INSTANTIATE_GEMVS(__nv_bfloat16, bf16)

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)
