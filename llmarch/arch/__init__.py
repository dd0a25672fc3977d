"""The stage between the checkpoint readers and the consumers (report, runtime, convert).

    spec.py          ArchSpec / LayerSpec: the format-independent description, and derived figures
    fingerprint/     checkpoint -> ArchSpec, one module per section (sizes, attention, rope, ...)
    recipe_book.py   family recipes (top-level recipes/*.toml) loaded against their schema
    recipe_schema.py the schema: one frozen dataclass per recipe section, unknown keys refused
    gguf_config.py   GGUF metadata <-> config.json keys (gguf-py's Keys)
    tensor_roles.py  what a tensor name is (router, shared expert, q_norm, vision tower, ...)

It imports the checkpoint readers and nothing from report, runtime or convert.
"""
