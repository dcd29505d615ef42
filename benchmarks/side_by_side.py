r"""capi_jax vs the official PyTorch CAPI step, alternating on one host: images/s and CPU s/step.

Run (after `bash ../shared/tools/setup_torch_reference.sh GIT_DIR`, which builds the official
release's environment outside the project):
  python benchmarks/side_by_side.py --rounds=6
  python benchmarks/side_by_side.py --rounds=6 --cpus=0      # both pinned to one core

Each round runs `python -m capi_jax.bench --config=configs/bench_cpu.py` (ours) then the
official training iteration on the same shape (`torch_reference_bench.py --shape bench_cpu`),
each in a fresh process, so that a noisy neighbour hurts both sides alike. Both are timed the
same way: wall time and process CPU time (all threads) over the timed steps, divided by the
step count. The official script reports only wall time; it is run unmodified, with a clock
that also notes the process CPU time when the script reads its two timestamps.

Prints one line per run and a summary: median images/s and CPU s/step of each side, and the
ratio ours/official as the median of the per-round ratios with their min-max spread. On a
shared host, CPU s/step is the steadier figure (other processes inflate wall time, not the
CPU time a step costs); quote wall-time figures only from a quiet host.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
REF_HOME = pathlib.Path(os.environ.get(
    'REF_HOME', pathlib.Path(os.environ.get('XDG_CACHE_HOME', pathlib.Path.home() / '.cache'))
    / 'capi-ref'))
REF_BENCH = REPO.parent / 'shared' / 'tools' / 'torch_reference_bench.py'

# Runs the official benchmark script unmodified; its two perf_counter() reads (start, end of the
# timed steps) also note the process CPU time. Prints {"cpu_s_per_step": ...} after its line.
_TORCH_WRAPPER = r'''
import json, runpy, sys, time
script, steps = sys.argv[1], int(sys.argv[sys.argv.index('--steps') + 1])
wall_clock, cpu_marks = time.perf_counter, []
def clock():
  if sys._getframe(1).f_code.co_filename == script:
    cpu_marks.append(time.process_time())
  return wall_clock()
time.perf_counter = clock
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name='__main__')
assert len(cpu_marks) == 2, f'expected 2 timestamps from the script, got {len(cpu_marks)}'
print(json.dumps({'cpu_s_per_step': (cpu_marks[1] - cpu_marks[0]) / steps}))
'''


def cpu_model() -> str:
  for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
    if line.startswith('model name'):
      return line.split(':', 1)[1].strip()
  return platform.processor() or 'unknown'


def run(cmd: list[str], cpus: str, env: dict[str, str]) -> list[dict]:
  """Runs cmd (pinned to `cpus` if given) and returns the JSON lines it printed."""
  if cpus:
    cmd = ['taskset', '-c', cpus, *cmd]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stderr[-3000:]}')
  return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]


def ours(args: argparse.Namespace) -> dict[str, float]:
  out, = run([sys.executable, '-m', 'capi_jax.bench', f'--config={args.config}',
              f'--steps={args.steps}', f'--warmup={args.warmup}', '--data_batches=0'],
             args.cpus, dict(os.environ))
  return {'images_per_s': out['global_batch_size'] / out['step_time_mean_s'],
          's_per_step': out['step_time_mean_s'], 'cpu_s_per_step': out['host_cpu_mean_s_per_step']}


def official(args: argparse.Namespace) -> dict[str, float]:
  env = dict(os.environ, CAPI_REF_REPO=str(args.ref_repo))
  result, cpu = run([str(args.ref_python), '-c', _TORCH_WRAPPER, str(args.ref_bench),
                     '--shape', args.shape, '--steps', str(args.steps),
                     '--warmup', str(args.warmup)], args.cpus, env)
  return {'images_per_s': result['images_per_s'], 's_per_step': result['s_per_step'],
          'cpu_s_per_step': cpu['cpu_s_per_step'], 'threads': result['threads']}


def summary(name: str, values: list[float], fmt: str) -> str:
  return f'{name} {format(statistics.median(values), fmt)} [{format(min(values), fmt)}, ' \
         f'{format(max(values), fmt)}]'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--config', default='configs/bench_cpu.py')
  parser.add_argument('--shape', default='bench_cpu')
  parser.add_argument('--cpus', default='', help="taskset CPU list for both sides, e.g. '0'.")
  parser.add_argument('--ref_python', type=pathlib.Path, default=REF_HOME / 'venv/bin/python')
  parser.add_argument('--ref_repo', type=pathlib.Path, default=REF_HOME / 'src')
  parser.add_argument('--ref_bench', type=pathlib.Path, default=REF_BENCH)
  args = parser.parse_args()
  for path in (args.ref_python, args.ref_repo, args.ref_bench):
    if not path.exists():
      sys.exit(f'{path} is missing: run ../shared/tools/setup_torch_reference.sh first, or pass '
               '--ref_python / --ref_repo / --ref_bench.')

  print(f'host: {cpu_model()}, {len(os.sched_getaffinity(0))} CPUs; pinned to: '
        f'{args.cpus or "none"}; load average {os.getloadavg()[0]:.2f}', flush=True)
  rows = {'ours': [], 'official': []}
  for i in range(args.rounds):
    for side, fn in (('ours', ours), ('official', official)):
      r = fn(args)
      rows[side].append(r)
      print(f'round {i} {side:8s} {r["images_per_s"]:7.2f} images/s  {r["s_per_step"]:.3f} s/step'
            f'  {r["cpu_s_per_step"]:.3f} CPU s/step  load {os.getloadavg()[0]:.2f}', flush=True)
  for side, rs in rows.items():
    print(f'{side:8s} ' + summary('images/s', [r['images_per_s'] for r in rs], '.2f') + '  '
          + summary('CPU s/step', [r['cpu_s_per_step'] for r in rs], '.3f'))
  pairs = list(zip(rows['ours'], rows['official']))
  print('ratio ours/official (median [min, max] over rounds): '
        + summary('images/s', [o['images_per_s'] / t['images_per_s'] for o, t in pairs], '.2f')
        + '  ' + summary('by CPU time', [t['cpu_s_per_step'] / o['cpu_s_per_step']
                                         for o, t in pairs], '.2f'))


if __name__ == '__main__':
  main()
