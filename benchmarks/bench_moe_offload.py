"""Decode speed of a Qwen3-30B-A3B-shaped MoE (or another --shape) with routed experts int4/int8 on
the CPU (llmarch offload) vs transformers + accelerate with the experts offloaded to the CPU
(device_map).

    python benchmarks/bench_moe_offload.py                 # the real shapes, on a CUDA machine
    python benchmarks/bench_moe_offload.py --small --device cpu   # smoke test of the same path
    python benchmarks/bench_moe_offload.py --shape qwen3-next-80b-a3b --bits 4   # the hybrid

Random weights, made cheaply: dense/attention/router on the GPU with normal_ (seconds), routed
experts as random int4/int8 bytes + small fp16 scales drawn on the GPU and copied to host RAM
(normal_ over 10 GB of CPU tensors takes minutes). Routing over random weights spreads the
tokens across experts, so host reads are not served from caches.
The baseline runs only --baseline-layers MoE layers (accelerate moves every expert of a layer
from host RAM to the GPU at each step) and is scaled to the full depth, as printed;
for a hybrid the measured layers keep the model's mix of linear and full-attention layers (by
default one full_attention_interval: 3 Gated DeltaNet + 1 attention for Qwen3-Next).
Prints one JSON line per configuration and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fixtures.hub_shapes import QWEN3_30B_A3B, QWEN3_NEXT_80B_A3B  # noqa: E402

GPT_OSS_120B = dict(  # openai/gpt-oss-120b config.json shapes (experts MXFP4 as shipped)
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    num_hidden_layers=36,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=64,
    num_local_experts=128,
    num_experts_per_tok=4,
    sliding_window=128,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
)
GPT_OSS_20B = dict(GPT_OSS_120B, num_hidden_layers=24, num_local_experts=32)
SHAPES = {
    "qwen3-30b-a3b": ("qwen3_moe", QWEN3_30B_A3B),
    "gpt-oss-20b": ("gpt_oss", GPT_OSS_20B),
    "gpt-oss-120b": ("gpt_oss", GPT_OSS_120B),
    "qwen3-next-80b-a3b": ("qwen3_next", QWEN3_NEXT_80B_A3B),
}
BASELINE_FAMILIES = ("qwen3_moe", "qwen3_next")  # transformers' bf16 experts; gpt-oss ships MXFP4
SMALL_MOE = dict(
    vocab_size=1024,
    hidden_size=256,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=16,
    num_experts_per_tok=4,
)
SMALL_LINEAR = dict(  # Gated DeltaNet heads, only read by the hybrid shapes
    shared_expert_intermediate_size=128,
    linear_num_key_heads=4,
    linear_num_value_heads=8,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
)


def small_of(config: dict) -> dict:
    """The same family at a size a 2-core CPU runs in seconds (--small)."""
    small = dict(config, **SMALL_MOE)
    small.update({k: v for k, v in SMALL_LINEAR.items() if k in config})
    return small


def spec_of(config: dict, family: str = "qwen3_moe"):
    from fixtures.make import make_skeleton
    from llmarch.arch.fingerprint import fingerprint
    from llmarch.checkpoint import open_checkpoint

    d = make_skeleton(family, tempfile.mkdtemp(prefix="bench-moe-"), config)  # headers only
    return fingerprint(open_checkpoint(str(d)))


def build_llmarch(spec, device, dtype, bits: int, gpu_experts: int, finish: bool = True):
    """The model with random weights; finish: then as the loader leaves it (model.finish_loading: norms
    folded, on CUDA the Triton decode GEMVs), which is what `llmarch run` decodes with."""
    import torch
    from torch import nn

    from llmarch.runtime.experts.formats import ExpertFormat, G
    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.experts.placement import Placement
    from llmarch.runtime.load import Runtime
    from llmarch.runtime.model import build_model
    from llmarch.runtime.ops.moe import MoE

    model = build_model(spec)
    fmt = {8: ExpertFormat.INT8, 4: ExpertFormat.INT4, 2: ExpertFormat.MXFP4}[bits]  # --bits 2: MXFP4 as shipped
    place = Placement("cpu", fmt, gpu_experts)
    t0 = time.perf_counter()
    for mod in list(model.modules()):
        if isinstance(mod, MoE):
            E, d, I = mod.E, mod.d, mod.inter
            parts = []
            for rows, k in ((2 * I, d), (d, I)):
                nbytes = k if fmt is ExpertFormat.INT8 else k // 2
                q = torch.randint(0, 256, (E, rows, nbytes), dtype=torch.uint8, device=device)
                if fmt is ExpertFormat.MXFP4:  # e8m0 scales near 2^-6 (weights about +-0.1 at most)
                    s = torch.randint(118, 122, (E, rows, k // 32), dtype=torch.uint8, device=device)
                elif fmt is ExpertFormat.INT8:
                    q = q.view(torch.int8)
                    s = torch.full((E, rows, k // G), 0.02 / 127 * 8, dtype=torch.float16, device=device)
                else:  # w = q * s + m, q in 0..15: about +-0.02
                    s = torch.stack(
                        [
                            torch.full((E, rows, k // G), 0.04 / 15, device=device),
                            torch.full((E, rows, k // G), -0.02, device=device),
                        ],
                        -1,
                    )
                    s = (s * (1 + 0.1 * torch.rand_like(s))).half().reshape(E, rows, 2 * (k // G))
                parts += [q.cpu(), s.cpu()]
            mod.experts = OffloadedExperts.from_quantized(mod, tuple(parts), place, dtype)
    for mod in model.modules():  # what is left on the meta device (not the replaced resident experts)
        for pname, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            t = torch.empty(p.shape, device=device, dtype=dtype)
            if pname == "weight" and p.ndim == 1:
                t.fill_(1.0)  # norms
            else:
                t.normal_(0, 0.02)
            mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
    if finish:
        from llmarch.runtime.model import finish_loading

        finish_loading(model, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    model.eval()
    return Runtime(spec, model, None, device, dtype), build_s


def kernel_only(rt, spec, reps: int = 30) -> dict:
    """The CPU kernel alone on one layer: random k distinct experts per call, median time."""
    import numpy as np
    import torch

    from llmarch.runtime.experts.report import offloaded

    st = offloaded(rt.model)[0]
    moe = next(b.mlp for b in rt.model.layers if getattr(b.mlp, "experts", None) is st)
    k, times = spec.moe.experts_per_token, []
    x = torch.randn(1, spec.hidden_size)
    w = torch.rand(1, k)
    for _ in range(reps):
        idx = torch.randperm(st.E)[:k][None]
        t0 = time.perf_counter()
        st.host_compute(x, idx, w, moe.act, False)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times[3:]))
    return {"kernel_ms_per_layer": round(med * 1e3, 3), "kernel_gb_s": round(k * st.expert_bytes() / med / 1e9, 1)}


def check_kernel(rt, spec) -> float:
    """Relative error of the CPU kernel vs the same quantized weights dequantized, on one layer."""
    import torch
    import torch.nn.functional as F

    from llmarch.runtime.experts.formats import dequantize
    from llmarch.runtime.experts.report import offloaded

    st = offloaded(rt.model)[0]
    moe = next(b.mlp for b in rt.model.layers if getattr(b.mlp, "experts", None) is st)
    k = spec.moe.experts_per_token
    x, w = torch.randn(3, spec.hidden_size), torch.rand(3, k)
    idx = torch.stack([torch.randperm(st.E)[:k] for _ in range(3)])
    got = st.host_compute(x, idx, w, moe.act, False)
    ref = torch.zeros_like(x)
    for t in range(3):
        for j in range(k):
            e = int(idx[t, j])
            h = F.linear(x[t], dequantize(st.gu[e], st.gu_s[e], st.format))
            ref[t] += w[t, j] * F.linear(moe.act(h), dequantize(st.dn[e], st.dn_s[e], st.format))
    return float((got - ref).norm() / ref.norm())


def run_llmarch(args, spec, device, dtype, bits, gpu_experts, bw, segmented=True, torch_threads=None):
    import torch

    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.experts.report import report, reset_counters
    from llmarch.runtime.generate import Generator, Sampling

    rt, build_s = build_llmarch(spec, device, dtype, bits, gpu_experts, finish=not args.ab_build)
    torch.set_num_threads(torch_threads or os.cpu_count())
    gen = Generator(rt, args.prompt + args.tokens + 1, cuda_graph=False, compile=args.compile)
    seg = segmented and attach_decoder(gen)
    ids = torch.randint(0, spec.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    gen.generate(ids, 4, Sampling())  # warm-up (kernel build, allocator)
    if args.ab_build and seg:  # the raw build's segments captured above; now the loader's, a second decoder
        from llmarch.runtime.model import finish_loading

        raw = gen._step_eager
        finish_loading(rt.model, device)
        attach_decoder(gen)
        gen.generate(ids, 4, Sampling())
        args.decoders = {"raw_build": raw, "loader_build": gen._step_eager}
    elif args.ab_gpu_slots and seg:  # one decoder per GPU share, alternated below
        args.decoders = {}
        for n in args.ab_gpu_slots:
            with moe_gpu_slots(n):
                attach_decoder(gen)
            gen.generate(ids, 4, Sampling())
            args.decoders[f"gpu_slots_{n}"] = gen._step_eager
    reset_counters(rt.model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res = gen.generate(ids, args.tokens, Sampling())
    steps = len(res.tokens) - 1
    r = report(rt.model, steps, res.decode_s, device, bw)
    if args.profile and seg:  # before the repeats: an outer time limit cuts those, printed round by round
        from profile_moe_offload import profile_step, segment_kernels

        for name, step in getattr(args, "decoders", {}).items():  # the two builds' segments, kernel by kernel
            if name != "loader_build" and step.__self__.graphs:
                print(json.dumps({f"segment_kernels_{name}": segment_kernels(step.__self__)}), flush=True)
        profile = profile_step(gen, rt, spec, early=args.ab_early)
        print(json.dumps({"profile": profile}), flush=True)
    ab = args.ab_kernel or args.ab_step or args.ab_build or args.ab_early or args.ab_gpu_slots
    if args.repeats > 1 or ab:
        r["repeats"] = repeated_runs(args, gen, rt, spec, ids, device, bw, seg)
    r.update(
        engine="llmarch",
        expert_bits=bits,
        gpu_experts=gpu_experts,
        build_s=round(build_s, 1),
        prefill_tok_s=round(res.prefill_tok_s, 1),
        layers=spec.layers,
        graphs=bool(seg),
        torch_threads=torch.get_num_threads(),
        compiled=args.compile,
        kernel_rel_err=check_kernel(rt, spec),
        **kernel_only(rt, spec),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
    )
    del rt, gen
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


def repeated_runs(args, gen, rt, spec, ids, device, bw, seg) -> dict:
    """--repeats decode runs of the same model, and with --ab-kernel another build of moe_cpu.c
    (an older source, say) alternated with the current one round by round, or with --ab-step the
    segmented decoder's step loop in Python and in C (moe_step) alternated: per variant, each run's
    tok/s, the median, its fraction of the same-run bound, the kernel alone on one layer, and
    whether every run gave the same tokens."""
    import statistics
    from pathlib import Path

    from llmarch.runtime.experts import kernel
    from llmarch.runtime.experts.report import host_read_bandwidth, report, reset_counters
    from llmarch.runtime.generate import Sampling

    per_tok = 0
    current = kernel.cpu_kernel()
    dec = gen._step_eager.__self__ if seg else None
    native = dec is not None and getattr(dec, "native", False)
    loop0 = getattr(dec, "step_loop", None)
    axes: list[dict] = []  # each axis: {name: setup}; the variants are their product, alternated per round
    if args.ab_kernel:
        from llmarch.runtime.cbuild import build

        other = build("moe_cpu_ab", Path(args.ab_kernel).read_text(), ["-O3", "-march=native", "-fopenmp"])
        other.moe_experts.restype = other.moe_decode.restype = None

        def use_lib(lib):
            def setup():
                kernel._LIB = lib  # the Python path and kernel_only call cpu_kernel()
                if native:
                    dec.lib, dec.step_loop = lib, "python"  # the prepared contexts fit either build

            return setup

        axes.append({"ab_kernel": use_lib(other), "current": use_lib(current)})
    if args.ab_step:
        if dec is None or dec.plan is None:
            print(
                json.dumps(
                    {"ab_step": "no C step loop here (no captured graphs, or torch without raw_cuda_graph_exec)"}
                )
            )
        else:
            axes.append({f"{lp}_loop": (lambda lp=lp: setattr(dec, "step_loop", lp)) for lp in ("python", "c")})
    if getattr(args, "decoders", None):
        axes.insert(
            0, {name: (lambda step=step: setattr(gen, "_step_eager", step)) for name, step in args.decoders.items()}
        )
    if args.ab_early:
        if dec is None or dec.plan is None or dec._early is None:
            print(json.dumps({"ab_early": "no early launch here (no C step loop, or no cuStreamWaitValue32)"}))
        else:
            axes.append(
                {
                    f"{name}_launch": (lambda on=on: gen._step_eager.__self__.set_early_launch(on))
                    for name, on in (("after_kernel", False), ("early", True))
                }
            )
    variants: dict = {"current": []}
    for axis in axes:
        variants = {
            (f"{a}+{b}" if a != "current" else b): [*fs, f] for a, fs in variants.items() for b, f in axis.items()
        }
    runs: dict[str, list] = {name: [] for name in variants}
    kern: dict[str, list] = {name: [] for name in variants}
    tokens: dict[str, list] = {name: [] for name in variants}
    for rnd in range(args.repeats):
        for name, setups in variants.items():
            for f in setups:
                f()
            gen.generate(ids, 4, Sampling())
            reset_counters(rt.model)
            res = gen.generate(ids, args.tokens, Sampling())
            rep = report(rt.model, len(res.tokens) - 1, res.decode_s, device, bw)
            runs[name].append(rep["decode_tok_s"])
            tokens[name].append(list(res.tokens))
            per_tok = rep["expert_bytes_per_token"]
            kern[name].append(kernel_only(rt, spec, reps=20)["kernel_ms_per_layer"])
            print(  # as it goes: what was measured survives an outer time limit
                json.dumps(
                    {
                        "round": rnd,
                        "variant": name,
                        "decode_tok_s": runs[name][-1],
                        "kernel_ms": kern[name][-1],
                        "load_1min": round(os.getloadavg()[0], 2),
                    }
                ),
                flush=True,
            )
    kernel._LIB = current
    if native:
        dec.lib, dec.step_loop = current, loop0
    if getattr(args, "decoders", None):
        gen._step_eager = list(args.decoders.values())[-1]
    if args.ab_early and dec is not None and dec.plan is not None:  # back to the default
        from llmarch.runtime.experts.decode import early_launch_choice

        for step in getattr(args, "decoders", {"current": gen._step_eager}).values():
            step.__self__.set_early_launch(early_launch_choice())
    out = {}
    first = next(iter(tokens.values()))[0]
    for name in variants:
        med = statistics.median(runs[name])
        out[name] = {
            "decode_tok_s": runs[name],
            "median_tok_s": round(med, 2),
            "fraction_of_bound": round(med / (bw / per_tok), 3) if per_tok else None,
            "kernel_ms_per_layer": kern[name],
            "same_tokens_as_first_run": all(t == first for t in tokens[name]),
        }
    names = list(variants)
    for name in names[1:]:  # each variant against the first, round by round
        out[name]["per_round_ratio_to_first"] = [round(y / x, 3) for x, y in zip(runs[names[0]], runs[name])]
    out["same_tokens_all_variants"] = all(t == first for v in tokens.values() for t in v)
    out["order"] = "alternated per round" if len(variants) > 1 else "same model, one after another"
    out["host_read_gb_s_after"] = round(host_read_bandwidth() / 1e9, 1)
    return out


def baseline_layer_types(config: dict, L: int) -> list[str] | None:
    """The first L layer kinds of a hybrid's pattern, the last one made full attention if the slice
    has none (None: not a hybrid)."""
    interval = config.get("full_attention_interval")
    if interval is None:
        return None
    kinds = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(L)]
    if "full_attention" not in kinds:
        kinds[-1] = "full_attention"
    return kinds


def linear_kernels_present() -> dict:
    """Which fast kernel packages transformers could pick up for Gated DeltaNet instead of its torch path."""
    import importlib.util

    return {name: importlib.util.find_spec(name) is not None for name in ("fla", "causal_conv1d", "kernels")}


def run_baseline(args, family, config, device, dtype):
    """transformers + accelerate: experts of every layer on the CPU, moved in at each forward."""
    import torch
    from accelerate import dispatch_model
    from transformers import AutoConfig, AutoModelForCausalLM

    L = args.baseline_layers or config.get("full_attention_interval", 2)
    kinds = baseline_layer_types(config, L)
    cfg = AutoConfig.for_model(family, **dict(config, num_hidden_layers=L, **({"layer_types": kinds} if kinds else {})))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    main = 0 if device.type == "cuda" else "cpu"
    # everything on the GPU but the routed experts (the shared expert and the router stay resident)
    dm = {f"model.{n}": main for n, _ in model.model.named_children() if n != "layers"}
    dm["lm_head"] = main
    expert_bytes = 0
    for i, layer in enumerate(model.model.layers):
        for n, child in layer.named_children():
            if n != "mlp":
                dm[f"model.layers.{i}.{n}"] = main
                continue
            for m, sub in child.named_children():
                dm[f"model.layers.{i}.mlp.{m}"] = "cpu" if m == "experts" else main
                if m == "experts":
                    # in host RAM before dispatch: accelerate keeps a "cpu" module's tensors where they
                    # are as its weights map, so experts made on the GPU would never cross PCIe
                    sub.to("cpu")
                    expert_bytes += sum(p.numel() * p.element_size() for p in sub.parameters())
    model = dispatch_model(model, device_map=dm)
    model.eval()
    held_on = sorted(
        {
            str(mod._hf_hook.weights_map[k].device)
            for n, mod in model.named_modules()
            if n.endswith("mlp.experts") and getattr(getattr(mod, "_hf_hook", None), "weights_map", None) is not None
            for k, _ in mod.named_parameters()
        }
    )

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), device=device)
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        steps, times = 3, []
        for _ in range(steps + 1):
            sync()
            t0 = time.perf_counter()
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
            times.append(time.perf_counter() - t0)
    per_layer = sorted(times[1:])[steps // 2] / L
    full = per_layer * config["num_hidden_layers"]
    import transformers

    r = {
        "engine": "transformers+accelerate",
        "transformers": transformers.__version__,
        "measured_layers": L,
        "s_per_token_per_layer": round(per_layer, 4),
        "decode_tok_s_scaled": round(1 / full, 4),
        "expert_gb_per_layer": round(expert_bytes / L / 1e9, 2),
        # what crossing PCIe at each step implies: above the link's rate, the experts did not cross it
        "implied_transfer_gb_s": round(expert_bytes / L / per_layer / 1e9, 1),
        "expert_weights_map_on": held_on or None,
        "note": f"measured on {L} MoE layers, scaled to {config['num_hidden_layers']}",
    }
    if kinds:
        r.update(layer_types=kinds, fast_linear_kernel_packages=linear_kernels_present())
        r["note"] += f" ({kinds.count('linear_attention')} linear + {kinds.count('full_attention')} full attention)"
    del model, out, past
    return r


@contextmanager
def moe_gpu_slots(n: int | str | None):
    """LLMARCH_MOE_GPU_SLOTS=n (None: as it is) while a decoder is built, then back as it was."""
    saved = os.environ.get("LLMARCH_MOE_GPU_SLOTS")
    if n is not None:
        os.environ["LLMARCH_MOE_GPU_SLOTS"] = str(n)
    try:
        yield
    finally:
        os.environ.pop("LLMARCH_MOE_GPU_SLOTS", None)
        if saved is not None:
            os.environ["LLMARCH_MOE_GPU_SLOTS"] = saved


def stop_after(seconds: float) -> None:
    """End the process after `seconds`, saying so: each result is printed as it is measured, so what
    was done survives an outer time limit that would kill the process without a word."""
    import threading

    def stop():
        print(json.dumps({"stopped": f"time budget of {seconds:.0f} s reached; later runs did not finish"}), flush=True)
        os._exit(3)

    t = threading.Timer(seconds, stop)
    t.daemon = True
    t.start()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="a small shape (CPU smoke test)")
    ap.add_argument(
        "--shape",
        default="qwen3-30b-a3b",
        choices=sorted(SHAPES),
        help="real config shapes; gpt-oss: run with --bits 2 (MXFP4 as shipped), no baseline",
    )
    ap.add_argument("--device", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--gpu-experts", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--baseline-layers",
        type=int,
        default=None,
        help="MoE layers the baseline runs (default: 2, or a hybrid's full_attention_interval)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop after this many seconds (what has been measured is already printed); a run "
        "that could not start before it says so",
    )
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--baseline-only", action="store_true", help="only transformers+accelerate (no llmarch run)")
    ap.add_argument("--variants", action="store_true", help="also int4 without graphs, and with 16 hot GPU experts")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch's intra-op threads while decoding (where torch and the kernel share libgomp, the "
        "kernel's too: 1 makes the expert kernel single-threaded)",
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile the GPU segments between host round trips")
    ap.add_argument(
        "--repeats", type=int, default=1, help="decode runs of each llmarch model (same model, median reported)"
    )
    ap.add_argument(
        "--ab-kernel",
        default=None,
        help="another moe_cpu.c source (an older commit's, say) alternated with the current kernel each repeat",
    )
    ap.add_argument(
        "--ab-step",
        action="store_true",
        help="alternate the segmented decoder's step loop in Python and in C (moe_step) each repeat",
    )
    ap.add_argument(
        "--ab-build",
        action="store_true",
        help="alternate two decoders of one model: captured on the model as built (random weights put in, "
        "the form measured before) and as the loader leaves it (norms folded, Triton decode GEMVs)",
    )
    ap.add_argument(
        "--ab-early",
        action="store_true",
        help="alternate moe_step's launch of the next segment after the kernel and early (behind a flag)",
    )
    ap.add_argument(
        "--ab-gpu-slots",
        type=int,
        nargs="+",
        default=None,
        help="alternate decoders whose GPU reads these many of each token's experts over PCIe (0: none)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after the first run, where a step's time goes on the same model (profile_moe_offload.profile_step)",
    )
    ap.add_argument(
        "--omp-active", action="store_true", help="OMP_WAIT_POLICY=ACTIVE: kernel threads spin between layers"
    )
    args = ap.parse_args()
    if args.budget_s:
        stop_after(args.budget_s)
    if args.omp_active:
        os.environ["OMP_WAIT_POLICY"] = "ACTIVE"  # read when libgomp starts: before torch is imported
    import torch

    from llmarch.runtime.experts.report import host_read_bandwidth

    torch.set_num_threads(os.cpu_count())
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    family, config = SHAPES[args.shape]
    if args.small:
        config = small_of(config)
    spec = spec_of(config, family)
    bw = host_read_bandwidth()
    machine = {
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "host_read_gb_s": round(bw / 1e9, 1),
        "torch": torch.__version__,
    }
    print(json.dumps({"machine": machine}), flush=True)
    rows = []
    configs = (
        [] if args.baseline_only else [(b, ge, True, args.torch_threads) for b in args.bits for ge in args.gpu_experts]
    )
    if args.variants:  # what the graphs and torch's own thread pool change, on int4
        configs += [(4, 0, False, args.torch_threads), (4, 16, True, args.torch_threads)]
    for bits, ge, seg, tt in configs:
        r = run_llmarch(args, spec, device, dtype, bits, ge, bw, seg, tt)
        print(json.dumps(r), flush=True)
        rows.append(r)
    base = None
    if not args.skip_baseline and family in BASELINE_FAMILIES:
        base = run_baseline(args, family, config, device, dtype)
        print(json.dumps(base), flush=True)
    print(
        f"\n{'engine':<26}{'bits':>5}{'hot':>5}{'graphs':>7}{'thr':>4}{'tok/s':>9}{'MiB/tok':>9}{'bound':>8}{'frac':>7}"
        f"{'kern ms':>8}{'kern GB/s':>10}{'GPU MiB':>9}{'RSS MiB':>9}"
    )
    for r in rows:
        print(
            f"{'llmarch':<26}{r['expert_bits']:>5}{r['gpu_experts']:>5}{str(r['graphs']):>7}{r['torch_threads']:>4}"
            f"{r['decode_tok_s']:>9}{r['expert_bytes_per_token'] / 2**20:>9.1f}{r.get('bound_tok_s', 0):>8}"
            f"{r.get('fraction_of_bound', 0):>7}{r['kernel_ms_per_layer']:>8}{r['kernel_gb_s']:>10}"
            f"{r.get('gpu_peak_mib', 0):>9}{r['host_rss_peak_mib']:>9}"
        )
    if base:
        print(f"{'transformers+accelerate':<26}{16:>5}{0:>5}{base['decode_tok_s_scaled']:>9}   ({base['note']})")
    if base and rows:
        best = max(r["decode_tok_s"] for r in rows)
        print(f"speedup {best / base['decode_tok_s_scaled']:.1f}x")


if __name__ == "__main__":
    main()
