"""cpu_decode: a whole CPU decode step in one C call, against the module path it replaces.

The module path (the same stored-block matmuls, RMS norm, RoPE, attention and gated activation
called from Python, layer by layer) is itself proven against transformers loading the same GGUF
(tests/test_run_gguf.py) and against gguf-py's dequantizer (tests/test_gguf_blocks.py). Both paths
call the same C functions on the same inputs, so their logits and the KV cache they write must be
equal bit for bit, not just close. Against the float32 weights (the stored blocks dequantized) the
step differs only by the int8 rounding of activations.
"""

from __future__ import annotations

import pytest
import torch

from llmarch.runtime import cpu_decode, gguf_matmul
from llmarch.runtime.generate import Generator, Sampling
from llmarch.runtime.kv_cache import KVCache
from llmarch.runtime.load import load_runtime

pytestmark = pytest.mark.skipif(
    not gguf_matmul.available(), reason="no AVX2 or no C compiler: the kernels are not built"
)

# tiny gemma3: 5 sliding layers (window 16: the ring wraps) and one full layer, QK-norm, sandwich
# (1 + w) norms, two RoPE bases, gelu-tanh MLP, tied Q8_0 embedding; tiny llama: GQA, llama.cpp's
# permuted Q/K rows (the step reorders them), silu MLP, its own output matrix
MODELS = {"gemma3": {"n_layers": 6, "head_dim": 32}, "llama": {}}


def runtime(tiny_gguf, arch: str):
    return load_runtime(str(tiny_gguf(arch, **MODELS[arch])), "cpu", None, None, stored_blocks=True)


@pytest.mark.parametrize("arch", list(MODELS))
def test_step_equals_the_module_path(tiny_gguf, arch):
    """Teacher-forced over 30 positions (past the window): same logits, same KV cache, bit for bit."""
    rt = runtime(tiny_gguf, arch)
    gen = Generator(rt, 40)
    step = gen.cpu_step
    assert step is not None
    ids = torch.randint(4, rt.spec.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    caches = []
    with torch.inference_mode():
        for c_step in (step, None):
            gen.cpu_step = c_step
            gen.cache.reset()
            gen.model(ids[:, :10], torch.arange(10), gen.cache, limit=10)
            logits = torch.cat([gen._step_eager(ids[:, i : i + 1], i).clone() for i in range(10, 40)])
            caches.append(({i: (c.k.clone(), c.v.clone()) for i, c in gen.cache.layers.items()}, logits))
    (kv_c, logits_c), (kv_m, logits_m) = caches
    assert torch.equal(logits_c, logits_m)
    assert all(torch.equal(kv_c[i][0], kv_m[i][0]) and torch.equal(kv_c[i][1], kv_m[i][1]) for i in kv_m)
    assert step.next_token() == int(logits_c[-1].argmax())


def test_final_softcap(tiny_gguf):
    """A final logit soft-cap (Gemma 2's 30, set on the tiny gemma3 here): the step caps as the
    module path does, within float32 rounding of tanh (libm's tanhf against torch's)."""
    rt = runtime(tiny_gguf, "gemma3")
    rt.model.final_softcap = 0.3  # the tiny model's logits reach ~0.5: capped visibly
    gen = Generator(rt, 12)
    ids = torch.randint(4, rt.spec.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        gen.model(ids[:, :4], torch.arange(4), gen.cache, limit=4)
        mine = torch.cat([gen.cpu_step(ids[:, i : i + 1], i).clone() for i in range(4, 12)])
        gen.model(ids[:, :4], torch.arange(4), gen.cache, limit=4)
        theirs = torch.cat(
            [gen.model(ids[:, i : i + 1], torch.tensor([i]), gen.cache, limit=i + 1)[0] for i in range(4, 12)]
        )
    assert theirs.abs().max() <= 0.3 and (theirs.abs() > 0.2).any()
    assert (mine - theirs).abs().max().item() < 1e-5


def test_step_is_close_to_the_float_weights(tiny_gguf, monkeypatch):
    """The step's logits against the module path with every matrix dequantized (MAX_ROWS 0: float
    weights, float activations): int8 activation rounding only, a few percent."""
    rt = runtime(tiny_gguf, "gemma3")
    spec, a = rt.spec, rt.spec.attention
    gen = Generator(rt, 24)
    ids = torch.randint(4, spec.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        gen.model(ids[:, :4], torch.arange(4), gen.cache, limit=4)
        mine = torch.cat([gen.cpu_step(ids[:, i : i + 1], i).clone() for i in range(4, 24)])
        cache = KVCache(spec.schedule, 24, a.kv_heads, a.head_dim, a.head_dim, torch.float32, "cpu")
        monkeypatch.setattr(gguf_matmul, "MAX_ROWS", 0)
        ref = rt.model(ids, torch.arange(24), cache, limit=24, last_only=False)[0, 4:]
    rel = ((mine - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert rel < 0.1, rel  # 0.046 measured; a step off by one position gives 1.2


def test_generate_uses_the_step_and_gives_the_module_paths_tokens(tiny_gguf):
    """Greedy generation (the step's own argmax) twice on one Generator, then the module path."""
    rt = runtime(tiny_gguf, "gemma3")
    gen = Generator(rt, 60)
    prompt = [2, 40, 41, 42, 43, 44, 45]
    first = gen.generate(prompt, 50, Sampling()).tokens
    assert gen.generate(prompt, 50, Sampling()).tokens == first  # the C step reset with the cache
    gen.cpu_step = None
    assert gen.generate(prompt, 50, Sampling()).tokens == first


def test_unsupported_models_keep_the_module_path(tiny_gguf, monkeypatch):
    """Float matrices (--dtype float32) are not stored blocks: no plan. Nor without the C library
    (LLMARCH_NO_CKERNEL, no compiler)."""
    path = str(tiny_gguf("gemma3", **MODELS["gemma3"]))
    assert Generator(load_runtime(path, "cpu", "float32"), 8).cpu_step is None
    rt = load_runtime(path, "cpu", None, None, stored_blocks=True)
    monkeypatch.setattr(cpu_decode, "lib", lambda: None)
    assert Generator(rt, 8).cpu_step is None
