"""Weights from other codebases: official files (`files`), conversion rules (`rules`), the
standard ViT's families (`vit`). Each method's own converter lives in its folder."""
