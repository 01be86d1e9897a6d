// Training kernels kept on the device between steps (issue 6, item 3; `qplc bench`):
// * `adam_multi`: one launch updates every trainable tensor (apex's multi_tensor_apply:
//   a table of tensors, one block per chunk of one tensor);
// * `init_random`: counter-hash random initialisation, so no multi-GB host tensor is made.
//
// Compiled by NVRTC apart from kernels.cu (runtime/src/cuda/adam.rs) so that this file needs
// no edit of the backend's kernel list. No CUDA headers: bf16 rounding is bit arithmetic and
// f16 conversion is one PTX instruction each way.
//
// Storage kinds (`StorageKind` in adam.rs): 0 = f32, 1 = bf16 bits in u16, 2 = f16 bits in u16.
// Rounding dtypes (`round_one` in runtime/src/train/adam.rs): 0 = f32, 1 = bf16, 2 = f16.

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned short u16;
typedef unsigned int u32;

// The half crate's bf16::from_f32: round to nearest even, NaN kept quiet.
__device__ __forceinline__ u16 f32_to_bf16_bits(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((x >> 16) | 0x0040u);
    u32 round_bit = 0x00008000u;
    if ((x & round_bit) != 0 && (x & (3u * round_bit - 1u)) != 0) return (u16)((x >> 16) + 1u);
    return (u16)(x >> 16);
}

__device__ __forceinline__ float bf16_bits_to_f32(u16 b) {
    return __uint_as_float(((u32)b) << 16);
}

__device__ __forceinline__ u16 f32_to_f16_bits(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float f16_bits_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float round_to(float x, int dtype) {
    if (dtype == 1) return bf16_bits_to_f32(f32_to_bf16_bits(x));
    if (dtype == 2) return f16_bits_to_f32(f32_to_f16_bits(x));
    return x;
}

__device__ __forceinline__ float load_as_f32(u64 ptr, int kind, i64 i) {
    if (kind == 1) return bf16_bits_to_f32(((const u16*)ptr)[i]);
    if (kind == 2) return f16_bits_to_f32(((const u16*)ptr)[i]);
    return ((const float*)ptr)[i];
}

__device__ __forceinline__ void store_f32(u64 ptr, int kind, i64 i, float x) {
    if (kind == 1) ((u16*)ptr)[i] = f32_to_bf16_bits(x);
    else if (kind == 2) ((u16*)ptr)[i] = f32_to_f16_bits(x);
    else ((float*)ptr)[i] = x;
}

// torch.lerp's two-sided form (train/adam.rs `lerp`); explicit _rn intrinsics keep NVRTC from
// contracting a multiply and an add into one FMA, which the host reference never does.
__device__ __forceinline__ float lerp_rn(float start, float end, float w) {
    if (fabsf(w) < 0.5f) return __fadd_rn(start, __fmul_rn(w, __fsub_rn(end, start)));
    return __fsub_rn(end, __fmul_rn(__fsub_rn(end, start), __fsub_rn(1.0f, w)));
}

// Static table, 5 words per tensor: m, v, kahan (0 if none), numel, dtype | state_kind << 8.
// Per-step table, 3 words per tensor: param, grad, param_kind | grad_kind << 8.
// `chunk_prefix[t]` = first chunk of tensor t; `chunk_prefix[n_tensors]` = number of chunks.
extern "C" __global__ void adam_multi(
    const u64* table, const u64* ptrs, const i64* chunk_prefix, int n_tensors, i64 chunk,
    float m_weight, float beta2, float one_minus_beta2, float neg_lr, float eps) {
    i64 block = blockIdx.x;
    // The tensor whose chunk this block is: binary search over the prefix.
    int lo = 0, hi = n_tensors - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (chunk_prefix[mid] <= block) lo = mid; else hi = mid - 1;
    }
    int t = lo;
    u64 m_ptr = table[5 * t + 0];
    u64 v_ptr = table[5 * t + 1];
    u64 c_ptr = table[5 * t + 2];
    i64 n = (i64)table[5 * t + 3];
    int dtype = (int)(table[5 * t + 4] & 0xFF);
    int state_kind = (int)((table[5 * t + 4] >> 8) & 0xFF);
    u64 p_ptr = ptrs[3 * t + 0];
    u64 g_ptr = ptrs[3 * t + 1];
    int p_kind = (int)(ptrs[3 * t + 2] & 0xFF);
    int g_kind = (int)((ptrs[3 * t + 2] >> 8) & 0xFF);
    i64 start = (block - chunk_prefix[t]) * chunk;
    i64 end = start + chunk < n ? start + chunk : n;
    for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        float g = load_as_f32(g_ptr, g_kind, i);
        float m = load_as_f32(m_ptr, state_kind, i);
        float v = load_as_f32(v_ptr, state_kind, i);
        float mi = round_to(lerp_rn(m, g, m_weight), dtype);
        float vi = round_to(
            __fadd_rn(round_to(__fmul_rn(v, beta2), dtype),
                      __fmul_rn(__fmul_rn(one_minus_beta2, g), g)),
            dtype);
        float d = round_to(__fadd_rn(round_to(__fsqrt_rn(vi), dtype), eps), dtype);
        float u = __fdiv_rn(__fmul_rn(neg_lr, mi), d);
        float p = load_as_f32(p_ptr, p_kind, i);
        if (c_ptr != 0) {
            // Kahan-compensated add (train/adam.rs `add_update`).
            float c = load_as_f32(c_ptr, state_kind, i);
            c = round_to(__fadd_rn(c, u), dtype);
            float old = p;
            p = round_to(__fadd_rn(old, c), dtype);
            c = round_to(__fadd_rn(c, round_to(__fsub_rn(old, p), dtype)), dtype);
            store_f32(c_ptr, state_kind, i, c);
        } else {
            p = round_to(__fadd_rn(p, u), dtype);
        }
        store_f32(m_ptr, state_kind, i, mi);
        store_f32(v_ptr, state_kind, i, vi);
        store_f32(p_ptr, p_kind, i, p);
    }
}

// SplitMix64's finaliser (bench/random.rs `mix`): a counter hash, so element i's value does
// not depend on how the grid is laid out.
__device__ __forceinline__ u64 mix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// mode 0: normal(0, a) by Box-Muller; 1: uniform [a, b); 2: constant a. The value is rounded
// to `dtype` and stored in `kind` (bench/random.rs `sample` is the host twin).
extern "C" __global__ void init_random(
    u64 ptr, int kind, i64 n, u64 seed, int mode, float a, float b, int dtype) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (i64)gridDim.x * blockDim.x) {
        u64 h = mix64(seed ^ ((u64)i * 0xD1B54A32D192ED03ull));
        float u1 = (float)((h >> 40) + 1ull) * (1.0f / 16777216.0f);
        float u2 = (float)((h >> 16) & 0xFFFFFFull) * (1.0f / 16777216.0f);
        float x;
        if (mode == 0) x = a * sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
        else if (mode == 1) x = __fadd_rn(a, __fmul_rn(__fsub_rn(b, a), u2));
        else x = a;
        store_f32(ptr, kind, i, round_to(x, dtype));
    }
}
