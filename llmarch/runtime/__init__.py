"""Pure-PyTorch runtime built from an ArchSpec (imports torch: only `llmarch run` loads this)."""
