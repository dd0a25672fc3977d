"""A folder of safetensors shards (config.json, index, side files) or of GGUF files -> Checkpoint."""

from __future__ import annotations

import os
import re
from pathlib import Path

from llmarch.checkpoint.base import Checkpoint, TensorInfo, read_regular
from llmarch.checkpoint.config_check import check_config, parse_json
from llmarch.checkpoint.gguf import open_gguf
from llmarch.checkpoint.safetensors import read_header
from llmarch.errors import CheckpointError

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}
PICKLE_REASON = (
    "pickle checkpoints are not supported: loading one runs arbitrary code; use the model's .safetensors or .gguf files"
)
MAX_JSON_BYTES = 256 << 20  # a config or an index: DeepSeek-V3's index is ~9 MB
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def open_folder(folder: Path) -> Checkpoint:
    index = folder / "model.safetensors.index.json"
    if index.exists():  # a FIFO or device under this name is refused by the reader, not skipped
        shards, weight_map = _shards_from_index(index)
        ckpt = from_files(folder, shards, config_dir=folder)
        _check_weight_map(index, weight_map, ckpt)
        return ckpt
    shards = sorted(folder.glob("*.safetensors"))
    # Mistral's repos carry the same weights twice: HF-named shards and consolidated*.safetensors
    # (mistral-inference names). Reading both would count every parameter twice.
    hf_named = [p for p in shards if not p.name.startswith("consolidated")]
    if hf_named and len(hf_named) < len(shards):
        shards = hf_named
    if shards:
        return from_files(folder, shards, config_dir=folder)
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs:
        firsts = [p for p in ggufs if not re.search(r"-\d{5}-of-\d{5}\.gguf$", p.name) or "-00001-of-" in p.name]
        if len(firsts) > 1:  # a vision model's projector (llama.cpp's mmproj-*.gguf) is not a second model
            models = [p for p in firsts if not p.name.lower().startswith("mmproj")]
            firsts = models if len(models) == 1 else firsts
        if len(firsts) == 1:
            return open_gguf(firsts[0])
        if not firsts:  # only later parts of a split model: its reader names the missing first part
            return open_gguf(ggufs[0])
        names = ", ".join(p.name for p in firsts[:5]) + (", ..." if len(firsts) > 5 else "")
        raise CheckpointError(f"folder holds {len(firsts)} GGUF models ({names}); name one", folder)
    if any(p.suffix.lower() in PICKLE_SUFFIXES for p in folder.iterdir()):
        raise CheckpointError(PICKLE_REASON, folder)
    raise CheckpointError("no model here (no *.safetensors, *.gguf or model.safetensors.index.json)", folder)


def _shards_from_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not set(map(type, weight_map.values())) <= {str}:
        raise CheckpointError("index has no weight_map of tensor name -> file", index)
    if not weight_map:  # 0 parameters beside unreadable shards would be a silent lie
        raise CheckpointError("index has an empty weight_map (no tensor is named)", index)
    # containment is checked on the names, not on resolved paths: in the Hugging Face cache every
    # file of a snapshot is a symlink into ../../blobs, and that is fine
    folder = index.parent
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        rel = os.path.normpath(name.replace("\\", "/"))
        if os.path.isabs(rel) or rel == ".." or rel.startswith("../") or rel.startswith("/"):
            raise CheckpointError(f"index names a file outside the folder: {name!r}", index)
        shard = folder / rel
        try:
            present = shard.is_file()
        except OSError as e:  # a name no file system accepts (too long, ...) is as missing as an absent one
            raise CheckpointError(
                f"shard {name!r} named by the index cannot be looked up: {e.strerror}", index
            ) from None
        if not present:
            raise CheckpointError(f"shard {name!r} named by the index is missing", index)
        shards.append(shard)
    return shards, weight_map


def _check_weight_map(index: Path, weight_map: dict[str, str], ckpt: Checkpoint) -> None:
    """Every tensor the index names must be in the shard it names (a stale index is corrupt)."""
    folder = index.parent
    resolved = {file: folder / os.path.normpath(file.replace("\\", "/")) for file in set(weight_map.values())}
    tensors = ckpt.tensors
    by_path = {p: p for p in ckpt.files}  # the very Path objects the tensors hold: `is` is enough
    resolved = {file: by_path.get(p, p) for file, p in resolved.items()}
    for name, file in weight_map.items():
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"index names tensor {name!r} in {file}, but no shard holds it", index)
        expected = resolved[file]
        if t.file is not expected and t.file != expected:
            raise CheckpointError(f"index puts tensor {name!r} in {file}, but it is in {t.file.name}", index)


def from_files(path: Path, shards: list[Path], config_dir: Path) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard in shards:
        t, m = read_header(shard)
        dup = tensors.keys() & t.keys()
        if dup:
            raise CheckpointError(f"tensor {sorted(dup)[0]!r} is also in another shard", shard)
        tensors.update(t)
        metadata = metadata or m
    config_file = config_dir / "config.json"
    config = read_config(config_file) if config_file.exists() else None
    extra = {n: config_dir / n for n in SIDE_FILES if (config_dir / n).is_file()}
    return Checkpoint("safetensors", path, shards, tensors, config, metadata, extra_files=extra)


def _read_json(path: Path):
    return parse_json(read_regular(path, MAX_JSON_BYTES), path)


def read_config(path: Path) -> dict:
    config = _read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError("config is not a JSON object", path)
    check_config(config, path)
    return config
