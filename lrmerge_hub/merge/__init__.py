"""Merge methods (pure tensor functions) and the streaming engine over safetensors shards."""

from .methods import METHODS, MergeMethod, get_method

__all__ = ["METHODS", "MergeMethod", "get_method"]
