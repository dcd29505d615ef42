"""CAE v2 (Zhang et al., 2022): regress frozen CLIP features of all tokens from the visible ones."""
