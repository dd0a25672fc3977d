"""Architecture pictures drawn as the articles draw them, as hand-written SVG (no dependencies).

Bottom to top: token embedding, the repeated blocks (parts in order, norm placement visible),
final norm, LM head. A hybrid schedule (5 local : 1 global) is one group of sub-blocks with a
repeat count, never one drawing per layer; a strip on the left shows every layer's kind.
Two documents give two stacks side by side, with the parts that differ outlined in red.
`.png` goes through cairosvg (the `png` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from llmarch.arch.ranges import index_ranges, layers_named
from llmarch.errors import LlmarchError, printable
from llmarch.report.diagram_parts import Part, block_parts, head_parts, layers_from_doc, title_lines
from llmarch.report.text import layer_label, repeat_unit

FONT = "DejaVu Sans, Verdana, Arial, sans-serif"
CHAR_W = {False: 0.62, True: 0.68}  # advance per font-size unit, a little wide on purpose

STACK_W = 620  # one model's column
STRIP_X = 22  # layer strip
X0 = 56  # left edge of group frames
BW = 250  # part box width
PAD = 12  # block frame padding
LANE = 28  # residual lane right of the parts
FRAME_W = PAD + BW + LANE  # block frame width
LABEL_W = 64  # count label column inside a group
GROUP_W = 10 + FRAME_W + LABEL_W + 6
GAP = 10
MAX_BLOCKS = 8  # more runs than this and no repeat: one block per distinct layer kind
DIFF = "#d62728"
COLORS = {
    "norm": "#fff4c2",
    "attn": "#ffd8b0",
    "sliding": "#ffe9cf",
    "chunked": "#ffe9cf",
    "mla": "#f8c1a6",
    "linear": "#cfead3",
    "mamba": "#cfead3",
    "ffn": "#cfe2ff",
    "moe": "#e4d5f5",
    "embed": "#e6e6e6",
    "head": "#e6e6e6",
    "none": "#f4f4f4",
    "add": "#ffffff",
}
# the layer strip's cells are small: stronger colours of the same hues
STRIP = {
    "attn": "#f39a4e",
    "full": "#f39a4e",
    "sliding": "#fbd29f",
    "chunked": "#fbd29f",
    "mla": "#e07048",
    "linear": "#5dbb7d",
    "mamba": "#5dbb7d",
    "dense": "#6fa6ee",
    "moe": "#9f78d6",
    "none": "#dddddd",
}


def text_width(s: str, size: float, bold: bool = False) -> float:
    return len(s) * size * CHAR_W[bold]


def fit(s: str, width: float, size: float, bold: bool = False, min_size: float = 8.5) -> tuple[str, float]:
    """Shrink the font, then cut with an ellipsis, until the text fits the width."""
    while text_width(s, size, bold) > width and size > min_size:
        size = round(size - 0.5, 1)
    if text_width(s, size, bold) > width:
        n = max(1, int(width / (size * CHAR_W[bold])) - 1)
        s = s[:n] + "…"
    return s, size


@dataclass
class Block:
    layer: object  # the representative LayerSpec
    layers: list[int]
    caption: str = ""


@dataclass
class Group:
    blocks: list[Block]
    reps: int
    layers: list[int] = field(default_factory=list)


def plan(doc: dict) -> list[Block | Group]:
    """Bottom-up list of blocks and repeated groups covering every layer once."""
    layers = layers_from_doc(doc)
    learned = bool(doc["rope"].get("learned_positions"))
    labels = [layer_label(l, learned) for l in layers]
    if not labels:
        return []

    def runs(lo: int, hi: int) -> list[Block]:
        out: list[Block] = []
        for i in range(lo, hi):
            if out and labels[out[-1].layers[-1]] == labels[i]:
                out[-1].layers.append(i)
            else:
                out.append(Block(layers[i], [i]))
        return out

    found = repeat_unit(labels)
    if found:
        start, p = found
        head, unit = runs(0, start), runs(start, start + p)
        n_body = len(labels) - start
        if len(unit) == 1:
            body: list = [Block(unit[0].layer, list(range(start, len(labels))))]
        else:
            reps = n_body // p
            for b in unit:  # a sub-block's layers across all repeats
                b.layers = [i + r * p for r in range(reps) for i in b.layers]
            body = [Group(unit, reps, list(range(start, start + reps * p)))] + runs(start + reps * p, len(labels))
        items = head + body
    else:
        items = runs(0, len(labels))
        if len(items) > MAX_BLOCKS:  # irregular schedule: one block per kind, the strip shows order
            kinds: dict[str, Block] = {}
            for i, lab in enumerate(labels):
                kinds.setdefault(lab, Block(layers[i], [])).layers.append(i)
            items = sorted(kinds.values(), key=lambda b: b.layers[0])
    for it in items:
        if isinstance(it, Block):
            it.caption = _caption(it, layers)
    return items


def _caption(b: Block, layers: list) -> str:
    first, n = b.layers[0], len(b.layers)
    contiguous = b.layers == list(range(first, first + n))
    rest_moe = n < len(layers) and all(l.ffn == "moe" for l in layers[n:])
    if contiguous and first == 0 and b.layer.ffn == "dense" and rest_moe:  # DeepSeek's dense-first
        return f"first {n} dense" if n > 1 else "first layer dense"
    return layers_named(b.layers)


# ----------------------------------------------------------------------------- SVG pieces


class Canvas:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, s: str) -> None:
        self.parts.append(s)

    def rect(self, x, y, w, h, fill, stroke="#555", rx=6, sw=1.2, cls="", dash=False):
        d = ' stroke-dasharray="5,3"' if dash else ""
        c = f' class="{cls}"' if cls else ""
        self.add(
            f'<rect{c} x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="{rx}" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{sw}"{d}/>'
        )

    def text(self, x, y, s, size=11, bold=False, anchor="middle", color="#222", cls=""):
        c = f' class="{cls}"' if cls else ""
        w = ' font-weight="bold"' if bold else ""
        self.add(
            f'<text{c} x="{x:.1f}" y="{y:.1f}" font-size="{size}"{w} text-anchor="{anchor}" '
            f'fill="{color}">{escape(printable(s))}</text>'
        )

    def line(self, x1, y1, x2, y2, color="#666", sw=1.4, arrow=False):
        m = ' marker-end="url(#arrow)"' if arrow else ""
        self.add(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" stroke-width="{sw}"{m}/>'
        )


def part_height(p: Part) -> float:
    if p.role == "add":
        return 18
    if p.role == "norm":
        return 22
    return 22 + 14 * len(p.lines)


def draw_part(c: Canvas, p: Part, cx: float, y: float, width: float, marked: bool) -> float:
    """Draw a part with its top at y; return its height."""
    h = part_height(p)
    stroke, sw = (DIFF, 2.6) if marked else ("#555", 1.2)
    differs = ' data-differs="1"' if marked else ""
    c.add(f'<g class="part" data-role="{p.role}"{differs}>')
    if p.role == "add":
        c.add(f'<circle cx="{cx:.1f}" cy="{y + h / 2:.1f}" r="8" fill="#fff" stroke="{stroke}" stroke-width="{sw}"/>')
        c.text(cx, y + h / 2 + 4.5, "+", 13, True)
    else:
        c.rect(cx - width / 2, y, width, h, COLORS.get(p.color, "#eee"), stroke, sw=sw, dash=p.dashed)
        title, size = fit(p.title, width - 12, 12 if p.role != "norm" else 11, p.role != "norm")
        c.text(cx, y + (15 if p.lines else h / 2 + 4), title, size, p.role != "norm")
        for i, ln in enumerate(p.lines):
            s, sz = fit(ln, width - 12, 10.5)
            c.text(cx, y + 30 + 14 * i, s, sz, color="#333")
        if marked:
            c.text(cx + width / 2 - 9, y + 12, "≠", 12, True, color=DIFF, cls="diffmark")
    c.add("</g>")
    return h


def block_height(parts: list[Part]) -> float:
    return 2 * PAD + sum(part_height(p) for p in parts) + GAP * (len(parts) - 1)


def draw_block(
    c: Canvas, b: Block, parts: list[Part], x: float, y: float, label: str, caption: str, others: set, label_w: float
) -> float:
    """Block frame at (x, y) top-left: parts top-down (data flows up), residual lane on the right."""
    h = block_height(parts)
    c.add(f'<g class="block" data-layers="{index_ranges(b.layers)}" data-count="{len(b.layers)}">')
    c.rect(x, y, FRAME_W, h, "#fafafa", "#999", rx=10, sw=1.2)
    cx = x + PAD + BW / 2
    lane = x + PAD + BW + LANE / 2
    yy = y + PAD
    tops = []
    for p in reversed(parts):  # top-down
        tops.append(yy)
        yy += part_height(p) + GAP
    tops.reverse()  # tops[i] of parts[i]
    for i, p in enumerate(parts):
        draw_part(c, p, cx, tops[i], BW, marked=p.signature() not in others)
        if i + 1 < len(parts):  # arrow up to the next part
            c.line(cx, tops[i], cx, tops[i + 1] + part_height(parts[i + 1]) + 1, arrow=True)
    # residual: from below each sub-sequence's first part around to its "+"
    start = 0
    for i, p in enumerate(parts):
        if p.role == "add":
            y_from = tops[start] + part_height(parts[start]) + GAP / 2 if start else y + h - 3
            y_to = tops[i] + part_height(p) / 2
            c.add(
                f'<polyline class="residual" points="{cx:.1f},{y_from:.1f} {lane:.1f},{y_from:.1f} '
                f'{lane:.1f},{y_to:.1f} {cx + 9:.1f},{y_to:.1f}" fill="none" stroke="#888" '
                f'stroke-width="1.2" marker-end="url(#arrow)"/>'
            )
            start = i + 1
    _count_label(c, x + FRAME_W + 8, y + h / 2, label, caption, label_w, (label, caption) not in others)
    c.add("</g>")
    return h


def _count_label(c: Canvas, x: float, ymid: float, label: str, caption: str, width: float, marked: bool) -> None:
    color = DIFF if marked else "#222"
    s, size = fit(label, width, 20, True)
    c.text(x, ymid + (0 if caption else 7), s, size, True, "start", color, cls="count")
    if caption:
        words = caption.split(" ")
        lines, cur = [], ""
        for w in words:  # wrap the caption over up to 3 lines
            t = (cur + " " + w).strip()
            if cur and text_width(t, 10.5) > width:
                lines.append(cur)
                cur = w
            else:
                cur = t
        lines.append(cur)
        for i, ln in enumerate(lines[:3]):
            s, size = fit(ln, width, 10.5)
            c.text(x, ymid + 17 + 13 * i, s, size, False, "start", color, cls="caption")


def group_height(g: Group, doc: dict) -> float:
    return 2 * 10 + sum(block_height(block_parts(doc, b.layer)) for b in g.blocks) + GAP * (len(g.blocks) - 1)


def draw_stack(c: Canvas, doc: dict, ox: float, oy: float, heading: str, others: set, strip_marks: set[int]) -> float:
    """One model's column; returns its height."""
    items = plan(doc)
    y = oy
    lines = title_lines(doc)
    t, size = fit(heading, STACK_W - 30, 16, True)
    c.text(ox + 10, y + 18, t, size, True, "start", cls="title")
    for i, ln in enumerate(lines):
        s, sz = fit(ln, STACK_W - 30, 11)
        c.text(ox + 10, y + 38 + 15 * i, s, sz, False, "start", "#444", cls="subtitle")
    y += 38 + 15 * len(lines) + 10
    cx = ox + X0 + 10 + PAD + BW / 2
    top_parts, bottom_parts = head_parts(doc)
    c.add('<g class="stack">')
    for p in top_parts:  # LM head, final norm (top-down)
        h = draw_part(c, p, cx, y, BW, p.signature() not in others)
        if p.note:
            _note(c, cx + BW / 2 + 14, y, p.note, others)
        y += h + GAP
        c.line(cx, y - 1, cx, y - GAP + 1, arrow=True)
    y_blocks = y
    for it in reversed(items):  # top-down
        if isinstance(it, Group):
            gh = group_height(it, doc)
            c.add(f'<g class="group" data-reps="{it.reps}" data-layers="{index_ranges(it.layers)}">')
            c.rect(ox + X0, y, GROUP_W, gh, "none", "#777", rx=12, sw=1.4, dash=True)
            yy = y + 10
            for b in reversed(it.blocks):
                parts = block_parts(doc, b.layer)
                n = len(b.layers) // it.reps
                yy += draw_block(c, b, parts, ox + X0 + 10, yy, f"×{n}", "", others, LABEL_W - 10) + GAP
            cap = "layers " + index_ranges(it.layers)
            _count_label(
                c,
                ox + X0 + GROUP_W + 8,
                y + gh / 2,
                f"×{it.reps}",
                cap,
                STACK_W - X0 - GROUP_W - 20,
                (f"×{it.reps}", cap) not in others,
            )
            c.add("</g>")
            y += gh + GAP
        else:
            parts = block_parts(doc, it.layer)
            y += (
                draw_block(
                    c,
                    it,
                    parts,
                    ox + X0 + 10,
                    y,
                    f"×{len(it.layers)}",
                    it.caption,
                    others,
                    STACK_W - X0 - 10 - FRAME_W - 22,
                )
                + GAP
            )
        c.line(cx, y - 1, cx, y - GAP + 1, arrow=True)
    _strip(c, doc, ox + STRIP_X, y_blocks, y - GAP - y_blocks, strip_marks)
    for p in bottom_parts:  # embedding
        h = draw_part(c, p, cx, y, BW, p.signature() not in others)
        if p.note:
            _note(c, cx + BW / 2 + 14, y, p.note, others)
        y += h + GAP
    y += _legend(c, doc, ox + STRIP_X - 8, y + 4)
    c.add("</g>")
    return y - oy


LEGEND = [
    ("full", "full attention"),
    ("sliding", "sliding window"),
    ("chunked", "chunked"),
    ("mla", "MLA"),
    ("linear", "linear"),
    ("mamba", "Mamba"),
    ("none", "no mixer"),
    ("dense", "dense FFN"),
    ("moe", "MoE"),
]


def _legend(c: Canvas, doc: dict, x0: float, y: float) -> float:
    """Key to the layer strip's colours, only the kinds this model has; returns its height."""
    present = {l["mixer"] for l in doc["layer_schedule"]} | {l["ffn"] for l in doc["layer_schedule"]}
    items = [(k, label) for k, label in LEGEND if k in present]
    if not items:
        return 0
    c.add('<g class="legend">')
    c.text(x0, y + 10, "layers:", 10, anchor="start", color="#555")
    x, right = x0 + text_width("layers:", 10) + 8, x0 + STACK_W - 40
    rows = 1
    for k, label in items:
        w = 14 + text_width(label, 10) + 12
        if x + w > right:
            x, rows = x0 + text_width("layers:", 10) + 8, rows + 1
        yy = y + (rows - 1) * 16
        c.add(f'<rect x="{x:.1f}" y="{yy + 1:.1f}" width="10" height="10" fill="{STRIP.get(k, "#ccc")}"/>')
        c.text(x + 14, yy + 10, label, 10, anchor="start", color="#555")
        x += w
    c.add("</g>")
    return rows * 16 + 4


def _note(c: Canvas, x: float, y: float, note: str, others: set) -> None:
    marked = ("note", note) not in others
    s, size = fit(note, STACK_W - (x % STACK_W) - 8, 10.5)  # up to the column's right edge
    c.add('<g class="note">')
    c.text(x, y + 14, s, size, False, "start", DIFF if marked else "#555", cls="note")
    c.add("</g>")


def _strip(c: Canvas, doc: dict, x: float, y: float, h: float, marks: set[int]) -> None:
    """Every layer as a thin cell, layer 0 at the bottom: mixer colour left, FFN colour right."""
    sched = doc["layer_schedule"]
    n = len(sched)
    if not n or h <= 0:
        return
    cell = min(24.0, h / n)
    top = y + h - cell * n
    c.add(f'<g class="strip" data-layers="{n}">')
    for i, l in enumerate(sched):
        cy = top + (n - 1 - i) * cell
        c.add(
            f'<rect x="{x:.1f}" y="{cy:.2f}" width="10" height="{cell:.2f}" fill="{STRIP.get(l["mixer"], "#ccc")}" '
            f'stroke="#fff" stroke-width="{0.4 if cell < 4 else 0.8}"/>'
        )
        c.add(
            f'<rect x="{x + 10:.1f}" y="{cy:.2f}" width="6" height="{cell:.2f}" fill="{STRIP.get(l["ffn"], "#ccc")}" '
            f'stroke="#fff" stroke-width="{0.4 if cell < 4 else 0.8}"/>'
        )
        if i in marks:
            c.add(
                f'<rect class="strip-diff" x="{x + 17:.1f}" y="{cy:.2f}" width="3" height="{cell:.2f}" fill="{DIFF}"/>'
            )
    c.text(x - 3, top + cell * n - 1, "0", 9, anchor="end", color="#666", cls="strip-label")
    c.text(x - 3, top + 8, str(n - 1), 9, anchor="end", color="#666", cls="strip-label")
    c.add("</g>")


# ----------------------------------------------------------------------------- entry points


def signatures(doc: dict) -> set:
    """What another drawing compares against to mark differences."""
    out = set()
    top, bottom = head_parts(doc)
    for p in top + bottom:
        out.add(p.signature())
        if p.note:
            out.add(("note", p.note))
    for it in plan(doc):
        blocks = it.blocks if isinstance(it, Group) else [it]
        for b in blocks:
            out.update(p.signature() for p in block_parts(doc, b.layer))
        if isinstance(it, Group):
            cap = "layers " + index_ranges(it.layers)
            out.add((f"×{it.reps}", cap))
            out.update((f"×{len(b.layers) // it.reps}", "") for b in it.blocks)
        else:
            out.add((f"×{len(it.layers)}", it.caption))
    return out


def render_svg(docs: list[dict]) -> str:
    if not docs or len(docs) > 2:
        raise LlmarchError("a diagram draws one model or two side by side")
    c = Canvas()
    if len(docs) == 2:
        sig = [signatures(docs[1]), signatures(docs[0])]
        from llmarch.report.diff import schedule_diff

        marks = {i for s in schedule_diff(docs[0], docs[1]) for i in s["layers"]}
        heads = [f"A: {_name(docs[0])}", f"B: {_name(docs[1])}"]
    else:
        sig, marks, heads = [None], set(), [_name(docs[0])]
    heights = []
    for k, doc in enumerate(docs):
        others = sig[k] if sig[k] is not None else _Everything()
        c.add(f'<g class="model" data-side="{"AB"[k] if len(docs) == 2 else "A"}">')
        heights.append(draw_stack(c, doc, k * STACK_W, 10, heads[k], others, marks))
        c.add("</g>")
    width, height = STACK_W * len(docs), max(heights) + 24
    defs = (
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker></defs>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" '
        f'viewBox="0 0 {width} {height:.0f}" font-family="{FONT}">\n{defs}\n'
        f'<rect x="0" y="0" width="{width}" height="{height:.0f}" fill="#ffffff"/>\n'
        + "\n".join(c.parts)
        + "\n</svg>\n"
    )


class _Everything:
    """A single drawing marks nothing."""

    def __contains__(self, item) -> bool:
        return True


def _name(doc: dict) -> str:
    src = doc.get("source")
    return Path(src).name if src else doc["family"]


def write_diagram(docs: list[dict], path: str) -> None:
    svg = render_svg(docs)
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in (".svg", ".png"):
        raise LlmarchError("diagram file must end in .svg or .png", path)
    try:
        if suffix == ".svg":
            out.write_text(svg, encoding="utf-8")
            return
        try:
            import cairosvg
        except ImportError as e:
            raise LlmarchError("PNG output needs cairosvg: pip install 'llmarch[png]' (or use .svg)", path) from e
        cairosvg.svg2png(bytestring=svg.encode(), write_to=str(out), output_width=None, scale=1.5)
    except OSError as e:
        raise LlmarchError(f"cannot write the diagram: {e.strerror or e}", path) from e
