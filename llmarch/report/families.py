"""`llmarch families`: which families llmarch knows and what each command supports, from the
recipes alone (the same list every refusal names), as a table, Markdown (README) or JSON."""

from __future__ import annotations

from llmarch.arch.recipe_book import all_recipes
from llmarch.arch.recipe_schema import COMMANDS


def family_rows() -> list[dict]:
    return [
        {
            "family": r.family,
            "model_types": list(r.model_types),
            "gguf_archs": list(r.gguf_archs),
            "supports": {c: c in r.supports for c in COMMANDS},
        }
        for r in all_recipes()
    ]


HEADERS = ["family", "config.json model_type", "GGUF arch"] + [f"`{c}`" for c in COMMANDS]


def _cells(row: dict) -> list[str]:
    yes = ["yes" if row["supports"][c] else "-" for c in COMMANDS]
    return [row["family"], ", ".join(row["model_types"]), ", ".join(row["gguf_archs"]) or "-", *yes]


def markdown_table() -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in family_rows()]
    return "\n".join(lines) + "\n"


def print_families(console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="families llmarch knows (recipes/*.toml); other models: inspect and diff only")
    for h in HEADERS:
        table.add_column(h.strip("`"))
    for row in family_rows():
        table.add_row(*(escape(c) for c in _cells(row)))
    console.print(table)
