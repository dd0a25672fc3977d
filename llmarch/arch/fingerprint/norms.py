"""Norm placement (from the norm tensors of the first layer), kind, eps, (1+w) weights."""

from __future__ import annotations

from llmarch.arch.fingerprint.facts import Facts, layer_has
from llmarch.arch.recipe_schema import Recipe
from llmarch.arch.spec import ArchSpec, NormSpec


def read_norms(spec: ArchSpec, f: Facts, recipe: Recipe, lt) -> None:
    n = NormSpec()
    first = next(iter(sorted(lt)), None)
    if first is not None:
        has = {
            role: layer_has(lt, first, role)
            for role in ("input_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm")
        }
        if has["post_ffn_norm"] and has["input_norm"]:
            n.placement = "sandwich"
        elif has["post_ffn_norm"] and not has["input_norm"]:
            n.placement = "post"
        else:
            n.placement = "pre"
        spec.evidence["norm.placement"] = f"norm tensors of layer {first}: " + ", ".join(k for k, v in has.items() if v)
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
