"""`train_and_evaluate(config, workdir)`: the pretraining loop.

From one CPU to a pod, the same loop:
  - multi-process runs call `jax.distributed.initialize` (`engine.distributed`), each host reads
    its slice of the data and assembles global arrays;
  - the TrainState is created abstractly, born sharded (or restored sharded from the latest
    checkpoint in WORKDIR/checkpoints), the step is compiled ahead of time and its memory use
    logged;
  - inside the loop the host only dispatches; it syncs with the devices at logging, NaN checks
    and checkpoints;
  - one run per workdir (`runs.lock_workdir`); every start that trains leaves a record of its
    config in WORKDIR/runs/ (nothing of an earlier start is overwritten);
  - resuming takes the newest intact checkpoint (damaged ones are set aside, see
    `checkpointing`), and metrics.jsonl / TensorBoard forget the steps after it;
  - SIGTERM / SIGUSR1 (pre-emption, SLURM's warning signal) / SIGINT (Ctrl-C) -> checkpoint and
    exit; the next run with the same workdir resumes exactly where this one stopped (single
    process: after the current step; several processes: all agree at the next logging step). A
    Ctrl-C run then raises KeyboardInterrupt (the command line exits with 130); a second Ctrl-C
    interrupts at once, without a checkpoint;
  - divergence fails loudly (`NonFiniteLossError`, naming the last good checkpoint): loss NaN/inf
    at more than 2 consecutive checks (every `train.nan_check_period` steps), or a non-finite
    state at a checkpoint, an evaluation or the end. Only finite states become checkpoints and
    a non-finite model is never evaluated;
  - every logging step reports step time, images/s, TFLOP/s per device, MFU (where the device's
    peak is known), the share of time spent waiting for input and the ETA (`engine.progress`);
    `train.profile_steps` = (START, STOP) traces those steps into WORKDIR/profile;
  - evaluations (`engine.evaluation`) of `evals.model` at the steps `evaluators.due` names
    (each protocol's `period`), and of the EMA with every protocol at the end unless
    `evals.final` is False.
"""

import contextlib
import logging
import os
import signal
import sys
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from capi_jax import evaluators
from capi_jax import methods
from capi_jax.base import errors
from capi_jax.base import hardware
from capi_jax.base import interface
from capi_jax.base import sharding
from capi_jax.data import pipeline
from capi_jax.engine import checkpointing
from capi_jax.engine import config_checks
from capi_jax.engine import distributed
from capi_jax.engine import evaluation
from capi_jax.engine import metrics_writer
from capi_jax.engine import pretrained
from capi_jax.engine import progress
from capi_jax.engine import runs
from capi_jax.engine import state as state_lib
from capi_jax.engine import step as step_lib

logger = logging.getLogger(__name__)
# The reference aborts after more than this many consecutive NaN checks.
CONSECUTIVE_NAN_LIMIT = 2


class NonFiniteLossError(errors.UserError):
  """Training diverged: the loss was NaN/inf at more than CONSECUTIVE_NAN_LIMIT consecutive
  checks, or the state was not finite where it is checked (checkpoints, evaluations, the end)."""


class _StopFlag:
  """Set by SIGTERM / SIGUSR1 / SIGINT; read by the loop between steps.

  A Ctrl-C after the first stop signal raises KeyboardInterrupt at once (no checkpoint).
  """
  SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

  def __init__(self):
    self.signal = None

  def __call__(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signal is not None:
      raise KeyboardInterrupt
    self.signal = signum
    logger.warning('Received %s: checkpointing and exiting after this step%s.',
                   signal.Signals(signum).name,
                   ' (Ctrl-C again: exit at once, without one)' if signum == signal.SIGINT else '')

  def install(self) -> dict[int, Any]:
    """Installs the handler; returns the previous handlers, for `restore`."""
    return {sig: signal.signal(sig, self) for sig in self.SIGNALS}

  @staticmethod
  def restore(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _any_process(flag: bool) -> bool:
  """True on every process if it is True on any (so all stop at the same step)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def _is_finite(metrics: dict[str, Any], loss_keys: tuple[str, ...]) -> bool:
  return bool(np.isfinite(sum(float(metrics[k]) for k in loss_keys)))


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  """Whether every float in `tree` is finite (one device-side reduction, one bool to the host)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.stack(leaves).all()


def _diverged(ckpt: checkpointing.Checkpointer, what: str) -> NonFiniteLossError:
  """The error for a diverged run, naming its last good checkpoint."""
  ckpt.wait()
  latest = ckpt.latest_step()
  where = (f'The last good checkpoint is step {latest} in {ckpt.directory}' if latest is not None
           else 'No checkpoint was written (none of its states was finite at a save)')
  return NonFiniteLossError(
      f'{what}: training diverged. {where}; lower the learning rate (the method\'s section, '
      'e.g. capi.optim.lr_schedule.base_value) or check the data, then rerun with the same '
      '--workdir to resume.')


def _require_finite(state: state_lib.TrainState, ckpt: checkpointing.Checkpointer, step: int,
                    when: str) -> None:
  """Raises NonFiniteLossError unless every float of `state` (after `step` steps) is finite."""
  if not bool(_all_finite(state)):
    raise _diverged(ckpt, f'The state after step {step} is not finite ({when})')


class InputPipelineError(errors.UserError):
  """The input pipeline failed (a data worker died or raised)."""


def _input_failed(error: Exception, ckpt: checkpointing.Checkpointer,
                  state: state_lib.TrainState, step: int, data_iter: Any) -> InputPipelineError:
  """The one-line error for an input pipeline that failed before step `step`, after saving
  the healthy state of `step` steps where that is safe (one process: the others of a
  multi-process run would wait for it in the save's collectives)."""
  reason = errors.summary(error)
  saved = ''
  if jax.process_count() == 1 and step > 0 and bool(_all_finite(state)):
    try:
      ckpt.save(step, state, data_iter)
      ckpt.wait()
      saved = f' The state after step {step} is checkpointed.'
    except Exception as e:  # pylint: disable=broad-except  (the error to report is `error`)
      logger.error('Could not checkpoint step %d after the input failure: %s', step, e)
  released = pipeline.release_worker_memory(data_iter)
  if released:
    logger.info('Removed %d shared-memory block(s) the data workers left.', released)
  return InputPipelineError(
      f'The input pipeline failed before step {step} ({reason}).{saved} Fix the cause (memory, '
      'a killed worker, the data) and rerun with the same --workdir to resume.')


def _log_memory(compiled) -> None:
  try:
    mem = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    mem = None
  if mem is None:
    return
  gib = lambda b: f'{b / 2**30:.3f} GiB'
  logger.info('Train step memory per device: arguments %s, outputs %s, temporaries %s, '
               'code %s (arguments are donated).',
               gib(mem.argument_size_in_bytes), gib(mem.output_size_in_bytes),
               gib(mem.temp_size_in_bytes), gib(mem.generated_code_size_in_bytes))


def run_evals(config: ml_collections.ConfigDict, method: interface.Method,
              state: state_lib.TrainState, step: int, workdir: epath.Path, which: str,
              mesh: jax.sharding.Mesh, writer: metrics_writer.MetricsWriter,
              protocols: tuple[str, ...] | None = None) -> dict[str, float]:
  """Evaluates the student or EMA backbone (`evaluation.run_evals`); logs and returns results.

  `evaluation.run_evals` prints a table and writes WORKDIR/eval/<step>/; with
  `config.evals.random_init_baseline` the table shows the random init's numbers beside.
  """
  params = method.eval_params(state.variables, which)
  writer.flush()  # The training curves drawn with the results read metrics.jsonl.
  results = evaluation.run_evals(config, params, step, workdir, protocols=protocols, mesh=mesh)
  writer.write_tensorboard(step, {f'{which}/{k}': v for k, v in results.items()},
                           prefix='eval/')
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]
                       ) -> state_lib.TrainState:
  """Pretrains per `config` in `workdir` (resuming if it holds a checkpoint); returns the state."""
  distributed.initialize()
  try:
    state = _train_in_workdir(config, workdir)
  except BaseException as e:
    # Several processes: the others stop too, naming this one (or a dead peer caused `e`).
    distributed.finished(e)
    raise
  distributed.finished(None)
  return state


def _train_in_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]
                      ) -> state_lib.TrainState:
  config_checks.validate(config)
  workdir = runs.make_workdir(workdir)  # gs:// stays gs:// (never a local ./gs:/ folder).
  lock = runs.lock_workdir(workdir)
  try:
    is_main = jax.process_index() == 0
    logger.info('Process %d/%d, %d local / %d global devices (%s).', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)
    mesh = sharding.make_mesh(config)
    with jax.set_mesh(mesh):
      return _train(config, workdir, mesh, is_main)
  finally:
    if lock is not None:
      lock.release()


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, mesh: jax.sharding.Mesh,
           is_main: bool) -> state_lib.TrainState:
  method = methods.from_config(config)
  rng = jax.random.PRNGKey(config.train.seed)
  layout = state_lib.state_layout(config, method, mesh)

  data_iter = pipeline.create_train_loader(
      config, method.train_transform(), seed=config.train.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  with contextlib.ExitStack() as cleanup:  # Closed in reverse order, on errors too.
    ckpt = checkpointing.Checkpointer(workdir / 'checkpoints', config)
    cleanup.callback(ckpt.close)
    if ckpt.all_steps() and not config.train.auto_resume:
      raise errors.UserError(f'{ckpt.directory} already holds checkpoints {ckpt.all_steps()} and '
                          'config.train.auto_resume is False: use a new --workdir, or resume.')
    restored = ckpt.restore_latest(checkpointing.restore_target(layout.abstract, layout.shardings),
                                   data_iter)
    if restored is not None:
      state, latest = restored
      if latest > config.train.total_iters:
        # Training on would do nothing and evaluate the step-`latest` model under the label
        # total_iters.
        raise errors.UserError(
            f'{ckpt.directory} holds step {latest}, beyond train.total_iters='
            f'{config.train.total_iters}: raise --config.train.total_iters to train on, evaluate '
            f'that checkpoint with `python -m capi_jax.evaluate --config=CONFIG '
            f'--workdir={workdir}`, or use a new --workdir.')
      logger.info('Resuming from step %d.', latest)
    else:
      state = jax.jit(layout.init, out_shardings=layout.shardings)(rng)
      if method.pretrained_paths():
        variables = pretrained.apply(method, state.variables)
        state = jax.device_put(state.replace(**variables._asdict()), layout.shardings)
        logger.info('Started from %s.', method.pretrained_paths())
    ckpt.check_space(state)
    runs.write_record(workdir, config, resumed_from=None if restored is None else latest,
                      mesh=mesh)

    total = config.train.total_iters
    start = int(jax.device_get(state.step))
    writer = metrics_writer.MetricsWriter(workdir, enabled=is_main, start_step=start,
                                          total_steps=total)
    cleanup.callback(writer.close)
    stop = _StopFlag()
    cleanup.callback(stop.restore, stop.install())
    batch_spec = sharding.batch_sharding(mesh, layout.logical_rules).spec
    next_batch = lambda: pipeline.make_global_batch(next(data_iter), mesh, batch_spec)

    step_fn = step_lib.jit_train_step(method, layout, mesh)
    compiled = None
    cfg = config.train
    stats = progress.LiveStats(
        total_steps=total, global_batch=config.train.global_batch_size,
        flops_per_step=method.flops_per_step()['total'], device_count=jax.device_count(),
        peak_flops_per_device=hardware.table_peak_flops(jax.devices()[0].device_kind,
                                                        config.efficiency.compute_dtype))
    profiler = progress.StepProfiler(workdir / 'profile', cfg.get('profile_steps') or (),
                                     is_main, stats)
    cleanup.callback(profiler.finish)
    bad_checks = 0
    metrics = None
    bar = cleanup.enter_context(tqdm.tqdm(
        total=total, initial=start, disable=not (is_main and sys.stderr.isatty()), desc='train',
        unit='step', dynamic_ncols=True))
    for step in range(start, total):
      with stats.waiting_for_data():
        try:
          batch = next_batch()
        except (errors.UserError, KeyboardInterrupt):
          raise
        except Exception as e:  # pylint: disable=broad-except  (a dead data worker, a crash)
          raise _input_failed(e, ckpt, state, step, data_iter) from e
      if compiled is None:
        compiled = step_lib.compile_step(step_fn.lower(state, batch), jax.devices()[0].platform)
        _log_memory(compiled)
        stats.restart(step)
      profiler.before_step(step)
      with jax.transfer_guard('disallow'), jax.profiler.StepTraceAnnotation('train',
                                                                            step_num=step):
        state, metrics = compiled(state, batch)
      profiler.after_step(step, state)
      bar.update(1)
      done = step + 1

      if step % cfg.log_loss_every == 0 or done == total:
        host = jax.device_get(metrics)
        host.update(stats.interval(done))
        writer.write(step, host)
        ckpt.raise_if_save_failed()

      if cfg.nan_check_period > 0 and step % cfg.nan_check_period == 0:
        host = jax.device_get(metrics)
        if _is_finite(host, method.loss_keys):
          bad_checks = 0
        else:
          bad_checks += 1
          logger.warning('Non-finite loss at step %d (%d consecutive checks): %s', step,
                          bad_checks, {k: float(host[k]) for k in method.loss_keys})
          if bad_checks > CONSECUTIVE_NAN_LIMIT:
            raise _diverged(ckpt, f'Loss is NaN/inf at {bad_checks} consecutive checks (every '
                                  f'{cfg.nan_check_period} steps), last at step {step}')

      stopping = (stop.signal is not None if jax.process_count() == 1 else
                  step % cfg.log_loss_every == 0 and _any_process(stop.signal is not None))
      if stopping or done % cfg.checkpointing.period == 0:
        # Only finite states become checkpoints, so the latest one is always good.
        _require_finite(state, ckpt, done, 'checkpoint')
        writer.flush()  # The rows of the steps this checkpoint covers are stored before it.
        ckpt.save(done, state, data_iter)
      if stopping:
        ckpt.wait()
        logger.warning('Stopped by signal at step %d; checkpoint saved, rerun to resume.', done)
        if stop.signal == signal.SIGINT:
          raise KeyboardInterrupt
        return state

      due = evaluators.due(config, done)
      if due and done != total:
        _require_finite(state, ckpt, done, 'evaluation')
        with stats.excluded():
          run_evals(config, method, state, done, workdir, config.evals.model, mesh, writer, due)

    if metrics is not None:
      _require_finite(state, ckpt, total, 'end of training')
      writer.flush()
      ckpt.save(total, state, data_iter)
    ckpt.wait()
    if config.evals.final:
      # The EMA is what the reference evaluates at the end (and what it releases).
      run_evals(config, method, state, total, workdir, 'ema', mesh, writer)
    return state
