// f32 products with one side no larger than a LoRA rank (runtime/src/cuda/skinny.rs says
// which product takes which kernel). cuBLAS's f32 GEMM tiles are built for square products
// and reach a quarter of memory bandwidth on these; here every kernel is shaped so that the
// big operand (or the big output) crosses memory once.
//
// True f32: every product term is one fmaf in f32, no TF32, no tensor cores (PEFT's fp32
// adapters compute this way, and the CPU reference agrees within 1e-4 relative). Each
// output sums its terms in ascending k within a split, and the splits are added in split
// order by `skinny_sum_splits`: no atomics, so a product gives the same bits every run.
//
// Operands are addressed by element strides, so one kernel covers every transpose:
//   A(i, p) = a[i*sa_i + p*sa_p]   (the big operand, i < m, p < k)
//   B(p, j) = b[p*sb_p + j*sb_j]   (the small one, j < n <= 64)
//   C(i, j) = c[i*sc_i + j*sc_j]
// A product whose small side is m runs as its transpose (skinny.rs swaps the roles).
//
// The big operand may also be bf16 (the `_bf16` kernels): a LoRA step's adapter products read
// the bf16 activations and gradients themselves instead of f32 copies of them. Each bf16
// value is widened exactly when it is read from shared memory, so the FMAs, their order and
// the result are those of the f32 kernel on a widened copy, bit for bit.

// The generated kernels of fused.rs compute a product step of a fused chain with `outer_tile`
// and apply the chain to the accumulators instead of storing them: the text between the
// OUTER_TILE marks is copied into their source.
// OUTER_TILE_BEGIN
typedef long long i64;

// Shape and strides of one product; `#[repr(C)] SkinnyArgs` in skinny.rs (all 8-byte fields).
struct SkinnyArgs {
    i64 m, n, k;
    i64 kslice;                       // k-range one split sums (a multiple of SK_BK)
    i64 sa_i, sa_p, sb_p, sb_j, sc_i, sc_j;
    i64 batch_a, batch_b, batch_c;    // elements between the matrices of a batch
    i64 split_c;                      // elements between the partial results of two splits
    i64 stages;                       // pipeline depth of the small-n kernels, 2..4
};

#define OK_BM 64
#define OK_BN 64
#define OK_BK 16
#define OK_THREADS 128

// The block's 64×64 tile of C = A·B (rows i0.., columns j0..) in registers: thread
// (tx = t & 15, ty = t >> 4) holds rows ty*4 + {0..3} and 32 + ty*4 + {0..3}, columns
// tx*4 + {0..3}, each summed over ascending k with one fmaf per term.
__device__ __forceinline__ void outer_tile(const float* __restrict__ a, const float* __restrict__ b,
                                           const SkinnyArgs& s, i64 i0, i64 j0, float acc[8][4]) {
    __shared__ __align__(16) float As[OK_BK][OK_BM + 4];
    __shared__ __align__(16) float Bs[OK_BK][OK_BN + 4];
    const int t = threadIdx.x;
    const int tx = t & 15, ty = t >> 4;

#pragma unroll
    for (int u = 0; u < 8; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] = 0.0f;

    for (i64 p0 = 0; p0 < s.k; p0 += OK_BK) {
#pragma unroll
        for (int q = 0; q < OK_BM * OK_BK / OK_THREADS; ++q) {
            int f = q * OK_THREADS + t;
            int kk, row;
            if (s.sa_p == 1) { kk = f & (OK_BK - 1); row = f / OK_BK; } else { row = f & (OK_BM - 1); kk = f / OK_BM; }
            i64 i = i0 + row, p = p0 + kk;
            As[kk][row] = (i < s.m && p < s.k) ? a[i * s.sa_i + p * s.sa_p] : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < OK_BN * OK_BK / OK_THREADS; ++q) {
            int f = q * OK_THREADS + t;
            int kk, col;
            if (s.sb_j == 1) { col = f & (OK_BN - 1); kk = f / OK_BN; } else { kk = f & (OK_BK - 1); col = f / OK_BK; }
            i64 j = j0 + col, p = p0 + kk;
            Bs[kk][col] = (j < s.n && p < s.k) ? b[p * s.sb_p + j * s.sb_j] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < OK_BK; ++kk) {
            float4 a0 = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
            float4 a1 = *reinterpret_cast<const float4*>(&As[kk][32 + ty * 4]);
            float4 b0 = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
            float ar[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            float br[4] = {b0.x, b0.y, b0.z, b0.w};
#pragma unroll
            for (int u = 0; u < 8; ++u)
#pragma unroll
                for (int v = 0; v < 4; ++v) acc[u][v] = fmaf(ar[u], br[v], acc[u][v]);
        }
        __syncthreads();
    }
}
// OUTER_TILE_END


// --- small n: C[m, n] = A[m, k] · B[k, n], n <= 64 -------------------------------------
//
// A block owns SK_BM rows of C and one k-range (a split); 128 threads, each 4 rows by
// NB/4 columns, so every A value read from shared memory feeds NB/4 FMAs and every B value 4.
// The A tile is staged through shared memory in the layout its rows arrive in from global
// memory (float4 loads along the contiguous axis), so the global reads are full 128-byte
// lines either way:
//   KMAJOR = false: A is contiguous along k (x·Aᵀ, g·B): As[row][k], thread rows strided by
//                   32 so that the float4 reads along k fall in distinct banks;
//   KMAJOR = true:  A is contiguous along i (gᵀ·h, the transposed xᵀ·g): As[k][row],
//                   thread rows adjacent so one float4 read gives a thread its 4 rows.
#define SK_BM 128
#define SK_BK 32
#define SK_THREADS 128

__device__ __forceinline__ float lane(const float4 v, int u) {
    return u == 0 ? v.x : (u == 1 ? v.y : (u == 2 ? v.z : v.w));
}

// Asynchronous global → shared copies (sm_80+): the next tile streams into shared memory
// while the current one is multiplied, without passing through registers. A 4-byte copy
// with `valid` false writes a zero and reads nothing (src-size 0), which pads edge tiles.
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void copy16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void copy4(void* dst, const float* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void copies_issued() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most `pending` groups (the tiles issued last) are still in flight.
__device__ __forceinline__ void arrived_all_but(int pending) {
    if (pending <= 1) asm volatile("cp.async.wait_group 1;\n" ::);
    else if (pending == 2) asm volatile("cp.async.wait_group 2;\n" ::);
    else asm volatile("cp.async.wait_group 3;\n" ::);
}

typedef unsigned short bf16_t;

// Widening a bf16 is exact: its bits are the top half of the f32's.
__device__ __forceinline__ float widen_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float widen_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

// Four consecutive A values from shared memory, as floats.
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const bf16_t* p) {
    uint2 w = *reinterpret_cast<const uint2*>(p);
    return make_float4(widen_lo(w.x), widen_hi(w.x), widen_lo(w.y), widen_hi(w.y));
}

// Shared memory of one pipeline stage, in bytes: the A tile (in A's element type, rows
// padded by 16 bytes: aligned for the 16-byte copies, banks spread) and the f32 B tile.
// `s.stages` of them; skinny.rs sizes the launch from the same numbers.
template <bool KMAJOR, int NB, typename TA>
struct Stage {
    static constexpr int PAD = 16 / sizeof(TA);
    static constexpr int AS_ROWS = KMAJOR ? SK_BK : SK_BM;
    static constexpr int AS_COLS = KMAJOR ? SK_BM + PAD : SK_BK + PAD;
    static constexpr int A_BYTES = AS_ROWS * AS_COLS * sizeof(TA);
    static constexpr int BYTES = A_BYTES + SK_BK * NB * sizeof(float);
    // Elements of A one 16-byte copy moves.
    static constexpr int VEC = 16 / sizeof(TA);
};

// Issues the copies of the tile starting at p0 into one stage.
template <bool KMAJOR, int NB, typename TA>
__device__ __forceinline__ void stage_tile(char* st, const TA* a, const float* b,
                                           const SkinnyArgs& s, bool vec, i64 i0, i64 p0,
                                           i64 p_end) {
    typedef Stage<KMAJOR, NB, TA> S;
    TA (*As)[S::AS_COLS] = reinterpret_cast<TA (*)[S::AS_COLS]>(st);
    float (*Bs)[NB] = reinterpret_cast<float (*)[NB]>(st + S::A_BYTES);
    const int t = threadIdx.x;
    if (vec && p0 + SK_BK <= p_end && sizeof(TA) == 2) {
        // bf16: 16-byte copies of 8 values, 4 per thread.
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            int f = q * SK_THREADS + t;
            if (KMAJOR) {
                int kk = f >> 4, iq = (f & 15) * 8;
                copy16(&As[kk][iq], a + (p0 + kk) * s.sa_p + i0 + iq);
            } else {
                int row = f >> 2, kq = (f & 3) * 8;
                copy16(&As[row][kq], a + (i0 + row) * s.sa_i + p0 + kq);
            }
        }
    } else if (sizeof(TA) == 2) {
        // bf16 edge tiles: plain loads (cp.async has no 2-byte copy); the barrier before the
        // stage is read orders them like the asynchronous copies.
#pragma unroll 4
        for (int q = 0; q < 32; ++q) {
            int f = q * SK_THREADS + t;
            int row = KMAJOR ? (f & 127) : (f >> 5);
            int kk = KMAJOR ? (f >> 7) : (f & 31);
            i64 i = i0 + row, p = p0 + kk;
            TA v = (i < s.m && p < p_end) ? a[i * s.sa_i + p * s.sa_p] : (TA)0;
            if (KMAJOR) As[kk][row] = v; else As[row][kk] = v;
        }
    } else if (vec && p0 + SK_BK <= p_end) {
        // Full tile, 16-byte copies along the contiguous axis: 128-byte lines per 8 threads.
#pragma unroll
        for (int q = 0; q < 8; ++q) {
            int f = q * SK_THREADS + t;
            if (KMAJOR) {
                int kk = f >> 5, iq = (f & 31) * 4;
                copy16(&As[kk][iq], a + (p0 + kk) * s.sa_p + i0 + iq);
            } else {
                int row = f >> 3, kq = (f & 7) * 4;
                copy16(&As[row][kq], a + (i0 + row) * s.sa_i + p0 + kq);
            }
        }
    } else {
        // Edge tiles and unaligned operands: one element a copy, zeros outside.
#pragma unroll 4
        for (int q = 0; q < 32; ++q) {
            int f = q * SK_THREADS + t;
            int row = KMAJOR ? (f & 127) : (f >> 5);
            int kk = KMAJOR ? (f >> 7) : (f & 31);
            i64 i = i0 + row, p = p0 + kk;
            bool in = i < s.m && p < p_end;
            const float* src = reinterpret_cast<const float*>(in ? a + i * s.sa_i + p * s.sa_p : a);
            copy4(KMAJOR ? &As[kk][row] : &As[row][kk], src, in);
        }
    }
    // B is at most 64 wide and read by every row block (an L2 hit); neighbouring threads
    // take neighbouring addresses.
#pragma unroll
    for (int q = 0; q < NB / 4; ++q) {
        int f = q * SK_THREADS + t;
        int kk, j;
        if (s.sb_p == 1) { kk = f % SK_BK; j = f / SK_BK; } else { kk = f / NB; j = f % NB; }
        i64 p = p0 + kk;
        bool in = j < s.n && p < p_end;
        copy4(&Bs[kk][j], in ? b + p * s.sb_p + j * s.sb_j : b, in);
    }
}

template <bool KMAJOR, int NB, typename TA>
__device__ __forceinline__ void skinny_body(const TA* __restrict__ a,
                                            const float* __restrict__ b,
                                            float* __restrict__ c, const SkinnyArgs s) {
    typedef Stage<KMAJOR, NB, TA> S;
    constexpr int TN = NB / 4;
    extern __shared__ __align__(16) char smem[];
    const int stages = (int)s.stages;
    {
        // The launch must bring the stages (skinny.rs computes the size); fail loudly.
        unsigned dyn;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
        if (stages < 2 || stages > 4 || dyn < stages * S::BYTES) __trap();
    }

    const int t = threadIdx.x;
    const int rg = t >> 2, cg = t & 3;
    const i64 i0 = (i64)blockIdx.x * SK_BM;
    const i64 p_begin = (i64)blockIdx.y * s.kslice;
    const i64 p_end = min(s.k, p_begin + s.kslice);
    a += (i64)blockIdx.z * s.batch_a;
    b += (i64)blockIdx.z * s.batch_b;
    c += (i64)blockIdx.z * s.batch_c + (i64)blockIdx.y * s.split_c;

    const bool aligned = ((unsigned long long)a & 15) == 0;
    const bool vec = i0 + SK_BM <= s.m && aligned &&
                     (KMAJOR ? (s.sa_i == 1 && s.sa_p % S::VEC == 0)
                             : (s.sa_p == 1 && s.sa_i % S::VEC == 0));

    float acc[4][TN];
#pragma unroll
    for (int ii = 0; ii < 4; ++ii)
#pragma unroll
        for (int jj = 0; jj < TN; ++jj) acc[ii][jj] = 0.0f;

    // Software pipeline: `stages - 1` tiles are in flight while one is multiplied. Every
    // step commits one copy group (empty past the end), so "all but the last stages - 1
    // groups have arrived" always means "this step's tile is in shared memory".
    for (int q = 0; q < stages - 1; ++q) {
        i64 p = p_begin + q * SK_BK;
        if (p < p_end) stage_tile<KMAJOR, NB, TA>(smem + q * S::BYTES, a, b, s, vec, i0, p, p_end);
        copies_issued();
    }
    int buf = 0;
    for (i64 p0 = p_begin; p0 < p_end; p0 += SK_BK, buf = buf + 1 == stages ? 0 : buf + 1) {
        const i64 ahead = p0 + (stages - 1) * SK_BK;
        int into = buf + stages - 1;
        if (into >= stages) into -= stages;
        if (ahead < p_end) stage_tile<KMAJOR, NB, TA>(smem + into * S::BYTES, a, b, s, vec, i0, ahead, p_end);
        copies_issued();
        arrived_all_but(stages - 1);
        __syncthreads();
        const TA (*As)[S::AS_COLS] = reinterpret_cast<const TA (*)[S::AS_COLS]>(smem + buf * S::BYTES);
        const float (*Bs)[NB] = reinterpret_cast<const float (*)[NB]>(smem + buf * S::BYTES + S::A_BYTES);

#pragma unroll 2
        for (int kk = 0; kk < SK_BK; kk += 4) {
            float4 av[4];
            if (!KMAJOR) {
#pragma unroll
                for (int ii = 0; ii < 4; ++ii)
                    av[ii] = load4(&As[rg + 32 * ii][kk]);
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                float ar[4];
                if (KMAJOR) {
                    float4 x = load4(&As[kk + u][rg * 4]);
                    ar[0] = x.x; ar[1] = x.y; ar[2] = x.z; ar[3] = x.w;
                } else {
#pragma unroll
                    for (int ii = 0; ii < 4; ++ii) ar[ii] = lane(av[ii], u);
                }
                float bw[TN];
#pragma unroll
                for (int q = 0; q < TN / 4; ++q) {
                    float4 x = *reinterpret_cast<const float4*>(&Bs[kk + u][cg * TN + 4 * q]);
                    bw[4 * q] = x.x; bw[4 * q + 1] = x.y; bw[4 * q + 2] = x.z; bw[4 * q + 3] = x.w;
                }
#pragma unroll
                for (int ii = 0; ii < 4; ++ii)
#pragma unroll
                    for (int jj = 0; jj < TN; ++jj) acc[ii][jj] = fmaf(ar[ii], bw[jj], acc[ii][jj]);
            }
        }
        // The stage just read is the one the next step's copies overwrite.
        __syncthreads();
    }

#pragma unroll
    for (int ii = 0; ii < 4; ++ii) {
        i64 i = i0 + (KMAJOR ? rg * 4 + ii : rg + 32 * ii);
        if (i >= s.m) continue;
#pragma unroll
        for (int jj = 0; jj < TN; ++jj) {
            int j = cg * TN + jj;
            if (j < s.n) c[i * s.sc_i + j * s.sc_j] = acc[ii][jj];
        }
    }
}

// MINB: blocks a multiprocessor must hold at once (caps the registers: without it the
// compiler spends them on unrolling and one or two blocks fit, too few loads in flight).
#define SKINNY(NAME, KMAJOR, NB, MINB, TA)                                                    \
    extern "C" __global__ void __launch_bounds__(SK_THREADS, MINB)                            \
        NAME(const TA* a, const float* b, float* c, const SkinnyArgs s) {                     \
        skinny_body<KMAJOR, NB, TA>(a, b, c, s);                                              \
    }
SKINNY(skinny_rows16, false, 16, 4, float)
SKINNY(skinny_rows32, false, 32, 3, float)
SKINNY(skinny_rows64, false, 64, 2, float)
SKINNY(skinny_cols16, true, 16, 4, float)
SKINNY(skinny_cols32, true, 32, 3, float)
SKINNY(skinny_cols64, true, 64, 2, float)
SKINNY(skinny_rows16_bf16, false, 16, 4, bf16_t)
SKINNY(skinny_rows32_bf16, false, 32, 3, bf16_t)
SKINNY(skinny_rows64_bf16, false, 64, 2, bf16_t)
SKINNY(skinny_cols16_bf16, true, 16, 4, bf16_t)
SKINNY(skinny_cols32_bf16, true, 32, 3, bf16_t)
SKINNY(skinny_cols64_bf16, true, 64, 2, bf16_t)

// The splits' partial products, laid out as C and `total` apart, added in split order.
extern "C" __global__ void skinny_sum_splits(const float* __restrict__ part, float* __restrict__ c,
                                             i64 total, i64 splits) {
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (i64)gridDim.x * blockDim.x) {
        float sum = part[e];
        for (i64 q = 1; q < splits; ++q) sum += part[q * total + e];
        c[e] = sum;
    }
}

// --- small k: C[m, n] = A[m, k] · B[k, n], k <= 64 (h·Bᵀ, dh·A) ---------------------------
//
// Bound by writing C and by the FMAs (k an element). To overlap the two, a multiprocessor
// must hold many blocks at different phases (one block computing while another's stores
// drain), so blocks are small: a 64×64 tile of C, 128 threads, each an 8×4 register tile
// (rows ty*4 + {0..3} and 32 + ty*4 + {0..3}, columns tx*4 + {0..3}); a warp's float4 stores
// cover 256 contiguous bytes of a row. k is staged 16 at a time (zeros past k).

extern "C" __global__ void __launch_bounds__(OK_THREADS, 5)
    skinny_outer(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ c,
                 const SkinnyArgs s) {
    const int t = threadIdx.x;
    const int tx = t & 15, ty = t >> 4;
    const i64 i0 = (i64)blockIdx.y * OK_BM, j0 = (i64)blockIdx.x * OK_BN;
    a += (i64)blockIdx.z * s.batch_a;
    b += (i64)blockIdx.z * s.batch_b;
    c += (i64)blockIdx.z * s.batch_c;
    float acc[8][4];
    outer_tile(a, b, s, i0, j0, acc);

    const bool vec = s.sc_j == 1 && s.sc_i % 4 == 0 && ((unsigned long long)c & 15) == 0;
    const i64 j = j0 + tx * 4;
#pragma unroll
    for (int u = 0; u < 8; ++u) {
        i64 i = i0 + (u < 4 ? ty * 4 + u : 32 + ty * 4 + (u - 4));
        if (i >= s.m) continue;
        if (vec && j + 3 < s.n) {
            *reinterpret_cast<float4*>(c + i * s.sc_i + j) =
                make_float4(acc[u][0], acc[u][1], acc[u][2], acc[u][3]);
        } else {
#pragma unroll
            for (int v = 0; v < 4; ++v)
                if (j + v < s.n) c[i * s.sc_i + (j + v) * s.sc_j] = acc[u][v];
        }
    }
}
