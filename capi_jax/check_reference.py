r"""Parity check against numbers produced by the official PyTorch releases.

Run:
  python -m capi_jax.check_reference tests/fixtures/capi_reference/capi_ref_small.npz
  python -m capi_jax.check_reference tests/fixtures/caev2_reference/caev2_small.npz
  python -m capi_jax.check_reference FIXTURE.npz --kind=mim_refiner   # force the kind
  python -m capi_jax.check_reference FIXTURE.npz --scan_layers         # blocks as one scan

Prints one table of errors against tolerances (`capi_jax.reference.harness`) and exits
non-zero if any quantity is out of tolerance or nothing could be compared.
"""

from collections.abc import Sequence
import sys

from capi_jax.reference import harness


def main(argv: Sequence[str]) -> int:
  args = list(argv[1:])
  kind, scan_layers = None, False
  for arg in list(args):
    if arg.startswith('--kind='):
      kind = arg.split('=', 1)[1]
      args.remove(arg)
    elif arg == '--scan_layers':
      scan_layers = True
      args.remove(arg)
  if len(args) != 1:
    print('usage: python -m capi_jax.check_reference FIXTURE.npz [--kind=KIND] [--scan_layers]',
          file=sys.stderr)
    return 2
  report = harness.run(harness.load_fixture(args[0]), kind, scan_layers=scan_layers)
  print(f'{report.kind} fixture {args[0]}')
  print(report.table())
  print(report.verdict())
  return 0 if report.ok else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv))
