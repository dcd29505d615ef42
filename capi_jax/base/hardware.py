"""What the hardware can do, from the vendors' published figures (no project imports).

Dense bf16 peak FLOP/s per device (datasheets, no sparsity), for model FLOPs utilisation (MFU)
and ideal step times.
"""

import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity), keyed by a substring of
# `device.device_kind`; first match wins, so the more specific names come first.
PEAK_BF16_FLOPS = (
    ('H100 PCIe', 756e12),
    ('H100 NVL', 835e12),
    ('H100', 989e12),  # SXM, e.g. 'NVIDIA H100 80GB HBM3'.
    ('H200', 989e12),
    ('GH200', 989e12),
    ('A100', 312e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),  # v5e.
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),  # v5p reports 'TPU v5'.
    ('TPU v6 lite', 918e12),  # v6e (Trillium).
    ('TPU v6e', 918e12),
)

# Bandwidths per TPU chip, bytes/s, from Google Cloud's TPU pages (docs.cloud.google.com/tpu/
# docs/{v4,v5e,v5p,v6e}), for step-time bounds of compiled plans (`engine.scaling`):
#   hbm  HBM bandwidth per chip;
#   ici  bidirectional inter-chip interconnect bandwidth per chip (all links, both ways);
#   dcn  data centre network bandwidth per chip (v5p: 50 Gbps per chip; v5e: a host's 2 x
#        100 Gbps NICs over its 8 chips); None where no page gives it.
TPU_BANDWIDTH = {
    'v4': {'hbm': 1200e9, 'ici': None, 'dcn': None},
    'v5e': {'hbm': 819e9, 'ici': 400e9, 'dcn': 200e9 / 8 / 8},
    'v5p': {'hbm': 2765e9, 'ici': 1200e9, 'dcn': 50e9 / 8},
    'v6e': {'hbm': 1638e9, 'ici': 800e9, 'dcn': None},
}


def table_peak_flops(device_kind: str, compute_dtype: str) -> float | None:
  """Per-device datasheet peak for bf16 compute, or None (other dtypes, unknown devices)."""
  if jnp.dtype(compute_dtype) != jnp.bfloat16:
    return None
  return next((peak for name, peak in PEAK_BF16_FLOPS if name in device_kind), None)
