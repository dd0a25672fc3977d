"""`llmarch convert`: Hugging Face safetensors <-> GGUF, streamed and verified.

plan.py            per-tensor plan (GGUF name, type, shape, bytes, where each source piece goes)
layout.py          family rules (from recipes/*.toml [convert]) and the HF tensor names per GGUF kind
gguf_meta.py       ArchSpec/config -> GGUF metadata keys (gguf-py Keys, via llmarch.arch.gguf_config)
tokenizer_gguf.py  tokenizer.json <-> GGUF vocab
writer.py          header first, then every tensor pwrite()n at its offset by a thread pool
to_gguf.py / from_gguf.py / verify.py
"""
