"""What a generation is asked (Sampling) and what it gives (Result): no torch, so the torch generator
(generate.py) and the torch-free one (native_run.py) report alike."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass
class Result:
    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    stopped_by: str  # eos | max_tokens
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first token comes from the prefill logits; decode steps produced the rest
        n = max(len(self.tokens) - 1, 0)
        return n / self.decode_s if self.decode_s > 0 and n else 0.0
