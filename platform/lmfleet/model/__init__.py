"""The decoder model: plain PyTorch, no parallelism inside (lmfleet.train.parallel applies it)."""

from lmfleet.model.config import ModelConfig
from lmfleet.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer"]
