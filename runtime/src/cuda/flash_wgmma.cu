// Flash attention on sm_90a with warpgroup MMA (`wgmma.mma_async`), appended to flash_attn.cu
// (whose helpers it uses) and compiled together with it for `sm_90a` where the device is
// compute capability 9.0 (flash.rs); every other device, and the shapes these kernels do not
// take (d <= 32: no 64-wide tile), keep flash_attn.cu's `mma.sync` kernels. Same semantics,
// same numerics (f32 accumulation, P and dS rounded to bf16 before their products, lse in
// log2 units from the forward), same deterministic two-kernel backward.
//
// Why wgmma: `mma.sync` peaked at 186-225 TFLOP/s in these kernels (notes/CUDA.md) against
// ~790 for bf16 GEMMs on an H200: a warpgroup (4 warps, 128 threads) issues one 64 x N x 16
// product reading both operands (or B only) straight from shared memory, asynchronously.
//
// Shared memory: every tile (Q, K, V, dO) of R rows x D columns is stored in the 128-byte
// swizzle that wgmma's descriptors describe: D/64 panels of R rows x 128 bytes (64 columns),
// the 16-byte chunk j of row r at chunk j ^ (r % 8) of its row, panels 1024-byte aligned.
// cp.async writes it (generic proxy); `fence.proxy.async` makes those writes visible to wgmma
// (async proxy) before the barrier that hands the tile over.
// * K-major operand (A or B of a product contracting over the columns: Q·Kᵀ, dO·Vᵀ, K·Qᵀ,
//   V·dOᵀ): for the k-step ks (16 columns) the descriptor starts at panel ks/4, byte 32·(ks%4)
//   of the first row; stride byte offset 1024 (8 rows of 128 bytes); the leading offset is
//   unused with a swizzle (1).
// * MN-major B (contracting over rows: P·V, dS·K, Pᵀ·dO, dSᵀ·Q): the tile's rows are the K
//   dimension, its columns N; the k-step kk starts at row 16·kk; leading byte offset = the
//   panel stride (R·128: N-adjacent 64-column blocks), stride byte offset 1024 (8 rows).
//
// Register fragments (PTX ISA, wgmma .m64nNk16): warp w of the warpgroup owns rows 16w..16w+15
// and, within them, exactly the layout of mma.m16n8k16 — the f32 accumulator's tile i (8
// columns) in d[i][0..3] = (g, 8i+2t), (g, 8i+2t+1), (g+8, 8i+2t), (g+8, 8i+2t+1); the bf16 A
// fragment of a k-step as flash_attn.cu's to_frags builds it. So the softmax code is the
// mma.sync kernels' per-warp code, and P/dS go from accumulators to A registers unchanged.

typedef unsigned long long u64;

// Byte offset of element (r, c) (c a multiple of 8) in an R-row swizzled tile.
__device__ __forceinline__ u32 sw128(int r, int c, int R) {
    return (u32)((c >> 6) * R * 128 + r * 128 + ((((c >> 3) & 7) ^ (r & 7)) << 4));
}

// Rows row0.. of one head (row stride `gs` elements) into an R x D swizzled tile at shared
// address `s`; rows >= T and columns >= d are zeros, as load_tile.
template <int R, int D, int NT>
__device__ __forceinline__ void load_sw(u32 s, const u16* g, int row0, int T, long long gs, int d, int tid) {
    constexpr int CH = D / 8;
#pragma unroll
    for (int c = tid; c < R * CH; c += NT) {
        const int r = c / CH, col = (c % CH) * 8, row = row0 + r;
        const bool ok = row < T && col < d;
        cp_async16(s + sw128(r, col, R), ok ? g + row * gs + col : g, ok);
    }
}

// Shared-memory matrix descriptor, 128-byte swizzle (layout type 1 in bits 62-63); addresses
// and offsets in 16-byte units, 14 bits each.
__device__ __forceinline__ u64 wg_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr >> 4) & 0x3fff) | ((u64)((lbo >> 4) & 0x3fff) << 16) | ((u64)((sbo >> 4) & 0x3fff) << 32) |
           (1ull << 62);
}
// K-major operand: rows row0.. (a multiple of 8) of the R-row tile at `tile`, k-step ks.
__device__ __forceinline__ u64 desc_k(u32 tile, int R, int row0, int ks) {
    return wg_desc(tile + (ks >> 2) * R * 128 + row0 * 128 + (ks & 3) * 32, 16, 1024);
}
// MN-major B operand: rows 16kk.. (the contraction) and every column (N) of the R-row tile.
__device__ __forceinline__ u64 desc_mn(u32 tile, int R, int kk) {
    return wg_desc(tile + kk * 16 * 128, R * 128, 1024);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// cp.async / st.shared results (generic proxy) visible to the wgmma that reads them next.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// The compiler does not know that wgmma writes its accumulators (and reads its A registers)
// until wait_group: these empty volatile statements pin every use after the wait and every
// definition before the issue.
template <int N> __device__ __forceinline__ void reg_fence(float (*d)[4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
}
template <int N> __device__ __forceinline__ void reg_fence(u32 (*a)[4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}

// D (64 x N, f32, this thread's share) = A·B (+ D where `accumulate`): A and B K-major in shared
// memory ("SS"), or A bf16 fragments in registers and B MN-major in shared memory ("RS").
// Operand lists written out: inline asm needs every accumulator register named.
__device__ __forceinline__ void wgmma_ss_n64(float (*d)[4], u64 a, u64 b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(a), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_ss_n128(float (*d)[4], u64 a, u64 b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
          "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
          "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
          "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
          "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "l"(a), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_rs_n64(float (*d)[4], const u32* a, u64 b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_rs_n128(float (*d)[4], const u32* a, u64 b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
          "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
          "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
          "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
          "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

template <int N> __device__ __forceinline__ void wgmma_ss(float (*d)[4], u64 a, u64 b, int accumulate) {
    static_assert(N == 64 || N == 128, "wgmma_ss: N is 64 or 128");
    if constexpr (N == 64) wgmma_ss_n64(d, a, b, accumulate);
    else wgmma_ss_n128(d, a, b, accumulate);
}
template <int N> __device__ __forceinline__ void wgmma_rs(float (*d)[4], const u32* a, u64 b, int accumulate) {
    static_assert(N == 64 || N == 128, "wgmma_rs: N is 64 or 128");
    if constexpr (N == 64) wgmma_rs_n64(d, a, b, accumulate);
    else wgmma_rs_n128(d, a, b, accumulate);
}

// Shared memory is rounded up to 1024 bytes (the swizzle's period); hosts add that much.
__device__ __forceinline__ u32 wg_smem_base() {
    extern __shared__ __align__(16) unsigned char wg_smem[];
    return (smem_u32(wg_smem) + 1023u) & ~1023u;
}

// ---------------------------------------------------------------------------------------------
// Forward: one CTA per (query block of 64·NWG rows, head); warpgroup wg owns rows 64wg.., each
// warp 16 of them (the softmax is flash_fwd's per-warp code at RW = 1). Per key tile of BC rows
// (double-buffered, cp.async): S = Q·Kᵀ (SS, D/16 k-steps, N = BC), online softmax, P to bf16
// fragments, O += P·V (RS, BC/16 k-steps, N = D). Tiles hidden from a whole warpgroup are
// skipped (the product is warpgroup-wide, so the skip is per warpgroup).
template <int D, int NWG, int BC>
__device__ __forceinline__ void flash_fwd_wg(const u16* __restrict__ q, const u16* __restrict__ k,
                                             const u16* __restrict__ v, u16* __restrict__ o, float* __restrict__ lse,
                                             int T, int nh, int nkv, int d, float scale, int window, float cap) {
    constexpr int BR = 64 * NWG, NT = 128 * NWG, NB = BC / 8, NO = D / 8, KS = D / 16;
    constexpr u32 KB = BC * D * 2;
    const u32 sQ = wg_smem_base(), sK = sQ + BR * D * 2, sV = sK + 2 * KB;
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const float sl2 = scale * LOG2E, sc = cap > 0.0f ? scale / cap : 0.0f, cl2 = cap > 0.0f ? cap * LOG2E : 0.0f;
    const int nqb = (T + BR - 1) / BR, h = blockIdx.x % nh, kh = h / (nh / nkv);
    const int q0 = (nqb - 1 - blockIdx.x / nh) * BR;  // longest first, as flash_fwd
    const long long qs = (long long)nh * d, ks = (long long)nkv * d;
    const u16* kp = k + (long long)kh * d;
    const u16* vp = v + (long long)kh * d;
    const int kt0 = first_key(q0, window) / BC, kt1 = (min(T, q0 + BR) + BC - 1) / BC;

    load_sw<BR, D, NT>(sQ, q + (long long)h * d, q0, T, qs, d, tid);
    load_sw<BC, D, NT>(sK, kp, kt0 * BC, T, ks, d, tid);
    load_sw<BC, D, NT>(sV, vp, kt0 * BC, T, ks, d, tid);
    cp_commit();

    float acc[NO][4];
#pragma unroll
    for (int i = 0; i < NO; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    const int r0 = q0 + 64 * wg, w0 = r0 + 16 * warp;
    const int rows[2] = {w0 + g, w0 + g + 8};

    for (int kt = kt0; kt < kt1; ++kt) {
        const int buf = (kt - kt0) & 1;
        if (kt + 1 < kt1) {
            load_sw<BC, D, NT>(sK + (buf ^ 1) * KB, kp, (kt + 1) * BC, T, ks, d, tid);
            load_sw<BC, D, NT>(sV + (buf ^ 1) * KB, vp, (kt + 1) * BC, T, ks, d, tid);
        }
        cp_commit();
        cp_wait<1>();
        fence_async_shared();
        __syncthreads();

        const int k0 = kt * BC;
        const bool skip = k0 > r0 + 63 || (window > 0 && r0 - (k0 + BC - 1) >= window);
        if (!skip) {
            float s[NB][4];
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < KS; ++kk)
                wgmma_ss<BC>(s, desc_k(sQ, BR, 64 * wg, kk), desc_k(sK + buf * KB, BC, 0, kk), kk > 0);
            wg_commit();
            wg_wait<0>();
            reg_fence<NB>(s);

            const bool mask = k0 + BC - 1 > w0 || (window > 0 && w0 + 15 - k0 >= window);
            const bool raw = !mask && cl2 <= 0.0f;
            float mx[2] = {m[0], m[1]};
            if (raw) {
                float tmx[2] = {NEG_INF, NEG_INF};
#pragma unroll
                for (int nb = 0; nb < NB; ++nb) {
                    tmx[0] = fmaxf(tmx[0], fmaxf(s[nb][0], s[nb][1]));
                    tmx[1] = fmaxf(tmx[1], fmaxf(s[nb][2], s[nb][3]));
                }
                mx[0] = fmaxf(mx[0], tmx[0] * sl2);
                mx[1] = fmaxf(mx[1], tmx[1] * sl2);
            } else {
#pragma unroll
                for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float dc;
                        float x = score2(s[nb][e], sl2, sc, cl2, &dc);
                        if (mask && hidden(rows[e >> 1], k0 + nb * 8 + 2 * t4 + (e & 1), window)) x = NEG_INF;
                        s[nb][e] = x;
                        mx[e >> 1] = fmaxf(mx[e >> 1], x);
                    }
                }
            }
            float corr[2], base[2], rs[2] = {0.0f, 0.0f};
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 2));
                base[i] = mx[i] == NEG_INF ? 0.0f : mx[i];
                corr[i] = ex2(m[i] - base[i]);
                m[i] = mx[i];
            }
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float x = s[nb][e];
                    s[nb][e] = raw ? ex2(fmaf(x, sl2, -base[e >> 1])) : ex2(x - base[e >> 1]);
                    rs[e >> 1] += s[nb][e];
                }
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) l[i] = l[i] * corr[i] + rs[i];
#pragma unroll
            for (int no = 0; no < NO; ++no) {
                acc[no][0] *= corr[0];
                acc[no][1] *= corr[0];
                acc[no][2] *= corr[1];
                acc[no][3] *= corr[1];
            }
            u32 p[BC / 16][4];
            to_frags<BC / 16>(p, s);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk) wgmma_rs<D>(acc, p[kk], desc_mn(sV + buf * KB, BC, kk), 1);
            wg_commit();
            wg_wait<0>();
            reg_fence<NO>(acc);
            reg_fence<BC / 16>(p);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffff, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffff, l[i], 2);
    }
    const float inv[2] = {l[0] > 0.0f ? 1.0f / l[0] : 0.0f, l[1] > 0.0f ? 1.0f / l[1] : 0.0f};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (rows[i] >= T) continue;
        u16* orow = o + (long long)rows[i] * qs + (long long)h * d;
#pragma unroll
        for (int no = 0; no < NO; ++no) {
            const int col = no * 8 + 2 * t4;
            if (col < d) *(u32*)(orow + col) = pack_bf16(acc[no][2 * i] * inv[i], acc[no][2 * i + 1] * inv[i]);
        }
        if (lse != 0 && t4 == 0) lse[(long long)h * T + rows[i]] = m[i] + log2f(l[i]);
    }
}

// ---------------------------------------------------------------------------------------------
// dQ: one CTA per (query block of 64·NWG rows, head), the forward's layout. Per key tile:
// S = Q·Kᵀ and dP = dO·Vᵀ (SS, issued together), P = exp2(S₂ − lse), dS = P∘(dP − delta)∘cap',
// dQ += dS·K (RS, K as MN-major B); dQ·scale at the end.
template <int D, int NWG, int BC>
__device__ __forceinline__ void flash_bwd_dq_wg(const u16* __restrict__ q, const u16* __restrict__ k,
                                                const u16* __restrict__ v, const u16* __restrict__ go,
                                                const float* __restrict__ lse, const float* __restrict__ delta,
                                                u16* __restrict__ dqkv, int T, int nh, int nkv, int d, float scale,
                                                int window, float cap) {
    constexpr int BR = 64 * NWG, NT = 128 * NWG, NB = BC / 8, NO = D / 8, KS = D / 16;
    constexpr u32 QB = BR * D * 2, KB = BC * D * 2;
    const u32 sQ = wg_smem_base(), sG = sQ + QB, sK = sG + QB, sV = sK + 2 * KB;
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const float sl2 = scale * LOG2E, sc = cap > 0.0f ? scale / cap : 0.0f, cl2 = cap > 0.0f ? cap * LOG2E : 0.0f;
    const int nqb = (T + BR - 1) / BR, h = blockIdx.x % nh, kh = h / (nh / nkv);
    const int q0 = (nqb - 1 - blockIdx.x / nh) * BR;
    const long long qs = (long long)nh * d, ks = (long long)nkv * d;
    const u16* kp = k + (long long)kh * d;
    const u16* vp = v + (long long)kh * d;
    const int kt0 = first_key(q0, window) / BC, kt1 = (min(T, q0 + BR) + BC - 1) / BC;

    load_sw<BR, D, NT>(sQ, q + (long long)h * d, q0, T, qs, d, tid);
    load_sw<BR, D, NT>(sG, go + (long long)h * d, q0, T, qs, d, tid);
    load_sw<BC, D, NT>(sK, kp, kt0 * BC, T, ks, d, tid);
    load_sw<BC, D, NT>(sV, vp, kt0 * BC, T, ks, d, tid);
    cp_commit();

    const int r0 = q0 + 64 * wg, w0 = r0 + 16 * warp;
    const int rows[2] = {w0 + g, w0 + g + 8};
    float L[2], Dl[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        // Padded rows: dO is zero there, so dS is zero whatever P is.
        L[i] = rows[i] < T ? lse[(long long)h * T + rows[i]] : 0.0f;
        Dl[i] = rows[i] < T ? delta[(long long)h * T + rows[i]] : 0.0f;
    }
    float dq[NO][4];
#pragma unroll
    for (int i = 0; i < NO; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.0f;

    for (int kt = kt0; kt < kt1; ++kt) {
        const int buf = (kt - kt0) & 1;
        if (kt + 1 < kt1) {
            load_sw<BC, D, NT>(sK + (buf ^ 1) * KB, kp, (kt + 1) * BC, T, ks, d, tid);
            load_sw<BC, D, NT>(sV + (buf ^ 1) * KB, vp, (kt + 1) * BC, T, ks, d, tid);
        }
        cp_commit();
        cp_wait<1>();
        fence_async_shared();
        __syncthreads();

        const int k0 = kt * BC;
        const bool skip = k0 > r0 + 63 || (window > 0 && r0 - (k0 + BC - 1) >= window);
        if (!skip) {
            float s[NB][4], dp[NB][4];
            // Two commit groups: P's exponentials run while dP = dO·Vᵀ is still in the tensor cores.
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < KS; ++kk)
                wgmma_ss<BC>(s, desc_k(sQ, BR, 64 * wg, kk), desc_k(sK + buf * KB, BC, 0, kk), kk > 0);
            wg_commit();
#pragma unroll
            for (int kk = 0; kk < KS; ++kk)
                wgmma_ss<BC>(dp, desc_k(sG, BR, 64 * wg, kk), desc_k(sV + buf * KB, BC, 0, kk), kk > 0);
            wg_commit();
            wg_wait<1>();
            reg_fence<NB>(s);
            const bool mask = k0 + BC - 1 > w0 || (window > 0 && w0 + 15 - k0 >= window);
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float dc;
                    const float x = score2(s[nb][e], sl2, sc, cl2, &dc);
                    const bool hid = mask && hidden(rows[e >> 1], k0 + nb * 8 + 2 * t4 + (e & 1), window);
                    s[nb][e] = hid ? 0.0f : ex2(x - L[e >> 1]) * dc;  // P∘cap'
                }
            }
            wg_wait<0>();
            reg_fence<NB>(dp);
#pragma unroll
            for (int nb = 0; nb < NB; ++nb)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nb][e] *= dp[nb][e] - Dl[e >> 1];
            u32 f[BC / 16][4];
            to_frags<BC / 16>(f, s);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk) wgmma_rs<D>(dq, f[kk], desc_mn(sK + buf * KB, BC, kk), 1);
            wg_commit();
            wg_wait<0>();
            reg_fence<NO>(dq);
            reg_fence<BC / 16>(f);
        }
        __syncthreads();
    }

    const long long os = (long long)(nh + 2 * nkv) * d;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (rows[i] >= T) continue;
        u16* orow = dqkv + (long long)rows[i] * os + (long long)h * d;
#pragma unroll
        for (int no = 0; no < NO; ++no) {
            const int col = no * 8 + 2 * t4;
            if (col < d) *(u32*)(orow + col) = pack_bf16(dq[no][2 * i] * scale, dq[no][2 * i + 1] * scale);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// dK, dV: one CTA per (key block of 64·NWG keys, KV head, split of the GQA group), flash_bwd_dkdv's
// grid and outputs (dkdv_store: bf16 into dqkv, or f32 partials for flash_bwd_dkdv_reduce).
// Warpgroup wg owns keys 64wg.. and keeps their dK, dV (64 x D each) in registers. Per query
// tile of BQ rows (double-buffered with its lse and delta): Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (SS,
// issued together), Pᵀ = exp2(Sᵀ₂ − lse), dSᵀ = Pᵀ∘(dPᵀ − delta)∘cap' from Pᵀ rounded to bf16 (as
// flash_bwd_dkdv), then dV += Pᵀ·dO and dK += dSᵀ·Q (RS, dO and Q as MN-major B).
template <int D, int NWG, int BQ>
__device__ __forceinline__ void flash_bwd_dkdv_wg(const u16* __restrict__ q, const u16* __restrict__ k,
                                                  const u16* __restrict__ v, const u16* __restrict__ go,
                                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                                  u16* __restrict__ dqkv, float* __restrict__ part, int nsplit, int T,
                                                  int nh, int nkv, int d, float scale, int window, float cap) {
    constexpr int BK = 64 * NWG, NT = 128 * NWG, NB = BQ / 8, NO = D / 8, KS = D / 16;
    constexpr u32 KB = BK * D * 2, QB = BQ * D * 2;
    const u32 sK = wg_smem_base(), sV = sK + KB, sQ = sV + KB, sG = sQ + 2 * QB, sS = sG + 2 * QB;
    // lse then delta, per buffer: sS + (2b + 0|1) * BQ * 4.
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const float sl2 = scale * LOG2E, sc = cap > 0.0f ? scale / cap : 0.0f, cl2 = cap > 0.0f ? cap * LOG2E : 0.0f;
    const int per_block = nkv * nsplit, split = blockIdx.x % nsplit;
    const int k0 = (blockIdx.x / per_block) * BK, kh = (blockIdx.x % per_block) / nsplit;
    const int group = nh / nkv, heads = group / nsplit, h0 = kh * group + split * heads;
    const long long qs = (long long)nh * d, ks = (long long)nkv * d;
    const int qend = window > 0 ? min(T, k0 + BK - 1 + window) : T;
    const int qt0 = k0 / BQ, nq = (qend + BQ - 1) / BQ - qt0, total = heads * nq;

    load_sw<BK, D, NT>(sK, k + (long long)kh * d, k0, T, ks, d, tid);
    load_sw<BK, D, NT>(sV, v + (long long)kh * d, k0, T, ks, d, tid);
    auto load_q = [&](int it, int b) {
        const int h = h0 + it / nq, i0 = (qt0 + it % nq) * BQ;
        load_sw<BQ, D, NT>(sQ + b * QB, q + (long long)h * d, i0, T, qs, d, tid);
        load_sw<BQ, D, NT>(sG + b * QB, go + (long long)h * d, i0, T, qs, d, tid);
        for (int r = tid; r < BQ; r += NT) {
            const int i = i0 + r;
            const bool ok = i < T;
            const long long at = ok ? (long long)h * T + i : 0;
            cp_async4(sS + ((2 * b) * BQ + r) * 4, lse + at, ok);
            cp_async4(sS + ((2 * b + 1) * BQ + r) * 4, delta + at, ok);
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
    const int r0 = k0 + 64 * wg, w0 = r0 + 16 * warp;
    const int keys[2] = {w0 + g, w0 + g + 8};
    extern __shared__ __align__(16) unsigned char wg_smem[];
    const unsigned char* gen = wg_smem + (sS - smem_u32(wg_smem));  // generic pointer to the statistics

    for (int it = 0; it < total; ++it) {
        const int buf = it & 1;
        if (it + 1 < total) load_q(it + 1, buf ^ 1);
        cp_commit();
        cp_wait<1>();
        fence_async_shared();
        __syncthreads();

        const int i0 = (qt0 + it % nq) * BQ;
        // Every query of the tile before this warpgroup's keys, or all of them past the window.
        const bool skip = i0 + BQ - 1 < r0 || (window > 0 && i0 - (r0 + 63) >= window);
        if (!skip) {
            const u32 q_t = sQ + buf * QB, g_t = sG + buf * QB;
            const float* L = (const float*)(gen + (2 * buf) * BQ * 4);
            const float* Dl = L + BQ;
            float st[NB][4], dpt[NB][4];
            // Three overlaps in one warpgroup: Pᵀ's exponentials while dPᵀ = V·dOᵀ runs, dSᵀ
            // while dV += Pᵀ·dO runs (commit groups complete in order).
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < KS; ++kk)
                wgmma_ss<BQ>(st, desc_k(sK, BK, 64 * wg, kk), desc_k(q_t, BQ, 0, kk), kk > 0);
            wg_commit();
#pragma unroll
            for (int kk = 0; kk < KS; ++kk)
                wgmma_ss<BQ>(dpt, desc_k(sV, BK, 64 * wg, kk), desc_k(g_t, BQ, 0, kk), kk > 0);
            wg_commit();
            wg_wait<1>();
            reg_fence<NB>(st);
            const bool mask = i0 + BQ > T || w0 + 15 > i0 || (window > 0 && i0 + BQ - 1 - w0 >= window);
            u32 pf[BQ / 16][4], df[BQ / 16][4];
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    float p[2];
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int c = nb * 8 + 2 * t4 + e, i = i0 + c;
                        float dc;
                        const float x = score2(st[nb][2 * half + e], sl2, sc, cl2, &dc);
                        const bool hid = mask && (i >= T || hidden(i, keys[half], window));
                        // dSᵀ from Pᵀ rounded to bf16, as the dV product sees it (flash_bwd_dkdv).
                        p[e] = hid ? 0.0f : bf16_f32((u16)(pack_bf16(ex2(x - L[c]), 0.0f) & 0xffff));
                        st[nb][2 * half + e] = p[e] * dc;
                    }
                    pf[nb >> 1][(nb & 1) * 2 + half] = pack_bf16(p[0], p[1]);
                }
            }
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BQ / 16; ++kk) wgmma_rs<D>(dv, pf[kk], desc_mn(g_t, BQ, kk), 1);
            wg_commit();
            wg_wait<1>();
            reg_fence<NB>(dpt);
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int c = nb * 8 + 2 * t4;
                    df[nb >> 1][(nb & 1) * 2 + half] = pack_bf16(st[nb][2 * half] * (dpt[nb][2 * half] - Dl[c]),
                                                                 st[nb][2 * half + 1] * (dpt[nb][2 * half + 1] - Dl[c + 1]));
                }
            }
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BQ / 16; ++kk) wgmma_rs<D>(dk, df[kk], desc_mn(q_t, BQ, kk), 1);
            wg_commit();
            wg_wait<0>();
            reg_fence<NO>(dv);
            reg_fence<NO>(dk);
            reg_fence<BQ / 16>(pf);
            reg_fence<BQ / 16>(df);
        }
        __syncthreads();
    }

    dkdv_store<D>(dk, dv, keys, part, nsplit, split, dqkv, T, nh, nkv, kh, d, scale, t4);
}

// ---------------------------------------------------------------------------------------------
// Entry points (flash.rs `WgTiles`, scripts/flash_check.py `WG_*`): 128·NWG threads, at least MINB
// CTAs per SM (register cap), shared memory 1024 (alignment) plus
//   fwd_wg:  grid ceil(T / 64NWG)·nh,           (64NWG + 4BC)·D·2
//   dq_wg:   grid ceil(T / 64NWG)·nh,           (128NWG + 4BC)·D·2
//   dkdv_wg: grid ceil(T / 64NWG)·nkv·nsplit,   (128NWG + 4BQ)·D·2 + 16BQ
#define FWD_WG(name, D, NWG, BC, MINB)                                                                               \
    extern "C" __global__ void __launch_bounds__(128 * NWG, MINB) name(                                           \
        const u16* q, const u16* k, const u16* v, u16* o, float* lse, int T, int nh, int nkv, int d,          \
        float scale, int window, float cap) {                                                                  \
        flash_fwd_wg<D, NWG, BC>(q, k, v, o, lse, T, nh, nkv, d, scale, window, cap);                          \
    }
#define DQ_WG(name, D, NWG, BC, MINB)                                                                                \
    extern "C" __global__ void __launch_bounds__(128 * NWG, MINB) name(                                           \
        const u16* q, const u16* k, const u16* v, const u16* go, const float* lse, const float* delta,         \
        u16* dqkv, int T, int nh, int nkv, int d, float scale, int window, float cap) {                        \
        flash_bwd_dq_wg<D, NWG, BC>(q, k, v, go, lse, delta, dqkv, T, nh, nkv, d, scale, window, cap);         \
    }
#define DKDV_WG(name, D, NWG, BQ, MINB)                                                                              \
    extern "C" __global__ void __launch_bounds__(128 * NWG, MINB) name(                                           \
        const u16* q, const u16* k, const u16* v, const u16* go, const float* lse, const float* delta,         \
        u16* dqkv, float* part, int nsplit, int T, int nh, int nkv, int d, float scale, int window,            \
        float cap) {                                                                                           \
        flash_bwd_dkdv_wg<D, NWG, BQ>(q, k, v, go, lse, delta, dqkv, part, nsplit, T, nh, nkv, d, scale,       \
                                      window, cap);                                                            \
    }

// Measured on an H200 (notes/CUDA.md; T = 4096, 32/8 heads, causal; ms). D = 64: forward one
// warpgroup, key tile 128: 0.300 (two warpgroups 0.407, three 0.365, key tile 64 0.305); dQ two
// warpgroups, key tile 64, 2 CTAs/SM: 0.319 (three 0.393, one at 4 CTAs/SM 0.334, two at 1 CTA/SM 0.471);
// dK/dV one warpgroup at 3 CTAs/SM: 0.708 (two 0.977, query tile 128 0.953). D = 128: forward
// two warpgroups, key tile 64, 2 CTAs/SM: 0.419 (four 0.483, three with key tile 128 0.496, key
// tile 64 0.528); dQ three warpgroups: 0.540 (two 0.624, four 1.241 with 368 bytes spilled,
// key tile 128 0.908); dK/dV two warpgroups: 1.156 (one 1.190; 244 registers leave no room).
FWD_WG(flash_fwd_wg_d64, 64, 1, 128, 1)
FWD_WG(flash_fwd_wg_d128, 128, 2, 64, 2)
DQ_WG(flash_bwd_dq_wg_d64, 64, 2, 64, 2)
DQ_WG(flash_bwd_dq_wg_d128, 128, 3, 64, 1)
DKDV_WG(flash_bwd_dkdv_wg_d64, 64, 1, 64, 3)
DKDV_WG(flash_bwd_dkdv_wg_d128, 128, 2, 64, 1)
// Candidates, compiled only where FLASH_WG_CANDIDATES is defined (flash_check.py --build-cubin),
// checked and timed by flash_check.py --variants; flash.rs never loads them.
#ifdef FLASH_WG_CANDIDATES
#endif
