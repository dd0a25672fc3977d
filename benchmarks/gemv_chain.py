"""A bf16 decode step's chain of GEMVs without attention, for the probes that time other ways of
running it (probe_persistent_gemv, probe_tma_gemv) against the runtime's launches.

Per layer: q|k|v from rms_norm(x), x += (q's first rows) @ o^T (a stand-in for attention's output),
gate|up gated from rms_norm(x), x += h @ down^T; then the head from rms_norm(x), with
bench_gemv_cuda.matrices' shapes of a bench_run_gpu model and random weights on the GPU.
"""

from __future__ import annotations

import os


class Chain:
    def __init__(self, torch, model: str) -> None:
        from bench_gemv_cuda import matrices
        from bench_run_gpu import SHAPES

        # launches() is the Triton kernel's chain: gemv_cuda.launch would take one-row products to the
        # stream kernel on sm90+ (for this process: the probes time that kernel by its own launches)
        os.environ["LLMARCH_NO_GEMV_STREAM"] = "1"
        cfg = SHAPES[model][1]
        dims = {name: (N, K) for name, N, K, _ in matrices(cfg)}
        self.torch = torch
        self.L, self.D, self.F = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]
        self.V, self.NQKV, self.Q = dims["head"][0], dims["qkv"][0], dims["o"][1]
        L, D, F = self.L, self.D, self.F
        torch.manual_seed(0)

        def w(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) / shape[-1] ** 0.5

        self.wqkv, self.wo, self.wgu, self.wd = w(L, self.NQKV, D), w(L, D, self.Q), w(L, 2 * F, D), w(L, D, F)
        self.whead = w(self.V, D)
        self.nw = torch.ones(D, device="cuda", dtype=torch.bfloat16)
        self.x0 = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
        kinds = {"qkv": self.wqkv, "o": self.wo, "gate|up": self.wgu, "down": self.wd}
        self.kind_bytes = {k: t.numel() * 2 for k, t in kinds.items()}
        self.bytes = sum(self.kind_bytes.values()) + self.whead.numel() * 2

    def bufs(self) -> tuple:
        """(x, q, h, logits): the residual row (a fresh copy of x0) and the outputs."""
        t = self.torch
        return (self.x0.clone(), *(t.empty(1, n, device="cuda", dtype=t.bfloat16) for n in (self.NQKV, self.F, self.V)))

    def launches(self, x, q, h, logits, only: str | None = None) -> None:
        """The chain by gemv_cuda.launch's Triton kernel (see __init__), one launch a GEMV (only: that
        matrix kind's launches alone)."""
        from llmarch.runtime import gemv_cuda as gv

        for layer in range(self.L):
            if only in (None, "qkv"):
                gv.launch(x, self.wqkv[layer], None, q, norm_w=self.nw, eps=1e-5)
            if only in (None, "o"):
                gv.launch(q[:, : self.Q], self.wo[layer], None, x, residual=x)
            if only in (None, "gate|up"):
                gv.launch(x, self.wgu[layer], None, h, glu=True, norm_w=self.nw, eps=1e-5)
            if only in (None, "down"):
                gv.launch(h, self.wd[layer], None, x, residual=x)
        if only is None:
            gv.launch(x, self.whead, None, logits, norm_w=self.nw, eps=1e-5)

    def admit(self, name: str, got: tuple, ref: tuple, rows: list, against: str = "the launches") -> bool:
        """A variant's buffers against the reference's: the errors printed and recorded in rows; whether
        it may be timed (logits within 5%)."""
        err, errx = self.errors(got, ref)
        same = bool(self.torch.equal(got[3], ref[3]))
        print(f"{name}: logits rel. error {err:.2e} (equal: {same}), x {errx:.2e} against {against}", flush=True)
        rows.append({"variant": name, "rel_err_logits": err, "rel_err_x": errx, "equal": same})
        return err < 0.05

    def errors(self, got: tuple, ref: tuple) -> tuple[float, float]:
        """Relative errors of the logits and of x against the reference buffers'."""

        def rel(a, b):
            return ((a.double() - b.double()).norm() / b.double().norm()).item()

        return rel(got[3], ref[3]), rel(got[0], ref[0])


def graph_times(torch, variants: dict, bufs, rounds: int) -> dict[str, list[float]]:
    """Seconds a call of each variant (fn(buffers)) takes: ten calls captured in one CUDA graph, three
    replays timed a round, the variants in alternating order each round."""
    graphs, held = {}, []
    for name, fn in variants.items():
        b = bufs()
        held.append(b)  # a graph writes into its buffers at each replay: none may be reused
        fn(b)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(10):
                fn(b)
        graphs[name] = g
    times: dict = {n: [] for n in graphs}
    names = list(graphs)
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            graphs[n].replay()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(3):
                graphs[n].replay()
            e.record()
            torch.cuda.synchronize()
            times[n].append(s.elapsed_time(e) / 1e3 / 30)
    return times
