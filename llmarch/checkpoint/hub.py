"""Hugging Face repo ids: the local cache first; when online, config.json + safetensors headers only.

`org/name` or `org/name@revision` (a branch, a tag or a commit hash). The cache is found the
way huggingface_hub finds it (HF_HOME, HF_HUB_CACHE); HF_HUB_OFFLINE=1 means the cache only.
Online, only config.json (and small side files) are downloaded; the tensor index comes from
huggingface_hub's get_safetensors_metadata, which reads each shard's header with HTTP range
requests: never the weights.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from llmarch.checkpoint.base import Checkpoint, TensorInfo, check_no_overlap
from llmarch.checkpoint.config_check import show
from llmarch.checkpoint.folder import SIDE_FILES, open_folder, read_config
from llmarch.checkpoint.safetensors import DTYPE_SIZES
from llmarch.errors import CheckpointError


def _has_safetensors(folder: Path) -> bool:
    return (folder / "model.safetensors.index.json").exists() or any(folder.glob("*.safetensors"))


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of repo_id at revision, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:  # honours HF_HOME / HF_HUB_CACHE
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except IncompleteSnapshotError as e:
        # some files of the snapshot are not cached (e.g. only config + weights were fetched):
        # the headers may still all be there
        return Path(e.snapshot_path)
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None
    except ValueError as e:  # HFValidationError: not a valid repo id / revision
        raise CheckpointError(f"not a valid Hugging Face repo id: {e}", repo_id) from None


def open_repo(source: str) -> Checkpoint:
    repo_id, _, rev = source.partition("@")
    revision = rev or None
    folder = cached_snapshot(repo_id, revision)
    if folder is not None and _has_safetensors(folder):
        return open_folder(folder)
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        if folder is not None:  # cached, but without safetensors (a pickle-only repo, or config only)
            return open_folder(folder)
        where = constants.HF_HUB_CACHE
        raise CheckpointError(
            f"no such local folder, and not in the local Hugging Face cache ({where}); HF_HUB_OFFLINE is set", source
        )
    return _remote_headers(source, repo_id, revision)


def _hub_error(e: Exception, source: str, what: str) -> CheckpointError:
    """One line for each way a Hub call fails."""
    from huggingface_hub import errors as E

    if isinstance(e, E.LocalEntryNotFoundError):  # the Hub could not be reached, and no cached copy
        cause = e.__cause__ or e.__context__
        why = f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0]})" if cause and str(cause).strip() else ""
        return CheckpointError(
            f"not in the local Hugging Face cache, and the Hugging Face Hub cannot be reached{why}", source
        )
    if isinstance(e, E.GatedRepoError):
        return CheckpointError(
            "the repo is gated: accept its terms on huggingface.co and log in (hf auth login)", source
        )
    if isinstance(e, E.RepositoryNotFoundError):
        return CheckpointError(
            "no such local folder, and no such repo on the Hugging Face Hub (or it is private: log in)", source
        )
    if isinstance(e, E.RevisionNotFoundError):
        return CheckpointError("no such revision on the Hugging Face Hub", source)
    if isinstance(e, E.EntryNotFoundError):
        return CheckpointError(f"the repo has no {what}", source)
    if isinstance(e, E.NotASafetensorsRepoError):
        return CheckpointError(
            "the repo has no safetensors weights (model.safetensors or model.safetensors.index.json)", source
        )
    if isinstance(e, E.SafetensorsParsingError):
        return CheckpointError(f"corrupt safetensors header on the Hub: {e}", source)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CheckpointError(f"cannot reach the Hugging Face Hub ({type(e).__name__}: {first})", source)


def _is_network_error(e: Exception) -> bool:
    from huggingface_hub import errors as E

    if isinstance(
        e,
        (
            E.HfHubHTTPError,
            E.EntryNotFoundError,
            E.NotASafetensorsRepoError,
            E.SafetensorsParsingError,
            OSError,
            ConnectionError,
            TimeoutError,
        ),
    ):
        return True
    # the HTTP client's own errors (httpx / httpx2 / requests) when the hub is unreachable
    return type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _preflight(source: str) -> None:
    """Fail at once when the Hub's host name does not resolve (no network): huggingface_hub
    would retry for ~25 s first. Skipped behind a proxy, where only the proxy resolves names."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except OSError as e:
        raise CheckpointError(
            f"not in the local Hugging Face cache, and the Hugging Face Hub cannot be reached ({host}: "
            f"{e.strerror or e}); HF_HUB_OFFLINE=1 uses the cache only",
            source,
        ) from e


@contextmanager
def _quiet_hub():
    """huggingface_hub logs each retry as a warning and draws a progress bar over the shard
    headers; the CLI's contract is the fact sheet on stdout and at most one line on stderr."""
    import logging

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    bars_were_off = are_progress_bars_disabled()
    logger.setLevel(logging.ERROR)
    disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if not bars_were_off:
            enable_progress_bars()


def _remote_headers(source: str, repo_id: str, revision: str | None) -> Checkpoint:
    """config.json and the safetensors headers over HTTP range requests; never the weights."""
    _preflight(source)
    with _quiet_hub():
        return _remote_headers_quiet(source, repo_id, revision)


def _remote_headers_quiet(source: str, repo_id: str, revision: str | None) -> Checkpoint:
    import huggingface_hub as hf

    try:
        config_path = Path(hf.hf_hub_download(repo_id, "config.json", revision=revision))
    except Exception as e:
        if not _is_network_error(e):
            raise
        raise _hub_error(e, source, "config.json") from e
    config = read_config(config_path)
    try:
        meta = hf.get_safetensors_metadata(repo_id, revision=revision)
    except Exception as e:
        if not _is_network_error(e):
            raise
        raise _hub_error(e, source, "safetensors weights") from e

    tensors: dict[str, TensorInfo] = {}
    files = []
    for filename, fmeta in sorted(meta.files_metadata.items()):
        file = Path(f"hf://{repo_id}/{filename}")
        files.append(file)
        spans = []
        for name, t in fmeta.tensors.items():
            if not isinstance(t.dtype, str) or t.dtype not in DTYPE_SIZES:
                shown = repr(t.dtype) if isinstance(t.dtype, str) else show(t.dtype)
                raise CheckpointError(f"tensor {name!r}: unknown dtype {shown}", file)
            offsets_ok = len(t.data_offsets) == 2 and all(type(o) is int for o in t.data_offsets)
            if not offsets_ok or not all(type(d) is int and d >= 0 for d in t.shape):
                raise CheckpointError(f"tensor {name!r}: bad shape or data_offsets", file)
            start, end = t.data_offsets
            numel = 1
            for d in t.shape:
                numel *= d
            if not 0 <= start <= end or numel * DTYPE_SIZES[t.dtype] != end - start:
                raise CheckpointError(
                    f"tensor {name!r}: {t.dtype}{list(t.shape)} does not fit data_offsets {list(t.data_offsets)}", file
                )
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is also in another shard", file)
            # offset is relative to the data section: the header length is not known remotely
            tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), file, start, end - start)
            spans.append((start, end, name))
        check_no_overlap(spans, file)
    missing = [n for n in meta.weight_map if n not in tensors]
    if missing:
        raise CheckpointError(f"index names tensor {missing[0]!r} but no shard holds it", source)
    metadata = next((f.metadata for f in meta.files_metadata.values() if f.metadata), None) or {}
    extra = {}
    for name in SIDE_FILES:
        try:
            extra[name] = Path(hf.hf_hub_download(repo_id, name, revision=revision))
        except Exception as e:  # optional files: absence is normal
            if not _is_network_error(e):
                raise
    return Checkpoint(
        "safetensors",
        Path(source),
        files,
        tensors,
        config,
        {str(k): str(v) for k, v in metadata.items()},
        extra_files=extra,
    )
