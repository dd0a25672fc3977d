"""Planning from an ArchSpec: memory by part and the placements and launch lines that fit (`llmarch fit`)."""
