"""llmarch convert vs llama.cpp's convert_hf_to_gguf.py on a Qwen3-0.6B-shaped random bf16 checkpoint.

    python benchmarks/bench_convert.py [--sdist /tmp/lcp_sdist/llama_cpp_python-0.3.36.tar.gz] [--keep DIR]

Builds the checkpoint once (config and tensor names from transformers' Qwen3 classes on the meta
device; random bf16 weights tiled from a small random pool, so making them is cheap), a byte-level
BPE tokenizer (Qwen2 pre-tokenizer regex), then times each converter to bf16 and to q8_0 as a
separate process under /usr/bin/time (wall seconds, peak RSS). llama.cpp's script is unpacked from
the llama-cpp-python sdist into a temporary folder and run with its own vendored gguf-py; its
pre-tokenizer detection hashes a test encoding and knows no hash for our random tokenizer, so the
benchmark tells it the name (qwen2) instead, which costs no conversion time.
Source files are read once beforehand so both converters start from a warm page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(out: Path) -> Path:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    sys.path.insert(0, str(ROOT))
    from tests.test_convert import add_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    from fixtures.hub_shapes import QWEN3_0_6B

    cfg = Qwen3Config(**QWEN3_0_6B, torch_dtype="bfloat16")
    cfg.architectures = ["Qwen3ForCausalLM"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).view(np.uint32) >> 16
    pool = pool.astype(np.uint16)
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for k, s in shapes.items():
        n = int(np.prod(s)) * 2
        header[k] = {"dtype": "BF16", "shape": list(s), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k, s in shapes.items():
            n = int(np.prod(s))
            start = int(rng.integers(0, pool.size))
            data = np.resize(np.roll(pool, -start), n)
            if k.endswith("norm.weight"):
                data = np.full(n, 0x3F80, dtype=np.uint16)  # 1.0
            f.write(data.tobytes())
    cfg.save_pretrained(out)
    add_tokenizer(out, 4096)
    return out


def timed(cmd: list[str], env=None) -> dict:
    """Wall seconds, CPU seconds (user + sys) and peak RSS of one process run."""
    r = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", *cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    wall, user, sys_, rss_kb = r.stderr.strip().splitlines()[-1].split()
    return {
        "seconds": float(wall),
        "cpu_seconds": round(float(user) + float(sys_), 2),
        "peak_rss_mib": round(int(rss_kb) / 1024, 1),
    }


def best(runs: list[dict]) -> dict:
    """The fastest of repeated runs: on a shared machine the minimum is the least disturbed."""
    return min(runs, key=lambda r: r["seconds"])


def unpack_llamacpp(sdist: Path, dest: Path) -> Path:
    with tarfile.open(sdist) as tar:
        members = [
            m
            for m in tar.getmembers()
            if "/vendor/llama.cpp/" in m.name
            and (m.name.endswith("convert_hf_to_gguf.py") or "/conversion/" in m.name or "/gguf-py/" in m.name)
        ]
        tar.extractall(dest, members=members, filter="data")
    return next(dest.rglob("convert_hf_to_gguf.py")).parent


def compare(ours: Path, theirs: Path) -> dict:
    """Tensor names, types, shapes and bytes of the two files; metadata keys only one of them has."""
    import numpy as np
    from gguf import GGUFReader

    a, b = GGUFReader(ours), GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    differ = [
        n
        for n in ta
        if n not in tb
        or ta[n].tensor_type != tb[n].tensor_type
        or list(ta[n].shape) != list(tb[n].shape)
        or not np.array_equal(ta[n].data, tb[n].data)
    ]
    return {
        "tensors_identical": not differ and ta.keys() == tb.keys(),
        "tensors_differing": differ[:5],
        "keys_only_ours": sorted(a.fields.keys() - b.fields.keys()),
        "keys_only_theirs": sorted(b.fields.keys() - a.fields.keys()),
    }


RUN_LLAMACPP = """
import runpy, sys
lcp = sys.argv.pop(1)
sys.path[:0] = [lcp, lcp + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv[0] = lcp + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sdist", default="/tmp/lcp_sdist/llama_cpp_python-0.3.36.tar.gz")
    ap.add_argument("--keep", help="reuse/keep the checkpoint in this folder")
    ap.add_argument("--dtypes", default="bf16,q8_0")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as td:
        td = Path(td)
        src = Path(args.keep) if args.keep else td / "qwen3-0.6b-random"
        if not (src / "model.safetensors").is_file():
            make_checkpoint(src)
        lcp = unpack_llamacpp(Path(args.sdist), td / "lcp")
        subprocess.run(["cat", str(src / "model.safetensors")], stdout=subprocess.DEVNULL, check=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        rows = []
        for dtype in args.dtypes.split(","):
            out = td / f"out-{dtype}.gguf"
            ours = best(
                [
                    timed(
                        [
                            sys.executable,
                            "-m",
                            "llmarch",
                            "convert",
                            str(src),
                            "--to",
                            "gguf",
                            "-o",
                            str(out),
                            "--dtype",
                            dtype,
                            "--force",
                        ],
                        env,
                    )
                    for _ in range(args.repeat)
                ]
            )
            size = out.stat().st_size
            theirs_out = td / f"theirs-{dtype}.gguf"
            theirs = best(
                [
                    timed(
                        [
                            sys.executable,
                            "-c",
                            RUN_LLAMACPP,
                            str(lcp),
                            str(src),
                            "--outfile",
                            str(theirs_out),
                            "--outtype",
                            dtype,
                        ],
                        env,
                    )
                    for _ in range(args.repeat)
                ]
            )
            same = compare(out, theirs_out)
            out.unlink()
            theirs_out.unlink()
            rows.append(
                {
                    "dtype": dtype,
                    "llmarch": ours,
                    "llama.cpp": theirs,
                    "bytes": size,
                    **same,
                    "speedup": round(theirs["seconds"] / ours["seconds"], 2),
                    "cpu_ratio": round(theirs["cpu_seconds"] / ours["cpu_seconds"], 2),
                    "rss_ratio": round(theirs["peak_rss_mib"] / ours["peak_rss_mib"], 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        print(f"cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
