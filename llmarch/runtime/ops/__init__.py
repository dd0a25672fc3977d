"""Building blocks, one file per axis of variation (attention, norms, rope, mlp; mla/moe later)."""
