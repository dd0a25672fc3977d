"""llmarch: inspect, compare, convert and run open-weight LLM checkpoints."""

__version__ = "0.1.0"
