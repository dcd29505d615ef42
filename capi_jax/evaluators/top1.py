"""'finetune_top1': top-1 / top-5 accuracy of a classifier's logits, every image counted once.

The fine-tuned model's evaluation (CAE v2's `engine_for_finetuning.evaluate`: the eval
transform Resize(S / 0.875) bicubic + CenterCrop(S), `timm.utils.accuracy`): the evaluated
model's global representation is its logits (`methods/finetune`'s `LogitsModel`). The test set
is read with `datasets.stream`, which pads the last batch and checks that every position was
read exactly once, so the accuracy is over exactly the set's images (the release's
`DistributedSampler` pads by repeating images when the set does not divide over the GPUs).
Labels: the set's `labels` file (any of several valid labels) or the source's; `class_map`
keeps chosen logit columns. Results: 'top1', 'top5' in [0, 1]; details: 'images' (how many
were scored).
"""

import dataclasses
from typing import Any, ClassVar

import numpy as np

from capi_jax.evaluators import datasets
from capi_jax.evaluators import protocol


def topk_correct(logits: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
  """(n, C) logits, (n, A) valid labels padded with -1 -> (n,) bool: a valid label in the top k."""
  top = np.argsort(-logits, axis=1, kind='stable')[:, :k]
  return np.any((top[:, :, None] == targets[:, None, :]) & (targets[:, None, :] >= 0), axis=(1, 2))


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Top1(protocol.Protocol):
  """Accuracy of the logits on one test set (see the module docstring)."""
  name: ClassVar[str] = 'finetune_top1'

  test: Any  # Image set {dataset, split[, labels, class_map]}.
  resolution: int

  def check(self, p: protocol.Problems, key: str, model: protocol.ModelShape | None) -> None:
    datasets.check_set(p, f'{key}.test', self.test)
    p.number(f'{key}.resolution', self.resolution, 1, integer=True)

  def run(self, backbone, env, out_dir, log):
    del out_dir
    data = datasets.classif_set('finetune_top1', self.test, env.data_dir)
    res = self.resolution
    batches = datasets.stream(data, np.arange(len(data)), backbone.batch_size,
                              datasets.ClassifTransform(res), res, seed=env.seed,
                              num_workers=env.num_workers)
    out = backbone.extract(batches, ('global_repr',))
    logits = out['global_repr']
    if data.class_map is not None:
      logits = logits[:, data.class_map]
    targets = out['targets']
    scored = np.any(targets >= 0, axis=1)
    logits, targets = logits[scored], targets[scored]
    results = {f'top{k}': float(topk_correct(logits, targets, k).mean())
               for k in (1, 5) if k <= logits.shape[1]}
    log(f'finetune_top1: {len(logits)} images scored, top-1 {results["top1"]:.4f}')
    return results, {'images': int(len(logits))}
