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

// The half crate's bf16::from_f32: round to nearest even, NaN kept quiet. One `cvt` from
// sm_80 on: the optimiser rounds ~10 times an element, and the bit version is ~7 instructions.
__device__ __forceinline__ u16 f32_to_bf16_bits(float f) {
#if __CUDA_ARCH__ >= 800
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    u32 x = __float_as_uint(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((x >> 16) | 0x0040u);
    u32 round_bit = 0x00008000u;
    if ((x & round_bit) != 0 && (x & (3u * round_bit - 1u)) != 0) return (u16)((x >> 16) + 1u);
    return (u16)(x >> 16);
#endif
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
// Eight consecutive elements as one 16-byte load/store (two for f32): a 2-byte load per
// thread keeps too few bytes in flight to reach memory speed. `i` is a multiple of 8 and the
// tensor's addresses 16-byte aligned (`adam_multi` checks, else it takes the scalar loop).
__device__ __forceinline__ void load8(u64 ptr, int kind, i64 i, float* f) {
    if (kind == 0) {
        const float4* p = (const float4*)((const float*)ptr + i);
        float4 a = p[0], b = p[1];
        f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
        f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
        return;
    }
    uint4 w = *(const uint4*)((const u16*)ptr + i);
    u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        u16 lo = (u16)(words[j] & 0xFFFFu), hi = (u16)(words[j] >> 16);
        f[2 * j] = kind == 1 ? bf16_bits_to_f32(lo) : f16_bits_to_f32(lo);
        f[2 * j + 1] = kind == 1 ? bf16_bits_to_f32(hi) : f16_bits_to_f32(hi);
    }
}

__device__ __forceinline__ void store8(u64 ptr, int kind, i64 i, const float* f) {
    if (kind == 0) {
        float4* p = (float4*)((float*)ptr + i);
        p[0] = make_float4(f[0], f[1], f[2], f[3]);
        p[1] = make_float4(f[4], f[5], f[6], f[7]);
        return;
    }
    u32 words[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        u32 lo = kind == 1 ? f32_to_bf16_bits(f[2 * j]) : f32_to_f16_bits(f[2 * j]);
        u32 hi = kind == 1 ? f32_to_bf16_bits(f[2 * j + 1]) : f32_to_f16_bits(f[2 * j + 1]);
        words[j] = lo | (hi << 16);
    }
    *(uint4*)((u16*)ptr + i) = make_uint4(words[0], words[1], words[2], words[3]);
}

struct AdamScalars {
    float m_weight, beta2, one_minus_beta2, neg_lr, eps;
};

// One element's update (train/adam.rs `adam_update`); `c` is null without Kahan summation.
__device__ __forceinline__ void adam_one(float g, float* m, float* v, float* p, float* c, int dtype,
                                         const AdamScalars& k) {
    float mi = round_to(lerp_rn(*m, g, k.m_weight), dtype);
    float vi = round_to(
        __fadd_rn(round_to(__fmul_rn(*v, k.beta2), dtype),
                  __fmul_rn(__fmul_rn(k.one_minus_beta2, g), g)),
        dtype);
    float d = round_to(__fadd_rn(round_to(__fsqrt_rn(vi), dtype), k.eps), dtype);
    float u = __fdiv_rn(__fmul_rn(k.neg_lr, mi), d);
    if (c) {
        // Kahan-compensated add (train/adam.rs `add_update`).
        float ci = round_to(__fadd_rn(*c, u), dtype);
        float old = *p;
        *p = round_to(__fadd_rn(old, ci), dtype);
        *c = round_to(__fadd_rn(ci, round_to(__fsub_rn(old, *p), dtype)), dtype);
    } else {
        *p = round_to(__fadd_rn(*p, u), dtype);
    }
    *m = mi;
    *v = vi;
}

// Static table, 5 words per tensor: m, v, kahan (0 if none), numel, dtype | state_kind << 8.
// Per-step table, 3 words per tensor: param, grad, param_kind | grad_kind << 8.
// `chunk_prefix[t]` = first chunk of tensor t; `chunk_prefix[n_tensors]` = number of chunks.
// `chunk` is a multiple of 8.
extern "C" __global__ void adam_multi(
    const u64* table, const u64* ptrs, const i64* chunk_prefix, int n_tensors, i64 chunk,
    float m_weight, float beta2, float one_minus_beta2, float neg_lr, float eps) {
    const AdamScalars k = {m_weight, beta2, one_minus_beta2, neg_lr, eps};
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
    i64 vec_end = start;
    if (((m_ptr | v_ptr | c_ptr | p_ptr | g_ptr) & 15) == 0) {
        vec_end = start + (end - start) / 8 * 8;
        for (i64 i = start + 8 * (i64)threadIdx.x; i < vec_end; i += 8 * (i64)blockDim.x) {
            float g[8], m[8], v[8], p[8], c[8];
            load8(g_ptr, g_kind, i, g);
            load8(m_ptr, state_kind, i, m);
            load8(v_ptr, state_kind, i, v);
            load8(p_ptr, p_kind, i, p);
            if (c_ptr != 0) load8(c_ptr, state_kind, i, c);
#pragma unroll
            for (int j = 0; j < 8; ++j)
                adam_one(g[j], &m[j], &v[j], &p[j], c_ptr != 0 ? &c[j] : nullptr, dtype, k);
            if (c_ptr != 0) store8(c_ptr, state_kind, i, c);
            store8(m_ptr, state_kind, i, m);
            store8(v_ptr, state_kind, i, v);
            store8(p_ptr, p_kind, i, p);
        }
    }
    for (i64 i = vec_end + threadIdx.x; i < end; i += blockDim.x) {
        float g = load_as_f32(g_ptr, g_kind, i);
        float m = load_as_f32(m_ptr, state_kind, i);
        float v = load_as_f32(v_ptr, state_kind, i);
        float p = load_as_f32(p_ptr, p_kind, i);
        float c = c_ptr != 0 ? load_as_f32(c_ptr, state_kind, i) : 0.0f;
        adam_one(g, &m, &v, &p, c_ptr != 0 ? &c : nullptr, dtype, k);
        if (c_ptr != 0) store_f32(c_ptr, state_kind, i, c);
        store_f32(m_ptr, state_kind, i, m);
        store_f32(v_ptr, state_kind, i, v);
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
