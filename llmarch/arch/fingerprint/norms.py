"""Norm placement (from the norm tensors of the first layer), kind, eps, (1+w) weights."""

from __future__ import annotations

from llmarch.arch.fingerprint.facts import Facts, layer_has
from llmarch.arch.recipe_schema import Recipe
from llmarch.arch.spec import ArchSpec, NormSpec

NORM_ROLES = ("input_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm")


def layer_norm_placement(lt, i: int) -> str | None:
    """Where layer i's norms sit, from its norm tensors (None: the layer has no tensors)."""
    if i not in lt:
        return None
    has = {role: layer_has(lt, i, role) for role in NORM_ROLES}
    if has["post_ffn_norm"]:
        return "sandwich" if has["input_norm"] else "post"
    return "pre"


def read_norms(spec: ArchSpec, f: Facts, recipe: Recipe, lt) -> None:
    n = NormSpec()
    first = next(iter(sorted(lt)), None)
    if first is not None:
        n.placement = layer_norm_placement(lt, first) or "pre"
        shown = ", ".join(role for role in NORM_ROLES if layer_has(lt, first, role))
        spec.evidence["norm.placement"] = f"norm tensors of layer {first}: {shown}"
    else:
        n.placement = recipe.norm_placement or "pre"
    if recipe.norm_placement and first is not None and recipe.norm_placement != n.placement:
        spec.warnings.append(f"recipe expects {recipe.norm_placement} norms, tensors show {n.placement}")
    eps_rms = f.get("rms_norm_eps", "norm_eps", fact="norm.eps")
    eps_ln = f.get("layer_norm_epsilon", "layer_norm_eps")
    n.kind = recipe.norm or ("layer" if eps_ln is not None and eps_rms is None else "rms")
    n.eps = eps_rms if eps_rms is not None else eps_ln
    n.unit_offset = recipe.norm_unit_offset
    spec.norm = n
