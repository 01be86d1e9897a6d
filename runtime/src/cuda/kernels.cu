// Kernels of the CUDA backend (runtime/src/cuda), compiled by NVRTC when the backend starts,
// twice: once with STORAGE_BF16 = 0 (float storage, kernel names `*_f32`) and once with
// STORAGE_BF16 = 1 (bf16 storage, 2 bytes an element, names `*_bf16`). One source keeps the
// two storage kinds computing the same function: a kernel loads its storage type to float
// (`ld`), computes in f32 (f64 where the CPU reference does) and stores with
// round-to-nearest-even (`st`), which is exactly the rounding the CPU backend applies once
// after each op. Scratch arrays (statistics, log-sum-exps, accumulators) stay float/double.
//
// Integer kernels and the f16 rounding pass exist in the float build only (f16 tensors are
// held as f32 and rounded once after each op, as on the CPU).
//
// Every kernel uses a grid-stride loop over `long long` indices so that any launch size is
// correct and element offsets never overflow 32 bits (logits [4096, 128256] have 5.3e8
// elements, gradient tables [128256, 4096] as many).

#ifndef STORAGE_BF16
#define STORAGE_BF16 0
#endif

// FUSED_PRELUDE_BEGIN (cuda/fused.rs copies the element functions from here to the END mark)
// bf16 bits of x rounded to nearest even, as `half::bf16::from_f32`: one `cvt` from sm_80 on
// (the bit operations below take ~7 instructions, which elementwise kernels feel); a NaN
// becomes a quiet NaN either way.
__device__ __forceinline__ unsigned short bf16_rn(float x) {
#if __CUDA_ARCH__ >= 800
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
#else
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
#endif
}

// Round to nearest even at bf16 precision, as `half::bf16::from_f32` (NaN stays NaN).
__device__ __forceinline__ float round_bf16(float x) {
    return __uint_as_float(((unsigned int)bf16_rn(x)) << 16);
}

__device__ __forceinline__ float round_f16(float x) {
    unsigned short h;
    float r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
}

__device__ __forceinline__ bool visible(long long i, long long j, long long window) {
    return j <= i && (window < 0 || i - j < window);
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// Unary op codes: the order of `qplc_ops::UnaryOp`.
__device__ float unary_fn(int op, float x) {
    switch (op) {
    case 0: return -x;
    case 1: return expf(x);
    case 2: return logf(x);
    case 3: return tanhf(x);
    case 4: return sqrtf(x);
    case 5: return 1.0f / sqrtf(x);
    case 6: return 1.0f / x;
    case 7: return x * x;
    case 8: return fmaxf(x, 0.0f);
    case 9: return sigmoidf_(x);
    case 10: return x * sigmoidf_(x);
    case 11: {
        double d = (double)x;
        return (float)(0.5 * d * (1.0 + erf(d * 0.70710678118654752440)));
    }
    default: {
        const float k = 0.7978846f;
        return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
    }
    }
}

__device__ float unary_deriv(int op, float x) {
    switch (op) {
    case 0: return -1.0f;
    case 1: return expf(x);
    case 2: return 1.0f / x;
    case 3: { float t = tanhf(x); return 1.0f - t * t; }
    case 4: return 0.5f / sqrtf(x);
    case 5: return -0.5f / (x * sqrtf(x));
    case 6: return -1.0f / (x * x);
    case 7: return 2.0f * x;
    case 8: return x > 0.0f ? 1.0f : 0.0f;
    case 9: { float s = sigmoidf_(x); return s * (1.0f - s); }
    case 10: { float s = sigmoidf_(x); return s * (1.0f + x * (1.0f - s)); }
    case 11: {
        double d = (double)x;
        double cdf = 0.5 * (1.0 + erf(d * 0.70710678118654752440));
        double pdf = exp(-0.5 * d * d) / sqrt(2.0 * 3.14159265358979323846);
        return (float)(cdf + d * pdf);
    }
    default: {
        const float k = 0.7978846f;
        float t = tanhf(k * (x + 0.044715f * x * x * x));
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * x * x);
    }
    }
}

// Binary op codes: the order of `qplc_ops::BinaryOp`.
__device__ __forceinline__ float binary_fn(int op, float a, float b) {
    switch (op) {
    case 0: return a + b;
    case 1: return a - b;
    case 2: return a * b;
    case 3: return a / b;
    case 4: return fmaxf(a, b);
    default: return fminf(a, b);
    }
}

__device__ __forceinline__ float binary_partial(int op, int wrt, float a, float b) {
    switch (op) {
    case 0: return 1.0f;
    case 1: return wrt == 0 ? 1.0f : -1.0f;
    case 2: return wrt == 0 ? b : a;
    case 3: return wrt == 0 ? 1.0f / b : -a / (b * b);
    case 4: return (a >= b) == (wrt == 0) ? 1.0f : 0.0f;
    default: return (a <= b) == (wrt == 0) ? 1.0f : 0.0f;
    }
}

// FUSED_PRELUDE_END


#if STORAGE_BF16
// bf16 bits; no cuda_bf16.h so that NVRTC needs no include path.
typedef unsigned short S;
// Data movement copies storage words untouched.
typedef unsigned short W;
#define SFX(name) name##_bf16
__device__ __forceinline__ float ld(S x) { return __uint_as_float(((unsigned int)x) << 16); }
// Round to nearest even, as `half::bf16::from_f32` (NaN stays a quiet NaN): `bf16_rn` below.
__device__ __forceinline__ S st(float x) { return bf16_rn(x); }
#else
typedef float S;
typedef unsigned int W;
#define SFX(name) name##_f32
__device__ __forceinline__ float ld(S x) { return x; }
__device__ __forceinline__ S st(float x) { return x; }
#endif

// Four consecutive storage elements as one load / store (8 bytes of bf16, 16 of f32), for
// the memory-bound row kernels; the address must be a multiple of the vector size.
#if STORAGE_BF16
typedef uint2 V4;
__device__ __forceinline__ void ld4(const S* p, float* f) {
    uint2 v = *(const uint2*)p;
    f[0] = __uint_as_float(v.x << 16);
    f[1] = __uint_as_float(v.x & 0xffff0000u);
    f[2] = __uint_as_float(v.y << 16);
    f[3] = __uint_as_float(v.y & 0xffff0000u);
}
__device__ __forceinline__ void st4(S* p, const float* f) {
    uint2 v;
    v.x = (unsigned int)st(f[0]) | ((unsigned int)st(f[1]) << 16);
    v.y = (unsigned int)st(f[2]) | ((unsigned int)st(f[3]) << 16);
    *(uint2*)p = v;
}
#else
__device__ __forceinline__ void ld4(const S* p, float* f) {
    float4 v = *(const float4*)p;
    f[0] = v.x;
    f[1] = v.y;
    f[2] = v.z;
    f[3] = v.w;
}
__device__ __forceinline__ void st4(S* p, const float* f) { *(float4*)p = make_float4(f[0], f[1], f[2], f[3]); }
#endif

#define MAXR 8
#define NEG_INF __int_as_float(0xff800000)
#define LOOP(i, n) for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)blockDim.x * gridDim.x)

// Shapes for broadcasting / permuting: `dims` of the output, and for up to two inputs the
// stride of each output axis in that input (0 on broadcast axes).
struct Strided {
    long long rank;
    long long dims[MAXR];
    long long sa[MAXR];
    long long sb[MAXR];
};

__device__ __forceinline__ void offsets(const Strided& s, long long idx, long long* ia, long long* ib) {
    // Rank 0: both inputs have the output's layout (launch.rs `Strided::new`).
    if (s.rank == 0) {
        *ia = idx;
        *ib = idx;
        return;
    }
    long long a = 0, b = 0;
    for (int d = (int)s.rank - 1; d >= 0; --d) {
        long long c = idx % s.dims[d];
        idx /= s.dims[d];
        a += c * s.sa[d];
        b += c * s.sb[d];
    }
    *ia = a;
    *ib = b;
}


// Strided row copies for slice and concat: `rows` rows of `width` words T from x (row pitch
// `xs` words, starting at word `xo`) to o (pitch `os`, starting at `oo`). The host picks the
// widest T (16, 8, 4 bytes or the storage word) that divides every width and offset: one
// 2-byte word per thread left most of the memory bandwidth unused (notes/CUDA.md,
// "Memory-bound kernels").
template <typename T>
__device__ __forceinline__ void copy_rows(const void* xv, void* ov, long long rows, long long width, long long xs,
                                          long long xo, long long os, long long oo) {
    const T* x = (const T*)xv;
    T* o = (T*)ov;
    LOOP(i, rows * width) {
        long long r = i / width, c = i - r * width;
        o[r * os + oo + c] = x[r * xs + xo + c];
    }
}

// `wb` is the word size in bytes; the pitches and offsets count words of that size.
template <typename W0>
__device__ __forceinline__ void copy_rows_any(const void* x, void* o, long long rows, long long width, long long xs,
                                              long long xo, long long os, long long oo, int wb) {
    switch (wb) {
    case 16: copy_rows<uint4>(x, o, rows, width, xs, xo, os, oo); break;
    case 8: copy_rows<uint2>(x, o, rows, width, xs, xo, os, oo); break;
    case 4: copy_rows<unsigned int>(x, o, rows, width, xs, xo, os, oo); break;
    default: copy_rows<W0>(x, o, rows, width, xs, xo, os, oo); break;
    }
}

extern "C" {

#if !STORAGE_BF16
// Float storage only. mode 1: bf16, mode 2: f16 (a bf16/f16 value held as f32, used when
// an op mixes dtypes and runs on widened operands, and for every f16 result).
__global__ void round_storage(float* x, long long n, int mode) {
    LOOP(i, n) { x[i] = mode == 1 ? round_bf16(x[i]) : round_f16(x[i]); }
}

__global__ void fill_i32(int* o, long long n, int v) { LOOP(i, n) o[i] = v; }

// Integer arithmetic wraps (done in unsigned), division truncates; zero divisors are refused
// on the host first.
__global__ void binary_i32(const int* a, const int* b, int* o, long long n, Strided s, int op) {
    LOOP(i, n) {
        long long ia, ib;
        offsets(s, i, &ia, &ib);
        int x = a[ia], y = b[ib];
        int r;
        switch (op) {
        case 0: r = (int)((unsigned)x + (unsigned)y); break;
        case 1: r = (int)((unsigned)x - (unsigned)y); break;
        case 2: r = (int)((unsigned)x * (unsigned)y); break;
        case 3: r = (x == (-2147483647 - 1) && y == -1) ? x : x / y; break;
        case 4: r = x > y ? x : y; break;
        default: r = x < y ? x : y; break;
        }
        o[i] = r;
    }
}

// `o += b` per row, in place: the f32 product's bias (no rounding to do in f32 storage).
__global__ void bias_inplace_f32(float* o, const float* b, long long rows, long long n) {
    LOOP(i, rows * n) o[i] += b[i % n];
}
#else
// Storage conversions between the two builds' kinds: bf16 → f32 is exact; f32 → bf16
// rounds to nearest even.
__global__ void widen_bf16(const S* x, float* o, long long n) { LOOP(i, n) o[i] = ld(x[i]); }
__global__ void narrow_bf16(const float* x, S* o, long long n) { LOOP(i, n) o[i] = st(x[i]); }
#endif

__global__ void SFX(fill)(S* o, long long n, float v) {
    S s = st(v);
    LOOP(i, n) o[i] = s;
}

__global__ void SFX(unary)(const S* x, S* o, long long n, int op) {
    LOOP(i, n) o[i] = st(unary_fn(op, ld(x[i])));
}

__global__ void SFX(unary_backward)(const S* x, const S* g, S* o, long long n, int op) {
    LOOP(i, n) o[i] = st(ld(g[i]) * unary_deriv(op, ld(x[i])));
}

// kind 0: x·c, 1: x + c, 2: c·tanh(x/c).
__global__ void SFX(scalar_map)(const S* x, S* o, long long n, int kind, float c) {
    LOOP(i, n) {
        float v = ld(x[i]);
        o[i] = st(kind == 0 ? v * c : (kind == 1 ? v + c : c * tanhf(v / c)));
    }
}

__global__ void SFX(binary)(const S* a, const S* b, S* o, long long n, Strided s, int op) {
    LOOP(i, n) {
        long long ia, ib;
        offsets(s, i, &ia, &ib);
        o[i] = st(binary_fn(op, ld(a[ia]), ld(b[ib])));
    }
}

__global__ void SFX(binary_backward)(const S* a, const S* b, const S* g, S* o, long long n, Strided s, int op,
                                     int wrt) {
    LOOP(i, n) {
        long long ia, ib;
        offsets(s, i, &ia, &ib);
        o[i] = st(binary_partial(op, wrt, ld(a[ia]), ld(b[ib])) * ld(g[i]));
    }
}

// Data movement on storage words (the float build's 32-bit words also move i32 tensors).
// `s.sa` holds the input stride of each output axis.
__global__ void SFX(gather)(const W* x, W* o, long long n, Strided s) {
    LOOP(i, n) {
        long long ia, ib;
        offsets(s, i, &ia, &ib);
        o[i] = x[ia];
    }
}

// o viewed as [rows, os] words; x as [rows, width] is placed at word `oo` of each row
// (concat). Words of `wb` bytes, see copy_rows.
__global__ void SFX(place)(const W* x, W* o, long long rows, long long width, long long os, long long oo, int wb) {
    copy_rows_any<W>(x, o, rows, width, width, 0, os, oo, wb);
}

// x viewed as [rows, xs] words; `width` words from word `xo` of each row (slice). Words of
// `wb` bytes, see copy_rows.
__global__ void SFX(slice)(const W* x, W* o, long long rows, long long width, long long xs, long long xo, int wb) {
    copy_rows_any<W>(x, o, rows, width, xs, xo, width, 0, wb);
}

// Float → integer truncates toward zero and saturates, NaN → 0 (Rust `as i32`).
__global__ void SFX(cast_to_i32)(const S* x, int* o, long long n) {
    LOOP(i, n) {
        float v = ld(x[i]);
        int r;
        if (v != v) r = 0;
        else if (v >= 2147483648.0f) r = 2147483647;
        else if (v <= -2147483648.0f) r = -2147483647 - 1;
        else r = (int)v;
        o[i] = r;
    }
}

__global__ void SFX(cast_from_i32)(const int* x, S* o, long long n) { LOOP(i, n) o[i] = st((float)x[i]); }

// `o = acc + b` per row: the bias added to the f32 product before the one rounding.
__global__ void SFX(bias_rows)(const float* acc, const S* b, S* o, long long rows, long long n) {
    LOOP(i, rows * n) o[i] = st(acc[i] + ld(b[i % n]));
}

__global__ void SFX(embedding)(const int* ids, const S* table, S* o, long long t, long long h) {
    LOOP(i, t * h) {
        long long r = i / h, c = i % h;
        o[i] = table[(long long)ids[r] * h + c];
    }
}

// One block per distinct id: `order` lists the positions sorted by id (stable, so each id's
// positions stay in sequence order) and `starts[k]..starts[k+1]` are id k's; each thread
// sums its columns over them in that order in f32 (deterministic, as the CPU kernel) and
// stores the sum rounded once. Rows of ids that never occur are zeroed by the caller. One
// thread per column summing all positions had left the GPU nearly idle (2k threads).
__global__ void SFX(embedding_backward)(const int* ids, const int* order, const int* starts, long long groups,
                                        const S* g, S* o, long long h) {
    for (long long k = blockIdx.x; k < groups; k += gridDim.x) {
        int b = starts[k], e = starts[k + 1];
        long long id = ids[order[b]];
        for (long long c = threadIdx.x; c < h; c += blockDim.x) {
            float acc = 0.0f;
            for (int q = b; q < e; ++q) acc += ld(g[(long long)order[q] * h + c]);
            o[id * h + c] = st(acc);
        }
    }
}

// Softmax / log-softmax along the last axis, one thread per row.
__global__ void SFX(softmax_rows)(const S* x, S* o, long long rows, long long h, int log_) {
    LOOP(r, rows) {
        const S* xr = x + r * h;
        S* orow = o + r * h;
        float m = NEG_INF;
        for (long long j = 0; j < h; ++j) m = fmaxf(m, ld(xr[j]));
        float s = 0.0f;
        for (long long j = 0; j < h; ++j) s += expf(ld(xr[j]) - m);
        if (log_) {
            float lse = (float)log((double)s);
            for (long long j = 0; j < h; ++j) orow[j] = st(ld(xr[j]) - m - lse);
        } else {
            float inv = 1.0f / s;
            for (long long j = 0; j < h; ++j) orow[j] = st(expf(ld(xr[j]) - m) * inv);
        }
    }
}

// op 0 sum, 1 mean, 2 max; x viewed as [outer, len, inner].
__global__ void SFX(reduce)(const S* x, S* o, long long outer, long long len, long long inner, int op) {
    LOOP(i, outer * inner) {
        long long oi = i / inner, ii = i % inner;
        const S* base = x + oi * len * inner + ii;
        if (op == 2) {
            float m = NEG_INF;
            for (long long a = 0; a < len; ++a) m = fmaxf(m, ld(base[a * inner]));
            o[i] = st(m);
        } else {
            double s = 0.0;
            for (long long a = 0; a < len; ++a) s += (double)ld(base[a * inner]);
            o[i] = st(op == 1 ? (float)(s / (double)len) : (float)s);
        }
    }
}

// Norms: one block of NORM_THREADS per row (rows are the hidden size, thousands wide), row
// statistics summed in f64 across the block as the CPU sums them in f64; the weight
// gradients take per-row statistics computed once (`*_row_stats`) and sum each column over
// the rows in order in f64, one thread per column.
#define NORM_THREADS 256
#define NORM_WG_ROWS 64

// Σ of `v` over the block (all threads get it); `sh` is NORM_THREADS doubles of shared memory.
// Warp shuffles, then one warp over the warps' sums: two barriers instead of one per halving.
// Needs a block of whole warps, every thread calling.
__device__ double block_sum(double v, double* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? sh[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    double r = sh[32];
    __syncthreads();
    return r;
}

__device__ float SFX(rms_inv)(const S* x, long long h, float eps, double* sh) {
    double s = 0.0;
    for (long long j = threadIdx.x; j < h; j += blockDim.x) {
        double v = (double)ld(x[j]);
        s += v * v;
    }
    s = block_sum(s, sh);
    float ms = (float)(s / (double)h);
    return 1.0f / sqrtf(ms + eps);
}

__device__ void SFX(ln_stats)(const S* x, long long h, double eps, float* mean_out, float* r_out, double* sh) {
    double mean = 0.0;
    for (long long j = threadIdx.x; j < h; j += blockDim.x) mean += (double)ld(x[j]);
    mean = block_sum(mean, sh) / (double)h;
    double var = 0.0;
    for (long long j = threadIdx.x; j < h; j += blockDim.x) {
        double d = (double)ld(x[j]) - mean;
        var += d * d;
    }
    var = block_sum(var, sh) / (double)h;
    *mean_out = (float)mean;
    *r_out = (float)(1.0 / sqrt(var + eps));
}

#define ROWS(r, rows) for (long long r = blockIdx.x; r < (rows); r += gridDim.x)

// Rows of h = 16·blockDim (the host launches h/16 threads when h is a multiple of 512, up to
// 16384: every Llama hidden size) take the vector path: each thread loads its NORM_VEC
// chunks of 4 elements (chunk q = tid + k·blockDim) with unconditional 8-/16-byte loads, all
// in flight at once, keeps them in registers for the output pass, and the row is read once.
// The scalar loop (one 2-byte load in flight per thread, the row read twice) ran at a
// quarter of memory speed; a register cache with guarded scalar loads was slower still
// (the guards kept the loads apart). Other widths take the scalar loops. The f64 sums run
// in another order than the scalar loop's (both differ from the CPU's sequential order).
#define NORM_VEC 4

// 1/rms of the row held in `xv` (4·NORM_VEC elements per thread).
__device__ __forceinline__ float rms_inv_vec(const float* xv, long long h, float eps, double* sh) {
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < 4 * NORM_VEC; ++k) {
        double v = (double)xv[k];
        s += v * v;
    }
    s = block_sum(s, sh);
    float ms = (float)(s / (double)h);
    return 1.0f / sqrtf(ms + eps);
}

__global__ void SFX(rms_norm)(const S* x, const S* w, S* o, long long rows, long long h, float eps,
                              float offset) {
    __shared__ double sh[NORM_THREADS];
    if (h == 4 * NORM_VEC * (long long)blockDim.x) {
        ROWS(r, rows) {
            const S* xr = x + r * h;
            float xv[4 * NORM_VEC];
#pragma unroll
            for (int k = 0; k < NORM_VEC; ++k) ld4(xr + 4 * (threadIdx.x + k * blockDim.x), xv + 4 * k);
            float inv = rms_inv_vec(xv, h, eps, sh);
#pragma unroll
            for (int k = 0; k < NORM_VEC; ++k) {
                long long j = 4 * (threadIdx.x + k * blockDim.x);
                float wv[4], y[4];
                ld4(w + j, wv);
#pragma unroll
                for (int q = 0; q < 4; ++q) y[q] = xv[4 * k + q] * inv * (offset + wv[q]);
                st4(o + r * h + j, y);
            }
        }
        return;
    }
    ROWS(r, rows) {
        const S* xr = x + r * h;
        float inv = SFX(rms_inv)(xr, h, eps, sh);
        for (long long j = threadIdx.x; j < h; j += blockDim.x)
            o[r * h + j] = st(ld(xr[j]) * inv * (offset + ld(w[j])));
    }
}

__global__ void SFX(layer_norm)(const S* x, const S* w, const S* b, int has_b, S* o, long long rows, long long h,
                                double eps) {
    __shared__ double sh[NORM_THREADS];
    ROWS(r, rows) {
        const S* xr = x + r * h;
        float mean, inv;
        SFX(ln_stats)(xr, h, eps, &mean, &inv, sh);
        for (long long j = threadIdx.x; j < h; j += blockDim.x) {
            float y = (ld(xr[j]) - mean) * inv * ld(w[j]);
            o[r * h + j] = st(has_b ? y + ld(b[j]) : y);
        }
    }
}

__global__ void SFX(rms_norm_backward)(const S* x, const S* w, const S* g, S* o, long long rows, long long h,
                                       float eps, float offset) {
    __shared__ double sh[NORM_THREADS];
    if (h == 4 * NORM_VEC * (long long)blockDim.x) {
        ROWS(r, rows) {
            const S* xr = x + r * h;
            const S* gr = g + r * h;
            // x, g and offset + w of the thread's chunks, loaded once (see NORM_VEC).
            float xv[4 * NORM_VEC], gv[4 * NORM_VEC], wv[4 * NORM_VEC];
#pragma unroll
            for (int k = 0; k < NORM_VEC; ++k) {
                long long j = 4 * (threadIdx.x + k * blockDim.x);
                ld4(xr + j, xv + 4 * k);
                ld4(gr + j, gv + 4 * k);
                ld4(w + j, wv + 4 * k);
            }
#pragma unroll
            for (int k = 0; k < 4 * NORM_VEC; ++k) wv[k] = offset + wv[k];
            double inv = (double)rms_inv_vec(xv, h, eps, sh);
            double dot = 0.0;
#pragma unroll
            for (int k = 0; k < 4 * NORM_VEC; ++k) dot += (double)xv[k] * (double)gv[k] * (double)wv[k];
            dot = block_sum(dot, sh);
            double c = inv * inv * inv * dot / (double)h;
#pragma unroll
            for (int k = 0; k < NORM_VEC; ++k) {
                float y[4];
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    int e = 4 * k + q;
                    y[q] = (float)(inv * (double)wv[e] * (double)gv[e] - c * (double)xv[e]);
                }
                st4(o + r * h + 4 * (threadIdx.x + k * blockDim.x), y);
            }
        }
        return;
    }
    ROWS(r, rows) {
        const S* xr = x + r * h;
        const S* gr = g + r * h;
        double inv = (double)SFX(rms_inv)(xr, h, eps, sh);
        double dot = 0.0;
        for (long long j = threadIdx.x; j < h; j += blockDim.x)
            dot += (double)ld(xr[j]) * (double)ld(gr[j]) * (double)(offset + ld(w[j]));
        dot = block_sum(dot, sh);
        double c = inv * inv * inv * dot / (double)h;
        for (long long j = threadIdx.x; j < h; j += blockDim.x)
            o[r * h + j] = st((float)(inv * (double)(offset + ld(w[j])) * (double)ld(gr[j]) - c * (double)ld(xr[j])));
    }
}

// Per-row statistics for the weight gradients: stats[2r] = mean (0 for RMS), stats[2r+1] = 1/σ.
__global__ void SFX(norm_row_stats)(const S* x, float* stats, long long rows, long long h, double eps, int layer) {
    __shared__ double sh[NORM_THREADS];
    ROWS(r, rows) {
        float mean = 0.0f, inv;
        if (layer) SFX(ln_stats)(x + r * h, h, eps, &mean, &inv, sh);
        else inv = SFX(rms_inv)(x + r * h, h, (float)eps, sh);
        if (threadIdx.x == 0) {
            stats[2 * r] = mean;
            stats[2 * r + 1] = inv;
        }
    }
}

// Norm weight gradients in two passes, so that every SM works: pass 1 gives each block
// NORM_WG_ROWS rows of 256 consecutive columns (coalesced) and writes f64 partial sums
// `part[chunk, h]`; pass 2 adds a column's partials in chunk order (fixed: deterministic).
// `layer` 0: Σ g·x·r (RMS), 1: Σ g·(x − μ)·r (layer norm); stats as norm_row_stats writes them.
__global__ void SFX(norm_weight_grad_partial)(const S* x, const S* g, const float* stats, double* part,
                                              long long rows, long long h, int layer) {
    long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= h) return;
    long long r0 = (long long)blockIdx.y * NORM_WG_ROWS;
    long long r1 = r0 + NORM_WG_ROWS < rows ? r0 + NORM_WG_ROWS : rows;
    double acc = 0.0;
    for (long long r = r0; r < r1; ++r) {
        float xv = ld(x[r * h + c]);
        double gv = (double)ld(g[r * h + c]);
        acc += layer ? gv * (double)((xv - stats[2 * r]) * stats[2 * r + 1])
                     : gv * (double)xv * (double)stats[2 * r + 1];
    }
    part[(long long)blockIdx.y * h + c] = acc;
}

__global__ void SFX(norm_weight_grad_sum)(const double* part, S* o, long long chunks, long long h) {
    LOOP(c, h) {
        double acc = 0.0;
        for (long long k = 0; k < chunks; ++k) acc += part[k * h + c];
        o[c] = st((float)acc);
    }
}

__global__ void SFX(layer_norm_backward)(const S* x, const S* w, const S* g, S* o, long long rows, long long h,
                                         double eps) {
    __shared__ double sh[NORM_THREADS];
    ROWS(r, rows) {
        const S* xr = x + r * h;
        const S* gr = g + r * h;
        float mean, inv;
        SFX(ln_stats)(xr, h, eps, &mean, &inv, sh);
        double s1 = 0.0, s2 = 0.0;
        for (long long j = threadIdx.x; j < h; j += blockDim.x) {
            double xh = (double)((ld(xr[j]) - mean) * inv);
            double d = (double)ld(gr[j]) * (double)ld(w[j]);
            s1 += d;
            s2 += d * xh;
        }
        double m1 = block_sum(s1, sh) / (double)h, m2 = block_sum(s2, sh) / (double)h;
        for (long long j = threadIdx.x; j < h; j += blockDim.x) {
            double xh = (double)((ld(xr[j]) - mean) * inv);
            double d = (double)ld(gr[j]) * (double)ld(w[j]);
            o[r * h + j] = st((float)((double)inv * (d - m1 - xh * m2)));
        }
    }
}
// Rotary embedding, one block per position: the block first builds the position's (cos, sin)
// of the angles `inv_freq[j]·pos` (f32, as transformers builds them) in shared memory, once
// per pair instead of once per element and head (accurate sinf/cosf of angles in the
// thousands of radians are slow), then rotates every (head, pair) of the position. The
// inverse frequencies come by value (no upload, no scratch); indices are 32-bit within a
// position; each thread loads ROPE_UNROLL pairs before storing any, so that enough loads are
// in flight to keep the memory busy. `__grid_constant__` lets threads index the frequencies
// in parameter space: without it each thread copied the whole 1 kB array to local memory.
// `sign` = −1 turns by −θ (the backward).
#define ROPE_MAX_HALF 256
#define ROPE_UNROLL 4
struct InvFreq {
    float f[ROPE_MAX_HALF];
};
__global__ void SFX(rope)(const S* x, const int* pos, const __grid_constant__ InvFreq fr, S* o, long long t, int heads, int hd, int half,
                          int interleaved, float sign) {
    __shared__ float2 cs[ROPE_MAX_HALF];
    const int pairs = heads * half, rest = hd - 2 * half;
    for (long long p = blockIdx.x; p < t; p += gridDim.x) {
        float fp = (float)pos[p];
        for (int j = threadIdx.x; j < half; j += blockDim.x) {
            float a = fr.f[j] * fp;
            cs[j] = make_float2(cosf(a), sinf(a));
        }
        __syncthreads();
        const S* xp = x + p * (long long)heads * hd;
        S* op = o + p * (long long)heads * hd;
        for (int k0 = threadIdx.x; k0 < pairs; k0 += ROPE_UNROLL * blockDim.x) {
            float u[ROPE_UNROLL], v[ROPE_UNROLL];
            int iu[ROPE_UNROLL], iv[ROPE_UNROLL], jj[ROPE_UNROLL];
#pragma unroll
            for (int q = 0; q < ROPE_UNROLL; ++q) {
                int k = k0 + q * blockDim.x;
                int hh = k / half, j = k - hh * half;
                jj[q] = j;
                iu[q] = hh * hd + (interleaved ? 2 * j : j);
                iv[q] = iu[q] + (interleaved ? 1 : half);
                if (k < pairs) {
                    u[q] = ld(xp[iu[q]]);
                    v[q] = ld(xp[iv[q]]);
                }
            }
#pragma unroll
            for (int q = 0; q < ROPE_UNROLL; ++q) {
                if (k0 + q * (int)blockDim.x < pairs) {
                    float2 w = cs[jj[q]];
                    float c = w.x, s = sign * w.y;
                    op[iu[q]] = st(u[q] * c - v[q] * s);
                    op[iv[q]] = st(v[q] * c + u[q] * s);
                }
            }
        }
        // Features past the rotary dimension pass through.
        for (int k = threadIdx.x; k < heads * rest; k += blockDim.x) {
            int hh = k / rest, e = hh * hd + 2 * half + (k - hh * rest);
            op[e] = xp[e];
        }
        __syncthreads();
    }
}

__device__ __forceinline__ float SFX(score)(const S* q, const S* k, long long d, float scale, float cap) {
    float s = 0.0f;
    for (long long e = 0; e < d; ++e) s += ld(q[e]) * ld(k[e]);
    s *= scale;
    if (cap > 0.0f) s = cap * tanhf(s / cap);
    return s;
}

// Forward attention, one thread per (query, head, feature): max pass, then Σexp and the
// weighted sum of values (scores recomputed; simple, not fast — flash attention replaces
// it for large shapes).
__global__ void SFX(attention)(const S* q, const S* k, const S* v, S* o, long long t, long long nh, long long nkv,
                               long long d, float scale, long long window, float cap) {
    long long group = nh / nkv;
    LOOP(idx, t * nh * d) {
        long long e = idx % d;
        long long h = (idx / d) % nh;
        long long i = idx / (d * nh);
        long long kh = h / group;
        const S* qi = q + (i * nh + h) * d;
        float m = NEG_INF;
        for (long long j = 0; j <= i; ++j) {
            if (!visible(i, j, window)) continue;
            m = fmaxf(m, SFX(score)(qi, k + (j * nkv + kh) * d, d, scale, cap));
        }
        float l = 0.0f, acc = 0.0f;
        for (long long j = 0; j <= i; ++j) {
            if (!visible(i, j, window)) continue;
            float p = expf(SFX(score)(qi, k + (j * nkv + kh) * d, d, scale, cap) - m);
            l += p;
            acc += p * ld(v[(j * nkv + kh) * d + e]);
        }
        o[idx] = st(acc / l);
    }
}

// Backward, pass 1, one thread per (query, head): row max `m`, Σexp `l`, and
// `D = Σ_j P_ij·dP_ij` with `dP_ij = g_i·v_j`. stats[(i·nh + h)·3 + {0,1,2}].
__global__ void SFX(attention_stats)(const S* q, const S* k, const S* v, const S* g, float* stats, long long t,
                                     long long nh, long long nkv, long long d, float scale, long long window,
                                     float cap) {
    long long group = nh / nkv;
    LOOP(idx, t * nh) {
        long long h = idx % nh, i = idx / nh, kh = h / group;
        const S* qi = q + idx * d;
        const S* gi = g + idx * d;
        float m = NEG_INF;
        for (long long j = 0; j <= i; ++j) {
            if (!visible(i, j, window)) continue;
            m = fmaxf(m, SFX(score)(qi, k + (j * nkv + kh) * d, d, scale, cap));
        }
        float l = 0.0f;
        double dsum = 0.0;
        for (long long j = 0; j <= i; ++j) {
            if (!visible(i, j, window)) continue;
            float p = expf(SFX(score)(qi, k + (j * nkv + kh) * d, d, scale, cap) - m);
            l += p;
            float dp = 0.0f;
            for (long long e = 0; e < d; ++e) dp += ld(gi[e]) * ld(v[(j * nkv + kh) * d + e]);
            dsum += (double)p * (double)dp;
        }
        stats[idx * 3] = m;
        stats[idx * 3 + 1] = l;
        stats[idx * 3 + 2] = (float)(dsum / (double)l);
    }
}

// dS_ij = P_ij·(dP_ij − D_i)·(1 − (s_ij/c)²)·scale, recomputed from the stats.
__device__ float SFX(dscore)(const S* qi, const S* kj, const S* gi, const S* vj, const float* st_, long long d,
                             float scale, float cap, float* p_out) {
    float s = SFX(score)(qi, kj, d, scale, cap);
    float p = expf(s - st_[0]) / st_[1];
    float dp = 0.0f;
    for (long long e = 0; e < d; ++e) dp += ld(gi[e]) * ld(vj[e]);
    float ds = p * (dp - st_[2]);
    if (cap > 0.0f) {
        float r = s / cap;
        ds *= 1.0f - r * r;
    }
    *p_out = p;
    return ds * scale;
}

// Pass 2: dq, one thread per (query, head, feature). Output rows are [T, nh + 2·nkv, d].
__global__ void SFX(attention_dq)(const S* q, const S* k, const S* v, const S* g, const float* stats, S* o,
                                  long long t, long long nh, long long nkv, long long d, float scale,
                                  long long window, float cap) {
    long long group = nh / nkv, rowh = nh + 2 * nkv;
    LOOP(idx, t * nh * d) {
        long long e = idx % d, h = (idx / d) % nh, i = idx / (d * nh), kh = h / group;
        const S* qi = q + (i * nh + h) * d;
        const S* gi = g + (i * nh + h) * d;
        const float* sti = stats + (i * nh + h) * 3;
        float acc = 0.0f;
        for (long long j = 0; j <= i; ++j) {
            if (!visible(i, j, window)) continue;
            const S* kj = k + (j * nkv + kh) * d;
            float p;
            float ds = SFX(dscore)(qi, kj, gi, v + (j * nkv + kh) * d, sti, d, scale, cap, &p);
            acc += ds * ld(kj[e]);
        }
        o[(i * rowh + h) * d + e] = st(acc);
    }
}

// Pass 3: dk and dv, one thread per (key, KV head, feature), summing the query heads of the
// group and the queries that see the key.
__global__ void SFX(attention_dkv)(const S* q, const S* k, const S* v, const S* g, const float* stats, S* o,
                                   long long t, long long nh, long long nkv, long long d, float scale,
                                   long long window, float cap) {
    long long group = nh / nkv, rowh = nh + 2 * nkv;
    LOOP(idx, t * nkv * d) {
        long long e = idx % d, kh = (idx / d) % nkv, j = idx / (d * nkv);
        const S* kj = k + (j * nkv + kh) * d;
        const S* vj = v + (j * nkv + kh) * d;
        float dk = 0.0f, dv = 0.0f;
        for (long long gi_ = 0; gi_ < group; ++gi_) {
            long long h = kh * group + gi_;
            for (long long i = j; i < t; ++i) {
                if (!visible(i, j, window)) continue;
                const S* qi = q + (i * nh + h) * d;
                const S* gi = g + (i * nh + h) * d;
                float p;
                float ds = SFX(dscore)(qi, kj, gi, vj, stats + (i * nh + h) * 3, d, scale, cap, &p);
                dk += ds * ld(qi[e]);
                dv += p * ld(gi[e]);
            }
        }
        o[(j * rowh + nh + kh) * d + e] = st(dk);
        o[(j * rowh + nh + nkv + kh) * d + e] = st(dv);
    }
}

// Log-sum-exp of each row, one block of LSE_THREADS per row (the vocabulary can be 256k
// wide): a block-wide max, then Σ exp(z − m) with float exponentials summed in f64 per
// thread and across the block, as the CPU sums `exp` terms in f64. The logits are read in
// their storage type and never widened to an f32 copy. Reading the row twice costs nothing
// extra: 256 kB of bf16 stays in L2 between the passes. Rows of a multiple of 4 elements are
// read 4 at a time (8-/16-byte loads; the f64 sum then runs in another order than the scalar
// loop's, both unlike the CPU's sequential one), and the loops are unrolled so that several
// loads are in flight per thread. Thread 0 also
// writes the row's loss term lse − z[y] (0 for an ignored row), so that the loss sum reads
// one contiguous array instead of one scattered logit per row.
#define LSE_THREADS 512
__global__ void SFX(row_lse)(const S* z, const int* y, double* lse, double* term, long long rows, long long v) {
    __shared__ float smax[LSE_THREADS];
    __shared__ double ssum[LSE_THREADS];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const S* zr = z + r * v;
        const bool vec = v % 4 == 0;
        float m = NEG_INF;
        if (vec) {
#pragma unroll 4
            for (long long j = 4 * threadIdx.x; j < v; j += 4 * blockDim.x) {
                float f[4];
                ld4(zr + j, f);
                m = fmaxf(m, fmaxf(fmaxf(f[0], f[1]), fmaxf(f[2], f[3])));
            }
        } else {
#pragma unroll 8
            for (long long j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, ld(zr[j]));
        }
        smax[threadIdx.x] = m;
        __syncthreads();
        for (int w = blockDim.x / 2; w > 0; w >>= 1) {
            if (threadIdx.x < w) smax[threadIdx.x] = fmaxf(smax[threadIdx.x], smax[threadIdx.x + w]);
            __syncthreads();
        }
        m = smax[0];
        double s = 0.0;
        if (vec) {
#pragma unroll 4
            for (long long j = 4 * threadIdx.x; j < v; j += 4 * blockDim.x) {
                float f[4];
                ld4(zr + j, f);
#pragma unroll
                for (int q = 0; q < 4; ++q) s += (double)expf(f[q] - m);
            }
        } else {
#pragma unroll 8
            for (long long j = threadIdx.x; j < v; j += blockDim.x) s += (double)expf(ld(zr[j]) - m);
        }
        ssum[threadIdx.x] = s;
        __syncthreads();
        for (int w = blockDim.x / 2; w > 0; w >>= 1) {
            if (threadIdx.x < w) ssum[threadIdx.x] += ssum[threadIdx.x + w];
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            double l = (double)m + log(ssum[0]);
            lse[r] = l;
            int yr = y[r];
            term[r] = yr == -100 ? 0.0 : l - (double)ld(zr[yr]);
        }
        __syncthreads();
    }
}

// Σ over rows of row_lse's terms, in row order by one thread (as the CPU), divided by
// `count`. The block stages CE_CHUNK terms at a time in shared memory with coalesced loads;
// thread 0 then adds from there (an ignored row's term is +0, which adds nothing).
#define CE_CHUNK 2048
__global__ void SFX(cross_entropy)(const double* term, float* o, long long rows, long long count) {
    __shared__ double sh[CE_CHUNK];
    double total = 0.0;
    for (long long r0 = 0; r0 < rows; r0 += CE_CHUNK) {
        long long m = rows - r0 < CE_CHUNK ? rows - r0 : CE_CHUNK;
        for (long long k = threadIdx.x; k < m; k += blockDim.x) sh[k] = term[r0 + k];
        __syncthreads();
        if (threadIdx.x == 0)
            for (long long k = 0; k < m; ++k) total += sh[k];
        __syncthreads();
    }
    if (threadIdx.x == 0) o[0] = (float)(total / (double)count);
}

// `g·(softmax − onehot)/count`, written straight into the logits' storage type; one block
// per row (no 64-bit division per element), 4 elements per load and store where the row
// length allows (the arithmetic per element is the same either way).
__global__ void SFX(cross_entropy_backward)(const S* z, const int* y, const double* lse, const float* g, S* o,
                                            long long rows, long long v, long long count) {
    double sd = (double)g[0] / (double)count;
    float s = (float)sd;
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const S* zr = z + r * v;
        S* orow = o + r * v;
        int l = y[r];
        if (l == -100) {
            for (long long c = threadIdx.x; c < v; c += blockDim.x) orow[c] = st(0.0f);
            continue;
        }
        // softmax·g/count in f32 (expf): the CPU reference's f64 exp made this kernel
        // compute-bound at twice its memory time (128k logits a row); the f32 result differs
        // from it by a few f32 ulps (~1e-6 relative), far inside every storage's tolerance.
        float lr = (float)lse[r];
        if (v % 4 == 0) {
#pragma unroll 2
            for (long long c = 4 * threadIdx.x; c < v; c += 4 * blockDim.x) {
                float zv[4], p[4];
                ld4(zr + c, zv);
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    float pq = expf(zv[q] - lr) * s;
                    p[q] = c + q == l ? pq - s : pq;
                }
                st4(orow + c, p);
            }
            continue;
        }
#pragma unroll 4
        for (long long c = threadIdx.x; c < v; c += blockDim.x) {
            float p = expf(ld(zr[c]) - lr) * s;
            orow[c] = st(c == l ? p - s : p);
        }
    }
}

// PyTorch's nll_loss (mean over labels ≠ −100) of log-probabilities, summed in f64 in row
// order by one thread.
__global__ void SFX(nll)(const S* lp, const int* y, float* o, long long rows, long long v, long long count) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        double total = 0.0;
        for (long long r = 0; r < rows; ++r) {
            if (y[r] == -100) continue;
            total -= (double)ld(lp[r * v + y[r]]);
        }
        o[0] = (float)(total / (double)count);
    }
}

// −g/count at [t, y_t] of valid rows, zero elsewhere.
__global__ void SFX(nll_backward)(const int* y, const float* g, S* o, long long rows, long long v, long long count) {
    float d = (float)(-((double)g[0] / (double)count));
    LOOP(i, rows * v) {
        long long r = i / v, c = i % v;
        o[i] = st(y[r] != -100 && c == y[r] ? d : 0.0f);
    }
}

// SplitMix64's output function, as `qplc_ops::dropout::mix`.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Inverted dropout with the counter-hash mask of `qplc_ops::dropout::keeps_in`: element i is
// kept when the top 53 bits of mix(stream + (i+1)·γ), read as a fraction, are at least p —
// bit-identical to the CPU's mask, since it depends on (stream, i) only. `stream` is
// computed on the host from (seed, salt).
__global__ void SFX(dropout)(const S* x, S* o, long long n, unsigned long long stream, double p, float scale) {
    LOOP(i, n) {
        unsigned long long h = mix64(stream + ((unsigned long long)i + 1ull) * 0x9E3779B97F4A7C15ull);
        bool keep = (double)(h >> 11) * (1.0 / 9007199254740992.0) >= p;
        o[i] = st(keep ? ld(x[i]) * scale : 0.0f);
    }
}

} // extern "C"
