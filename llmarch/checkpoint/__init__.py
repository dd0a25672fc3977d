"""Header-only checkpoint readers: config, metadata and a tensor index; no tensor data is read."""

from llmarch.checkpoint.base import Checkpoint, TensorInfo
from llmarch.checkpoint.open import open_checkpoint

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]
