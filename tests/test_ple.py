"""--ple gpu|cpu|disk: the per-layer embedding store (llmarch/runtime/ple.py).

The expected rows come from the writers' own data: torch's copy of the table written with
safetensors, and gguf-py's dequantize of the GGUF tensors (Q8_0 read row by row from the file;
MXFP4, which llmarch's torch dequantizer does not decode, through the row file). The modes are
compared with each other and with that reference; read counts come from the store's counters,
checked against the distinct ids of the request."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmarch.checkpoint.open import open_checkpoint
from llmarch.errors import LlmarchError
from llmarch.runtime.ple import DiskTable, ResidentTable, TableLayout, choose_mode, open_store

LAYERS, WIDTH, VOCAB = 3, 64, 50  # rows of 3 x 64; 64 is two Q8_0 blocks and two MXFP4 blocks per layer
NAME = "model.language_model.embed_tokens_per_layer.weight"
MODES = ("cpu", "disk") + (("gpu",) if torch.cuda.is_available() else ())
DEVICE = torch.device(os.environ.get("LLMARCH_TEST_DEVICE", "cpu"))


def _table(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, LAYERS * WIDTH, generator=g)


def write_safetensors(path: Path, table: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    save_file({"model.language_model.embed_tokens.weight": torch.zeros(VOCAB, 8), NAME: table}, str(path))
    return path


def write_gguf(path: Path, table: np.ndarray, qtype) -> Path:
    import gguf
    from gguf.quants import quantize

    w = gguf.GGUFWriter(str(path), "gemma3n")
    w.add_block_count(LAYERS)
    w.add_tensor("token_embd.weight", np.zeros((VOCAB, 32), dtype=np.float32))
    w.add_tensor("per_layer_token_embd.weight", quantize(table, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def layout_of(path: Path, name: str, layers: int = LAYERS, width: int = WIDTH, vocab: int | None = VOCAB):
    ckpt = open_checkpoint(path)
    return TableLayout.of(ckpt.tensors[name], layers, width, vocab)


def stores(layout, dtype, tmp_path, **kw):
    out = {}
    for mode in MODES:
        out[mode] = open_store(layout, mode, DEVICE, dtype, folder=tmp_path / "ple-rows", **kw)
    return out


IDS = torch.tensor([[3, 7, 3, 49, 0, 7, 8]])  # repeats, both ends of the table, a run of neighbours (7, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_safetensors_modes_identical(tmp_path, dtype):
    table = _table().to(dtype)
    lay = layout_of(write_safetensors(tmp_path / "m.safetensors", table), NAME)
    assert (lay.rows, lay.width, lay.stored) == (VOCAB, LAYERS * WIDTH, "BF16" if dtype == torch.bfloat16 else "F32")
    expect = table[IDS] * torch.tensor(16.0, dtype=dtype)
    for mode, s in stores(lay, dtype, tmp_path, scale=16.0).items():
        got = s.gather(IDS)
        assert got.shape == (*IDS.shape, LAYERS * WIDTH) and got.dtype == dtype and got.device.type == DEVICE.type
        torch.testing.assert_close(got.cpu(), expect, rtol=0, atol=0, msg=mode)
        s.close()


def test_gguf_q8_0_rows_match_gguf_py(tmp_path):
    import gguf
    from gguf.quants import dequantize, quantize

    Q = gguf.GGMLQuantizationType
    table = _table(1).numpy()
    path = write_gguf(tmp_path / "m.gguf", table, Q.Q8_0)
    lay = layout_of(path, "per_layer_token_embd.weight")
    assert lay.stored == "Q8_0" and lay.row_bytes == LAYERS * WIDTH // 32 * 34
    ref = torch.from_numpy(dequantize(quantize(table, Q.Q8_0), Q.Q8_0))[IDS]
    got = {mode: s.gather(IDS) for mode, s in stores(lay, torch.float32, tmp_path).items()}
    for mode, rows in got.items():
        torch.testing.assert_close(rows.cpu(), ref, rtol=0, atol=0, msg=mode)
    assert isinstance(open_store(lay, "disk", DEVICE, torch.float32), DiskTable)
    assert not (tmp_path / "ple-rows").exists()  # Q8_0 rows are read from the GGUF itself


def test_gguf_mxfp4_goes_through_a_row_file(tmp_path):
    import gguf
    from gguf.quants import dequantize, quantize

    Q = gguf.GGMLQuantizationType
    table = _table(2).numpy()
    path = write_gguf(tmp_path / "m.gguf", table, Q.MXFP4)
    lay = layout_of(path, "per_layer_token_embd.weight")
    ref = torch.from_numpy(dequantize(quantize(table, Q.MXFP4), Q.MXFP4))[IDS]
    disk = open_store(lay, "disk", DEVICE, torch.float32, folder=tmp_path / "rows")
    [made] = list((tmp_path / "rows").iterdir())
    assert disk.layout.path == made and made.stat().st_size == VOCAB * LAYERS * WIDTH * 4
    torch.testing.assert_close(disk.gather(IDS).cpu(), ref, rtol=0, atol=0)
    mtime = made.stat().st_mtime_ns
    again = open_store(lay, "disk", DEVICE, torch.float32, folder=tmp_path / "rows")
    assert again.layout.path == made and made.stat().st_mtime_ns == mtime  # written once, then reused
    cpu = open_store(lay, "cpu", DEVICE, torch.float32)
    torch.testing.assert_close(cpu.gather(IDS).cpu(), ref, rtol=0, atol=0)


def test_captured_step_reads_the_staged_row(tmp_path):
    """A CUDA graph's decode step reads its row from the store's static buffer: inside captured()
    (warm-up and capture) gather ignores its placeholder ids and returns what stage(id) put there,
    decoded and scaled as gather returns that id's row (the writers' data: torch's table, gguf-py's
    Q8_0 dequantize); each stage replaces the last one's row at the same address (what a replay
    reads), an id outside the table stages row 0 (as the model maps it), and on disk the decode
    loop's prefetch of the id is the one read stage uses. Outside captured() gather is unchanged."""
    import gguf
    from gguf.quants import dequantize, quantize

    Q = gguf.GGMLQuantizationType
    bf16 = _table(3).to(torch.bfloat16)
    st = layout_of(write_safetensors(tmp_path / "m.safetensors", bf16), NAME)
    q8 = _table(4).numpy()
    gg = layout_of(write_gguf(tmp_path / "m.gguf", q8, Q.Q8_0), "per_layer_token_embd.weight")
    cases = [
        (st, torch.bfloat16, 16.0, bf16 * torch.tensor(16.0, dtype=torch.bfloat16)),
        (gg, torch.float32, None, torch.from_numpy(dequantize(quantize(q8, Q.Q8_0), Q.Q8_0))),
    ]
    placeholder = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    for lay, dtype, scale, table in cases:
        for mode, s in stores(lay, dtype, tmp_path, scale=scale).items():
            assert s.stages == (mode != "gpu" and DEVICE.type == "cuda"), mode
            with s.captured():
                pass  # the first capture makes the buffer
            address = s._static.data_ptr()
            for tok in (7, 49, 0, 7, VOCAB + 3):
                before = s.stats.rows_read
                s.prefetch(torch.tensor([[tok]]))  # as the decode loop does right after sampling
                s.stage(torch.tensor([[tok]]))
                with s.captured():
                    got = s.gather(placeholder).clone()
                assert got.shape == (1, 1, LAYERS * WIDTH) and got.dtype == dtype, mode
                torch.testing.assert_close(got.cpu()[0], table[[tok if tok < VOCAB else 0]], rtol=0, atol=0, msg=mode)
                assert s._static.data_ptr() == address, mode
                if mode == "disk":
                    assert s.stats.rows_read == before + 1 and s.pending is None
            torch.testing.assert_close(s.gather(IDS).cpu(), table[IDS], rtol=0, atol=0, msg=mode)
            s.close()


def test_prefill_reads_each_distinct_token_once(tmp_path):
    lay = layout_of(write_safetensors(tmp_path / "m.safetensors", _table()), NAME)
    disk = open_store(lay, "disk", DEVICE, torch.float32)
    disk.gather(IDS)
    distinct = len(set(IDS.flatten().tolist()))  # 5 of 7
    r = disk.report()
    assert r["rows_read"] == distinct and r["tokens"] == IDS.numel()
    assert r["reads"] == distinct - 1  # 7 and 8 are neighbours: one read
    # decode steps: prefetch as soon as the id is known, gather later; one row read per step
    for t in (11, 12, 11):
        step = torch.tensor([[t]])
        disk.prefetch(step)
        disk.gather(step)
    r = disk.report()
    assert r["rows_read"] == distinct + 3 and r["reads"] == distinct - 1 + 3
    assert r["mode"] == "disk" and r["resident_bytes"] < lay.nbytes


def test_hot_row_cache_serves_repeats_within_its_budget(tmp_path):
    lay = layout_of(write_safetensors(tmp_path / "m.safetensors", _table()), NAME)
    disk = open_store(lay, "disk", DEVICE, torch.float32, cache_bytes=2 * lay.row_bytes)
    ref = open_store(lay, "cpu", DEVICE, torch.float32)
    for t in (5, 6, 5, 6, 9, 5):  # 5, 6 cached; 9 evicts 5 (least recently used); 5 is read again
        step = torch.tensor([[t]])
        torch.testing.assert_close(disk.gather(step), ref.gather(step), rtol=0, atol=0)
    r = disk.report()
    assert (r["rows_read"], r["cache_hits"]) == (4, 2)
    assert len(disk.cache) == 2 and r["resident_bytes"] <= 2 * lay.row_bytes + r["staging_bytes"]


def test_gather_without_matching_prefetch(tmp_path):
    """A prefetch for other ids (or none) still gives the asked rows."""
    table = _table()
    lay = layout_of(write_safetensors(tmp_path / "m.safetensors", table), NAME)
    disk = open_store(lay, "disk", DEVICE, torch.float32)
    disk.prefetch(torch.tensor([[1]]))
    for ids in (torch.tensor([[2]]), torch.tensor([[4, 4]])):
        torch.testing.assert_close(disk.gather(ids).cpu(), table[ids], rtol=0, atol=0)


# ----------------------------------------------------------------------------- bad input


def test_table_shape_disagrees_with_layers_x_width(tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", _table())
    with pytest.raises(LlmarchError, match=r"4 layers x per-layer width 64 need rows of 256") as e:
        layout_of(path, NAME, layers=4)
    assert e.value.path == str(path)
    with pytest.raises(LlmarchError, match=r"has 50 rows, the config's per-layer vocabulary is 60"):
        layout_of(path, NAME, vocab=60)


def test_file_shorter_than_its_rows(tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", _table())
    lay = layout_of(path, NAME)
    disk = open_store(lay, "disk", DEVICE, torch.float32)
    with open(path, "r+b") as f:  # the file loses its last rows after it was opened
        f.truncate(lay.offset + 10 * lay.row_bytes)
    with pytest.raises(LlmarchError, match="run past the end of the file") as e:
        layout_of(path, NAME)  # the checkpoint reader refuses the file as it opens
    assert e.value.path == str(path)
    with pytest.raises(LlmarchError, match="shorter than the 50 rows") as e:
        lay.check_size()  # and the table's own check (run when a layout is made) on the header it was given
    assert e.value.path == str(path)
    with pytest.raises(LlmarchError, match=r"file ends at byte \d+, before the per-layer embedding rows") as e:
        disk.gather(torch.tensor([[45]]))
    assert e.value.path == str(path)
    with pytest.raises(LlmarchError, match="shorter than"):
        ResidentTable(lay, torch.device("cpu"), DEVICE, torch.float32)
    disk.gather(torch.tensor([[3]]))  # rows still in the file read as before


def test_row_folder_cannot_be_written(tmp_path):
    import gguf

    path = write_gguf(tmp_path / "m.gguf", _table().numpy(), gguf.GGMLQuantizationType.MXFP4)
    lay = layout_of(path, "per_layer_token_embd.weight")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(LlmarchError, match="cannot write the per-layer embedding row file") as e:
        open_store(lay, "disk", DEVICE, torch.float32, folder=blocker / "rows")
    assert e.value.path == str(blocker / "rows")
    assert blocker.read_text() == ""


def test_ids_outside_the_table(tmp_path):
    lay = layout_of(write_safetensors(tmp_path / "m.safetensors", _table()), NAME)
    for mode in ("cpu", "disk"):
        with pytest.raises(LlmarchError, match="token id 50 is outside the per-layer embedding table's 50 rows"):
            open_store(lay, mode, torch.device("cpu"), torch.float32).gather(torch.tensor([[1, 50]]))


def test_choose_mode():
    cpu = torch.device("cpu")
    assert choose_mode("disk", 1, 1, cpu) == ("disk", "asked")
    with pytest.raises(LlmarchError, match="--ple gpu needs the model on a GPU"):
        choose_mode("gpu", 1, 1, cpu)
    with pytest.raises(LlmarchError, match="--ple must be gpu, cpu or disk"):
        choose_mode("ram", 1, 1, cpu)
    with pytest.raises(LlmarchError, match=r"--ple cpu: the table \(1048576.00 GiB\) needs more than"):
        choose_mode("cpu", 1 << 50, 1, cpu)
    assert choose_mode(None, 1 << 20, 1 << 20, cpu)[0] == "cpu"
    mode, why = choose_mode(None, 1 << 50, 1 << 20, cpu)  # a 1 PiB table fits in no host RAM
    assert mode == "disk" and "do not fit" in why


# ----------------------------------------------------------------------------- through `llmarch run`


def llmarch(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`llmarch ARGS` in this process (the console entry point, so errors are its one line and
    exit status): (status, stdout, stderr)."""
    from llmarch.cli import main

    capsys.readouterr()  # drop what came before (fixtures built on first use print progress)
    monkeypatch.setattr(sys, "argv", ["llmarch", *map(str, args)])
    monkeypatch.delenv("LLMARCH_DEBUG", raising=False)
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("family", ["gemma3n", "gemma4_text"])
def test_modes_give_identical_tokens_through_run(tiny, monkeypatch, capsys, family):
    """The tiny Gemma 3n / Gemma 4 checkpoints (their tables from transformers' save_pretrained)
    give the same greedy tokens with the table resident (the default: host RAM here, the GPU there) and read
    from disk with a hot-row cache; the disk run reads each distinct prompt token once."""
    src = tiny(family)
    prompt = "5,9,5,17,9,3,250,5"
    out = {}
    for extra in ((), ("--ple", "disk", "--ple-cache-mib", "1")):
        code, stdout, err = llmarch(
            monkeypatch, capsys, "run", src, "--prompt-ids", prompt, "-n", "12", "--ignore-eos", "--json", *extra
        )
        assert code == 0, err
        doc = json.loads(stdout)
        out[extra] = doc["tokens"]
        # the default with the table fitting: beside the compute, so on the GPU where run uses one
        default = "gpu" if torch.cuda.is_available() else "cpu"
        assert doc["ple"]["mode"] == ("disk" if extra else default)
        assert f"per-layer embeddings: --ple {doc['ple']['mode']} (" in err and "· PLE " in err
    assert len(set(map(tuple, out.values()))) == 1, out
    rep = doc["ple"]
    distinct = len(set(prompt.split(",")))
    assert rep["tokens"] == 8 + 11 and rep["rows_read"] + rep["cache_hits"] == distinct + 11
    assert rep["where"] == f"file {src / 'model.safetensors'}" and rep["resident_bytes"] < rep["table_bytes"]


def test_decode_loop_starts_the_next_rows_right_after_sampling(tiny):
    """With --ple disk the decode loop starts the next step's row read as soon as the sampled id is
    on the host: when the token is streamed (before the step runs) the store already holds a
    request for exactly that id; the step's own pre-hook then starts nothing again (one read per
    step). The last token, which no step follows, starts none."""
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime
    from llmarch.runtime.ple import find_store

    rt = load_runtime(str(tiny("gemma3n")), "cpu", None, ple="disk")
    store = find_store(rt.model)
    assert isinstance(store, DiskTable)
    seen: list[tuple[int, list[int] | None]] = []
    gen = Generator(rt, 32, cuda_graph=False)
    res = gen.generate(
        [5, 9, 5, 17], 6, Sampling(), on_token=lambda t: seen.append((t, store.pending and store.pending.key))
    )
    assert [t for t, _ in seen] == res.tokens and len(res.tokens) == 6
    assert [k for _, k in seen] == [[t] for t in res.tokens[:-1]] + [None]
    r = store.report()
    assert r["tokens"] == 4 + 5 and r["rows_read"] == 3 + 5 and r["reads"] == 3 + 5


@pytest.mark.parametrize("family", ["gemma3n", "gemma4_text"])
def test_split_step_reads_the_staged_row_only_in_its_second_part(tiny, family):
    """A decode step with a host-staged row is captured in two parts (Generator): model.start, which
    runs while the host still fetches the token's row, then model.finish. Here, on the CPU, step by
    step past the sliding window: start runs with the row's static buffer poisoned (all bits set:
    NaN in the stored float type), so any read of the row would show; its outputs are finite. The
    row is then staged and finish gives exactly the logits of the whole step with the rows gathered
    from the file as usual (same ops on the same values), on a second cache fed the same tokens."""
    from llmarch.runtime.generate import Generator
    from llmarch.runtime.load import load_runtime
    from llmarch.runtime.ple import find_store

    rt = load_runtime(str(tiny(family)), "cpu", None, ple="disk")
    model, store = rt.model, find_store(rt.model)
    assert isinstance(store, DiskTable) and store.layout.stored in ("F32", "BF16", "F16")
    prompt = [5, 9, 5, 17, 9, 3, 250, 5]
    whole, split = (Generator(rt, 64, cuda_graph=False).cache for _ in range(2))
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        pos = torch.arange(len(prompt))
        ref = model(ids, pos, whole, limit=len(prompt))[:, -1]
        assert torch.equal(model(ids, pos, split, limit=len(prompt))[:, -1], ref)
        tokens = []
        for n in range(len(prompt), len(prompt) + 24):  # the tiny configs' windows are shorter
            tok = int(ref.argmax(-1))
            tokens.append(tok)
            ids, pos = torch.tensor([[tok]]), torch.tensor([n])
            ref = model(ids, pos, whole, limit=None)[:, -1]  # limit=None: the whole cache, as a graph reads it
            with store.captured():
                store._static.fill_(255)
                mid = model.start(ids, pos, split, limit=None)
                assert all(bool(t.isfinite().all()) for t in mid if t is not None)
                store.stage(ids)
                got = model.finish(ids, pos, split, *mid)[:, -1]
            assert torch.equal(got, ref), (n, (got - ref).abs().max())
    assert len(set(tokens)) > 1  # a step that ignored its input would repeat one token


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["gemma3n", "gemma4_text"])
def test_three_modes_give_identical_tokens_through_the_cuda_graph(tiny, monkeypatch, capsys, device, family):
    """On a GPU (LLMARCH_TEST_DEVICE=cuda): the table on the GPU, in host RAM and on disk give the
    same greedy tokens, all three decoding through the captured CUDA graph (cpu and disk stage each
    step's row into the graph's static buffer before the replay: one row per decode step; disk reads
    the prompt's distinct tokens once). The --ple gpu graph's parity with transformers is
    tests/test_run_gemma3n.py's and test_run_gemma4.py's."""
    if not device.startswith("cuda"):
        pytest.skip("needs LLMARCH_TEST_DEVICE=cuda")
    src = tiny(family)
    prompt = "5,9,5,17,9,3,250,5"
    out = {}
    for mode in ("gpu", "cpu", "disk"):
        code, stdout, err = llmarch(
            monkeypatch, capsys, "run", src, "--prompt-ids", prompt, "-n", "12", "--ignore-eos",
            "--json", "--device", device, "--dtype", "float32", "--ple", mode,
        )  # fmt: skip
        assert code == 0, err
        doc = json.loads(stdout)
        rep = doc["ple"]
        assert rep["mode"] == mode and rep["cuda_graph"] is True, rep
        if mode != "gpu":  # the resident GPU table's gather inside the graph is not counted
            prefill = len(set(prompt.split(","))) if mode == "disk" else 8
            assert rep["tokens"] == 8 + 11 and rep["rows_read"] == prefill + 11, rep
        out[mode] = doc["tokens"]
    assert out["gpu"] == out["cpu"] == out["disk"], out


def test_ple_options_refused_before_loading(tiny, monkeypatch, capsys):
    import llmarch.runtime.load as load

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the options were checked")

    monkeypatch.setattr(load, "load_runtime", no_load)
    for src, args, needle in (
        ("llama", ("--ple", "disk"), "--ple only applies to models with per-layer embeddings"),
        ("llama", ("--ple-dir", "x", "--ple-cache-mib", "4"), "--ple-cache-mib and --ple-dir only apply"),
        ("gemma3n", ("--ple", "ram"), "--ple must be gpu, cpu or disk"),
        ("gemma3n", ("--ple-cache-mib", "-1"), "--ple-cache-mib must be >= 0"),
    ):
        code, _, err = llmarch(monkeypatch, capsys, "run", tiny(src), "--prompt-ids", "1,2", *args)
        one_line(code, err, needle)


def test_ple_gpu_without_a_gpu(tiny, monkeypatch, capsys):
    code, _, err = llmarch(
        monkeypatch, capsys, "run", tiny("gemma3n"), "--prompt-ids", "1,2", "--ple", "gpu", "--device", "cpu"
    )
    one_line(code, err, "--ple gpu needs the model on a GPU")


def test_table_shape_disagreeing_with_config_through_run(tiny, tmp_path, monkeypatch, capsys):
    from tests.test_run_cli import _rewrite_safetensors

    def cut(sd):
        name = next(n for n in sd if n.endswith("embed_tokens_per_layer.weight"))
        sd[name] = sd[name][:, :-8].contiguous()  # one layer's 8 columns fewer
        return sd

    bad = _rewrite_safetensors(tiny("gemma3n"), tmp_path / "bad", cut)
    code, _, err = llmarch(monkeypatch, capsys, "run", bad, "--prompt-ids", "1,2", "--ple", "disk")
    one_line(code, err, "per-layer width 8 need rows of 80", str(bad / "model.safetensors"))
