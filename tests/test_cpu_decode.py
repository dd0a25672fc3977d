"""cpu_decode: a whole CPU decode step in one C call, against the module path it replaces.

The module path (the same stored-block matmuls, RMS norm, RoPE, attention and gated activation
called from Python, layer by layer) is itself proven against transformers loading the same GGUF
(tests/test_run_gguf.py) and against gguf-py's dequantizer (tests/test_gguf_blocks.py). Both paths
call the same C functions on the same inputs, so their logits and the KV cache they write must be
equal bit for bit, not just close. Against the float32 weights (the stored blocks dequantized) the
step differs only by the int8 rounding of activations.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from llmarch.errors import LlmarchError
from llmarch.runtime import cpu_decode, cpu_plan, gguf_matmul
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


@pytest.mark.parametrize("arch", list(MODELS))
def test_prefill_equals_decode_steps_and_the_module_path(tiny_gguf, arch, monkeypatch):
    """The C prefill of 40 tokens (gemma3's 16-token window wraps its ring inside the prompt), in
    chunks of 16, 16 and 8 rows, then continued from position 40: the last token's logits and the
    whole KV cache equal 40 (then 8 more) C decode steps' bit for bit (the matmuls' rows do not
    depend on how many there are; attention runs token by token as the step's), and the module
    path's prefill (batched torch attention) within its int8 activation rounding (see below)."""
    rt = runtime(tiny_gguf, arch)
    gen = Generator(rt, 56)
    step = gen.cpu_step
    ids = torch.randint(4, rt.spec.vocab_size, (1, 48), generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(cpu_plan, "PREFILL_ROWS", 16)

    def kv():
        return {i: (c.k.clone(), c.v.clone()) for i, c in gen.cache.layers.items()}

    with torch.inference_mode():
        gen.cache.reset()
        steps = [step(ids[:, i : i + 1], i).clone() for i in range(48)]
        kv_steps = kv()
        gen.cache.reset()
        mine = step.prefill(ids[:, :40], 0).clone()
        assert step.next_token() == int(mine.argmax())
        gen.cache.reset()
        module = gen.model(ids[:, :40], torch.arange(40), gen.cache, limit=40)[:, -1]
        kv_module = kv()
        gen.cache.reset()
        step.prefill(ids[:, :40], 0)
        kv_mine = kv()
        more = step.prefill(ids[:, 40:], 40).clone()
        kv_more = kv()
    assert torch.equal(mine, steps[39]) and torch.equal(more, steps[47])
    assert all(
        torch.equal(kv_more[i][0], kv_steps[i][0]) and torch.equal(kv_more[i][1], kv_steps[i][1]) for i in kv_steps
    )
    # against the module path: its attention output differs from the step's by float32 rounding
    # (~5e-7), which is enough to move an activation across an int8 rounding boundary of the next
    # matmul now and then; seeds 5, 6, 8, 9, 11 agree to 2e-7, 4, 7, 10 (this one) to ~1.5%
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(mine, module) < 0.05
    for i in kv_module:
        assert rel(kv_mine[i][0], kv_module[i][0]) < 0.05 and rel(kv_mine[i][1], kv_module[i][1]) < 0.05
    first = min(kv_module)  # before any attention output is read: the same bits
    assert torch.equal(kv_mine[first][0], kv_module[first][0]) and torch.equal(kv_mine[first][1], kv_module[first][1])


def test_prefill_failure_is_one_error(tiny_gguf):
    """Positions past a full layer's cache: the C code's return code becomes one LlmarchError
    naming them (the Generator refuses such prompts before; a direct caller gets this)."""
    gen = Generator(runtime(tiny_gguf, "gemma3"), 12)
    ids = torch.randint(4, 100, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode(), pytest.raises(LlmarchError, match="positions 0-19 outside the cache"):
        gen.cpu_step.prefill(ids, 0)
    assert cpu_plan.prefill(ctypes.addressof(gen.cpu_step.plan), 0, 0, 0, 0, 1) == (3, -1)  # no tokens


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
    """Greedy generation (the C prefill, the step's own argmax) twice on one Generator, after the
    module path's prefill, then all through the module path."""
    rt = runtime(tiny_gguf, "gemma3")
    gen = Generator(rt, 60)
    prompt = [2, 40, 41, 42, 43, 44, 45]
    first = gen.generate(prompt, 50, Sampling()).tokens  # C prefill, C steps
    assert gen.generate(prompt, 50, Sampling()).tokens == first  # the C step reset with the cache
    gen.cpu_step.prefill_rows = 4  # a prompt longer than that: the module path's prefill, C steps
    assert gen.generate(prompt, 50, Sampling()).tokens == first
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
