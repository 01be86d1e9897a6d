// f32 products with one side no larger than a LoRA rank (runtime/src/cuda/skinny.rs says
// which product takes which kernel). cuBLAS's f32 GEMM tiles are built for square products
// and reach a quarter of memory bandwidth on these; here every kernel is shaped so that the
// big operand (or the big output) crosses memory once.
//
// f32 accuracy, two ways. The small-n kernels with an f32 big operand (f32 training) add one
// fmaf per term in ascending k. The small-n kernels with a bf16 big operand (the `_bf16`
// kernels: a LoRA step's adapter products read the bf16 activations and gradients
// themselves) and the small-k kernel run on bf16 tensor cores with the f32 operands split
// into three bf16 parts ("f32 products on bf16 tensor cores" below): f32-accurate, not
// TF32, but summed in another order than the FMA kernels. Within a split the order is
// fixed, and the splits are added in split order by `skinny_sum_splits`: no atomics, so a
// product gives the same bits every run.
//
// Operands are addressed by element strides, so one kernel covers every transpose:
//   A(i, p) = a[i*sa_i + p*sa_p]   (the big operand, i < m, p < k)
//   B(p, j) = b[p*sb_p + j*sb_j]   (the small one, j < n <= 64)
//   C(i, j) = c[i*sc_i + j*sc_j]
// A product whose small side is m runs as its transpose (skinny.rs swaps the roles).

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

typedef unsigned short bf16_t;

// Widening a bf16 is exact: its bits are the top half of the f32's.
__device__ __forceinline__ float widen_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float widen_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

// --- f32 products on bf16 tensor cores ----------------------------------------------------
//
// An f32 value v is the sum of three bf16 parts, v1 = bf16(v), v2 = bf16(v − v1),
// v3 = bf16(v − v1 − v2) (each difference exact in f32; the parts carry 24 significant bits,
// |v − v1 − v2 − v3| ≤ 2⁻²⁴|v|). A bf16 × bf16 product is exact in f32, so a product with a
// bf16 operand is x·w1 + x·w2 + x·w3 (3 MMAs), and one of two f32 operands keeps the six
// terms with i + j ≤ 4 (the three dropped are together below 2⁻²³ of the product). The MMAs sum in a
// different order than one fmaf per term and truncate their f32 sums (not round to nearest),
// so the result is f32-accurate (~1e-6 relative) but not bitwise the FMA kernels'; it is the
// same every run (no atomics, fixed order).

// The three parts of the pair (lo, hi), packed as MMA fragments hold them (lo in the low
// half of each word: the lower k or column index).
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ void split3(float lo, float hi, unsigned& p1, unsigned& p2, unsigned& p3) {
    p1 = pack_bf16(lo, hi);
    lo -= widen_lo(p1);
    hi -= widen_hi(p1);
    p2 = pack_bf16(lo, hi);
    lo -= widen_lo(p2);
    hi -= widen_hi(p2);
    p3 = pack_bf16(lo, hi);
}

// d += a·b on one m16n8k16 tile (bf16 operands, f32 accumulators). Fragments (g = lane/4,
// q = lane%4): a = {(g, 2q..), (g+8, 2q..), (g, 2q+8..), (g+8, 2q+8..)} as (row, k);
// b = {(2q.., g), (2q+8.., g)} as (k, column); d = {(g, 2q), (g, 2q+1), (g+8, 2q), (g+8, 2q+1)}.
__device__ __forceinline__ void mma_bf16(float d[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}
// Four 8×8 bf16 matrices from shared memory, lane l giving row l%8 of matrix l/8; `trans`
// loads them transposed (rows of the stored matrix become fragment columns).
__device__ __forceinline__ void ldsm4(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldsm4_trans(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row)));
}

// Shared memory of `outer_tile`: the bf16 parts of the A tile ([row][k]) and of the B tile
// ([column][k]), rows padded to 48 bytes (ldmatrix reads 8 rows in distinct banks); then,
// reusing the same bytes, the f32 C tile handed from the MMA layout to the threads' 8 × 4
// (rows padded to 72 floats: the float2 stores of a half-warp fall in distinct banks).
#define OK_KP (OK_BK + 8)
#define OK_CP (OK_BN + 8)
struct OuterSmem {
    union {
        struct {
            bf16_t a[3][OK_BM][OK_KP];
            bf16_t b[3][OK_BN][OK_KP];
        } in;
        float c[OK_BM][OK_CP];
    };
};

// The block's 64×64 tile of C = A·B (rows i0.., columns j0..) in registers: thread
// (tx = t & 15, ty = t >> 4) holds rows ty*4 + {0..3} and 32 + ty*4 + {0..3}, columns
// tx*4 + {0..3}. Both operands are f32, split into bf16 parts as they are staged (16 k at
// a time); warp w multiplies rows (w/2)*32.., columns (w%2)*32.. with six MMAs a term,
// smaller terms first, accumulating over all k (k ≤ 64: at most 24 accumulating MMAs).
__device__ __forceinline__ void outer_tile(const float* __restrict__ a, const float* __restrict__ b,
                                           const SkinnyArgs& s, i64 i0, i64 j0, float acc[8][4]) {
    __shared__ __align__(16) OuterSmem sm;
    const int t = threadIdx.x;
    const int lane = t & 31, w = t >> 5;
    const int wm = (w >> 1) * 32, wn = (w & 1) * 32;

    float d[2][4][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) d[mt][nt][e] = 0.0f;

    for (i64 p0 = 0; p0 < s.k; p0 += OK_BK) {
        // Pairs of k-adjacent values, 4 of A and 4 of B a thread; neighbouring threads read
        // neighbouring addresses along whichever axis is contiguous.
#pragma unroll 2
        for (int q = 0; q < OK_BM * OK_BK / 2 / OK_THREADS; ++q) {
            int f = q * OK_THREADS + t;
            int kp, row;
            if (s.sa_p == 1) { kp = f & (OK_BK / 2 - 1); row = f / (OK_BK / 2); } else { row = f & (OK_BM - 1); kp = f / OK_BM; }
            i64 i = i0 + row, p = p0 + 2 * kp;
            const float* src = a + i * s.sa_i + p * s.sa_p;
            float lo = (i < s.m && p < s.k) ? src[0] : 0.0f;
            float hi = (i < s.m && p + 1 < s.k) ? src[s.sa_p] : 0.0f;
            unsigned p1, p2, p3;
            split3(lo, hi, p1, p2, p3);
            *reinterpret_cast<unsigned*>(&sm.in.a[0][row][2 * kp]) = p1;
            *reinterpret_cast<unsigned*>(&sm.in.a[1][row][2 * kp]) = p2;
            *reinterpret_cast<unsigned*>(&sm.in.a[2][row][2 * kp]) = p3;
        }
#pragma unroll 2
        for (int q = 0; q < OK_BN * OK_BK / 2 / OK_THREADS; ++q) {
            int f = q * OK_THREADS + t;
            int kp, col;
            if (s.sb_p == 1) { kp = f & (OK_BK / 2 - 1); col = f / (OK_BK / 2); } else { col = f & (OK_BN - 1); kp = f / OK_BN; }
            i64 j = j0 + col, p = p0 + 2 * kp;
            const float* src = b + p * s.sb_p + j * s.sb_j;
            float lo = (j < s.n && p < s.k) ? src[0] : 0.0f;
            float hi = (j < s.n && p + 1 < s.k) ? src[s.sb_p] : 0.0f;
            unsigned p1, p2, p3;
            split3(lo, hi, p1, p2, p3);
            *reinterpret_cast<unsigned*>(&sm.in.b[0][col][2 * kp]) = p1;
            *reinterpret_cast<unsigned*>(&sm.in.b[1][col][2 * kp]) = p2;
            *reinterpret_cast<unsigned*>(&sm.in.b[2][col][2 * kp]) = p3;
        }
        __syncthreads();
        // Per 16-row tile: the A fragments of the three parts, then per pair of column tiles
        // the B fragments (one ldmatrix a part: columns +0..7 at k 0..7 and k 8..15, then
        // columns +8..15 likewise). Loading B again per row tile keeps the registers under
        // the five-blocks bound.
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
            unsigned af[3][4];
#pragma unroll
            for (int part = 0; part < 3; ++part)
                ldsm4(af[part], &sm.in.a[part][wm + mt * 16 + (lane & 7) + (((lane >> 3) & 1) << 3)][(lane >> 4) * 8]);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                unsigned bf[3][4];
#pragma unroll
                for (int part = 0; part < 3; ++part)
                    ldsm4(bf[part], &sm.in.b[part][wn + np * 16 + (lane & 7) + ((lane >> 4) << 3)][((lane >> 3) & 1) * 8]);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float* dd = d[mt][2 * np + h];
                    const int x = 2 * h, y = 2 * h + 1;
                    mma_bf16(dd, af[2], bf[0][x], bf[0][y]);
                    mma_bf16(dd, af[1], bf[1][x], bf[1][y]);
                    mma_bf16(dd, af[0], bf[2][x], bf[2][y]);
                    mma_bf16(dd, af[1], bf[0][x], bf[0][y]);
                    mma_bf16(dd, af[0], bf[1][x], bf[1][y]);
                    mma_bf16(dd, af[0], bf[0][x], bf[0][y]);
                }
            }
        }
        __syncthreads();
    }

    // The MMA layout to the threads' 8 × 4 through shared memory (the staging bytes are free:
    // the loop ended on a barrier).
    const int g = lane >> 2, q4 = lane & 3;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int r = wm + mt * 16 + g, c = wn + nt * 8 + 2 * q4;
            *reinterpret_cast<float2*>(&sm.c[r][c]) = make_float2(d[mt][nt][0], d[mt][nt][1]);
            *reinterpret_cast<float2*>(&sm.c[r + 8][c]) = make_float2(d[mt][nt][2], d[mt][nt][3]);
        }
    __syncthreads();
    const int tx = t & 15, ty = t >> 4;
#pragma unroll
    for (int u = 0; u < 8; ++u) {
        const int r = u < 4 ? ty * 4 + u : 32 + ty * 4 + (u - 4);
        float4 v = *reinterpret_cast<const float4*>(&sm.c[r][tx * 4]);
        acc[u][0] = v.x;
        acc[u][1] = v.y;
        acc[u][2] = v.z;
        acc[u][3] = v.w;
    }
    // A second call in the same block must not overwrite the tile before it is read.
    __syncthreads();
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
__device__ __forceinline__ void copy16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src));
}
__device__ __forceinline__ void copy4(void* dst, const float* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void copies_issued() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most `pending` groups (the tiles issued last) are still in flight.
__device__ __forceinline__ void arrived_all_but(int pending) {
    if (pending <= 1) asm volatile("cp.async.wait_group 1;\n" ::);
    else if (pending == 2) asm volatile("cp.async.wait_group 2;\n" ::);
    else asm volatile("cp.async.wait_group 3;\n" ::);
}

// Four consecutive A values from shared memory, as floats.
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const bf16_t* p) {
    uint2 w = *reinterpret_cast<const uint2*>(p);
    return make_float4(widen_lo(w.x), widen_hi(w.x), widen_lo(w.y), widen_hi(w.y));
}

// Shared memory of one pipeline stage, in bytes: the A tile (in A's element type, rows
// padded by 16 bytes: aligned for the 16-byte copies, banks spread) and the f32 B tile
// (rows of NB, padded by 4 floats for the tensor-core kernels, whose lanes read a column
// each: 8 k-rows apart in distinct banks). `s.stages` of them; skinny.rs sizes the launch
// from the same numbers.
template <bool KMAJOR, int NB, typename TA>
struct Stage {
    static constexpr int PAD = 16 / sizeof(TA);
    static constexpr int AS_ROWS = KMAJOR ? SK_BK : SK_BM;
    static constexpr int AS_COLS = KMAJOR ? SK_BM + PAD : SK_BK + PAD;
    static constexpr int A_BYTES = AS_ROWS * AS_COLS * sizeof(TA);
    static constexpr int BROW = sizeof(TA) == 2 ? NB + 4 : NB;
    static constexpr int BYTES = A_BYTES + SK_BK * BROW * sizeof(float);
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
    float (*Bs)[S::BROW] = reinterpret_cast<float (*)[S::BROW]>(st + S::A_BYTES);
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

// Streams the block's k-range (split blockIdx.y) of rows blockIdx.x*SK_BM.. through the
// stages, calling mul(stage) on each tile in ascending k; `a`, `b` already point at the
// block's batch entry.
template <bool KMAJOR, int NB, typename TA, typename Mul>
__device__ __forceinline__ void stream_tiles(const TA* __restrict__ a, const float* __restrict__ b,
                                             const SkinnyArgs& s, Mul&& mul) {
    typedef Stage<KMAJOR, NB, TA> S;
    extern __shared__ __align__(16) char smem[];
    const int stages = (int)s.stages;
    {
        // The launch must bring the stages (skinny.rs computes the size); fail loudly.
        unsigned dyn;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
        if (stages < 2 || stages > 4 || dyn < stages * S::BYTES) __trap();
    }
    const i64 i0 = (i64)blockIdx.x * SK_BM;
    const i64 p_begin = (i64)blockIdx.y * s.kslice;
    const i64 p_end = min(s.k, p_begin + s.kslice);
    const bool aligned = ((unsigned long long)a & 15) == 0;
    const bool vec = i0 + SK_BM <= s.m && aligned &&
                     (KMAJOR ? (s.sa_i == 1 && s.sa_p % S::VEC == 0)
                             : (s.sa_p == 1 && s.sa_i % S::VEC == 0));

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
        mul(smem + buf * S::BYTES);
        // The stage just read is the one the next step's copies overwrite.
        __syncthreads();
    }
}

// The FMA kernels (f32 training; with a bf16 A, the timing checks' reference): one fmaf per
// term, ascending k, bf16 values widened exactly as they are read. Thread t holds rows
// t/4 + 32·{0..3} (or 4·(t/4) + {0..3} k-major) and columns (t%4)·NB/4 + {0..NB/4}.
template <bool KMAJOR, int NB, typename TA>
__device__ __forceinline__ void skinny_body(const TA* __restrict__ a,
                                            const float* __restrict__ b,
                                            float* __restrict__ c, const SkinnyArgs s) {
    typedef Stage<KMAJOR, NB, TA> S;
    constexpr int TN = NB / 4;
    const int t = threadIdx.x;
    const int rg = t >> 2, cg = t & 3;
    const i64 i0 = (i64)blockIdx.x * SK_BM;
    a += (i64)blockIdx.z * s.batch_a;
    b += (i64)blockIdx.z * s.batch_b;
    c += (i64)blockIdx.z * s.batch_c + (i64)blockIdx.y * s.split_c;

    float acc[4][TN];
#pragma unroll
    for (int ii = 0; ii < 4; ++ii)
#pragma unroll
        for (int jj = 0; jj < TN; ++jj) acc[ii][jj] = 0.0f;

    stream_tiles<KMAJOR, NB, TA>(a, b, s, [&](const char* st) {
        const TA (*As)[S::AS_COLS] = reinterpret_cast<const TA (*)[S::AS_COLS]>(st);
        const float (*Bs)[S::BROW] = reinterpret_cast<const float (*)[S::BROW]>(st + S::A_BYTES);
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
    });

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

// The bf16 kernels, on tensor cores: warp w multiplies rows w·32.. (two 16-row tiles) by all
// NB columns (NB/8 tiles). The A fragments come straight from the staged bf16 tile with
// ldmatrix (transposed when A is k-major); each lane splits the f32 B values its fragments
// hold into three bf16 parts (every warp the same B: no extra barrier) and runs the three
// MMAs, smallest part first. A tile's 32 k are summed by the MMAs into a zeroed
// accumulator, which is then added to the running sum in f32: the MMAs' truncating sums
// then see only 6 steps, and the k-long running sum rounds to nearest.
template <bool KMAJOR, int NB>
__device__ __forceinline__ void skinny_body_tc(const bf16_t* __restrict__ a,
                                               const float* __restrict__ b,
                                               float* __restrict__ c, const SkinnyArgs s) {
    typedef Stage<KMAJOR, NB, bf16_t> S;
    constexpr int NT = NB / 8;
    const int t = threadIdx.x;
    const int lane = t & 31, wm = (t >> 5) * 32;
    const int g = lane >> 2, q4 = lane & 3;
    const i64 i0 = (i64)blockIdx.x * SK_BM;
    a += (i64)blockIdx.z * s.batch_a;
    b += (i64)blockIdx.z * s.batch_b;
    c += (i64)blockIdx.z * s.batch_c + (i64)blockIdx.y * s.split_c;

    float acc[2][NT][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;

    stream_tiles<KMAJOR, NB, bf16_t>(a, b, s, [&](const char* st) {
        const bf16_t (*As)[S::AS_COLS] = reinterpret_cast<const bf16_t (*)[S::AS_COLS]>(st);
        const float (*Bs)[S::BROW] = reinterpret_cast<const float (*)[S::BROW]>(st + S::A_BYTES);
        float part[2][NT][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) part[mt][nt][e] = 0.0f;
#pragma unroll
        for (int k16 = 0; k16 < SK_BK; k16 += 16) {
            unsigned af[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                // Matrices 0..3 of the x4 load: rows +0 / +8 at k +0, then at k +8.
                const int mr = wm + mt * 16 + (((lane >> 3) & 1) << 3);
                const int kr = k16 + ((lane >> 4) << 3);
                if (KMAJOR) ldsm4_trans(af[mt], &As[kr + (lane & 7)][mr]);
                else ldsm4(af[mt], &As[mr + (lane & 7)][kr]);
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int col = nt * 8 + g, k = k16 + 2 * q4;
                unsigned w1[2], w2[2], w3[2];
                split3(Bs[k][col], Bs[k + 1][col], w1[0], w2[0], w3[0]);
                split3(Bs[k + 8][col], Bs[k + 9][col], w1[1], w2[1], w3[1]);
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    mma_bf16(part[mt][nt], af[mt], w3[0], w3[1]);
                    mma_bf16(part[mt][nt], af[mt], w2[0], w2[1]);
                    mma_bf16(part[mt][nt], af[mt], w1[0], w1[1]);
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mt][nt][e] += part[mt][nt][e];
    });

#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
            const i64 i = i0 + wm + mt * 16 + g + (e ? 8 : 0);
            if (i >= s.m) continue;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int j = nt * 8 + 2 * q4;
                if (j < s.n) c[i * s.sc_i + j * s.sc_j] = acc[mt][nt][e];
                if (j + 1 < s.n) c[i * s.sc_i + (j + 1) * s.sc_j] = acc[mt][nt][e + 1];
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
#define SKINNY_TC(NAME, KMAJOR, NB, MINB)                                                     \
    extern "C" __global__ void __launch_bounds__(SK_THREADS, MINB)                            \
        NAME(const bf16_t* a, const float* b, float* c, const SkinnyArgs s) {                 \
        skinny_body_tc<KMAJOR, NB>(a, b, c, s);                                               \
    }
SKINNY(skinny_rows16, false, 16, 4, float)
SKINNY(skinny_rows32, false, 32, 3, float)
SKINNY(skinny_rows64, false, 64, 2, float)
SKINNY(skinny_cols16, true, 16, 4, float)
SKINNY(skinny_cols32, true, 32, 3, float)
SKINNY(skinny_cols64, true, 64, 2, float)
SKINNY_TC(skinny_rows16_bf16, false, 16, 4)
SKINNY_TC(skinny_rows32_bf16, false, 32, 3)
SKINNY_TC(skinny_rows64_bf16, false, 64, 2)
SKINNY_TC(skinny_cols16_bf16, true, 16, 4)
SKINNY_TC(skinny_cols32_bf16, true, 32, 3)
SKINNY_TC(skinny_cols64_bf16, true, 64, 2)
SKINNY(skinny_rows16_bf16_fma, false, 16, 4, bf16_t)
SKINNY(skinny_rows32_bf16_fma, false, 32, 3, bf16_t)
SKINNY(skinny_rows64_bf16_fma, false, 64, 2, bf16_t)
SKINNY(skinny_cols16_bf16_fma, true, 16, 4, bf16_t)
SKINNY(skinny_cols32_bf16_fma, true, 32, 3, bf16_t)
SKINNY(skinny_cols64_bf16_fma, true, 64, 2, bf16_t)

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
// Bound by writing C. To overlap the stores with the next tile's loads and MMAs, a
// multiprocessor must hold many blocks at different phases, so blocks are small: a 64×64
// tile of C (`outer_tile`), 128 threads, each an 8×4 register tile (rows ty*4 + {0..3} and
// 32 + ty*4 + {0..3}, columns tx*4 + {0..3}); a warp's float4 stores cover 256 contiguous
// bytes of a row.

// The FMA version of `outer_tile` (same tile and thread layout, one fmaf per term in
// ascending k, k staged 16 at a time): the timing checks' reference, `skinny_outer_fma`.
__device__ __forceinline__ void outer_tile_fma(const float* __restrict__ a, const float* __restrict__ b,
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

template <bool TC>
__device__ __forceinline__ void outer_body(const float* __restrict__ a, const float* __restrict__ b,
                                           float* __restrict__ c, const SkinnyArgs& s) {
    const int t = threadIdx.x;
    const int tx = t & 15, ty = t >> 4;
    const i64 i0 = (i64)blockIdx.y * OK_BM, j0 = (i64)blockIdx.x * OK_BN;
    a += (i64)blockIdx.z * s.batch_a;
    b += (i64)blockIdx.z * s.batch_b;
    c += (i64)blockIdx.z * s.batch_c;
    float acc[8][4];
    if (TC) outer_tile(a, b, s, i0, j0, acc);
    else outer_tile_fma(a, b, s, i0, j0, acc);

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

extern "C" __global__ void __launch_bounds__(OK_THREADS, 5)
    skinny_outer(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ c,
                 const SkinnyArgs s) {
    outer_body<true>(a, b, c, s);
}
extern "C" __global__ void __launch_bounds__(OK_THREADS, 5)
    skinny_outer_fma(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ c,
                     const SkinnyArgs s) {
    outer_body<false>(a, b, c, s);
}
