"""Can the GPU read a share of the host's experts itself, while the CPU reads the rest? A Triton
kernel given a pinned host tensor (UVA: the host address is valid on the device) gathers the slabs
of a few selected experts into device memory. Measured: its rate by experts gathered, against the
copy engine's (cudaMemcpy of the same bytes, contiguous); a CPU reader (torch sum over 2 GiB)
alone and beside a stream of gathers; and whether memory pinned in place (cudaHostRegister on a
heap buffer and on a read-only file mapping) works, and how long pinning takes. Prints JSON lines.

    python benchmarks/probe_pcie_gather.py
"""

from __future__ import annotations

import json
import mmap
import os
import statistics
import tempfile
import time

import torch
import triton

from llmarch.runtime.experts.gpu_share_kernels import gather_experts


def gather(src, ids, dst, block=4096, warps=4):
    n = src.shape[1]
    gather_experts[(ids.numel(), triton.cdiv(n, block))](src, ids, dst, n, BLOCK=block, num_warps=warps)


def timed(fn, reps=50):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / reps


def emit(**kw):
    print(json.dumps(kw), flush=True)


def main():
    E, slab = 128, 884736  # a Qwen3-30B-A3B expert matrix in Q4_0 (768 x 2048 weights, 18 bytes / 32)
    words = slab // 4
    host = torch.randint(-(2**31), 2**31 - 1, (E, words), dtype=torch.int32).pin_memory()
    dev_copy = torch.empty((8, words), dtype=torch.int32, device="cuda")
    ok = False
    try:
        ids = torch.tensor([3, 77, 100], device="cuda")
        gather(host, ids, dev_copy)
        torch.cuda.synchronize()
        ok = torch.equal(dev_copy[:3].cpu(), host[[3, 77, 100]])
        emit(what="triton_reads_pinned", ok=ok)
    except Exception as e:  # the launcher may refuse a host tensor
        emit(what="triton_reads_pinned", ok=False, error=f"{type(e).__name__}: {e}"[:300])
    g = torch.Generator().manual_seed(0)
    for kg in (1, 2, 3, 4, 6, 8):
        ids = torch.randperm(E, generator=g)[:kg].cuda()
        for block, warps in ((1024, 4), (4096, 4), (4096, 8), (8192, 8)):
            if not ok:
                break
            t = timed(lambda ids=ids, block=block, warps=warps: gather(host, ids, dev_copy, block, warps))
            emit(
                what="gather",
                experts=kg,
                block=block,
                warps=warps,
                us=round(t * 1e6, 1),
                gb_s=round(kg * slab / t / 1e9, 1),
            )
        t = timed(lambda kg=kg: dev_copy[:kg].copy_(host[:kg], non_blocking=True))
        emit(what="memcpy", experts=kg, us=round(t * 1e6, 1), gb_s=round(kg * slab / t / 1e9, 1))

    # a CPU reader beside a stream of gathers
    big = torch.ones(512 << 20, dtype=torch.float32)
    torch.set_num_threads(os.cpu_count() or 1)

    def cpu_read(n=5):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            big.sum()
            ts.append(time.perf_counter() - t0)
        return big.numel() * 4 / statistics.median(ts) / 1e9

    emit(what="cpu_read_alone", gb_s=round(cpu_read(), 1))
    if ok:
        ids = torch.randperm(E, generator=g)[:3].cuda()
        side = torch.cuda.Stream()
        reps = 400
        with torch.cuda.stream(side):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(reps):
                gather(host, ids, dev_copy)
            b.record()
        cpu = cpu_read()
        b.synchronize()
        emit(
            what="beside",
            cpu_read_gb_s=round(cpu, 1),
            gather_gb_s=round(reps * 3 * slab / (a.elapsed_time(b) / 1e3) / 1e9, 1),
        )
        # and with fewer CPU threads (the main thread of the runtime keeps one)
        for thr in (15, 12):
            torch.set_num_threads(thr)
            emit(what="cpu_read_alone", threads=thr, gb_s=round(cpu_read(), 1))

    # pinning in place: a heap buffer, and a read-only file mapping
    cudart = torch.cuda.cudart()
    heap = torch.ones(4 << 30, dtype=torch.uint8)
    t0 = time.perf_counter()
    rc = cudart.cudaHostRegister(heap.data_ptr(), heap.numel(), 0)
    t1 = time.perf_counter()
    emit(what="register_heap", rc=int(rc), gib=4, s=round(t1 - t0, 3))
    if int(rc) == 0 and ok:
        view = heap.view(torch.int32)[: E * words].view(E, words)
        ids = torch.tensor([5, 9], device="cuda")
        gather(view, ids, dev_copy)
        torch.cuda.synchronize()
        emit(what="gather_registered_heap", ok=torch.equal(dev_copy[:2].cpu(), view[[5, 9]]))
        cudart.cudaHostUnregister(heap.data_ptr())
    with tempfile.NamedTemporaryFile(dir="/tmp") as f:
        f.write(os.urandom(E * slab))
        f.flush()
        with open(f.name, "rb") as fr:
            mm = mmap.mmap(fr.fileno(), 0, access=mmap.ACCESS_READ)
            t = torch.frombuffer(mm, dtype=torch.int32).view(E, words)
            for flags, name in ((8, "read_only"), (0, "default")):
                t0 = time.perf_counter()
                rc = cudart.cudaHostRegister(t.data_ptr(), E * slab, flags)
                emit(what="register_file_map", flags=name, rc=int(rc), s=round(time.perf_counter() - t0, 3))
                if int(rc) == 0:
                    if ok:
                        ids = torch.tensor([1, 120], device="cuda")
                        gather(t, ids, dev_copy)
                        torch.cuda.synchronize()
                        emit(what="gather_file_map", ok=torch.equal(dev_copy[:2].cpu(), t[[1, 120]]))
                    cudart.cudaHostUnregister(t.data_ptr())
                    break
            del t


if __name__ == "__main__":
    main()
