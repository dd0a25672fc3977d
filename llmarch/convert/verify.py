"""--verify: run the source and the converted model on the same token ids and compare.

Reported: top-1 token agreement over every position (teacher-forced, so one early difference
does not hide the rest) and logit NMSE = sum((a - b)^2) / sum(a^2), llama.cpp's measure
(< 1e-4 excellent for f16/bf16, < 1e-2 pass; q8_0 lands near 2e-4).
Engines: llmarch's own runtime when it supports the family (dense attention today); otherwise
transformers for the safetensors side and llama.cpp (llama-cpp-python) for the GGUF side, when
installed. Nothing is stubbed: without an engine, --verify says what to install.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmarch.errors import LlmarchError

PROMPTS = ["The capital of France is", "def fibonacci(n):", "In 1969, the first humans"]
EXCELLENT, PASS = 1e-4, 1e-2


def nmse(ref: np.ndarray, other: np.ndarray) -> float:
    ref, other = ref.astype(np.float64), other.astype(np.float64)
    return float(((ref - other) ** 2).sum() / max((ref**2).sum(), 1e-30))


def prompt_ids(hf_dir: Path, vocab: int, n: int = 3, length: int = 12) -> list[list[int]]:
    """Prompts encoded with the HF side's tokenizer; fixed pseudo-random ids when it has none."""
    tj = hf_dir / "tokenizer.json"
    if tj.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tj))
        return [tok.encode(p).ids for p in PROMPTS[:n]]
    rng = np.random.default_rng(1234)
    return [rng.integers(1, vocab, size=length).tolist() for _ in range(n)]


def _hf_dir(path: str) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def verify_pair(source: str, output: str) -> dict:
    """Compare source and output on a few prompts; the safetensors side is the reference."""
    hf, gg = (output, source) if Path(source).suffix.lower() == ".gguf" else (source, output)
    config = json.loads((_hf_dir(hf) / "config.json").read_text())
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    prompts = prompt_ids(_hf_dir(hf), vocab)
    ref, got, backend = _logits_pair(hf, gg, prompts)
    agree = [float((a.argmax(-1) == b.argmax(-1)).mean()) for a, b in zip(ref, got)]
    err = float(np.mean([nmse(a, b) for a, b in zip(ref, got)]))
    verdict = "excellent" if err < EXCELLENT else "pass" if err < PASS else "fail"
    return {
        "backend": backend,
        "prompts": len(prompts),
        "token_agreement": float(np.mean(agree)),
        "nmse": err,
        "verdict": verdict,
    }


def _logits_pair(hf: str, gg: str, prompts):
    try:
        return [_runtime_logits(hf, p) for p in prompts], [_runtime_logits(gg, p) for p in prompts], "llmarch runtime"
    except (ImportError, LlmarchError):
        pass  # runtime absent or family not supported by it yet: use the reference engines
    try:
        import llama_cpp  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise LlmarchError(
            "--verify for this family needs transformers and llama-cpp-python "
            f"(pip install transformers llama-cpp-python): {e}"
        ) from e
    return hf_logits(hf, prompts), llamacpp_logits(gg, prompts), "transformers + llama.cpp"


def _runtime_logits(source: str, ids: list[int]) -> np.ndarray:
    import torch

    from llmarch.runtime.kv_cache import KVCache
    from llmarch.runtime.load import load_runtime

    rt = load_runtime(source, device="cpu", dtype="float32")
    spec, n = rt.spec, len(ids)
    rt.model.setup(n, rt.device, rt.dtype)
    a = spec.attention
    cache = KVCache(spec.schedule, n, a.kv_heads, a.head_dim, a.v_head_dim or a.head_dim, rt.dtype, rt.device)
    with torch.no_grad():
        x = torch.tensor([ids])
        out = rt.model(x, torch.arange(n), cache, last_only=False)
    return out[0].float().numpy()


def hf_logits(folder: str, prompts) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float().numpy() for p in prompts]


def llamacpp_logits(path: str, prompts) -> list[np.ndarray]:
    import llama_cpp

    n_ctx = max(len(p) for p in prompts) + 8
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=max(n_ctx, 64), logits_all=True, verbose=False, n_threads=2, n_batch=max(n_ctx, 64)
    )
    out = []
    for p in prompts:
        llm.reset()
        llm.eval(p)
        out.append(np.array(llm.scores[: len(p)], dtype=np.float32))
    return out
