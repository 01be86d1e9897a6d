// Flash attention (FlashAttention-2 scheme) for bf16 storage: causal, grouped-query, optional
// sliding window and soft-cap; the semantics of `Op::Attention` / `Op::AttentionBackward`
// (runtime/src/cpu/attention*.rs is the reference). Compiled by NVRTC with no headers, so the
// tensor-core products are inline PTX: `mma.sync.m16n8k16` (bf16 in, f32 accumulate) fed by
// `ldmatrix` from shared memory, tiles filled by `cp.async` (double-buffered).
//
// Layouts: q/out [T, nh, d], k/v [T, nkv, d], row-major bf16 bits (u16); d % 8 == 0 and d <= the
// kernel's D (columns d..D of a tile are zero-filled, so one kernel serves every d <= D).
// Backward output dqkv [T, nh + 2*nkv, d]. Per-row statistics (lse, delta) are f32 [nh, T];
// lse is kept in log2 units (scores are multiplied by log2(e) once, then exp2 everywhere).
//
// Backward, deterministic: one kernel owns dK/dV of a key block (looping over every query head
// of its KV group), another owns dQ of a query block; both recompute P from the lse the forward
// kernel wrote. Costs two extra tile products over the atomic-dq scheme but every gradient is
// written once, in a fixed summation order. flash_bwd_fused is that atomic-dq scheme made
// deterministic (dQ added in key-block order behind counters); on an H200 it ties with the
// two kernels (notes/CUDA.md), so flash.rs keeps the two by default.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16): with g = lane/4, t = lane%4, an f32
// accumulator tile 16x8 holds (row g, cols 2t,2t+1) in c0,c1 and (row g+8, same cols) in c2,c3.
// An A fragment 16x16 is a0=(g, 2t..), a1=(g+8, 2t..), a2=(g, 2t+8..), a3=(g+8, 2t+8..): two
// adjacent accumulator tiles converted to bf16 pairs form one A fragment, which is how P and dS
// feed the second product without a trip through shared memory.

typedef unsigned short u16;
typedef unsigned int u32;

#define LOG2E 1.4426950408889634f
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared, asynchronously; `ok == false` writes zeros (rows past T, columns
// past d) without reading `src`.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool ok) {
    int n = ok ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
// 4 bytes, for the per-row statistics (rows of one head are not 16-byte aligned in general).
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, bool ok) {
    int n = ok ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// volatile: shared memory changes between loop iterations at the same address.
__device__ __forceinline__ void ldsm_x4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> bf16x2 (round to nearest even), `lo` in the low half.
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 2^x by the SFU (exp2f adds denormal handling we do not need: P is rounded to bf16 anyway).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float bf16_f32(u16 x) { return __uint_as_float(((u32)x) << 16); }
__device__ __forceinline__ float bf16_lo(u32 x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float bf16_hi(u32 x) { return __uint_as_float(x & 0xffff0000u); }

// acc[NB] (16 x 8NB) += A · Bᵀ: A is 16 rows x 16KS at sA, B is 8NB rows x 16KS at sB (both
// row-major, LD elements per row) — Q·Kᵀ, dO·Vᵀ, K·Qᵀ, V·dOᵀ.
template <int KS, int NB, int LD>
__device__ __forceinline__ void mma_nt(float (*acc)[4], const u16* sA, const u16* sB, int lane) {
    const u32 a_base = smem_u32(sA + (lane & 15) * LD + (lane >> 4) * 8);
    const u32 b_base = smem_u32(sB + ((lane & 7) + ((lane >> 4) << 3)) * LD + ((lane >> 3) & 1) * 8);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        u32 a[4];
        ldsm_x4(a, a_base + ks * 32);
#pragma unroll
        for (int nb = 0; nb < NB; nb += 2) {
            u32 b[4];
            ldsm_x4(b, b_base + (nb * 8 * LD + ks * 16) * 2);
            mma16816(acc[nb], a, b[0], b[1]);
            mma16816(acc[nb + 1], a, b[2], b[3]);
        }
    }
}

// As `mma_nt` with A already in registers (the forward's Q, loaded once per CTA).
template <int KS, int NB, int LD>
__device__ __forceinline__ void mma_rt(float (*acc)[4], const u32 (*a)[4], const u16* sB, int lane) {
    const u32 b_base = smem_u32(sB + ((lane & 7) + ((lane >> 4) << 3)) * LD + ((lane >> 3) & 1) * 8);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
        for (int nb = 0; nb < NB; nb += 2) {
            u32 b[4];
            ldsm_x4(b, b_base + (nb * 8 * LD + ks * 16) * 2);
            mma16816(acc[nb], a[ks], b[0], b[1]);
            mma16816(acc[nb + 1], a[ks], b[2], b[3]);
        }
    }
}

// acc[NB] (16 x 8NB) += A · B: A is KS register fragments (16 x 16KS), B is 16KS rows x 8NB at sB
// (row-major) — P·V, P·dO, dS·K, dS·Q.
template <int KS, int NB, int LD>
__device__ __forceinline__ void mma_rn(float (*acc)[4], const u32 (*a)[4], const u16* sB, int lane) {
    const u32 b_base = smem_u32(sB + ((lane & 7) + (((lane >> 3) & 1) << 3)) * LD + (lane >> 4) * 8);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
        for (int nb = 0; nb < NB; nb += 2) {
            u32 b[4];
            ldsm_x4_t(b, b_base + (ks * 16 * LD + nb * 8) * 2);
            mma16816(acc[nb], a[ks], b[0], b[1]);
            mma16816(acc[nb + 1], a[ks], b[2], b[3]);
        }
    }
}

// As `mma_nt` for RW row groups of 16 (A rows r·16.. at sA): each B fragment is loaded once and
// used RW times.
template <int RW, int KS, int NB, int LD>
__device__ __forceinline__ void mma_nt_rows(float (*acc)[NB][4], const u16* sA, const u16* sB, int lane) {
    const u32 a_base = smem_u32(sA + (lane & 15) * LD + (lane >> 4) * 8);
    const u32 b_base = smem_u32(sB + ((lane & 7) + ((lane >> 4) << 3)) * LD + ((lane >> 3) & 1) * 8);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        u32 a[RW][4];
#pragma unroll
        for (int r = 0; r < RW; ++r) ldsm_x4(a[r], a_base + (r * 16 * LD + ks * 16) * 2);
#pragma unroll
        for (int nb = 0; nb < NB; nb += 2) {
            u32 b[4];
            ldsm_x4(b, b_base + (nb * 8 * LD + ks * 16) * 2);
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                mma16816(acc[r][nb], a[r], b[0], b[1]);
                mma16816(acc[r][nb + 1], a[r], b[2], b[3]);
            }
        }
    }
}

// As `mma_rn` for RW row groups (A fragments a[r]): each B fragment loaded once, used RW times.
template <int RW, int KS, int NB, int LD>
__device__ __forceinline__ void mma_rn_rows(float (*acc)[NB][4], const u32 (*a)[KS][4], const u16* sB, int lane) {
    const u32 b_base = smem_u32(sB + ((lane & 7) + (((lane >> 3) & 1) << 3)) * LD + (lane >> 4) * 8);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
        for (int nb = 0; nb < NB; nb += 2) {
            u32 b[4];
            ldsm_x4_t(b, b_base + (ks * 16 * LD + nb * 8) * 2);
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                mma16816(acc[r][nb], a[r][ks], b[0], b[1]);
                mma16816(acc[r][nb + 1], a[r][ks], b[2], b[3]);
            }
        }
    }
}

// Accumulator tiles (16 x 16KS, f32) -> A fragments (bf16).
template <int KS> __device__ __forceinline__ void to_frags(u32 (*f)[4], const float (*acc)[4]) {
#pragma unroll
    for (int k = 0; k < KS; ++k) {
        f[k][0] = pack_bf16(acc[2 * k][0], acc[2 * k][1]);
        f[k][1] = pack_bf16(acc[2 * k][2], acc[2 * k][3]);
        f[k][2] = pack_bf16(acc[2 * k + 1][0], acc[2 * k + 1][1]);
        f[k][3] = pack_bf16(acc[2 * k + 1][2], acc[2 * k + 1][3]);
    }
}

// Rows row0.. of one head (row stride `gs` elements) into a ROWS x D tile; rows >= T and columns
// >= d are zeros (so padded keys/queries contribute nothing and never carry NaN garbage).
template <int ROWS, int D, int LD, int NT>
__device__ __forceinline__ void load_tile(u16* s, const u16* g, int row0, int T, long long gs, int d, int tid) {
    constexpr int CH = D / 8;
#pragma unroll
    for (int c = tid; c < ROWS * CH; c += NT) {
        const int r = c / CH, col = (c % CH) * 8, row = row0 + r;
        const bool ok = row < T && col < d;
        cp_async16(smem_u32(s + r * LD + col), ok ? g + row * gs + col : g, ok);
    }
}

// Score in log2 units after scale and soft-cap; `dcap` gets d(capped)/d(scaled) (1 without cap).
// `sl2` = scale·log2(e), `sc` = scale / cap, `cl2` = cap·log2(e) (precomputed per kernel).
__device__ __forceinline__ float score2(float x, float sl2, float sc, float cl2, float* dcap) {
    if (cl2 > 0.0f) {
        const float th = tanhf(x * sc);
        *dcap = 1.0f - th * th;
        return cl2 * th;
    }
    *dcap = 1.0f;
    return x * sl2;
}

__device__ __forceinline__ bool hidden(int i, int j, int window) {
    return j > i || (window > 0 && i - j >= window);
}

// First key a query block starting at q0 can see.
__device__ __forceinline__ int first_key(int q0, int window) { return window > 0 ? max(0, q0 - window + 1) : 0; }

// ---------------------------------------------------------------------------------------------
// Forward: one CTA per (query block of 16·RW·NW rows, head); each warp owns RW groups of 16
// query rows and keeps their O (16 x D each, f32) in registers while key/value tiles of BC rows
// stream through shared memory. RW = 2 (FlashAttention-2's warp tile) loads each K and V
// fragment once for two row groups, halving the shared-memory traffic per product, at the
// price of Q read from shared memory per tile (RW = 1 keeps Q's fragments in registers).
// Writes lse (log2 units) when `lse` is not null (the backward's recomputation needs it).
template <int D, int NW, int BC, int RW>
__device__ __forceinline__ void flash_fwd(const u16* __restrict__ q, const u16* __restrict__ k,
                                          const u16* __restrict__ v, u16* __restrict__ o, float* __restrict__ lse,
                                          int T, int nh, int nkv, int d, float scale, int window, float cap) {
    constexpr int WR = 16 * RW, BR = WR * NW, LD = D + 8, NT = 32 * NW, KS = D / 16, NB = BC / 8, NO = D / 8;
    extern __shared__ __align__(16) u16 smem[];
    u16* sQ = smem;
    u16* sK = sQ + BR * LD;
    u16* sV = sK + 2 * BC * LD;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const float sl2 = scale * LOG2E, sc = cap > 0.0f ? scale / cap : 0.0f, cl2 = cap > 0.0f ? cap * LOG2E : 0.0f;
    // Longest (last) query blocks of every head first: causal work grows with the block index,
    // and the hardware hands out CTAs in blockIdx order, so a per-head order (head in y) would
    // start the last head's longest blocks last and leave a tail of them running alone.
    const int nqb = (T + BR - 1) / BR, h = blockIdx.x % nh, kh = h / (nh / nkv);
    const int q0 = (nqb - 1 - blockIdx.x / nh) * BR;
    const long long qs = (long long)nh * d, ks = (long long)nkv * d;
    const u16* qh = q + (long long)h * d;
    const u16* kp = k + (long long)kh * d;
    const u16* vp = v + (long long)kh * d;
    const int kt0 = first_key(q0, window) / BC, kt1 = (min(T, q0 + BR) + BC - 1) / BC;

    load_tile<BR, D, LD, NT>(sQ, qh, q0, T, qs, d, tid);
    load_tile<BC, D, LD, NT>(sK, kp, kt0 * BC, T, ks, d, tid);
    load_tile<BC, D, LD, NT>(sV, vp, kt0 * BC, T, ks, d, tid);
    cp_commit();

    float acc[RW][NO][4];
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
        for (int i = 0; i < NO; ++i) acc[r][i][0] = acc[r][i][1] = acc[r][i][2] = acc[r][i][3] = 0.0f;
    float m[RW][2], l[RW][2];
#pragma unroll
    for (int r = 0; r < RW; ++r) m[r][0] = m[r][1] = NEG_INF, l[r][0] = l[r][1] = 0.0f;
    const int w0 = q0 + warp * WR;
    const u16* sQw = sQ + warp * WR * LD;
    cp_wait<0>();
    __syncthreads();
    // RW = 1: Q fragments stay in registers for the whole key loop.
    u32 qf[RW == 1 ? KS : 1][4];
    if constexpr (RW == 1) {
        const u32 a_base = smem_u32(sQw + (lane & 15) * LD + (lane >> 4) * 8);
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) ldsm_x4(qf[ks], a_base + ks * 32);
    }

    for (int kt = kt0; kt < kt1; ++kt) {
        const int buf = (kt - kt0) & 1;
        if (kt + 1 < kt1) {
            load_tile<BC, D, LD, NT>(sK + (buf ^ 1) * BC * LD, kp, (kt + 1) * BC, T, ks, d, tid);
            load_tile<BC, D, LD, NT>(sV + (buf ^ 1) * BC * LD, vp, (kt + 1) * BC, T, ks, d, tid);
        }
        cp_commit();
        cp_wait<1>();
        __syncthreads();

        const int k0 = kt * BC;
        // Whole tile hidden from this warp's rows (a CTA's block spans more keys than a warp's).
        const bool skip = k0 > w0 + WR - 1 || (window > 0 && w0 - (k0 + BC - 1) >= window);
        if (!skip) {
            float s[RW][NB][4];
#pragma unroll
            for (int r = 0; r < RW; ++r)
#pragma unroll
                for (int i = 0; i < NB; ++i) s[r][i][0] = s[r][i][1] = s[r][i][2] = s[r][i][3] = 0.0f;
            if constexpr (RW == 1) {
                mma_rt<KS, NB, LD>(s[0], qf, sK + buf * BC * LD, lane);
            } else {
                mma_nt_rows<RW, KS, NB, LD>(s, sQw, sK + buf * BC * LD, lane);
            }
            const bool mask = k0 + BC - 1 > w0 || (window > 0 && w0 + WR - 1 - k0 >= window);
            // Interior tiles without soft-cap (most of the work) keep raw scores: the row max is
            // taken raw (scale > 0 keeps the order) and scaling folds into the exponent's FMA.
            const bool raw = !mask && cl2 <= 0.0f;
            u32 p[RW][BC / 16][4];
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                const int rows[2] = {w0 + r * 16 + g, w0 + r * 16 + g + 8};
                float mx[2] = {m[r][0], m[r][1]};
                if (raw) {
                    float tmx[2] = {NEG_INF, NEG_INF};
#pragma unroll
                    for (int nb = 0; nb < NB; ++nb) {
                        tmx[0] = fmaxf(tmx[0], fmaxf(s[r][nb][0], s[r][nb][1]));
                        tmx[1] = fmaxf(tmx[1], fmaxf(s[r][nb][2], s[r][nb][3]));
                    }
                    mx[0] = fmaxf(mx[0], tmx[0] * sl2);
                    mx[1] = fmaxf(mx[1], tmx[1] * sl2);
                } else {
#pragma unroll
                    for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            float dc;
                            float x = score2(s[r][nb][e], sl2, sc, cl2, &dc);
                            if (mask && hidden(rows[e >> 1], k0 + nb * 8 + 2 * t4 + (e & 1), window)) x = NEG_INF;
                            s[r][nb][e] = x;
                            mx[e >> 1] = fmaxf(mx[e >> 1], x);
                        }
                    }
                }
                float corr[2], base[2], rs[2] = {0.0f, 0.0f};
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 1));
                    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 2));
                    // A row with nothing visible yet keeps max −inf; exp2(−inf − 0) = 0 keeps it empty.
                    base[i] = mx[i] == NEG_INF ? 0.0f : mx[i];
                    corr[i] = ex2(m[r][i] - base[i]);
                    m[r][i] = mx[i];
                }
#pragma unroll
                for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float x = s[r][nb][e];
                        s[r][nb][e] = raw ? ex2(fmaf(x, sl2, -base[e >> 1])) : ex2(x - base[e >> 1]);
                        rs[e >> 1] += s[r][nb][e];
                    }
                }
#pragma unroll
                for (int i = 0; i < 2; ++i) l[r][i] = l[r][i] * corr[i] + rs[i];
#pragma unroll
                for (int no = 0; no < NO; ++no) {
                    acc[r][no][0] *= corr[0];
                    acc[r][no][1] *= corr[0];
                    acc[r][no][2] *= corr[1];
                    acc[r][no][3] *= corr[1];
                }
                to_frags<BC / 16>(p[r], s[r]);
            }
            mma_rn_rows<RW, BC / 16, NO, LD>(acc, p, sV + buf * BC * LD, lane);
        }
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < RW; ++r) {
        const int rows[2] = {w0 + r * 16 + g, w0 + r * 16 + g + 8};
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            l[r][i] += __shfl_xor_sync(0xffffffff, l[r][i], 1);
            l[r][i] += __shfl_xor_sync(0xffffffff, l[r][i], 2);
        }
        const float inv[2] = {l[r][0] > 0.0f ? 1.0f / l[r][0] : 0.0f, l[r][1] > 0.0f ? 1.0f / l[r][1] : 0.0f};
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            if (rows[i] >= T) continue;
            u16* orow = o + (long long)rows[i] * qs + (long long)h * d;
#pragma unroll
            for (int no = 0; no < NO; ++no) {
                const int col = no * 8 + 2 * t4;
                if (col < d)
                    *(u32*)(orow + col) = pack_bf16(acc[r][no][2 * i] * inv[i], acc[r][no][2 * i + 1] * inv[i]);
            }
            if (lse != 0 && t4 == 0) lse[(long long)h * T + rows[i]] = m[r][i] + log2f(l[r][i]);
        }
    }
}

// delta[h, i] = Σ_c dO[i, h, c]·O[i, h, c] (the softmax backward's row term); one warp per row.
extern "C" __global__ void flash_bwd_delta(const u16* __restrict__ o, const u16* __restrict__ g,
                                           float* __restrict__ delta, int T, int nh, int d) {
    const long long idx = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (idx >= (long long)T * nh) return;
    const u16* orow = o + idx * d;
    const u16* grow = g + idx * d;
    float sum = 0.0f;
    for (int c = lane; c < d; c += 32) sum += bf16_f32(orow[c]) * bf16_f32(grow[c]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, off);
    if (lane == 0) delta[(idx % nh) * T + idx / nh] = sum;
}

// ---------------------------------------------------------------------------------------------
// dQ: one CTA per (query block, head), the forward's tiling; each warp owns RW groups of 16 query
// rows (RW = 2 shares every K and V fragment between two row groups, as the forward). Per key tile:
// S = Q·Kᵀ, dP = dO·Vᵀ, P = exp2(S₂ − lse), dS = P∘(dP − delta)∘cap', dQ += dS·K; dQ·scale at the end.
template <int D, int NW, int BC, int RW>
__device__ __forceinline__ void flash_bwd_dq(const u16* __restrict__ q, const u16* __restrict__ k,
                                             const u16* __restrict__ v, const u16* __restrict__ go,
                                             const float* __restrict__ lse, const float* __restrict__ delta,
                                             u16* __restrict__ dqkv, int T, int nh, int nkv, int d, float scale,
                                             int window, float cap) {
    constexpr int WR = 16 * RW, BR = WR * NW, LD = D + 8, NT = 32 * NW, KS = D / 16, NB = BC / 8, NO = D / 8;
    extern __shared__ __align__(16) u16 smem[];
    u16* sQ = smem;
    u16* sG = sQ + BR * LD;
    u16* sK = sG + BR * LD;
    u16* sV = sK + 2 * BC * LD;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const float sl2 = scale * LOG2E, sc = cap > 0.0f ? scale / cap : 0.0f, cl2 = cap > 0.0f ? cap * LOG2E : 0.0f;
    const int nqb = (T + BR - 1) / BR, h = blockIdx.x % nh, kh = h / (nh / nkv);
    const int q0 = (nqb - 1 - blockIdx.x / nh) * BR;  // longest first, as the forward
    const long long qs = (long long)nh * d, ks = (long long)nkv * d;
    const u16* kp = k + (long long)kh * d;
    const u16* vp = v + (long long)kh * d;
    const int kt0 = first_key(q0, window) / BC, kt1 = (min(T, q0 + BR) + BC - 1) / BC;

    load_tile<BR, D, LD, NT>(sQ, q + (long long)h * d, q0, T, qs, d, tid);
    load_tile<BR, D, LD, NT>(sG, go + (long long)h * d, q0, T, qs, d, tid);
    load_tile<BC, D, LD, NT>(sK, kp, kt0 * BC, T, ks, d, tid);
    load_tile<BC, D, LD, NT>(sV, vp, kt0 * BC, T, ks, d, tid);
    cp_commit();

    const int w0 = q0 + warp * WR;
    float L[RW][2], Dl[RW][2];
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            // Padded rows: dO is zero there, so dS is zero whatever P is.
            const int row = w0 + r * 16 + g + 8 * i;
            L[r][i] = row < T ? lse[(long long)h * T + row] : 0.0f;
            Dl[r][i] = row < T ? delta[(long long)h * T + row] : 0.0f;
        }
    float dq[RW][NO][4];
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
        for (int i = 0; i < NO; ++i) dq[r][i][0] = dq[r][i][1] = dq[r][i][2] = dq[r][i][3] = 0.0f;

    for (int kt = kt0; kt < kt1; ++kt) {
        const int buf = (kt - kt0) & 1;
        if (kt + 1 < kt1) {
            load_tile<BC, D, LD, NT>(sK + (buf ^ 1) * BC * LD, kp, (kt + 1) * BC, T, ks, d, tid);
            load_tile<BC, D, LD, NT>(sV + (buf ^ 1) * BC * LD, vp, (kt + 1) * BC, T, ks, d, tid);
        }
        cp_commit();
        cp_wait<1>();
        __syncthreads();

        const int k0 = kt * BC;
        const bool skip = k0 > w0 + WR - 1 || (window > 0 && w0 - (k0 + BC - 1) >= window);
        if (!skip) {
            float s[RW][NB][4], dp[RW][NB][4];
#pragma unroll
            for (int r = 0; r < RW; ++r)
#pragma unroll
                for (int i = 0; i < NB; ++i) {
                    s[r][i][0] = s[r][i][1] = s[r][i][2] = s[r][i][3] = 0.0f;
                    dp[r][i][0] = dp[r][i][1] = dp[r][i][2] = dp[r][i][3] = 0.0f;
                }
            mma_nt_rows<RW, KS, NB, LD>(s, sQ + warp * WR * LD, sK + buf * BC * LD, lane);
            mma_nt_rows<RW, KS, NB, LD>(dp, sG + warp * WR * LD, sV + buf * BC * LD, lane);
            const bool mask = k0 + BC - 1 > w0 || (window > 0 && w0 + WR - 1 - k0 >= window);
            u32 f[RW][BC / 16][4];
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                const int rows[2] = {w0 + r * 16 + g, w0 + r * 16 + g + 8};
#pragma unroll
                for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float dc;
                        const float x = score2(s[r][nb][e], sl2, sc, cl2, &dc);
                        const bool hid = mask && hidden(rows[e >> 1], k0 + nb * 8 + 2 * t4 + (e & 1), window);
                        const float p = hid ? 0.0f : ex2(x - L[r][e >> 1]);
                        s[r][nb][e] = p * (dp[r][nb][e] - Dl[r][e >> 1]) * dc;
                    }
                }
                to_frags<BC / 16>(f[r], s[r]);
            }
            mma_rn_rows<RW, BC / 16, NO, LD>(dq, f, sK + buf * BC * LD, lane);
        }
        __syncthreads();
    }

    const long long os = (long long)(nh + 2 * nkv) * d;
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int row = w0 + r * 16 + g + 8 * i;
            if (row >= T) continue;
            u16* orow = dqkv + (long long)row * os + (long long)h * d;
#pragma unroll
            for (int no = 0; no < NO; ++no) {
                const int col = no * 8 + 2 * t4;
                if (col < d)
                    *(u32*)(orow + col) = pack_bf16(dq[r][no][2 * i] * scale, dq[r][no][2 * i + 1] * scale);
            }
        }
}

// One query tile's share of dK and dV for a warp's 16 keys (K rows at sKw, V rows at sVw; Q, dO
// of the tile at q_t, g_t; lse, delta at L, Dl), leaving dSᵀ (bf16, keys x queries) in pf as A
// fragments. Sᵀ = K·Qᵀ, Pᵀ = exp2(Sᵀ₂ − lse), dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − delta)∘cap',
// dK += dSᵀ·Q. Staged to bound registers (dK and dV already hold 2·D/8·4 floats): Pᵀ and the
// soft-cap derivative are kept as bf16 fragments only, so the Sᵀ tile is dead before the dPᵀ tile
// is live. dS then uses P rounded to bf16, as the dV product does.
template <int D, int BQ>
__device__ __forceinline__ void dkdv_tile(float (*dk)[4], float (*dv)[4], u32 (*pf)[4], const u16* sKw,
                                          const u16* sVw, const u16* q_t, const u16* g_t, const float* L,
                                          const float* Dl, int i0, const int* keys, bool mask, int T, int window,
                                          float sl2, float sc, float cl2, int lane) {
    constexpr int LD = D + 8, KS = D / 16, NB = BQ / 8, NO = D / 8;
    const int t4 = lane & 3;
    u32 cf[BQ / 16][4];
    {
        float st[NB][4];
#pragma unroll
        for (int i = 0; i < NB; ++i) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.0f;
        mma_nt<KS, NB, LD>(st, sKw, q_t, lane);
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                float p[2], dc[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = nb * 8 + 2 * t4 + e, i = i0 + c;
                    const float x = score2(st[nb][2 * half + e], sl2, sc, cl2, &dc[e]);
                    const bool hid = mask && (i >= T || hidden(i, keys[half], window));
                    p[e] = hid ? 0.0f : ex2(x - L[c]);
                }
                // Fragment slot of accumulator tile nb, row half `half` (see to_frags).
                pf[nb >> 1][(nb & 1) * 2 + half] = pack_bf16(p[0], p[1]);
                cf[nb >> 1][(nb & 1) * 2 + half] = pack_bf16(dc[0], dc[1]);
            }
        }
    }
    mma_rn<BQ / 16, NO, LD>(dv, pf, g_t, lane);
    {
        float dpt[NB][4];
#pragma unroll
        for (int i = 0; i < NB; ++i) dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.0f;
        mma_nt<KS, NB, LD>(dpt, sVw, g_t, lane);
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                u32& slot = pf[nb >> 1][(nb & 1) * 2 + half];
                const u32 c2 = cf[nb >> 1][(nb & 1) * 2 + half];
                const int c = nb * 8 + 2 * t4;
                const float ds0 = bf16_lo(slot) * (dpt[nb][2 * half] - Dl[c]) * bf16_lo(c2);
                const float ds1 = bf16_hi(slot) * (dpt[nb][2 * half + 1] - Dl[c + 1]) * bf16_hi(c2);
                slot = pack_bf16(ds0, ds1);
            }
        }
    }
    mma_rn<BQ / 16, NO, LD>(dk, pf, q_t, lane);
}

// A warp's dK and dV (rows keys[0], keys[1] of each thread): bf16 into dqkv (dK scaled) where
// one CTA owns the whole GQA group (nsplit == 1), else unscaled f32 partials
// part[split][key][2·nkv·d] (dK heads, then dV heads) for flash_bwd_dkdv_reduce.
template <int D>
__device__ __forceinline__ void dkdv_store(const float (*dk)[4], const float (*dv)[4], const int* keys,
                                           float* __restrict__ part, int nsplit, int split, u16* __restrict__ dqkv,
                                           int T, int nh, int nkv, int kh, int d, float scale, int t4) {
    constexpr int NO = D / 8;
    if (nsplit > 1) {
        const long long ps = 2LL * nkv * d;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            if (keys[i] >= T) continue;
            float* prow = part + ((long long)split * T + keys[i]) * ps + (long long)kh * d;
#pragma unroll
            for (int no = 0; no < NO; ++no) {
                const int col = no * 8 + 2 * t4;
                if (col < d) {
                    *(float2*)(prow + col) = make_float2(dk[no][2 * i], dk[no][2 * i + 1]);
                    *(float2*)(prow + (long long)nkv * d + col) = make_float2(dv[no][2 * i], dv[no][2 * i + 1]);
                }
            }
        }
        return;
    }
    const long long os = (long long)(nh + 2 * nkv) * d;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (keys[i] >= T) continue;
        u16* krow = dqkv + (long long)keys[i] * os + (long long)(nh + kh) * d;
        u16* vrow = dqkv + (long long)keys[i] * os + (long long)(nh + nkv + kh) * d;
#pragma unroll
        for (int no = 0; no < NO; ++no) {
            const int col = no * 8 + 2 * t4;
            if (col < d) {
                *(u32*)(krow + col) = pack_bf16(dk[no][2 * i] * scale, dk[no][2 * i + 1] * scale);
                *(u32*)(vrow + col) = pack_bf16(dv[no][2 * i], dv[no][2 * i + 1]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// dK, dV: one CTA per (key block of 16·NW keys, KV head, split of the GQA group); each warp owns
// 16 keys and keeps their dK and dV (16 x D each, f32) in registers over the split's query heads
// (group / nsplit of them) and every query tile of BQ rows that can see the block (causal: from
// the block on; window: up to w past it).
// Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, Pᵀ = exp2(Sᵀ₂ − lse), dV += Pᵀ·dO, dSᵀ = Pᵀ∘(dPᵀ − delta)∘cap',
// dK += dSᵀ·Q; dK·scale at the end.
// nsplit == 1: dK, dV go to dqkv directly. nsplit > 1 (more, shorter CTAs: a causal key block 0
// otherwise runs group times longer than the average CTA, which at few CTAs per SM is the
// kernel's length): unscaled f32 partials go to part[split][key][2·nkv·d] (dK heads, then dV
// heads), and flash_bwd_dkdv_reduce sums the splits in index order — deterministic.
template <int D, int NW, int BQ>
__device__ __forceinline__ void flash_bwd_dkdv(const u16* __restrict__ q, const u16* __restrict__ k,
                                               const u16* __restrict__ v, const u16* __restrict__ go,
                                               const float* __restrict__ lse, const float* __restrict__ delta,
                                               u16* __restrict__ dqkv, float* __restrict__ part, int nsplit,
                                               int T, int nh, int nkv, int d, float scale, int window,
                                               float cap) {
    constexpr int BK = 16 * NW, LD = D + 8, NT = 32 * NW, NO = D / 8;
    extern __shared__ __align__(16) u16 smem[];
    u16* sK = smem;
    u16* sV = sK + BK * LD;
    u16* sQ = sV + BK * LD;
    u16* sG = sQ + 2 * BQ * LD;
    float* sL = (float*)(sG + 2 * BQ * LD);
    float* sD = sL + 2 * BQ;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2;
    const float sl2 = scale * LOG2E, sc = cap > 0.0f ? scale / cap : 0.0f, cl2 = cap > 0.0f ? cap * LOG2E : 0.0f;
    // Key block 0 sees the most queries: block-major order starts every head's first block first.
    const int per_block = nkv * nsplit, split = blockIdx.x % nsplit;
    const int k0 = (blockIdx.x / per_block) * BK, kh = (blockIdx.x % per_block) / nsplit;
    const int group = nh / nkv, heads = group / nsplit, h0 = kh * group + split * heads;
    const long long qs = (long long)nh * d, ks = (long long)nkv * d;
    const int qend = window > 0 ? min(T, k0 + BK - 1 + window) : T;
    const int qt0 = k0 / BQ, nq = (qend + BQ - 1) / BQ - qt0, total = heads * nq;

    load_tile<BK, D, LD, NT>(sK, k + (long long)kh * d, k0, T, ks, d, tid);
    load_tile<BK, D, LD, NT>(sV, v + (long long)kh * d, k0, T, ks, d, tid);
    // Query tile `it` (head-major over the group) into buffer `b`, statistics included: all
    // asynchronous (a plain load here would stall every iteration on global latency).
    auto load_q = [&](int it, int b) {
        const int h = h0 + it / nq, i0 = (qt0 + it % nq) * BQ;
        load_tile<BQ, D, LD, NT>(sQ + b * BQ * LD, q + (long long)h * d, i0, T, qs, d, tid);
        load_tile<BQ, D, LD, NT>(sG + b * BQ * LD, go + (long long)h * d, i0, T, qs, d, tid);
        for (int r = tid; r < BQ; r += NT) {
            const int i = i0 + r;
            const bool ok = i < T;
            const long long at = ok ? (long long)h * T + i : 0;
            cp_async4(smem_u32(sL + b * BQ + r), lse + at, ok);
            cp_async4(smem_u32(sD + b * BQ + r), delta + at, ok);
        }
    };
    load_q(0, 0);
    cp_commit();

    float dk[NO][4], dv[NO][4];
#pragma unroll
    for (int i = 0; i < NO; ++i) {
        dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.0f;
        dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.0f;
    }
    const int w0 = k0 + warp * 16;
    const int keys[2] = {w0 + g, w0 + g + 8};

    for (int it = 0; it < total; ++it) {
        const int buf = it & 1;
        if (it + 1 < total) load_q(it + 1, buf ^ 1);
        cp_commit();
        cp_wait<1>();
        __syncthreads();

        const int i0 = (qt0 + it % nq) * BQ;
        // Every query of the tile before this warp's keys, or all of them past the window.
        const bool skip = i0 + BQ - 1 < w0 || (window > 0 && i0 - (w0 + 15) >= window);
        if (!skip) {
            const u16* q_t = sQ + buf * BQ * LD;
            const u16* g_t = sG + buf * BQ * LD;
            const bool mask = i0 + BQ > T || w0 + 15 > i0 || (window > 0 && i0 + BQ - 1 - w0 >= window);
            u32 pf[BQ / 16][4];
            dkdv_tile<D, BQ>(dk, dv, pf, sK + warp * 16 * LD, sV + warp * 16 * LD, q_t, g_t, sL + buf * BQ,
                             sD + buf * BQ, i0, keys, mask, T, window, sl2, sc, cl2, lane);
        }
        __syncthreads();
    }

    dkdv_store<D>(dk, dv, keys, part, nsplit, split, dqkv, T, nh, nkv, kh, d, scale, lane & 3);
}

// dK, dV of flash_bwd_dkdv's partials: 4 elements per thread of [T, 2·nkv·d], the splits summed in
// index order, dK scaled after the sum (as the unsplit kernel scales its register sum).
extern "C" __global__ void flash_bwd_dkdv_reduce(const float* __restrict__ part, u16* __restrict__ dqkv,
                                                 int T, int nh, int nkv, int d, int nsplit, float scale) {
    const long long ps = 2LL * nkv * d, n = (long long)T * ps;
    const long long e = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (e >= n) return;
    float4 sum = *(const float4*)(part + e);
    for (int s = 1; s < nsplit; ++s) {
        const float4 x = *(const float4*)(part + (long long)s * n + e);
        sum.x += x.x;
        sum.y += x.y;
        sum.z += x.z;
        sum.w += x.w;
    }
    const long long row = e / ps, within = e % ps;
    const float f = within < (long long)nkv * d ? scale : 1.0f;
    // d % 8 == 0: the 4 elements are in one head row, 8-byte aligned in dqkv.
    *(uint2*)(dqkv + row * (nh + 2LL * nkv) * d + (long long)nh * d + within) =
        make_uint2(pack_bf16(sum.x * f, sum.y * f), pack_bf16(sum.z * f, sum.w * f));
}

// ---------------------------------------------------------------------------------------------
// The whole backward in one pass (FlashAttention-2's loop), causal without a window: one CTA per
// (key block of BK = 16·NW keys, query head); each warp keeps its 16 keys' dK and dV in registers
// (dkdv_tile) while the query tiles i = last .. kb stream through, and the CTA also produces the
// tile's dQ share dS·K (5 tile products per tile instead of the two-kernel path's 7).
// dSᵀ goes through shared memory (the tile's dO buffer, free once every warp has its dPᵀ) so
// that each warp multiplies 16 query rows by all BK keys.
//
// dQ is summed over key blocks in a fixed order, so it is bitwise deterministic: per (head, query
// tile) a counter sem says how many key blocks have added their share to the f32 scratch dqacc
// [nh, T, d]; key block kb waits for sem == kb. Key block 0 stores (no zeroing pass), the middle
// ones add, and the last one (kb == i, the diagonal) reads the sum, adds its own share and writes
// dQ·scale as bf16 into dqkv. No deadlock: a CTA waits only for a lower key block of its head,
// which has a lower blockIdx (block-major grid), so it was started before it; the chain ends at
// key block 0, which never waits. Query tiles are visited last to first so that neighbouring key
// blocks, started about together, reach tile i at the same step: the wait is about one tile's
// dQ add, not a step per key block (ascending order makes block kb trail block kb−1 by a step).
// dSᵀ needs rows of BQ + 8: below D = 64 the dO buffer's rows are too short, and dSᵀ gets its
// own region after the statistics.
// dK, dV as flash_bwd_dkdv with nsplit = the GQA group (dkdv_store, then flash_bwd_dkdv_reduce).
__device__ __forceinline__ void sem_wait(const int* s, int want) {
    int v;
    do {
        asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(s) : "memory");
    } while (v != want);
}

// Four f32 added to global memory (16-byte aligned), no return value: one vector reduction on
// sm_90 (the dQ additions are the one-pass kernel's largest cost; fewer, wider ones halve the
// operations the L2 must do), scalar atomics before.
__device__ __forceinline__ void red_add4(float* p, float a, float b, float c, float e) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(e)
                 : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
    atomicAdd(p + 2, c);
    atomicAdd(p + 3, e);
#endif
}

// BK = 16·NW keys per CTA, query tiles of BQ rows (BK a multiple of BQ: key block kb's diagonal
// covers query tiles kb·BK/BQ ..). The dQ step splits the BQ x D tile over the warps: BQ/16 row
// groups times NW/(BQ/16) column groups, CH accumulator tiles (8 columns each) per product.
template <int D, int NW, int BQ, int CH>
__device__ __forceinline__ void flash_bwd_fused(const u16* __restrict__ q, const u16* __restrict__ k,
                                                const u16* __restrict__ v, const u16* __restrict__ go,
                                                const float* __restrict__ lse, const float* __restrict__ delta,
                                                u16* __restrict__ dqkv, float* __restrict__ part,
                                                float* __restrict__ dqacc, int* __restrict__ sem, int T, int nh,
                                                int nkv, int d, float scale, float cap) {
    constexpr int BK = 16 * NW, LD = D + 8, NT = 32 * NW, NO = D / 8, R = BK / BQ;
    constexpr int RG = BQ / 16, CG = NW / RG, NOW = NO / CG;
    static_assert(BK % BQ == 0 && NW % RG == 0 && NO % CG == 0 && NOW % CH == 0, "fused tiling");
    // dSᵀ [key][query] takes the dO tile's place where that has BK rows of at least BQ + 8.
    constexpr bool OWN_S = LD < BQ + 8 || BK > BQ;
    constexpr int LDS = OWN_S ? BQ + 8 : LD;
    extern __shared__ __align__(16) u16 smem[];
    u16* sK = smem;
    u16* sV = sK + BK * LD;
    u16* sQ = sV + BK * LD;
    u16* sG = sQ + 2 * BQ * LD;
    float* sL = (float*)(sG + 2 * BQ * LD);
    float* sD = sL + 2 * BQ;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const float sl2 = scale * LOG2E, sc = cap > 0.0f ? scale / cap : 0.0f, cl2 = cap > 0.0f ? cap * LOG2E : 0.0f;
    const int nq = (T + BQ - 1) / BQ, kb = blockIdx.x / nh, h = blockIdx.x % nh;
    const int group = nh / nkv, kh = h / group, split = h % group, k0 = kb * BK, total = nq - kb * R;
    const long long qs = (long long)nh * d, ks = (long long)nkv * d;

    load_tile<BK, D, LD, NT>(sK, k + (long long)kh * d, k0, T, ks, d, tid);
    load_tile<BK, D, LD, NT>(sV, v + (long long)kh * d, k0, T, ks, d, tid);
    auto load_q = [&](int it, int b) {
        const int i0 = (nq - 1 - it) * BQ;
        load_tile<BQ, D, LD, NT>(sQ + b * BQ * LD, q + (long long)h * d, i0, T, qs, d, tid);
        load_tile<BQ, D, LD, NT>(sG + b * BQ * LD, go + (long long)h * d, i0, T, qs, d, tid);
        for (int r = tid; r < BQ; r += NT) {
            const int i = i0 + r;
            const bool ok = i < T;
            const long long at = ok ? (long long)h * T + i : 0;
            cp_async4(smem_u32(sL + b * BQ + r), lse + at, ok);
            cp_async4(smem_u32(sD + b * BQ + r), delta + at, ok);
        }
    };
    load_q(0, 0);
    cp_commit();

    float dk[NO][4], dv[NO][4];
#pragma unroll
    for (int i = 0; i < NO; ++i) {
        dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.0f;
        dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.0f;
    }
    const int w0 = k0 + warp * 16;
    const int keys[2] = {w0 + g, w0 + g + 8};
    const long long os = (long long)(nh + 2 * nkv) * d;
    const int rg = warp % RG, cg = warp / RG;

    for (int it = 0; it < total; ++it) {
        const int buf = it & 1, qt = nq - 1 - it, i0 = qt * BQ;
        if (it + 1 < total) load_q(it + 1, buf ^ 1);
        cp_commit();
        cp_wait<1>();
        __syncthreads();

        const u16* q_t = sQ + buf * BQ * LD;
        u16* g_t = sG + buf * BQ * LD;
        u16* sS = OWN_S ? (u16*)(sD + 2 * BQ) : g_t;
        // Only diagonal tiles and a ragged last tile have hidden entries.
        const bool mask = i0 + BQ > T || w0 + 15 > i0;
        u32 pf[BQ / 16][4];
        dkdv_tile<D, BQ>(dk, dv, pf, sK + warp * 16 * LD, sV + warp * 16 * LD, q_t, g_t, sL + buf * BQ,
                         sD + buf * BQ, i0, keys, mask, T, 0, sl2, sc, cl2, lane);
        if (!OWN_S) __syncthreads();  // every warp is done with dO: its buffer takes dSᵀ
#pragma unroll
        for (int kk = 0; kk < BQ / 16; ++kk)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                *(u32*)(sS + (warp * 16 + g + 8 * (e & 1)) * LDS + kk * 16 + 8 * (e >> 1) + 2 * t4) = pf[kk][e];
        int* s = sem + (long long)h * nq + qt;
        if (kb > 0 && tid == 0) sem_wait(s, kb);
        __syncthreads();

        // dQ rows rg·16.. of the tile, columns of group cg: A = dS (ldmatrix.trans of dSᵀ),
        // B = K, reduced over the block's BK keys.
        const bool first = kb == 0, last = kb == qt / R;
        const u32 a_base = smem_u32(sS + ((lane & 7) + ((lane >> 4) << 3)) * LDS + rg * 16 + ((lane >> 3) & 1) * 8);
        const u32 b_base = smem_u32(sK + ((lane & 7) + (((lane >> 3) & 1) << 3)) * LD + (lane >> 4) * 8);
#pragma unroll
        for (int c0 = cg * NOW; c0 < (cg + 1) * NOW; c0 += CH) {
            float acc[CH][4];
#pragma unroll
            for (int i = 0; i < CH; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                u32 a[4];
                ldsm_x4_t(a, a_base + kk * 16 * LDS * 2);
#pragma unroll
                for (int nb = 0; nb < CH; nb += 2) {
                    u32 b[4];
                    ldsm_x4_t(b, b_base + (kk * 16 * LD + (c0 + nb) * 8) * 2);
                    mma16816(acc[nb], a, b[0], b[1]);
                    mma16816(acc[nb + 1], a, b[2], b[3]);
                }
            }
            if (!first && !last) {
                // Lanes t, t^1 swap pairs: the even one adds 4 columns of row g, the odd one of
                // row g + 8 (every lane shuffles, so no lane may skip ahead of the bounds test).
                const int odd = t4 & 1, row = i0 + rg * 16 + g + 8 * odd;
                float* arow = dqacc + ((long long)h * T + row) * d;
#pragma unroll
                for (int nb = 0; nb < CH; ++nb) {
                    // Selects, not a computed index: that would put acc in local memory.
                    const float s0 = odd ? acc[nb][0] : acc[nb][2], s1 = odd ? acc[nb][1] : acc[nb][3];
                    const float r0 = __shfl_xor_sync(0xffffffff, s0, 1), r1 = __shfl_xor_sync(0xffffffff, s1, 1);
                    const int col = (c0 + nb) * 8 + 2 * (t4 & 2);
                    if (row < T && col < d) {
                        if (odd)
                            red_add4(arow + col, r0, r1, acc[nb][2], acc[nb][3]);
                        else
                            red_add4(arow + col, acc[nb][0], acc[nb][1], r0, r1);
                    }
                }
                continue;
            }
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = i0 + rg * 16 + g + 8 * half;
                if (row >= T) continue;
                float* arow = dqacc + ((long long)h * T + row) * d;
#pragma unroll
                for (int nb = 0; nb < CH; ++nb) {
                    const int col = (c0 + nb) * 8 + 2 * t4;
                    if (col >= d) continue;
                    float x0 = acc[nb][2 * half], x1 = acc[nb][2 * half + 1];
                    if (last) {
                        if (!first) {
                            const float2 o = __ldcg((const float2*)(arow + col));
                            x0 = o.x + x0;
                            x1 = o.y + x1;
                        }
                        *(u32*)(dqkv + (long long)row * os + (long long)h * d + col) =
                            pack_bf16(x0 * scale, x1 * scale);
                    } else {
                        __stcg((float2*)(arow + col), make_float2(x0, x1));
                    }
                }
            }
        }
        // Release: every thread's share is issued; the fence orders them before the count.
        __syncthreads();
        if (tid == 0 && !last) {
            __threadfence();
            atomicAdd(s, 1);
        }
    }
    dkdv_store<D>(dk, dv, keys, part, group, split, dqkv, T, nh, nkv, kh, d, scale, t4);
}

// ---------------------------------------------------------------------------------------------
// Entry points, one per (tile width D, warps NW, inner tile BC or BQ). The host (flash.rs
// `Tiles`, scripts/flash_check.py `tiles`) derives grid and shared memory from the same numbers:
//   fwd:    grid ceil(T / 16·RW·NW)·nh,      block 32NW, smem (16·RW·NW + 4BC)·(D+8)·2
//   dq:     grid ceil(T / 16·RW·NW)·nh,      block 32NW, smem (32·RW·NW + 4BC)·(D+8)·2
//   dkdv:   grid ceil(T / 16NW)·nkv·nsplit,  block 32NW, smem (32NW + 4BQ)·(D+8)·2 + 16BQ
//   fused:  grid ceil(T / 16NW)·nh,          block 32NW, smem 6·16NW·(D+8)·2 + 16·16NW
//           (+ 16NW·(16NW+8)·2 where D < 16NW); scratch dqacc f32 nh·T·d, sem int nh·ceil(T/16NW)
//           zeroed, part as dkdv with nsplit = nh/nkv
//   reduce: grid ceil(T·2nkv·d / 4 / 256),   block 256 (only where nsplit > 1)
#define FWD(name, D, NW, BC, RW)                                                                               \
    extern "C" __global__ void __launch_bounds__(32 * NW) name(                                                \
        const u16* q, const u16* k, const u16* v, u16* o, float* lse, int T, int nh, int nkv, int d,          \
        float scale, int window, float cap) {                                                                  \
        flash_fwd<D, NW, BC, RW>(q, k, v, o, lse, T, nh, nkv, d, scale, window, cap);                          \
    }
#define DQ(name, D, NW, BC, RW)                                                                                \
    extern "C" __global__ void __launch_bounds__(32 * NW) name(                                                \
        const u16* q, const u16* k, const u16* v, const u16* go, const float* lse, const float* delta,         \
        u16* dqkv, int T, int nh, int nkv, int d, float scale, int window, float cap) {                        \
        flash_bwd_dq<D, NW, BC, RW>(q, k, v, go, lse, delta, dqkv, T, nh, nkv, d, scale, window, cap);         \
    }
#define DKDV(name, D, NW, BQ, MINB)                                                                            \
    extern "C" __global__ void __launch_bounds__(32 * NW, MINB) name(                                                \
        const u16* q, const u16* k, const u16* v, const u16* go, const float* lse, const float* delta,         \
        u16* dqkv, float* part, int nsplit, int T, int nh, int nkv, int d, float scale, int window,            \
        float cap) {                                                                                           \
        flash_bwd_dkdv<D, NW, BQ>(q, k, v, go, lse, delta, dqkv, part, nsplit, T, nh, nkv, d, scale, window,   \
                                  cap);                                                                        \
    }

// Measured on an H200 (notes/CUDA.md): at D = 128 the forward's 2 row groups per warp (4 warps)
// beat 1 group with 8 warps by 1.25x; at D = 64 they gain 2 % in the forward and in dQ (noise,
// for 238-255 registers instead of 136-168). The backward kernels are fastest with 4 warps and
// 16 rows each (register-bound: dK and dV, or dQ, plus two score tiles); a dK/dV query tile
// of 32, or 8 warps, lost 8-12 %. __launch_bounds__(.., 3) keeps dK/dV at D = 64 at 168
// registers (3 CTAs per SM; the split's epilogue had pushed it to 220).
#define FUSED(name, D, NW, BQ, CH, MINB)                                                               \
    extern "C" __global__ void __launch_bounds__(32 * NW, MINB) name(                                          \
        const u16* q, const u16* k, const u16* v, const u16* go, const float* lse, const float* delta,         \
        u16* dqkv, float* part, float* dqacc, int* sem, int T, int nh, int nkv, int d, float scale,            \
        float cap) {                                                                                           \
        flash_bwd_fused<D, NW, BQ, CH>(q, k, v, go, lse, delta, dqkv, part, dqacc, sem, T, nh, nkv, d, scale,  \
                                       cap);                                                                   \
    }

FWD(flash_fwd_d32, 32, 4, 64, 1)
FWD(flash_fwd_d64, 64, 4, 64, 1)
FWD(flash_fwd_d128, 128, 4, 64, 2)
DQ(flash_bwd_dq_d32, 32, 4, 64, 1)
DQ(flash_bwd_dq_d64, 64, 4, 64, 1)
DQ(flash_bwd_dq_d128, 128, 4, 64, 1)
DKDV(flash_bwd_dkdv_d32, 32, 4, 64, 1)
DKDV(flash_bwd_dkdv_d64, 64, 4, 64, 3)
DKDV(flash_bwd_dkdv_d128, 128, 4, 64, 1)
// One-pass backward: 128 keys per CTA (8 warps) at D = 128 halve the dQ additions against 64
// (2.40 against 2.60 ms at T = 4096); at D = 64, 4 warps keep 3 CTAs per SM (1.42 against 1.70).
FUSED(flash_bwd_fused_d32, 32, 4, 64, 4, 1)
FUSED(flash_bwd_fused_d64, 64, 4, 64, 8, 3)
FUSED(flash_bwd_fused_d128, 128, 8, 64, 8, 1)
