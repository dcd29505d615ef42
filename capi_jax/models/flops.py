"""Analytic FLOP counts of the layers backbones are made of (2 FLOPs per multiply-add).

Methods build their step's count (`Method.flops_per_step`) from these; norms, activations,
softmax and elementwise ops are left out (a few % at ViT widths).
"""


def matmul_flops(m: int, k: int, n: int) -> int:
  """FLOPs of an (m, k) @ (k, n) matmul: one multiply-add (2 FLOPs) per output per k."""
  return 2 * m * k * n


def patch_embed_flops(n_patches: int, patch_dim: int, dim: int) -> int:
  """Forward FLOPs of the patch embedding (a stride-p conv = one matmul) for one image."""
  return matmul_flops(n_patches, patch_dim, dim)


def self_attention_block_flops(n: int, dim: int, mlp_dim: int) -> int:
  """Forward FLOPs of one self-attention block on one image of `n` tokens (prefix tokens included).

  q, k, v and output projections (4 n d^2 multiply-adds), scores and weighted sum
  (2 n^2 d), MLP (2 n d mlp_dim); times 2 FLOPs per multiply-add.
  """
  projections = 4 * matmul_flops(n, dim, dim)
  attention = 2 * matmul_flops(n, dim, n)
  mlp = 2 * matmul_flops(n, dim, mlp_dim)
  return projections + attention + mlp


def cross_attention_block_flops(n_q: int, n_kv: int, dim: int, mlp_dim: int) -> int:
  """Forward FLOPs of one cross-attention block on one image (queries attend to a context).

  Args:
    n_q: query tokens.
    n_kv: context tokens, projected to keys and values in every block.
    dim: width.
    mlp_dim: MLP hidden width.
  """
  q_and_out = 2 * matmul_flops(n_q, dim, dim)
  k_and_v = 2 * matmul_flops(n_kv, dim, dim)
  attention = 2 * matmul_flops(n_q, dim, n_kv)
  mlp = 2 * matmul_flops(n_q, dim, mlp_dim)
  return q_and_out + k_and_v + attention + mlp
