"""dam: Differentiable Adaptive Merging and mergekit-compatible classic merges for Hugging Face causal LMs."""

from dam.errors import DamError

__all__ = ["DamError"]
__version__ = "0.1.0"
