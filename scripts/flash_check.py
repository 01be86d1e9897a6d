#!/usr/bin/env python3
"""Flash attention kernels (runtime/src/cuda/flash_attn.cu) against a PyTorch f32 reference,
and their speed next to torch SDPA's flash backend. Runs on the device machine (a GPU, CuPy,
PyTorch); no Rust needed: CuPy compiles the .cu with NVRTC, as flash.rs does.

    python3 flash_check.py [--quick] [--cubin flash_sm90a.cubin]
    python3 flash_check.py --build-cubin flash_sm90a.cubin   # here, no GPU: NVRTC only

On a compute capability 9.0 device flash.rs compiles flash_attn.cu and flash_wgmma.cu together
for sm_90a and runs the wgmma kernels for 32 < d <= 128; --cubin loads that module (built
beforehand with --build-cubin, through cuda.bindings' NVRTC, so CuPy's own -arch option plays
no part) and checks and times the wgmma kernels next to the mma.sync ones.

Launch geometry below mirrors flash.rs (`Tiles`) and the table at the end of flash_attn.cu.
Every output buffer is filled with NaN first, so an element a kernel fails to write fails the
check. Exit status 1 when any relative error (||a-b|| / ||b||) exceeds 1e-2.
"""
import argparse
import math
import os
import sys
import time

try:
    import cupy as cp
    import numpy as np
    import torch
except ImportError:  # --build-cubin runs where there is NVRTC but no GPU stack
    cp = np = torch = None

TOL = 1e-2
HERE = os.path.dirname(os.path.abspath(__file__))
# Next to the script on the device machine (copied there), else in the source tree.
CU = next(p for p in (os.path.join(HERE, "flash_attn.cu"),
                      os.path.join(HERE, "..", "runtime", "src", "cuda", "flash_attn.cu"))
          if os.path.exists(p))
SRC = open(CU).read()
CU_WG = os.path.join(os.path.dirname(CU), "flash_wgmma.cu")
MOD = None
FUNCS = {}
# Set by --cubin: the module has the wgmma kernels (flash_wgmma.cu) too.
WG = False


def build_cubin(out):
    """flash_attn.cu + flash_wgmma.cu for sm_90a, as flash.rs compiles them on a 9.0 device."""
    from cuda.bindings import nvrtc
    src = SRC + open(CU_WG).read()
    _, prog = nvrtc.nvrtcCreateProgram(src.encode(), b"flash_attn.cu", 0, [], [])
    opts = [b"--gpu-architecture=sm_90a", b"-lineinfo", b"--ptxas-options=-v",
            b"-DFLASH_WG_CANDIDATES"]
    res = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
    _, n = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * n
    nvrtc.nvrtcGetProgramLog(prog, log)
    print(log.decode(errors="replace"))
    if res != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        sys.exit(f"NVRTC failed: {res}")
    _, n = nvrtc.nvrtcGetCUBINSize(prog)
    buf = b" " * n
    nvrtc.nvrtcGetCUBIN(prog, buf)
    open(out, "wb").write(buf)
    print(f"wrote {out} ({n} bytes)")


def tiles(d):
    """Kernel geometry for head dim d, as flash.rs `Tiles` and the table at the end of
    flash_attn.cu: (D padded tile width, forward warps, key tile BC, backward warps, dK/dV
    query tile BQ)."""
    if d % 8 or d > 128 or d < 8:
        raise ValueError(f"head dim {d} unsupported (needs d % 8 == 0, 8 <= d <= 128)")
    D = 32 if d <= 32 else 64 if d <= 64 else 128
    return D, 4, 64, 4, 64


# 16-row groups per warp of the forward and dQ kernels, per padded width D (flash.rs `Tiles`).
FWD_ROWS = {32: 1, 64: 1, 128: 2}
DQ_ROWS = {32: 1, 64: 1, 128: 1}
# For tuning: alternative instantiations added to the end of flash_attn.cu and listed here are
# checked on every shape and timed next to the defaults with --variants. Forward and dQ:
# (entry, warps, key tile, 16-row groups per warp); dK/dV: (entry, warps, query tile). Empty:
# the candidates of 2026-12-01 (notes/CUDA.md) lost or tied, and were removed.
FWD_VARIANTS = {32: [], 64: [], 128: []}
DQ_VARIANTS = {32: [], 64: [], 128: []}
DKDV_VARIANTS = {32: [], 64: [], 128: []}
# One-pass backward: (entry, warps = keys per CTA / 16, query tile). FUSED_TIMING: entries timed
# but not checked (experiments that compute wrong results, e.g. without the counters or
# without the dQ additions; notes/CUDA.md has the numbers of 2026-12-01).
# Warps (16 keys each) per CTA of the defaults, as flash.rs `Tiles::fused_warps`; query tile 64.
FUSED_BQ = 64
FUSED_WARPS = {32: 4, 64: 4, 128: 8}
FUSED_VARIANTS = {32: [], 64: [], 128: []}
FUSED_TIMING = {32: [], 64: [], 128: []}
# wgmma kernels (flash_wgmma.cu), as flash.rs `WgTiles`: (entry, warpgroups, key or query tile).
WG_FWD = {64: ("flash_fwd_wg_d64", 1, 128), 128: ("flash_fwd_wg_d128", 2, 64)}
WG_DQ = {64: ("flash_bwd_dq_wg_d64", 2, 64), 128: ("flash_bwd_dq_wg_d128", 3, 64)}
WG_DKDV = {64: ("flash_bwd_dkdv_wg_d64", 1, 64), 128: ("flash_bwd_dkdv_wg_d128", 2, 64)}
# Candidates (instantiations under FLASH_WG_CANDIDATES at the end of flash_wgmma.cu, which
# --build-cubin defines), checked and timed with --variants; notes/CUDA.md has earlier ones.
WG_FWD_VARIANTS = {64: [], 128: []}
WG_DQ_VARIANTS = {64: [], 128: []}
WG_DKDV_VARIANTS = {64: [], 128: []}


def wg_width(d):
    """Padded width of the wgmma kernels for head dim d, None where they do not apply."""
    return None if not WG or d <= 32 or d > 128 else 64 if d <= 64 else 128


def flash_fwd_wg(q, k, v, scale, window, cap, lse=None, out=None, fv=None):
    T, nh, d = q.shape
    nkv = k.shape[1]
    D = wg_width(d)
    name, NWG, BC = fv or WG_FWD[D]
    o = out if out is not None else torch.full_like(q, float("nan"))
    br = 64 * NWG
    smem = 1024 + (br + 4 * BC) * D * 2
    launch(name, (math.ceil(T / br) * nh,), 128 * NWG, smem,
           (ptr(q), ptr(k), ptr(v), ptr(o), ptr(lse)) + common(T, nh, nkv, d, scale, window, cap))
    return o


def bwd_wg(which, q, k, v, g, lse, delta, dqkv, scale, window, cap, nsplit=None, part=None,
           var=None):
    T, nh, d = q.shape
    nkv = k.shape[1]
    D = wg_width(d)
    if which == "dq":
        name, NWG, BC = var or WG_DQ[D]
        b = 64 * NWG
        args = (ptr(q), ptr(k), ptr(v), ptr(g), ptr(lse), ptr(delta), ptr(dqkv)) + common(
            T, nh, nkv, d, scale, window, cap)
        launch(name, (math.ceil(T / b) * nh,), 128 * NWG, 1024 + (2 * b + 4 * BC) * D * 2, args)
        return
    nsplit = nsplit or dkdv_splits(T, nh, nkv, d)
    if nsplit > 1 and part is None:
        part = torch.empty(nsplit, T, 2 * nkv * d, dtype=torch.float32, device=q.device)
    args = (ptr(q), ptr(k), ptr(v), ptr(g), ptr(lse), ptr(delta), ptr(dqkv), ptr(part),
            np.int32(nsplit)) + common(T, nh, nkv, d, scale, window, cap)
    name, NWG, BQ = var or WG_DKDV[D]
    b = 64 * NWG
    launch(name, (math.ceil(T / b) * nkv * nsplit,), 128 * NWG,
           1024 + (2 * b + 4 * BQ) * D * 2 + 16 * BQ, args)
    if nsplit > 1:
        launch("flash_bwd_dkdv_reduce", (math.ceil(T * 2 * nkv * d / 4 / 256),), 256, 0,
               (ptr(part), ptr(dqkv), np.int32(T), np.int32(nh), np.int32(nkv), np.int32(d),
                np.int32(nsplit), np.float32(scale)))


def flash_bwd_wg(q, k, v, g, scale, window, cap, nsplit=None, qv=None, kv=None, fv=None):
    """The wgmma backward: forward (wgmma) for O and lse, delta, dQ and dK/dV kernels."""
    T, nh, d = q.shape
    nkv = k.shape[1]
    lse = torch.empty(nh, T, dtype=torch.float32, device=q.device)
    delta = torch.empty(nh, T, dtype=torch.float32, device=q.device)
    o = flash_fwd_wg(q, k, v, scale, window, cap, lse=lse, fv=fv)
    launch("flash_bwd_delta", (math.ceil(T * nh / 8),), 256, 0,
           (ptr(o), ptr(g), ptr(delta), np.int32(T), np.int32(nh), np.int32(d)))
    dqkv = torch.full((T, nh + 2 * nkv, d), float("nan"), dtype=q.dtype, device=q.device)
    bwd_wg("dq", q, k, v, g, lse, delta, dqkv, scale, window, cap, var=qv)
    bwd_wg("dkdv", q, k, v, g, lse, delta, dqkv, scale, window, cap, nsplit=nsplit, var=kv)
    return dqkv


def fwd_default(d):
    D, NW, BC, _, _ = tiles(d)
    return (f"flash_fwd_d{D}", NW, BC, FWD_ROWS[D])


def dq_default(d):
    D, _, BC, NW, _ = tiles(d)
    return (f"flash_bwd_dq_d{D}", NW, BC, DQ_ROWS[D])


def dkdv_default(d):
    D, _, _, NW, BQ = tiles(d)
    return (f"flash_bwd_dkdv_d{D}", NW, BQ)


def launch(name, grid, threads, smem, args):
    f = FUNCS.get(name)
    if f is None:
        f = FUNCS[name] = MOD.get_function(name)
    if smem > 48 * 1024:
        f.max_dynamic_shared_size_bytes = smem
    f(grid, (threads,), args, shared_mem=smem)


def ptr(t):
    return np.uint64(0 if t is None else t.data_ptr())


def common(T, nh, nkv, d, scale, window, cap):
    return (np.int32(T), np.int32(nh), np.int32(nkv), np.int32(d), np.float32(scale),
            np.int32(window or 0), np.float32(cap or 0.0))


def flash_fwd(q, k, v, scale, window, cap, lse=None, out=None, fv=None):
    T, nh, d = q.shape
    nkv = k.shape[1]
    D = tiles(d)[0]
    name, NW, BC, RW = fv or fwd_default(d)
    o = out if out is not None else torch.full_like(q, float("nan"))
    br = 16 * NW * RW
    smem = (br + 4 * BC) * (D + 8) * 2
    launch(name, (math.ceil(T / br) * nh,), 32 * NW, smem,
           (ptr(q), ptr(k), ptr(v), ptr(o), ptr(lse)) + common(T, nh, nkv, d, scale, window, cap))
    return o


def bwd_prep(q, k, v, g, scale, window, cap, fv=None):
    """The forward recomputation (O, lse) and delta = rowsum(dO∘O): the backward's scratch."""
    T, nh, d = q.shape
    lse = torch.empty(nh, T, dtype=torch.float32, device=q.device)
    delta = torch.empty(nh, T, dtype=torch.float32, device=q.device)
    o = flash_fwd(q, k, v, scale, window, cap, lse=lse, fv=fv)
    launch("flash_bwd_delta", (math.ceil(T * nh / 8),), 256, 0,
           (ptr(o), ptr(g), ptr(delta), np.int32(T), np.int32(nh), np.int32(d)))
    return lse, delta


def dkdv_splits(T, nh, nkv, d):
    """How many CTAs share one key block's GQA group in the dK/dV kernel, as flash.rs
    `dkdv_splits`: the whole group (most, shortest CTAs) where it has more than one head."""
    return nh // nkv


def bwd_kernel(which, q, k, v, g, lse, delta, dqkv, scale, window, cap, nsplit=None, part=None,
               kv=None, qv=None, scratch=None, uv=None):
    T, nh, d = q.shape
    nkv = k.shape[1]
    D = tiles(d)[0]
    if which == "fused":
        # One pass for dQ, dK, dV (causal, no window), as flash.rs: dQ through the f32 scratch
        # and per-(head, query tile) counters (zeroed every call), dK/dV partials per query
        # head of the group (reduced where the group has more than one head).
        assert not window
        name, NW, bq = uv or (f"flash_bwd_fused_d{D}", FUSED_WARPS[D], FUSED_BQ)
        b = 16 * NW
        nblk = math.ceil(T / b)
        group = nh // nkv
        dqacc, sem, part = scratch or fused_scratch(T, nh, nkv, d)
        sem.zero_()
        args = (ptr(q), ptr(k), ptr(v), ptr(g), ptr(lse), ptr(delta), ptr(dqkv), ptr(part),
                ptr(dqacc), ptr(sem), np.int32(T), np.int32(nh), np.int32(nkv), np.int32(d),
                np.float32(scale), np.float32(cap or 0.0))
        # dSᵀ [b keys][bq queries] has its own region where the dO tile cannot hold it.
        own = D < bq or b > bq
        smem = (2 * b + 4 * bq) * (D + 8) * 2 + 16 * bq + (b * (bq + 8) * 2 if own else 0)
        launch(name, (nblk * nh,), 32 * NW, smem, args)
        if group > 1:
            launch("flash_bwd_dkdv_reduce", (math.ceil(T * 2 * nkv * d / 4 / 256),), 256, 0,
                   (ptr(part), ptr(dqkv), np.int32(T), np.int32(nh), np.int32(nkv), np.int32(d),
                    np.int32(group), np.float32(scale)))
        return
    if which == "dq":
        name, NW, BC, RW = qv or dq_default(d)
        b = 16 * NW * RW
        args = (ptr(q), ptr(k), ptr(v), ptr(g), ptr(lse), ptr(delta), ptr(dqkv)) + common(
            T, nh, nkv, d, scale, window, cap)
        launch(name, (math.ceil(T / b) * nh,), 32 * NW, (2 * b + 4 * BC) * (D + 8) * 2, args)
        return
    nsplit = nsplit or dkdv_splits(T, nh, nkv, d)
    if nsplit > 1 and part is None:
        part = torch.empty(nsplit, T, 2 * nkv * d, dtype=torch.float32, device=q.device)
    args = (ptr(q), ptr(k), ptr(v), ptr(g), ptr(lse), ptr(delta), ptr(dqkv), ptr(part),
            np.int32(nsplit)) + common(T, nh, nkv, d, scale, window, cap)
    name, NW, BQ = kv or dkdv_default(d)
    b = 16 * NW
    launch(name, (math.ceil(T / b) * nkv * nsplit,), 32 * NW,
           (2 * b + 4 * BQ) * (D + 8) * 2 + 16 * BQ, args)
    if nsplit > 1:
        launch("flash_bwd_dkdv_reduce", (math.ceil(T * 2 * nkv * d / 4 / 256),), 256, 0,
               (ptr(part), ptr(dqkv), np.int32(T), np.int32(nh), np.int32(nkv), np.int32(d),
                np.int32(nsplit), np.float32(scale)))


def fused_scratch(T, nh, nkv, d):
    """dQ f32 accumulator [nh, T, d], counters [nh, T/64], dK/dV partials (or None)."""
    dev = "cuda"
    nblk = math.ceil(T / FUSED_BQ)
    part = (torch.empty(nh // nkv, T, 2 * nkv * d, dtype=torch.float32, device=dev)
            if nh > nkv else None)
    return (torch.empty(nh, T, d, dtype=torch.float32, device=dev),
            torch.zeros(nh * nblk, dtype=torch.int32, device=dev), part)


def flash_bwd(q, k, v, g, scale, window, cap, nsplit=None, fv=None, kv=None, qv=None, fused=False,
              uv=None):
    T, nh, d = q.shape
    nkv = k.shape[1]
    lse, delta = bwd_prep(q, k, v, g, scale, window, cap, fv=fv)
    dqkv = torch.full((T, nh + 2 * nkv, d), float("nan"), dtype=q.dtype, device=q.device)
    if fused:
        bwd_kernel("fused", q, k, v, g, lse, delta, dqkv, scale, window, cap, uv=uv)
        return dqkv
    bwd_kernel("dq", q, k, v, g, lse, delta, dqkv, scale, window, cap, qv=qv)
    bwd_kernel("dkdv", q, k, v, g, lse, delta, dqkv, scale, window, cap, nsplit=nsplit, kv=kv)
    return dqkv


def reference(q, k, v, g, scale, window, cap):
    """f32 attention with an explicit mask, GQA by repeat_interleave; gradients by autograd."""
    T, nh, d = q.shape
    group = nh // k.shape[1]
    qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
    K = kf.repeat_interleave(group, dim=1)
    V = vf.repeat_interleave(group, dim=1)
    s = torch.einsum("ihd,jhd->hij", qf, K) * scale
    if cap:
        s = cap * torch.tanh(s / cap)
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    vis = j <= i
    if window:
        vis &= (i - j) < window
    s = s.masked_fill(~vis, float("-inf"))
    o = torch.einsum("hij,jhd->ihd", torch.softmax(s, dim=-1), V)
    o.backward(g.float())
    return o.detach(), qf.grad, kf.grad, vf.grad


def rel(a, b):
    """||a-b|| / ||b||, with ||b|| floored at 1e-3 per element: where every query sees one key
    only (T = 1, window 1) dq and dk are exactly zero, and both sides are rounding noise."""
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-3 * math.sqrt(b.numel()))).item()


def check(T, nh, nkv, d, window=None, cap=None, amp=1.0, seed=0, variants=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: (torch.randn(T, h, d, generator=gen, device="cuda") * amp).bfloat16()
    q, k, v = mk(nh), mk(nkv), mk(nkv)
    g = torch.randn(T, nh, d, generator=gen, device="cuda").bfloat16()
    scale = 1.0 / math.sqrt(d)
    o = flash_fwd(q, k, v, scale, window, cap)
    ro, rq, rk, rv = reference(q, k, v, g, scale, window, cap)
    ok = True
    # Every way of splitting the group (1 = dK/dV straight from registers, else through the
    # reduce kernel), each run twice: bitwise equal runs.
    group = nh // nkv
    runs = [(f"nsplit={s}", o, dict(nsplit=s)) for s in range(1, group + 1) if group % s == 0]
    if not window:
        runs = [("fused", o, dict(fused=True))] + runs
    if variants:
        D = tiles(d)[0]
        runs += [(fv[0], flash_fwd(q, k, v, scale, window, cap, fv=fv), dict(fv=fv))
                 for fv in FWD_VARIANTS[D]]
        runs += [(qv[0], o, dict(qv=qv)) for qv in DQ_VARIANTS[D]]
        runs += [(kv[0], o, dict(kv=kv)) for kv in DKDV_VARIANTS[D]]
        if not window:
            runs += [(uv[0], o, dict(fused=True, uv=uv)) for uv in FUSED_VARIANTS[D]]
    D = wg_width(d)
    if D:
        o_wg = flash_fwd_wg(q, k, v, scale, window, cap)
        runs += [(f"wgmma nsplit={s}", o_wg, dict(wg=True, nsplit=s))
                 for s in range(1, group + 1) if group % s == 0]
        if variants:
            runs += [(fv[0], flash_fwd_wg(q, k, v, scale, window, cap, fv=fv), dict(wg=True, fv=fv))
                     for fv in WG_FWD_VARIANTS[D]]
            runs += [(qv[0], o_wg, dict(wg=True, qv=qv)) for qv in WG_DQ_VARIANTS[D]]
            runs += [(kv[0], o_wg, dict(wg=True, kv=kv)) for kv in WG_DKDV_VARIANTS[D]]
    for what, out, kw in runs:
        kw = dict(kw)
        bwd = flash_bwd_wg if kw.pop("wg", False) else flash_bwd
        dqkv = bwd(q, k, v, g, scale, window, cap, **kw)
        # The fused kernel's dQ order rests on counters between CTAs: more runs, more chances
        # to catch a race.
        det = True
        for _ in range(5 if kw.get("fused") and T >= 4096 else 2 if kw.get("fused") else 1):
            again = bwd(q, k, v, g, scale, window, cap, **kw)
            torch.cuda.synchronize()
            det &= torch.equal(dqkv.view(torch.int16), again.view(torch.int16))
        errs = [rel(out, ro), rel(dqkv[:, :nh], rq), rel(dqkv[:, nh:nh + nkv], rk),
                rel(dqkv[:, nh + nkv:], rv)]
        good = max(errs) <= TOL and det
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} T={T:5d} nh={nh:2d} nkv={nkv} d={d:3d} window={window} "
              f"softcap={cap} amp={amp} {what}: out {errs[0]:.2e} dq {errs[1]:.2e} "
              f"dk {errs[2]:.2e} dv {errs[3]:.2e} deterministic={det}", flush=True)
    del ro, rq, rk, rv
    torch.cuda.empty_cache()
    return ok


def timed(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps * 1e-3


def bench(T, nh, nkv, d, window=None, variants=False):
    q, k, v, g = (torch.randn(T, h, d, device="cuda").bfloat16() for h in (nh, nkv, nkv, nh))
    scale = 1.0 / math.sqrt(d)
    flops = 4.0 * T * T * d * nh / 2  # causal: half of the two T×T×d products
    if window:
        flops *= min(1.0, (2.0 * window * T - window * window) / (T * T))
    tf = timed(lambda: flash_fwd(q, k, v, scale, window, None))
    tb = timed(lambda: flash_bwd(q, k, v, g, scale, window, None))
    lse, delta = bwd_prep(q, k, v, g, scale, window, None)
    dqkv = torch.empty(T, nh + 2 * nkv, d, dtype=q.dtype, device=q.device)
    t_dq = timed(lambda: bwd_kernel("dq", q, k, v, g, lse, delta, dqkv, scale, window, None))
    group = nh // nkv
    kv = []
    for nsplit in [s for s in range(1, group + 1) if group % s == 0]:
        part = torch.empty(nsplit, T, 2 * nkv * d, dtype=torch.float32, device=q.device)
        t = timed(lambda: bwd_kernel("dkdv", q, k, v, g, lse, delta, dqkv, scale, window, None,
                                     nsplit=nsplit, part=part))
        mark = "*" if nsplit == dkdv_splits(T, nh, nkv, d) else ""
        kv.append(f"{mark}{nsplit}: {t*1e3:.3f}")
    # flash_bwd includes its forward recomputation (lse), as the op must: report both.
    t_delta = timed(lambda: launch("flash_bwd_delta", (math.ceil(T * nh / 8),), 256, 0,
                                   (ptr(g), ptr(g), ptr(delta), np.int32(T), np.int32(nh),
                                    np.int32(d))))
    t_split = timed(lambda: bwd_kernel("dkdv", q, k, v, g, lse, delta, dqkv, scale, window, None))
    saved = f"two-kernel {(t_delta + t_dq + t_split)*1e3:.3f}"
    if not window:
        scr = fused_scratch(T, nh, nkv, d)
        t_fused = timed(lambda: bwd_kernel("fused", q, k, v, g, lse, delta, dqkv, scale, None, None,
                                           scratch=scr))
        saved += f", fused {(t_delta + t_fused)*1e3:.3f} (fused+reduce {t_fused*1e3:.3f})"
    line = (f"T={T} nh={nh} nkv={nkv} d={d} window={window}: "
            f"bwd with saved O/lse (delta {t_delta*1e3:.3f} + kernels): {saved} ms | "
            f"fwd {tf*1e3:.3f} ms {flops/tf/1e12:.0f} TFLOP/s | bwd (incl. fwd recompute) "
            f"{tb*1e3:.3f} ms {2.5*flops/tb/1e12:.0f} TFLOP/s (bwd only {2.5*flops/(tb-tf)/1e12:.0f}; "
            f"dq {t_dq*1e3:.3f} ms, dkdv+reduce by nsplit ({', '.join(kv)}) ms; * = default)")
    if window is None:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        group = nh // nkv
        q4 = q.transpose(0, 1)[None].contiguous().requires_grad_()
        k4 = k.repeat_interleave(group, 1).transpose(0, 1)[None].contiguous().requires_grad_()
        v4 = v.repeat_interleave(group, 1).transpose(0, 1)[None].contiguous().requires_grad_()
        g4 = g.transpose(0, 1)[None].contiguous()
        sdpa = torch.nn.functional.scaled_dot_product_attention
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sf = timed(lambda: sdpa(q4, k4, v4, is_causal=True))
            o4 = sdpa(q4, k4, v4, is_causal=True)
            sb = timed(lambda: torch.autograd.grad(o4, (q4, k4, v4), g4, retain_graph=True))
        line += (f" || SDPA flash: fwd {sf*1e3:.3f} ms {flops/sf/1e12:.0f} TFLOP/s, "
                 f"bwd {sb*1e3:.3f} ms {2.5*flops/sb/1e12:.0f} TFLOP/s")
    print(line, flush=True)
    D = wg_width(d)
    if D:
        tfw = timed(lambda: flash_fwd_wg(q, k, v, scale, window, None))
        lse_w = torch.empty_like(lse)
        flash_fwd_wg(q, k, v, scale, window, None, lse=lse_w)
        tq = timed(lambda: bwd_wg("dq", q, k, v, g, lse_w, delta, dqkv, scale, window, None))
        tk = timed(lambda: bwd_wg("dkdv", q, k, v, g, lse_w, delta, dqkv, scale, window, None))
        print(f"  wgmma: fwd {tfw*1e3:.3f} ms {flops/tfw/1e12:.0f} TFLOP/s | dq {tq*1e3:.3f} ms, "
              f"dkdv+reduce {tk*1e3:.3f} ms, bwd with saved O/lse {(t_delta + tq + tk)*1e3:.3f} ms "
              f"{2.5*flops/(t_delta + tq + tk)/1e12:.0f} TFLOP/s", flush=True)
        if variants:
            for fv in WG_FWD_VARIANTS[D]:
                t = timed(lambda: flash_fwd_wg(q, k, v, scale, window, None, fv=fv))
                print(f"  variant {fv[0]}: fwd {t*1e3:.3f} ms {flops/t/1e12:.0f} TFLOP/s", flush=True)
            for qv in WG_DQ_VARIANTS[D]:
                t = timed(lambda: bwd_wg("dq", q, k, v, g, lse_w, delta, dqkv, scale, window, None,
                                         var=qv))
                print(f"  variant {qv[0]}: dq {t*1e3:.3f} ms", flush=True)
            for kv in WG_DKDV_VARIANTS[D]:
                t = timed(lambda: bwd_wg("dkdv", q, k, v, g, lse_w, delta, dqkv, scale, window,
                                         None, var=kv))
                print(f"  variant {kv[0]}: dkdv+reduce {t*1e3:.3f} ms", flush=True)
    if variants:
        D = tiles(d)[0]
        for fv in FWD_VARIANTS[D]:
            t = timed(lambda: flash_fwd(q, k, v, scale, window, None, fv=fv))
            print(f"  variant {fv[0]}: fwd {t*1e3:.3f} ms {flops/t/1e12:.0f} TFLOP/s", flush=True)
        for qv in DQ_VARIANTS[D]:
            t = timed(lambda: bwd_kernel("dq", q, k, v, g, lse, delta, dqkv, scale, window, None,
                                         qv=qv))
            print(f"  variant {qv[0]}: dq {t*1e3:.3f} ms", flush=True)
        for kv in DKDV_VARIANTS[D]:
            t = timed(lambda: bwd_kernel("dkdv", q, k, v, g, lse, delta, dqkv, scale, window, None,
                                         kv=kv))
            print(f"  variant {kv[0]}: dkdv+reduce {t*1e3:.3f} ms", flush=True)
        for uv in FUSED_VARIANTS[D] + FUSED_TIMING[D] if not window else []:
            t = timed(lambda: bwd_kernel("fused", q, k, v, g, lse, delta, dqkv, scale, None, None,
                                         scratch=scr, uv=uv))
            print(f"  variant {uv[0]}: fused+reduce {t*1e3:.3f} ms", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="correctness of small shapes only")
    ap.add_argument("--variants", action="store_true",
                    help="also check and time the alternative instantiations (FWD_VARIANTS, ...)")
    ap.add_argument("--cubin", help="module built by --build-cubin (adds the wgmma kernels)")
    ap.add_argument("--build-cubin", metavar="OUT", help="compile for sm_90a into OUT and exit")
    ap.add_argument("--only-wg", action="store_true", help="benchmark T = 4096, d = 64 and 128 only")
    args = ap.parse_args()
    global MOD, WG
    if args.build_cubin:
        build_cubin(args.build_cubin)
        return
    if cp is None:
        sys.exit("flash_check.py needs CuPy, NumPy and PyTorch (only --build-cubin does not)")
    if args.cubin:
        MOD, WG = cp.RawModule(path=args.cubin), True
    else:
        MOD = cp.RawModule(code=SRC, backend="nvrtc", options=("-lineinfo",))
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} cupy {cp.__version__} "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    cases = [
        dict(T=1, nh=4, nkv=2, d=64),
        dict(T=37, nh=4, nkv=1, d=32),
        dict(T=100, nh=6, nkv=2, d=16),
        dict(T=50, nh=2, nkv=2, d=8),
        dict(T=77, nh=2, nkv=1, d=96, cap=20.0),
        dict(T=130, nh=4, nkv=4, d=64, window=17),
        dict(T=200, nh=8, nkv=2, d=128, cap=30.0),
        dict(T=257, nh=4, nkv=2, d=128, window=64, cap=50.0),
        dict(T=300, nh=4, nkv=2, d=64, window=1),
        dict(T=513, nh=32, nkv=8, d=64, amp=3.0),
        dict(T=1000, nh=8, nkv=2, d=128, window=300, amp=2.0),
    ]
    if not args.quick:
        cases += [dict(T=4096, nh=32, nkv=8, d=64), dict(T=4096, nh=32, nkv=8, d=128)]
    ok = True
    for c in cases:
        ok &= check(**c, variants=args.variants)
    if not args.quick:
        for d in (64, 128):
            bench(4096, 32, 8, d, variants=args.variants)
        if not args.only_wg:
            bench(4096, 32, 8, 128, window=1024, variants=args.variants)
            bench(1024, 32, 8, 128, variants=args.variants)
    print("ALL OK" if ok else "FAILURES", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
