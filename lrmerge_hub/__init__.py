"""lrmerge-hub: merge low-resource-language and task checkpoints, card, push and serve them."""

__version__ = "0.1.0"
