"""Model sizes: layers, hidden size, vocabulary, context, FFN width, activation."""

from __future__ import annotations

from llmarch.arch.fingerprint.facts import Facts, find_tensor
from llmarch.arch.spec import ArchSpec
from llmarch.arch.tensor_roles import is_vision, layer_of
from llmarch.checkpoint.base import Checkpoint
from llmarch.errors import CheckpointError


def read_sizes(spec: ArchSpec, f: Facts, ckpt: Checkpoint) -> None:
    spec.layers = int(f.get("num_hidden_layers", "n_layer", "num_layers", "n_layers", default=0, fact="layers"))
    spec.hidden_size = int(f.get("hidden_size", "n_embd", "d_model", "dim", default=0, fact="hidden_size"))
    spec.vocab_size = int(f.get("vocab_size", "n_vocab", default=0, fact="vocab_size"))
    spec.context_length = f.get(
        "max_position_embeddings",
        "n_positions",
        "max_sequence_length",
        "seq_length",
        "model_max_length",
        fact="context_length",
    )
    spec.intermediate_size = f.get(
        "intermediate_size_mlp", "intermediate_size", "n_inner", "ffn_hidden_size", fact="intermediate_size"
    )
    ratio = spec.recipe.ffn_ratio if spec.recipe else None
    if spec.intermediate_size is None and ratio and spec.hidden_size:
        spec.intermediate_size = ratio * spec.hidden_size
        spec.evidence["intermediate_size"] = f"recipe {spec.recipe.family}: {ratio} x hidden size"
    if isinstance(spec.intermediate_size, list):  # per-layer widths (Gemma 3n): keep the list in extras
        spec.extras["intermediate_size_per_layer"] = spec.intermediate_size
        spec.intermediate_size = max(spec.intermediate_size)
    spec.activation = f.get(
        "hidden_activation", "hidden_act", "activation_function", "activation", "mlp_hidden_act", fact="activation"
    )
    # fallbacks from tensors when the config is silent (bare .safetensors, GGUF without a key)
    embed = find_tensor(ckpt, ("embed_tokens.weight", "wte.weight", "token_embd.weight", "embeddings.weight"))
    if embed is not None and len(embed.shape) != 2:
        raise CheckpointError(
            f"tensor {embed.name!r}: an embedding is a matrix, got shape {list(embed.shape)}", embed.file
        )
    if embed is not None:
        vocab, hidden = embed.shape[0], embed.shape[-1]
        if not spec.vocab_size:
            spec.vocab_size = vocab
            spec.evidence["vocab_size"] = embed.name
        elif spec.vocab_size != vocab:
            spec.warnings.append(f"vocab_size {spec.vocab_size} in the config, but {embed.name} has {vocab} rows")
        if not spec.hidden_size:
            spec.hidden_size = hidden
            spec.evidence["hidden_size"] = embed.name
    if not spec.layers:
        idx = [i for n in ckpt.tensors if not is_vision(n) and (i := layer_of(n)) is not None]
        if idx:
            spec.layers = max(idx) + 1
            spec.evidence["layers"] = "count of layer indices in tensor names"
    check_layer_count(spec, f, ckpt)


def check_layer_count(spec: ArchSpec, f: Facts, ckpt: Checkpoint) -> None:
    """Every layer holds at least one tensor, so a checkpoint supports at most as many layers as
    it has tensors. Checked before anything is built per layer: a header saying 10^9 layers (or
    a tensor named model.layers.1000000000000.x) is a broken file, not a billion LayerSpecs."""
    if spec.layers <= len(ckpt.tensors):
        return
    source = spec.evidence.get("layers") or f.used.get("layers") or "the layer count"
    where = ckpt.path / "config.json" if ckpt.config is not None and ckpt.path.is_dir() else ckpt.path
    raise CheckpointError(
        f"{source} gives {spec.layers} layers, more than the {len(ckpt.tensors)} tensors of the checkpoint can hold "
        "(each layer has at least one)",
        where,
    )
