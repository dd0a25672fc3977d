"""Hugging Face repo ids: a fake local cache (the real on-disk layout: blobs + snapshot symlinks +
refs) under HF_HUB_OFFLINE=1, through the CLI; the online path (`_remote_headers`) with
huggingface_hub's functions replaced by fakes that return the library's own dataclasses."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bad_input import LLAMA_CONFIG

ROOT = Path(__file__).resolve().parents[1]


def st_bytes(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    """A safetensors file of zeros: {name: (dtype, shape)}, dtypes F32/BF16 only."""
    size = {"F32": 4, "BF16": 2}
    header, off = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = size[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(off)


def llama_config(layers: int, hidden: int = 8) -> dict:
    return dict(LLAMA_CONFIG, hidden_size=hidden, num_hidden_layers=layers, tie_word_embeddings=False)


def llama_tensors(layers: int, hidden: int = 8) -> dict:
    t = {
        "model.embed_tokens.weight": ("BF16", [4, hidden]),
        "model.norm.weight": ("BF16", [hidden]),
        "lm_head.weight": ("BF16", [4, hidden]),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update(
            {
                p + "self_attn.q_proj.weight": ("BF16", [hidden, hidden]),
                p + "self_attn.k_proj.weight": ("BF16", [hidden // 2, hidden]),
                p + "self_attn.v_proj.weight": ("BF16", [hidden // 2, hidden]),
                p + "self_attn.o_proj.weight": ("BF16", [hidden, hidden]),
                p + "mlp.gate_proj.weight": ("BF16", [16, hidden]),
                p + "mlp.up_proj.weight": ("BF16", [16, hidden]),
                p + "mlp.down_proj.weight": ("BF16", [hidden, 16]),
                p + "input_layernorm.weight": ("BF16", [hidden]),
                p + "post_attention_layernorm.weight": ("BF16", [hidden]),
            }
        )
    return t


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ()) -> Path:
    """Lay files out as huggingface_hub does: blobs/<hash>, snapshots/<commit>/<name> -> ../../blobs/<hash>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / digest, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


@pytest.fixture()
def hf_cache(tmp_path):
    """HF_HOME with two revisions of org/tiny (main: 2 layers, v2 tag: 3 layers, hidden 16) and a
    sharded org/sharded (index + 2 shards, all symlinks into blobs)."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    add_snapshot(
        cache,
        "org/tiny",
        COMMIT_A,
        {
            "config.json": json.dumps(llama_config(2)).encode(),
            "model.safetensors": st_bytes(llama_tensors(2)),
        },
        refs=("main",),
    )
    add_snapshot(
        cache,
        "org/tiny",
        COMMIT_B,
        {
            "config.json": json.dumps(llama_config(3, hidden=16)).encode(),
            "model.safetensors": st_bytes(llama_tensors(3, hidden=16)),
        },
        refs=("v2",),
    )
    t = llama_tensors(2)
    names = list(t)
    half = {n: t[n] for n in names[: len(names) // 2]}
    rest = {n: t[n] for n in names[len(names) // 2 :]}
    weight_map = {n: "model-00001-of-00002.safetensors" for n in half} | {
        n: "model-00002-of-00002.safetensors" for n in rest
    }
    add_snapshot(
        cache,
        "org/sharded",
        COMMIT_A,
        {
            "config.json": json.dumps(llama_config(2)).encode(),
            "model-00001-of-00002.safetensors": st_bytes(half),
            "model-00002-of-00002.safetensors": st_bytes(rest),
            "model.safetensors.index.json": json.dumps({"metadata": {}, "weight_map": weight_map}).encode(),
        },
        refs=("main",),
    )
    return home


def run_cli(source: str, env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "LLMARCH_DEBUG"}
    full.update(env, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "llmarch", "inspect", "--json", source],
        capture_output=True,
        text=True,
        env=full,
        timeout=120,
    )


@pytest.mark.parametrize("var", ["HF_HOME", "HF_HUB_CACHE"])
def test_repo_id_from_cache(hf_cache, var):
    env = {"HF_HOME": str(hf_cache)} if var == "HF_HOME" else {"HF_HUB_CACHE": str(hf_cache / "hub")}
    r = run_cli("org/tiny", env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["layers"], doc["hidden_size"], doc["attention"]["kv_heads"]) == (2, 8, 1)


@pytest.mark.parametrize("rev", [COMMIT_B, "v2"])
def test_repo_id_at_revision(hf_cache, rev):
    r = run_cli(f"org/tiny@{rev}", {"HF_HOME": str(hf_cache)})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["layers"], doc["hidden_size"]) == (3, 16)


def test_sharded_repo_in_cache(hf_cache):
    """Shards are symlinks into blobs/: still 'inside the folder' for the index check."""
    r = run_cli("org/sharded", {"HF_HOME": str(hf_cache)})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["layers"] == 2
    total = sum(1 for _ in llama_tensors(2))
    assert total == 21  # sanity of the fixture itself


def test_sharded_repo_in_cache_in_process(hf_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    from llmarch.checkpoint.hub import open_repo

    ckpt = open_repo("org/sharded")
    assert set(ckpt.tensors) == set(llama_tensors(2))
    assert [p.name for p in ckpt.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


@pytest.mark.parametrize("source", ["org/not-cached", "org/tiny@nosuchbranch", f"org/tiny@{'c' * 40}"])
def test_not_cached_is_one_line(hf_cache, source):
    r = run_cli(source, {"HF_HOME": str(hf_cache)})
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert source in lines[0] and "not in the local Hugging Face cache" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0]


def test_cached_pickle_only_repo_says_pickle(hf_cache):
    add_snapshot(
        hf_cache / "hub",
        "org/old",
        COMMIT_A,
        {"config.json": json.dumps(llama_config(2)).encode(), "pytorch_model.bin": b"\x80\x04N."},
        refs=("main",),
    )
    r = run_cli("org/old", {"HF_HOME": str(hf_cache)})
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and "pickle" in r.stderr


# ----------------------------------------------------------------------------- online, faked


class FakeHub:
    """Stands in for hf_hub_download / get_safetensors_metadata; records every call."""

    def __init__(
        self, tmp_path: Path, config: dict, files: dict[str, dict[str, tuple[str, list[int]]]], sharded: bool = True
    ):
        from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

        self.calls: list[tuple] = []
        self.dir = tmp_path / "downloads"
        self.dir.mkdir()
        (self.dir / "config.json").write_text(json.dumps(config))
        (self.dir / "tokenizer.json").write_text("{}")
        files_meta, weight_map = {}, {}
        for fname, tensors in files.items():
            infos, off = {}, 0
            for name, (dtype, shape) in tensors.items():
                n = {"F32": 4, "BF16": 2}[dtype]
                for d in shape:
                    n *= d
                infos[name] = TensorInfo(dtype=dtype, shape=shape, data_offsets=(off, off + n))
                off += n
                weight_map[name] = fname
            files_meta[fname] = SafetensorsFileMetadata(metadata={"format": "pt"}, tensors=infos)
        self.meta = SafetensorsRepoMetadata(
            metadata={"total_size": 0} if sharded else None,
            sharded=sharded,
            weight_map=weight_map,
            files_metadata=files_meta,
        )

    def hf_hub_download(self, repo_id, filename, *, revision=None, **kw):
        from huggingface_hub.errors import EntryNotFoundError

        self.calls.append(("download", repo_id, filename, revision))
        assert not filename.endswith((".safetensors", ".bin", ".gguf")), "weights must never be downloaded"
        if not (self.dir / filename).exists():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(self.dir / filename)

    def get_safetensors_metadata(self, repo_id, *, revision=None, **kw):
        self.calls.append(("metadata", repo_id, revision))
        return self.meta


@pytest.fixture()
def online(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("llmarch.checkpoint.hub._preflight", lambda source: None)  # no DNS here

    def install(fake: FakeHub):
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", fake.get_safetensors_metadata)
        return fake

    return install


def _two_shards(layers=2):
    t = llama_tensors(layers)
    names = list(t)
    return {
        "model-00001-of-00002.safetensors": {n: t[n] for n in names[:10]},
        "model-00002-of-00002.safetensors": {n: t[n] for n in names[10:]},
    }


def test_remote_headers_reads_every_shard(tmp_path, online):
    from llmarch.checkpoint.hub import _remote_headers

    fake = online(FakeHub(tmp_path, llama_config(2), _two_shards()))
    ckpt = _remote_headers("org/remote@dev", "org/remote", "dev")
    assert ckpt.config["num_hidden_layers"] == 2
    assert set(ckpt.tensors) == set(llama_tensors(2))
    t = ckpt.tensors["model.layers.1.mlp.up_proj.weight"]
    assert (t.dtype, t.shape, t.nbytes) == ("BF16", (16, 8), 16 * 8 * 2)
    assert (
        str(t.file) == "hf:/org/remote/model-00002-of-00002.safetensors"
        or t.file.name == "model-00002-of-00002.safetensors"
    )
    assert ckpt.metadata == {"format": "pt"}
    assert "tokenizer.json" in ckpt.extra_files
    # the revision reaches every call; only small files are downloaded
    assert ("metadata", "org/remote", "dev") in fake.calls
    assert all(c[-1] == "dev" for c in fake.calls)
    assert {c[2] for c in fake.calls if c[0] == "download"} <= {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    }


def test_open_repo_goes_online_when_not_cached(tmp_path, online, monkeypatch):
    from huggingface_hub import constants

    from llmarch.api import inspect_source

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    online(FakeHub(tmp_path, llama_config(2), _two_shards()))
    doc = inspect_source("org/remote")
    assert (doc["layers"], doc["hidden_size"], doc["attention"]["heads"]) == (2, 8, 2)
    assert doc["format"] == "safetensors"


def test_remote_bad_headers(tmp_path, online):
    from llmarch.checkpoint.hub import _remote_headers
    from llmarch.errors import CheckpointError

    fake = online(FakeHub(tmp_path, llama_config(2), _two_shards()))
    info = fake.meta.files_metadata["model-00001-of-00002.safetensors"].tensors["model.embed_tokens.weight"]
    info.data_offsets = (0, 10)  # BF16[4, 8] needs 64 bytes
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight.*does not fit data_offsets"):
        _remote_headers("org/remote", "org/remote", None)
    info.data_offsets = (0, 64)
    info.dtype = "Q9"
    with pytest.raises(CheckpointError, match="unknown dtype 'Q9'"):
        _remote_headers("org/remote", "org/remote", None)


def _http_error(cls, status: int):
    import httpx2

    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/remote")
    response = httpx2.Response(status, request=request)
    return cls(f"{status} Client Error", response=response)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("repo", "no such repo"),
        ("gated", "gated"),
        ("revision", "no such revision"),
        ("not_safetensors", "no safetensors weights"),
        ("no_config", "no config.json"),
        ("connect", "cannot reach the Hugging Face Hub"),
        ("offline_no_cache", "the Hugging Face Hub cannot be reached"),
    ],
)
def test_remote_errors_are_one_clear_line(tmp_path, online, kind, expected):
    from huggingface_hub import errors as E

    from llmarch.checkpoint.hub import _remote_headers
    from llmarch.errors import CheckpointError

    fake = online(FakeHub(tmp_path, llama_config(2), _two_shards()))
    if kind == "no_config":
        (fake.dir / "config.json").unlink()
    else:
        import httpx2

        err = {
            "repo": lambda: _http_error(E.RepositoryNotFoundError, 404),
            "gated": lambda: _http_error(E.GatedRepoError, 403),
            "revision": lambda: _http_error(E.RevisionNotFoundError, 404),
            "not_safetensors": lambda: E.NotASafetensorsRepoError("'org/remote' is not a safetensors repo."),
            "connect": lambda: httpx2.ConnectError("[Errno 111] Connection refused"),
            # what hf_hub_download raises when the request fails and the file is not cached
            "offline_no_cache": lambda: E.LocalEntryNotFoundError(
                "An error happened while trying to locate the file on the Hub and we cannot find the requested "
                "files in the local cache."
            ),
        }[kind]()

        def failing(*a, **kw):
            raise err

        target = "get_safetensors_metadata" if kind == "not_safetensors" else "hf_hub_download"
        import huggingface_hub

        setattr(huggingface_hub, target, failing)  # restored by monkeypatch (installed by `online`)
    with pytest.raises(CheckpointError) as info:
        _remote_headers("org/remote", "org/remote", None)
    msg = str(info.value)
    assert expected in msg and "org/remote" in msg and "\n" not in msg


def test_unreachable_hub_is_one_quick_line(tmp_path):
    """Online mode, nothing cached, a Hub whose name cannot resolve (.invalid, RFC 6761): one line,
    exit 2, and no ~25 s of retries (the name check fails first)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "LLMARCH_DEBUG"}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="https://hub.llmarch-test.invalid")
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "llmarch", "inspect", "org/some-model"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    elapsed = time.perf_counter() - t0
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "org/some-model" in lines[0] and "cannot be reached" in lines[0]
    if not any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        assert elapsed < 10, elapsed


def test_preflight(monkeypatch):
    import socket

    from llmarch.checkpoint.hub import _preflight
    from llmarch.errors import CheckpointError

    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    calls = []

    def no_dns(host, *a, **kw):
        calls.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(CheckpointError, match="cannot be reached.*Name or service not known"):
        _preflight("org/x")
    from urllib.parse import urlparse

    from huggingface_hub import constants

    assert calls == [urlparse(constants.ENDPOINT).hostname]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    _preflight("org/x")  # behind a proxy only the proxy resolves names: no check


def test_inspect_from_cache_writes_nothing(hf_cache):
    def snapshot():
        return {
            str(p.relative_to(hf_cache)): (p.is_symlink(), p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(hf_cache.rglob("*"))
        }

    before = snapshot()
    for source in ("org/tiny", f"org/tiny@{COMMIT_B}", "org/sharded", "org/not-cached"):
        run_cli(source, {"HF_HOME": str(hf_cache)})
    assert snapshot() == before
