"""Probe: one persistent kernel for a bf16 decode step's chain of GEMVs, against one launch a GEMV.

    python benchmarks/probe_persistent_gemv.py [--model llama-3.2-1b] [--rounds 5] [--json OUT]

A decode step of a 1-2B model is ~65-115 GEMV launches of 2-20 us of bytes each, and each launch
pays ~2.5 us of ramp (its first loads wait on memory) and tail (its last programs drain while the
rest of the GPU idles): about a quarter of the step. Programmatic dependent launches with weights
loaded before the wait, and L2 prefetches of the next matrix, were measured and did not win
(README, "Where each GPU target stands now"). This probe measures the other way: one kernel for the
whole chain, --programs programs a SM that stay, each phase (a matrix) split into tiles of TR weight
rows x BK values, a grid-wide barrier between phases (an atomic counter), and every program's tile
stream loaded one tile ahead in registers across the phases: the first tile of the next phase goes
out before the barrier, so memory keeps working while the programs wait for each other. --stages
adds chain_step_staged: the tiles through TMA descriptors, pipelined in shared memory, none across
a barrier. Variants whose programs could not all be resident at once (registers, shared memory)
are skipped: the barrier would wait forever.

The chain is a step's GEMVs without attention (bench_gemv_cuda.matrices' shapes): per layer q|k|v
from rms_norm(x), x += (q's first rows) @ o^T (a stand-in for attention's output), gate|up gated from
rms_norm(x), x += h @ down^T; then the head from rms_norm(x). The same chain by gemv_cuda.launch (the
runtime's kernel, one launch each, in a CUDA graph) gives the reference output and the time to beat;
both read the same weights. Prints the step time of each, % of the copy-rate bound, and the
persistent kernel's error against the launches' logits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _tile_rows(blk, N, GLU: tl.constexpr, TR: tl.constexpr):
    """Weight rows of block blk's [TR, BK] tiles: TR rows from blk * TR, or for GLU (w [2N, K], gate
    rows then up rows) TR // 2 gate rows from blk * TR // 2 and the same up rows; clamped to N."""
    i = tl.arange(0, TR)
    if GLU:
        half: tl.constexpr = TR // 2
        r = tl.minimum(blk * half + (i % half), N - 1) + (i // half) * N
    else:
        r = tl.minimum(blk * TR + i, N - 1)
    return r.to(tl.int64)


@triton.jit
def _grid_sync(bar, n, G):
    """Every one of the G programs waits until n + G arrivals are counted (the counter only grows in
    a step: n, the arrivals of the barriers before); the new count."""
    target = n + G
    tl.debug_barrier()
    tl.atomic_add(bar, 1, sem="release", scope="gpu")
    c = tl.atomic_add(bar, 0, sem="acquire", scope="gpu")
    while c < target:
        c = tl.atomic_add(bar, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    return target


@triton.jit
def _rms_inverse(xin, K, eps, BK: tl.constexpr):
    """1 / rms of the K values of xin (read from the L2: other programs wrote them)."""
    kk = tl.arange(0, BK)
    ss = tl.zeros([BK], dtype=tl.float32)
    for k1 in range(0, K, BK):
        xs = tl.load(xin + k1 + kk, cache_modifier=".cg").to(tl.float32)
        ss += xs * xs
    return tl.math.rsqrt(tl.sum(ss) / K + eps)


@triton.jit
def _input_tile(xin, nw, inv, cols, NORM: tl.constexpr):
    """xin's values at cols, as RMSNorm's output (rounded to xin's dtype) with NORM."""
    xt = tl.load(xin + cols, cache_modifier=".cg")
    if NORM:
        xt = (xt.to(tl.float32) * inv * tl.load(nw + cols).to(tl.float32)).to(xin.dtype.element_ty)
    return xt


@triton.jit
def _store_rows(out, res, o, orow, N, RES: tl.constexpr):
    """out[orow] = o (float32 sums), rounded, then with RES added to res[orow] and rounded again."""
    keep = orow < N
    if RES:
        o = o.to(out.dtype.element_ty).to(tl.float32) + tl.load(
            res + orow, mask=keep, other=0.0, cache_modifier=".cg"
        ).to(tl.float32)
    tl.store(out + orow, o.to(out.dtype.element_ty), mask=keep)


@triton.jit
def _phase(
    w, N, K, xin, nw, out, res, t, w2, N2, K2, pid, G, eps,
    GLU: tl.constexpr, NORM: tl.constexpr, RES: tl.constexpr, GLU2: tl.constexpr, TR: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """out = xin' @ w^T for this program's blocks (pid, pid + G, ...), xin' = rms_norm(xin) * nw with
    NORM, silu(gate) * up with GLU, res + ... with RES. t: its first tile, loaded before; returns the
    first tile of the next phase (w2, N2 rows, K2 wide, GLU2), loaded while this one's last tile is
    multiplied."""
    kk = tl.arange(0, BK)
    inv = _rms_inverse(xin, K, eps, BK) if NORM else 1.0
    OUT_ROWS: tl.constexpr = TR // 2 if GLU else TR
    nb = (N + OUT_ROWS - 1) // OUT_ROWS  # N outputs (GLU: 2N weight rows)
    nk = K // BK
    total = ((nb - pid + G - 1) // G) * nk
    acc = tl.zeros([TR], dtype=tl.float32)
    for i in range(0, total):
        blk = pid + (i // nk) * G
        k0 = (i % nk) * BK
        last = i + 1 == total
        ni = i + 1
        nblk = pid + (ni // nk) * G
        nk0 = (ni % nk) * BK
        # one pointer tile: this phase's next tile, or after its last the next phase's first
        r = tl.where(last, _tile_rows(pid, N2, GLU2, TR), _tile_rows(nblk, N, GLU, TR))
        base = tl.where(last, w2, w)
        cols = tl.where(last, 0, nk0) + kk
        nt = tl.load(base + r[:, None] * tl.where(last, K2, K) + cols[None, :], eviction_policy="evict_first")
        xt = _input_tile(xin, nw, inv, k0 + kk, NORM)
        acc += tl.sum(t.to(tl.float32) * xt.to(tl.float32)[None, :], axis=1)
        t = nt
        if (i % nk) == nk - 1:
            if GLU:
                a2 = tl.reshape(acc, [2, OUT_ROWS])
                sel = tl.arange(0, 2)[:, None] == 0
                g = tl.sum(tl.where(sel, a2, 0.0), axis=0)
                u = tl.sum(tl.where(sel, 0.0, a2), axis=0)
                o = g * tl.sigmoid(g) * u
            else:
                o = acc
            _store_rows(out, res, o, blk * OUT_ROWS + tl.arange(0, OUT_ROWS), N, RES)
            acc = tl.zeros([TR], dtype=tl.float32)
    if total == 0:  # no block here: the next phase's first tile was never asked for
        r = _tile_rows(pid, N2, GLU2, TR)
        t = tl.load(w2 + r[:, None] * K2 + kk[None, :], eviction_policy="evict_first")
    return t


@triton.jit
def chain_step(
    x, nw, wqkv, wo, wgu, wd, whead, q, h, logits, bar, L, eps,
    D: tl.constexpr, NQKV: tl.constexpr, Q: tl.constexpr, F: tl.constexpr, V: tl.constexpr,
    TR: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    r = _tile_rows(pid, NQKV, False, TR)
    t = tl.load(wqkv + r[:, None] * D + tl.arange(0, BK)[None, :], eviction_policy="evict_first")
    n = 0
    for layer in range(L):
        lq = wqkv + layer.to(tl.int64) * NQKV * D
        lo = wo + layer.to(tl.int64) * D * Q
        lg = wgu + layer.to(tl.int64) * 2 * F * D
        ld = wd + layer.to(tl.int64) * D * F
        t = _phase(lq, NQKV, D, x, nw, q, q, t, lo, D, Q, pid, G, eps, False, True, False, False, TR, BK)
        n = _grid_sync(bar, n, G)
        t = _phase(lo, D, Q, q, nw, x, x, t, lg, F, D, pid, G, eps, False, False, True, True, TR, BK)
        n = _grid_sync(bar, n, G)
        t = _phase(lg, F, D, x, nw, h, h, t, ld, D, F, pid, G, eps, True, True, False, False, TR, BK)
        n = _grid_sync(bar, n, G)
        nq = tl.where(layer + 1 < L, wqkv + (layer + 1).to(tl.int64) * NQKV * D, whead)
        nn = tl.where(layer + 1 < L, NQKV, V)
        t = _phase(ld, D, F, h, nw, x, x, t, nq, nn, D, pid, G, eps, False, False, True, False, TR, BK)
        n = _grid_sync(bar, n, G)
    _phase(whead, V, D, x, nw, logits, logits, t, whead, V, D, pid, G, eps, False, True, False, False, TR, BK)


@triton.jit
def _phase_staged(
    w, N, K, xin, nw, out, res, pid, G, eps,
    GLU: tl.constexpr, NORM: tl.constexpr, RES: tl.constexpr, TR: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """_phase with the weight tiles loaded by the tensor memory accelerator through a descriptor and
    Triton's software pipeliner (tl.range's num_stages: STAGES - 1 tiles in flight in shared memory;
    plain loads outside a dot are not pipelined) instead of one tile ahead in registers; no load
    crosses the barrier. GLU: gate and up tiles of TR // 2 rows each."""
    kk = tl.arange(0, BK)
    inv = _rms_inverse(xin, K, eps, BK) if NORM else 1.0
    OUT_ROWS: tl.constexpr = TR // 2 if GLU else TR
    nb = (N + OUT_ROWS - 1) // OUT_ROWS
    nk = K // BK
    total = ((nb - pid + G - 1) // G) * nk
    desc = tl.make_tensor_descriptor(w, shape=[2 * N if GLU else N, K], strides=[K, 1], block_shape=[OUT_ROWS, BK])
    acc = tl.zeros([OUT_ROWS], dtype=tl.float32)
    up = tl.zeros([OUT_ROWS], dtype=tl.float32)
    for i in tl.range(0, total, num_stages=STAGES):
        blk = pid + (i // nk) * G
        k0 = (i % nk) * BK
        t = desc.load([blk * OUT_ROWS, k0])
        xt = _input_tile(xin, nw, inv, k0 + kk, NORM)
        acc += tl.sum(t.to(tl.float32) * xt.to(tl.float32)[None, :], axis=1)
        if GLU:
            tu = desc.load([N + blk * OUT_ROWS, k0])
            up += tl.sum(tu.to(tl.float32) * xt.to(tl.float32)[None, :], axis=1)
        if (i % nk) == nk - 1:
            if GLU:
                o = acc * tl.sigmoid(acc) * up
                up = tl.zeros([OUT_ROWS], dtype=tl.float32)
            else:
                o = acc
            _store_rows(out, res, o, blk * OUT_ROWS + tl.arange(0, OUT_ROWS), N, RES)
            acc = tl.zeros([OUT_ROWS], dtype=tl.float32)


@triton.jit
def chain_step_staged(
    x, nw, wqkv, wo, wgu, wd, whead, q, h, logits, bar, L, eps,
    D: tl.constexpr, NQKV: tl.constexpr, Q: tl.constexpr, F: tl.constexpr, V: tl.constexpr,
    TR: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """chain_step with _phase_staged."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    n = 0
    for layer in range(L):
        lq = wqkv + layer.to(tl.int64) * NQKV * D
        lo = wo + layer.to(tl.int64) * D * Q
        lg = wgu + layer.to(tl.int64) * 2 * F * D
        ld = wd + layer.to(tl.int64) * D * F
        _phase_staged(lq, NQKV, D, x, nw, q, q, pid, G, eps, False, True, False, TR, BK, STAGES)
        n = _grid_sync(bar, n, G)
        _phase_staged(lo, D, Q, q, nw, x, x, pid, G, eps, False, False, True, TR, BK, STAGES)
        n = _grid_sync(bar, n, G)
        _phase_staged(lg, F, D, x, nw, h, h, pid, G, eps, True, True, False, TR, BK, STAGES)
        n = _grid_sync(bar, n, G)
        _phase_staged(ld, D, F, h, nw, x, x, pid, G, eps, False, False, True, TR, BK, STAGES)
        n = _grid_sync(bar, n, G)
    _phase_staged(whead, V, D, x, nw, logits, logits, pid, G, eps, False, True, False, TR, BK, STAGES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tiles", default="4,2048,8;8,2048,16;8,1024,8;16,2048,16", help="TR,BK,WARPS;...")
    ap.add_argument("--programs", default="1", help="programs a SM, comma-separated")
    ap.add_argument("--stages", default="", help="also chain_step_staged with these num_stages, comma-separated")
    ap.add_argument("--json")
    a = ap.parse_args()

    import torch
    from bench_run_gpu import copy_rate
    from gemv_chain import Chain, graph_times

    c = Chain(torch, a.model)
    L, D, F, V, NQKV, Q, nw = c.L, c.D, c.F, c.V, c.NQKV, c.Q, c.nw
    wqkv, wo, wgu, wd, whead, nbytes = c.wqkv, c.wo, c.wgu, c.wd, c.whead, c.bytes

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bar = torch.zeros(1, device="cuda", dtype=torch.int32)
    # device-side tensor descriptors (the staged variants) are written to a scratch buffer
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))

    def persistent(x, q, h, logits, tile, per_sm, warmup=False, stages=0):
        tr, bk, warps = tile
        bar.zero_()
        fn = chain_step_staged if stages else chain_step
        kernel = fn.warmup if warmup else fn[(sms * per_sm,)]
        return kernel(
            x, nw, wqkv, wo, wgu, wd, whead, q, h, logits, bar, L, 1e-5,
            D=D, NQKV=NQKV, Q=Q, F=F, V=V, TR=tr, BK=bk, num_warps=warps, **({"grid": (1,)} if warmup else {}),
            **({"STAGES": stages} if stages else {}),
        )  # fmt: skip

    def resident(tile, per_sm, stages=0) -> str | None:
        """Why per_sm programs of this tile cannot all be resident at once on every SM (the barrier
        would wait forever for programs that never start), or None."""
        k = persistent(*bufs(), tile, per_sm, warmup=True, stages=stages)
        k._init_handles()
        regs = -(-k.n_regs // 8) * 8 * 32 * tile[2] * per_sm
        smem = k.metadata.shared * per_sm
        if regs > 65536 or tile[2] * 32 * per_sm > 2048 or smem > 227 * 1024:
            return f"{k.n_regs} registers a thread, {k.metadata.shared} B shared: not {per_sm} a SM"
        return None

    bufs = c.bufs

    ref = bufs()
    c.launches(*ref)
    torch.cuda.synchronize()
    variants = {"launches": lambda b: c.launches(*b)}
    out = {"model": a.model, "bytes": nbytes, "rows": []}
    runs = [(ts, p, 0) for ts in a.tiles.split(";") for p in a.programs.split(",")]
    runs += [
        (ts, p, int(st)) for st in a.stages.split(",") if st for ts in a.tiles.split(";") for p in a.programs.split(",")
    ]
    for ts, p, stages in runs:
        tile, per_sm = tuple(int(v) for v in ts.split(",")), int(p)
        name = f"persistent {tile} x{per_sm}/SM" + (f" {stages} stages" if stages else "")
        b = bufs()
        try:
            why = resident(tile, per_sm, stages)
            if why:
                print(f"{name}: skipped, {why}", flush=True)
                continue
            persistent(*b, tile, per_sm, stages=stages)
            torch.cuda.synchronize()
        except Exception as e:
            print(f"{name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        if c.admit(name, b, ref, out["rows"]):
            variants[name] = lambda b, tile=tile, per_sm=per_sm, st=stages: persistent(*b, tile, per_sm, stages=st)
    rate = copy_rate(torch)
    times = graph_times(torch, variants, bufs, a.rounds)
    names = list(times)
    base = statistics.median(times["launches"])
    print(f"{a.model}: {nbytes / 1e9:.2f} GB of weights a step, copy rate {rate / 1e12:.2f} TB/s, "
          f"bound {nbytes / rate * 1e6:.0f} us, {sms} SMs; load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for n in names:
        t = statistics.median(times[n])
        print(f"  {n:34s} {t * 1e6:7.1f} us a step, {100 * nbytes / rate / t:5.1f}% of bound, {base / t:.3f}x launches")
        out["rows"].append({"variant": n, "step_us": t * 1e6, "samples_us": [v * 1e6 for v in times[n]]})
    out["copy_rate"] = rate
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
