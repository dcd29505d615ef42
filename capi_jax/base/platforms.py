"""Process set-up before jax starts: libtpu stays quiet on a machine without a TPU.

With libtpu installed (the `tpu` extra, for `python -m capi_jax.aot`) and no TPU chip, every
jax start loads libtpu's plugin, which asks the GCE metadata server what TPU this host is and
prints, on every command: 'Failed to find host bounds for accelerator type: WARNING: could not
determine TPU accelerator type ...' and an INVALID_ARGUMENT error about TPU_WORKER_HOSTNAMES.
Described as what it is, one worker with no TPU (`TPU_SKIP_MDS_QUERY=1`,
`TPU_WORKER_HOSTNAMES=localhost`, `TPU_HOST_BOUNDS=1,1,1`), the host asks nothing and prints
nothing; compile-only topologies (aot plans) are described by their own arguments and are
unchanged. Values already set are kept, and nothing is set where a TPU chip is present.
"""

import glob
import importlib.util
import os

GOOGLE_PCI_VENDOR = '0x1ae0'  # TPU chips are Google PCI devices (what jax's own check reads).
QUIET_TPU_ENV = {'TPU_SKIP_MDS_QUERY': '1', 'TPU_WORKER_HOSTNAMES': 'localhost',
                 'TPU_HOST_BOUNDS': '1,1,1'}


def tpu_chips_present() -> bool:
  """Whether this host has a TPU chip (a Google PCI device, or a /dev/accel* / /dev/vfio)."""
  if glob.glob('/dev/accel*') or os.path.isdir('/dev/vfio'):
    return True
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(vendor) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def quiet_libtpu_without_tpu() -> dict[str, str]:
  """Sets QUIET_TPU_ENV (where unset) when libtpu is installed and no TPU chip is present;
  returns what it set. Call before jax is imported."""
  if ('JAX_FORCE_TPU_INIT' in os.environ or importlib.util.find_spec('libtpu') is None
      or tpu_chips_present()):
    return {}
  added = {k: v for k, v in QUIET_TPU_ENV.items() if k not in os.environ}
  os.environ.update(added)
  return added
