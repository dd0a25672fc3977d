"""Checkpoint -> ArchSpec. Config facts and tensor facts are read separately and cross-checked.

Generic rules cover the config keys transformers uses across families (layer_types,
first_k_dense_replace, no_rope_layers, ...); what a family's files do not say comes from its
recipe (recipes/*.toml). An unknown architecture gets every fact the generic rules can read.
"""

from __future__ import annotations

from llmarch.arch import recipe_book as recipes
from llmarch.arch.fingerprint.attention import read_attention, read_indexer_sharing
from llmarch.arch.fingerprint.compressed import read_compressed
from llmarch.arch.fingerprint.extras import read_extras
from llmarch.arch.fingerprint.facts import Facts, tensors_by_layer
from llmarch.arch.fingerprint.moe import read_moe
from llmarch.arch.fingerprint.norms import read_norms
from llmarch.arch.fingerprint.params import read_params, read_storage
from llmarch.arch.fingerprint.rope import read_rope
from llmarch.arch.fingerprint.schedule import read_schedule
from llmarch.arch.fingerprint.sizes import read_sizes
from llmarch.arch.gguf_config import gguf_to_config
from llmarch.arch.spec import ArchSpec
from llmarch.checkpoint.base import Checkpoint
from llmarch.checkpoint.gguf import read_rope_freqs


def fingerprint(ckpt: Checkpoint) -> ArchSpec:
    """The recipe is resolved here, once: consumers read spec.family and spec.recipe, never the book."""
    model_type = text_family = None
    if ckpt.format == "gguf":
        arch = ckpt.metadata["general.architecture"]
        recipe = recipes.for_gguf_arch(arch, ckpt.metadata)
        config, ev = gguf_to_config(arch, ckpt.metadata, recipe or recipes.NO_RECIPE, read_rope_freqs(ckpt))
        family = recipe.family if recipe else arch
        architecture = gguf_arch = arch
        source = "gguf"
        if "vocab_size" not in config:
            tokens = ckpt.skipped_arrays.get("tokenizer.ggml.tokens")
            if tokens:
                config["vocab_size"] = tokens[1]
                ev["vocab_size"] = "tokenizer.ggml.tokens (length)"
    else:
        raw = dict(ckpt.config or {})
        model_type = raw.get("model_type")
        config, text_family = _text_config(raw)
        recipe = recipes.for_model_type(text_family or model_type) or recipes.for_model_type(model_type)
        family = recipe.family if recipe else (model_type or "unknown")
        gguf_arch = recipe.gguf_arch_for(text_family or model_type) if recipe else None
        archs = raw.get("architectures") or []
        architecture = archs[0] if archs else None
        ev = {}
        source = "config.json"
    facts = Facts(config, ev, source)
    spec = ArchSpec(
        family=family,
        format=ckpt.format,
        architecture=architecture,
        model_type=model_type,
        text_family=text_family,
        gguf_arch=gguf_arch,
        config=config,
        recipe=recipe,
        supports=list(recipe.supports) if recipe else [],
    )
    layer_tensors = tensors_by_layer(ckpt)
    recipe = recipe or recipes.NO_RECIPE

    read_sizes(spec, facts, ckpt)
    read_attention(spec, facts, recipe, layer_tensors, ckpt)
    read_rope(spec, facts, recipe, ckpt.tensors)
    read_norms(spec, facts, recipe, layer_tensors)
    read_moe(spec, facts, recipe, layer_tensors)
    read_schedule(spec, facts, recipe, layer_tensors, ckpt)
    read_indexer_sharing(spec, facts, ckpt)
    read_compressed(spec, facts, layer_tensors, ckpt)
    read_extras(spec, facts, recipe, ckpt)
    read_params(spec, ckpt)
    read_storage(spec, ckpt)
    spec.evidence.update(facts.used)
    return spec


def _text_config(raw: dict) -> tuple[dict, str | None]:
    """Multimodal configs keep the language model under text_config: use it, keep top-level extras."""
    text = raw.get("text_config")
    if isinstance(text, dict):
        merged = {k: v for k, v in raw.items() if k not in ("text_config", "vision_config", "audio_config")}
        merged.update(text)
        return merged, text.get("model_type")
    return raw, None
