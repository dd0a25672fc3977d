"""Hugging Face repo ids: the local cache first; when online, config.json + safetensors headers only."""

from __future__ import annotations

from pathlib import Path

from llmarch.checkpoint.base import Checkpoint, TensorInfo
from llmarch.checkpoint.open import SIDE_FILES, open_folder, read_config
from llmarch.checkpoint.safetensors import DTYPE_SIZES
from llmarch.errors import CheckpointError


def open_repo(source: str) -> Checkpoint:
    repo_id, _, revision = source.partition("@")
    revision = revision or None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # honours HF_HOME / HF_HUB_CACHE; never touches the network
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists():
            return open_folder(folder)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        pass
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        raise CheckpointError("not in the local Hugging Face cache and HF_HUB_OFFLINE is set", source)
    return _remote_headers(source, repo_id, revision)


def _remote_headers(source: str, repo_id: str, revision: str | None) -> Checkpoint:
    """config.json and the safetensors headers over HTTP range requests; never the weights."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, NotASafetensorsRepoError

    try:
        config = read_config(Path(hf_hub_download(repo_id, "config.json", revision=revision)))
        meta = get_safetensors_metadata(repo_id, revision=revision)
    except NotASafetensorsRepoError:
        raise CheckpointError("the repo has no safetensors weights", source) from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"cannot reach the Hugging Face Hub: {e}", source) from None
    tensors: dict[str, TensorInfo] = {}
    files = []
    for filename, fmeta in meta.files_metadata.items():
        file = Path(f"hf://{repo_id}/{filename}")
        files.append(file)
        for name, t in fmeta.tensors.items():
            if t.dtype not in DTYPE_SIZES:
                raise CheckpointError(f"tensor {name!r}: unknown dtype {t.dtype!r}", file)
            start, end = t.data_offsets
            tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), file, start, end - start)
    extra = {}
    for name in SIDE_FILES:
        try:
            extra[name] = Path(hf_hub_download(repo_id, name, revision=revision))
        except Exception:  # optional files: absence is normal
            pass
    return Checkpoint("safetensors", Path(source), files, tensors, config, {}, extra_files=extra)
