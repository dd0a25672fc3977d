"""--experts cpu from a quantized GGUF: load time, RSS and decode speed with the GGUF's expert blocks
read as stored (memory-mapped) against the dequantizing path (--expert-bits 16: float experts in
host RAM; --expert-bits 8 / 4: dequantized, then requantized to the kernel's int8 / int4).

    python benchmarks/bench_gguf_expert_blocks.py [--dtype q8_0|q4_k_m|mxfp4]
                                                  [--layers 2 --experts 64 --hidden 1024 --inter 512]

A random Qwen3-MoE of the given shape is made with transformers and converted by `llmarch convert
--to gguf` (q8_0 directly; q4_k_m and mxfp4 from its f32 conversion by llama.cpp's own quantizer,
llama_model_quantize from llama-cpp-python: Q4_K_M's Q4_K gate/up with Q6_K or Q4_K down experts,
MXFP4_MOE's MXFP4 experts), cached under --work; then each configuration loads and decodes in a
fresh process (so RSS is its own): one JSON line each and a table. RSS after load counts the
expert pages the store holds (anonymous copies, or the GGUF pages touched so far).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "as stored": dict(experts="cpu"),
    "dequantized, 16-bit": dict(experts="cpu", expert_bits=16),
    "dequantized, requantized int8": dict(experts="cpu", expert_bits=8),
    "dequantized, requantized int4": dict(experts="cpu", expert_bits=4),
}
LLAMA_FTYPES = {"q4_k_m": "Q4_K_M", "mxfp4": "MXFP4_MOE"}  # made by llama.cpp's quantizer from f32


def rss_mib(key: str = "VmRSS") -> float:
    """This process's resident MiB now (VmRSS) or at its peak (VmHWM: per address space, so unlike
    ru_maxrss it does not carry over the parent's peak into a child started with exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(path: str, kw: dict, steps: int) -> dict:
    """One configuration, in this process: load time, RSS, decode tok/s."""
    import time

    import torch

    from llmarch.runtime.experts.report import offloaded
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    with torch.device("meta"):  # torch's lazy imports on first module init (seconds): not the load's
        torch.nn.Embedding(2, 2)
    before = rss_mib()
    t0 = time.perf_counter()
    rt = load_runtime(path, "cpu", "float32", **kw)
    load_s = time.perf_counter() - t0
    after_load = rss_mib()
    res = Generator(rt, 16 + steps + 1).generate(list(range(3, 19)), steps, Sampling())
    return {
        "load_s": round(load_s, 2),
        "rss_before_mib": round(before),
        "rss_after_load_mib": round(after_load),
        "rss_after_decode_mib": round(rss_mib()),
        "peak_rss_mib": round(rss_mib("VmHWM")),
        "decode_tok_s": round(res.decode_tok_s, 2),
        "expert_format": ", ".join(dict.fromkeys(s.format_name for s in offloaded(rt.model))),
        "notes": rt.notes,
        "tokens": res.tokens,
    }


def llama_quantize(src: Path, out: Path, ftype: str) -> None:
    """llama.cpp's llama_model_quantize (llama-cpp-python) of src to out, llama.cpp's LLAMA_FTYPE_MOSTLY_<ftype>."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    tmp = out.with_suffix(".part")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)):
        raise SystemExit(f"llama_model_quantize {ftype} failed")
    tmp.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="q8_0", choices=["q8_0", *LLAMA_FTYPES])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "llmarch-bench-gguf-experts"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: "path|json kwargs"
    a = ap.parse_args()
    if a.one:
        path, kw = a.one.split("|", 1)
        print(json.dumps(measure(path, json.loads(kw), a.steps)))
        return
    work = Path(a.work)
    shape = f"L{a.layers}-E{a.experts}-d{a.hidden}-I{a.inter}"
    gguf_path = work / f"qwen3_moe-{shape}-{a.dtype}.gguf"
    if not gguf_path.exists():
        from fixtures.make import make_tiny
        from llmarch.convert.to_gguf import convert_to_gguf

        src = make_tiny(
            "qwen3_moe",
            work / f"src-{shape}",
            hidden_size=a.hidden,
            intermediate_size=a.hidden,
            moe_intermediate_size=a.inter,
            num_hidden_layers=a.layers,
            mlp_only_layers=[],
            num_experts=a.experts,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=a.hidden // 8,
        )
        if a.dtype in LLAMA_FTYPES:
            f32 = work / f"qwen3_moe-{shape}-f32.gguf"
            if not f32.exists():
                convert_to_gguf(str(src), f32, "f32")
            llama_quantize(f32, gguf_path, LLAMA_FTYPES[a.dtype])
        else:
            convert_to_gguf(str(src), gguf_path, a.dtype)
    rows = []
    for name, kw in CONFIGS.items():
        out = subprocess.run(
            [sys.executable, __file__, "--steps", str(a.steps), "--one", f"{gguf_path}|{json.dumps(kw)}"],
            capture_output=True,
            text=True,
        )
        if out.returncode:  # a path this file cannot take (MXFP4 experts are only read as stored)
            refused = (out.stderr.strip().splitlines() or ["(no message)"])[-1]
            print(json.dumps({"config": name, "refused": refused}))
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["config"] = name
        print(json.dumps(r))
        rows.append(r)
    print(f"\n{gguf_path.name} ({gguf_path.stat().st_size / 2**20:.0f} MiB), float32 activations, CPU")
    print(
        f"{'experts':34} {'format':28} {'load s':>7} {'RSS load MiB':>13} {'RSS decode':>11} {'peak':>7} {'tok/s':>7}"
    )
    for r in rows:
        print(
            f"{r['config']:34} {r['expert_format']:28} {r['load_s']:7.2f} {r['rss_after_load_mib']:13} {r['rss_after_decode_mib']:11} "
            f"{r['peak_rss_mib']:7} {r['decode_tok_s']:7.2f}"
        )
    for r in rows[1:]:
        same = sum(x == y for x, y in zip(r["tokens"], rows[0]["tokens"]))
        print(f"greedy tokens of {r['config']!r} equal to as stored's: {same} of {len(r['tokens'])}")


if __name__ == "__main__":
    main()
