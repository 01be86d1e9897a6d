// Kernels of the CUDA backend (runtime/src/cuda), compiled once by NVRTC when the backend
// starts. First working version: simple and correct (one thread per element, row or
// column), with the same formulas and accumulation precision as the CPU reference
// (runtime/src/cpu) so that the two agree within rounding; speed comes later (fused chains,
// flash attention, notes/CUDA.md).
//
// Floats live on the device as f32 whatever their logical dtype, exactly as on the CPU
// backend; `round_storage` rounds a bf16/f16 result once after each op.
//
// Every kernel uses a grid-stride loop over `long long` indices so that any launch size is
// correct.

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

// Round to nearest even at bf16 precision, as `half::bf16::from_f32` (NaN stays NaN).
__device__ __forceinline__ float round_bf16(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return x;
    u += 0x7fffu + ((u >> 16) & 1u);
    return __uint_as_float(u & 0xffff0000u);
}

__device__ __forceinline__ float round_f16(float x) {
    unsigned short h;
    float r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
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

extern "C" {

// mode 1: bf16, mode 2: f16.
__global__ void round_storage(float* x, long long n, int mode) {
    LOOP(i, n) { x[i] = mode == 1 ? round_bf16(x[i]) : round_f16(x[i]); }
}

__global__ void fill_f32(float* o, long long n, float v) { LOOP(i, n) o[i] = v; }
__global__ void fill_i32(int* o, long long n, int v) { LOOP(i, n) o[i] = v; }

__global__ void unary_f32(const float* x, float* o, long long n, int op) {
    LOOP(i, n) o[i] = unary_fn(op, x[i]);
}

__global__ void unary_backward_f32(const float* x, const float* g, float* o, long long n, int op) {
    LOOP(i, n) o[i] = g[i] * unary_deriv(op, x[i]);
}

// kind 0: x·c, 1: x + c, 2: c·tanh(x/c).
__global__ void scalar_map_f32(const float* x, float* o, long long n, int kind, float c) {
    LOOP(i, n) {
        float v = x[i];
        o[i] = kind == 0 ? v * c : (kind == 1 ? v + c : c * tanhf(v / c));
    }
}

__global__ void binary_f32(const float* a, const float* b, float* o, long long n, Strided s, int op) {
    LOOP(i, n) {
        long long ia, ib;
        offsets(s, i, &ia, &ib);
        o[i] = binary_fn(op, a[ia], b[ib]);
    }
}

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

__global__ void binary_backward_f32(const float* a, const float* b, const float* g, float* o, long long n,
                                    Strided s, int op, int wrt) {
    LOOP(i, n) {
        long long ia, ib;
        offsets(s, i, &ia, &ib);
        o[i] = binary_partial(op, wrt, a[ia], b[ib]) * g[i];
    }
}

// Data movement on 32-bit words (f32 and i32 alike). `s.sa` holds the input stride of each
// output axis.
__global__ void gather_u32(const unsigned int* x, unsigned int* o, long long n, Strided s) {
    LOOP(i, n) {
        long long ia, ib;
        offsets(s, i, &ia, &ib);
        o[i] = x[ia];
    }
}

// o viewed as [outer, row]; x as [outer, block] is placed at column `offset` of each row.
__global__ void place_u32(const unsigned int* x, unsigned int* o, long long outer, long long block, long long row,
                          long long offset) {
    LOOP(i, outer * block) {
        long long r = i / block, c = i % block;
        o[r * row + offset + c] = x[i];
    }
}

// x viewed as [outer, len·inner]; rows start..start+block/inner of the middle axis.
__global__ void slice_u32(const unsigned int* x, unsigned int* o, long long outer, long long len, long long inner,
                          long long start, long long block) {
    LOOP(i, outer * block) {
        long long r = i / block, c = i % block;
        o[i] = x[(r * len + start) * inner + c];
    }
}

// Float → integer truncates toward zero and saturates, NaN → 0 (Rust `as i32`).
__global__ void cast_f32_i32(const float* x, int* o, long long n) {
    LOOP(i, n) {
        float v = x[i];
        int r;
        if (v != v) r = 0;
        else if (v >= 2147483648.0f) r = 2147483647;
        else if (v <= -2147483648.0f) r = -2147483647 - 1;
        else r = (int)v;
        o[i] = r;
    }
}

__global__ void cast_i32_f32(const int* x, float* o, long long n) { LOOP(i, n) o[i] = (float)x[i]; }

__global__ void bias_rows_f32(float* o, const float* b, long long rows, long long n) {
    LOOP(i, rows * n) o[i] += b[i % n];
}

__global__ void embedding_f32(const int* ids, const float* table, float* o, long long t, long long h) {
    LOOP(i, t * h) {
        long long r = i / h, c = i % h;
        o[i] = table[(long long)ids[r] * h + c];
    }
}

// One thread per column: each sums its positions in sequence order (deterministic, as the
// CPU kernel). `o` is zeroed first by the caller.
__global__ void embedding_backward_f32(const int* ids, const float* g, float* o, long long t, long long h) {
    LOOP(c, h) {
        for (long long r = 0; r < t; ++r) o[(long long)ids[r] * h + c] += g[r * h + c];
    }
}

// Softmax / log-softmax along the last axis, one thread per row.
__global__ void softmax_rows_f32(const float* x, float* o, long long rows, long long h, int log_) {
    LOOP(r, rows) {
        const float* xr = x + r * h;
        float* orow = o + r * h;
        float m = NEG_INF;
        for (long long j = 0; j < h; ++j) m = fmaxf(m, xr[j]);
        float s = 0.0f;
        for (long long j = 0; j < h; ++j) s += expf(xr[j] - m);
        if (log_) {
            float lse = (float)log((double)s);
            for (long long j = 0; j < h; ++j) orow[j] = xr[j] - m - lse;
        } else {
            float inv = 1.0f / s;
            for (long long j = 0; j < h; ++j) orow[j] = expf(xr[j] - m) * inv;
        }
    }
}

// op 0 sum, 1 mean, 2 max; x viewed as [outer, len, inner].
__global__ void reduce_f32(const float* x, float* o, long long outer, long long len, long long inner, int op) {
    LOOP(i, outer * inner) {
        long long oi = i / inner, ii = i % inner;
        const float* base = x + oi * len * inner + ii;
        if (op == 2) {
            float m = NEG_INF;
            for (long long a = 0; a < len; ++a) m = fmaxf(m, base[a * inner]);
            o[i] = m;
        } else {
            double s = 0.0;
            for (long long a = 0; a < len; ++a) s += (double)base[a * inner];
            o[i] = op == 1 ? (float)(s / (double)len) : (float)s;
        }
    }
}

__device__ float rms_inv(const float* x, long long h, float eps) {
    double s = 0.0;
    for (long long j = 0; j < h; ++j) s += (double)x[j] * (double)x[j];
    float ms = (float)(s / (double)h);
    return 1.0f / sqrtf(ms + eps);
}

__device__ void ln_stats(const float* x, long long h, double eps, float* mean_out, float* r_out) {
    double mean = 0.0;
    for (long long j = 0; j < h; ++j) mean += (double)x[j];
    mean /= (double)h;
    double var = 0.0;
    for (long long j = 0; j < h; ++j) { double d = (double)x[j] - mean; var += d * d; }
    var /= (double)h;
    *mean_out = (float)mean;
    *r_out = (float)(1.0 / sqrt(var + eps));
}

__global__ void rms_norm_f32(const float* x, const float* w, float* o, long long rows, long long h, float eps,
                             float offset) {
    LOOP(r, rows) {
        const float* xr = x + r * h;
        float inv = rms_inv(xr, h, eps);
        for (long long j = 0; j < h; ++j) o[r * h + j] = xr[j] * inv * (offset + w[j]);
    }
}

__global__ void layer_norm_f32(const float* x, const float* w, const float* b, int has_b, float* o, long long rows,
                               long long h, double eps) {
    LOOP(r, rows) {
        const float* xr = x + r * h;
        float mean, inv;
        ln_stats(xr, h, eps, &mean, &inv);
        for (long long j = 0; j < h; ++j) {
            float y = (xr[j] - mean) * inv * w[j];
            o[r * h + j] = has_b ? y + b[j] : y;
        }
    }
}

__global__ void rms_norm_backward_f32(const float* x, const float* w, const float* g, float* o, long long rows,
                                      long long h, float eps, float offset) {
    LOOP(r, rows) {
        const float* xr = x + r * h;
        const float* gr = g + r * h;
        double inv = (double)rms_inv(xr, h, eps);
        double dot = 0.0;
        for (long long j = 0; j < h; ++j) dot += (double)xr[j] * (double)gr[j] * (double)(offset + w[j]);
        double c = inv * inv * inv * dot / (double)h;
        for (long long j = 0; j < h; ++j)
            o[r * h + j] = (float)(inv * (double)(offset + w[j]) * (double)gr[j] - c * (double)xr[j]);
    }
}

// One thread per column, rows summed in order in f64.
__global__ void rms_norm_weight_grad_f32(const float* x, const float* g, float* o, long long rows, long long h,
                                         float eps) {
    LOOP(c, h) {
        double acc = 0.0;
        for (long long r = 0; r < rows; ++r) {
            double inv = (double)rms_inv(x + r * h, h, eps);
            acc += (double)g[r * h + c] * (double)x[r * h + c] * inv;
        }
        o[c] = (float)acc;
    }
}

__global__ void layer_norm_backward_f32(const float* x, const float* w, const float* g, float* o, long long rows,
                                        long long h, double eps) {
    LOOP(r, rows) {
        const float* xr = x + r * h;
        const float* gr = g + r * h;
        float mean, inv;
        ln_stats(xr, h, eps, &mean, &inv);
        double s1 = 0.0, s2 = 0.0;
        for (long long j = 0; j < h; ++j) {
            double xh = (double)((xr[j] - mean) * inv);
            double d = (double)gr[j] * (double)w[j];
            s1 += d;
            s2 += d * xh;
        }
        double m1 = s1 / (double)h, m2 = s2 / (double)h;
        for (long long j = 0; j < h; ++j) {
            double xh = (double)((xr[j] - mean) * inv);
            double d = (double)gr[j] * (double)w[j];
            o[r * h + j] = (float)((double)inv * (d - m1 - xh * m2));
        }
    }
}

__global__ void layer_norm_weight_grad_f32(const float* x, const float* g, float* o, long long rows, long long h,
                                           double eps) {
    LOOP(c, h) {
        double acc = 0.0;
        for (long long r = 0; r < rows; ++r) {
            float mean, inv;
            ln_stats(x + r * h, h, eps, &mean, &inv);
            acc += (double)g[r * h + c] * (double)((x[r * h + c] - mean) * inv);
        }
        o[c] = (float)acc;
    }
}

// One thread per (position, head, feature). Angles `inv_freq·pos` in f32 as transformers
// builds them; `sign` = −1 turns by −θ (the backward).
__global__ void rope_f32(const float* x, const int* pos, const float* inv_freq, float* o, long long t,
                         long long heads, long long hd, long long half, int interleaved, float sign) {
    LOOP(i, t * heads * hd) {
        long long e = i % hd;
        long long row = i / hd;
        long long p = row / heads;
        if (e >= 2 * half) {
            o[i] = x[i];
            continue;
        }
        const float* xr = x + row * hd;
        long long pair = interleaved ? e / 2 : (e < half ? e : e - half);
        float a = inv_freq[pair] * (float)pos[p];
        float c = cosf(a), s = sign * sinf(a);
        float u, v;
        bool first;
        if (interleaved) {
            u = xr[2 * pair];
            v = xr[2 * pair + 1];
            first = (e % 2) == 0;
        } else {
            u = xr[pair];
            v = xr[pair + half];
            first = e < half;
        }
        o[i] = first ? u * c - v * s : v * c + u * s;
    }
}

__device__ __forceinline__ bool visible(long long i, long long j, long long window) {
    return j <= i && (window < 0 || i - j < window);
}

__device__ __forceinline__ float score(const float* q, const float* k, long long d, float scale, float cap) {
    float s = 0.0f;
    for (long long e = 0; e < d; ++e) s += q[e] * k[e];
    s *= scale;
    if (cap > 0.0f) s = cap * tanhf(s / cap);
    return s;
}

// Forward attention, one thread per (query, head, feature): max pass, then Σexp and the
// weighted sum of values (scores recomputed; simple, not fast).
__global__ void attention_f32(const float* q, const float* k, const float* v, float* o, long long t, long long nh,
                              long long nkv, long long d, float scale, long long window, float cap) {
    long long group = nh / nkv;
    LOOP(idx, t * nh * d) {
        long long e = idx % d;
        long long h = (idx / d) % nh;
        long long i = idx / (d * nh);
        long long kh = h / group;
        const float* qi = q + (i * nh + h) * d;
        float m = NEG_INF;
        for (long long j = 0; j <= i; ++j) {
            if (!visible(i, j, window)) continue;
            m = fmaxf(m, score(qi, k + (j * nkv + kh) * d, d, scale, cap));
        }
        float l = 0.0f, acc = 0.0f;
        for (long long j = 0; j <= i; ++j) {
            if (!visible(i, j, window)) continue;
            float p = expf(score(qi, k + (j * nkv + kh) * d, d, scale, cap) - m);
            l += p;
            acc += p * v[(j * nkv + kh) * d + e];
        }
        o[idx] = acc / l;
    }
}

// Backward, pass 1, one thread per (query, head): row max `m`, Σexp `l`, and
// `D = Σ_j P_ij·dP_ij` with `dP_ij = g_i·v_j`. stats[(i·nh + h)·3 + {0,1,2}].
__global__ void attention_stats_f32(const float* q, const float* k, const float* v, const float* g, float* stats,
                                    long long t, long long nh, long long nkv, long long d, float scale,
                                    long long window, float cap) {
    long long group = nh / nkv;
    LOOP(idx, t * nh) {
        long long h = idx % nh, i = idx / nh, kh = h / group;
        const float* qi = q + idx * d;
        const float* gi = g + idx * d;
        float m = NEG_INF;
        for (long long j = 0; j <= i; ++j) {
            if (!visible(i, j, window)) continue;
            m = fmaxf(m, score(qi, k + (j * nkv + kh) * d, d, scale, cap));
        }
        float l = 0.0f;
        double dsum = 0.0;
        for (long long j = 0; j <= i; ++j) {
            if (!visible(i, j, window)) continue;
            float p = expf(score(qi, k + (j * nkv + kh) * d, d, scale, cap) - m);
            l += p;
            float dp = 0.0f;
            for (long long e = 0; e < d; ++e) dp += gi[e] * v[(j * nkv + kh) * d + e];
            dsum += (double)p * (double)dp;
        }
        stats[idx * 3] = m;
        stats[idx * 3 + 1] = l;
        stats[idx * 3 + 2] = (float)(dsum / (double)l);
    }
}

// dS_ij = P_ij·(dP_ij − D_i)·(1 − (s_ij/c)²)·scale, recomputed from the stats.
__device__ float dscore(const float* qi, const float* kj, const float* gi, const float* vj, const float* st,
                        long long d, float scale, float cap, float* p_out) {
    float s = score(qi, kj, d, scale, cap);
    float p = expf(s - st[0]) / st[1];
    float dp = 0.0f;
    for (long long e = 0; e < d; ++e) dp += gi[e] * vj[e];
    float ds = p * (dp - st[2]);
    if (cap > 0.0f) {
        float r = s / cap;
        ds *= 1.0f - r * r;
    }
    *p_out = p;
    return ds * scale;
}

// Pass 2: dq, one thread per (query, head, feature). Output rows are [T, nh + 2·nkv, d].
__global__ void attention_dq_f32(const float* q, const float* k, const float* v, const float* g,
                                 const float* stats, float* o, long long t, long long nh, long long nkv, long long d,
                                 float scale, long long window, float cap) {
    long long group = nh / nkv, rowh = nh + 2 * nkv;
    LOOP(idx, t * nh * d) {
        long long e = idx % d, h = (idx / d) % nh, i = idx / (d * nh), kh = h / group;
        const float* qi = q + (i * nh + h) * d;
        const float* gi = g + (i * nh + h) * d;
        const float* st = stats + (i * nh + h) * 3;
        float acc = 0.0f;
        for (long long j = 0; j <= i; ++j) {
            if (!visible(i, j, window)) continue;
            const float* kj = k + (j * nkv + kh) * d;
            float p;
            float ds = dscore(qi, kj, gi, v + (j * nkv + kh) * d, st, d, scale, cap, &p);
            acc += ds * kj[e];
        }
        o[(i * rowh + h) * d + e] = acc;
    }
}

// Pass 3: dk and dv, one thread per (key, KV head, feature), summing the query heads of the
// group and the queries that see the key.
__global__ void attention_dkv_f32(const float* q, const float* k, const float* v, const float* g,
                                  const float* stats, float* o, long long t, long long nh, long long nkv, long long d,
                                  float scale, long long window, float cap) {
    long long group = nh / nkv, rowh = nh + 2 * nkv;
    LOOP(idx, t * nkv * d) {
        long long e = idx % d, kh = (idx / d) % nkv, j = idx / (d * nkv);
        const float* kj = k + (j * nkv + kh) * d;
        const float* vj = v + (j * nkv + kh) * d;
        float dk = 0.0f, dv = 0.0f;
        for (long long gi_ = 0; gi_ < group; ++gi_) {
            long long h = kh * group + gi_;
            for (long long i = j; i < t; ++i) {
                if (!visible(i, j, window)) continue;
                const float* qi = q + (i * nh + h) * d;
                const float* gi = g + (i * nh + h) * d;
                float p;
                float ds = dscore(qi, kj, gi, vj, stats + (i * nh + h) * 3, d, scale, cap, &p);
                dk += ds * qi[e];
                dv += p * gi[e];
            }
        }
        o[(j * rowh + nh + kh) * d + e] = dk;
        o[(j * rowh + nh + nkv + kh) * d + e] = dv;
    }
}

// Log-sum-exp of each row, in f64 (the CPU merges 65 536-wide chunks; same number up to
// rounding).
__global__ void row_lse_f32(const float* z, double* lse, long long rows, long long v) {
    LOOP(r, rows) {
        const float* zr = z + r * v;
        float m = NEG_INF;
        for (long long j = 0; j < v; ++j) m = fmaxf(m, zr[j]);
        double s = 0.0;
        for (long long j = 0; j < v; ++j) s += exp((double)zr[j] - (double)m);
        lse[r] = (double)m + log(s);
    }
}

// Σ over valid rows of lse − z[y], in row order by one thread, divided by `count`.
__global__ void cross_entropy_f32(const float* z, const int* y, const double* lse, float* o, long long rows,
                                  long long v, long long count) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        double total = 0.0;
        for (long long r = 0; r < rows; ++r) {
            if (y[r] == -100) continue;
            total += lse[r] - (double)z[r * v + y[r]];
        }
        o[0] = (float)(total / (double)count);
    }
}

__global__ void cross_entropy_backward_f32(const float* z, const int* y, const double* lse, const float* g,
                                           float* o, long long rows, long long v, long long count) {
    float s = (float)((double)g[0] / (double)count);
    LOOP(i, rows * v) {
        long long r = i / v, c = i % v;
        int l = y[r];
        if (l == -100) {
            o[i] = 0.0f;
        } else {
            float p = expf((float)((double)z[i] - lse[r])) * s;
            o[i] = c == l ? p - s : p;
        }
    }
}

} // extern "C"
