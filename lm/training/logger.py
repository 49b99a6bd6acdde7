"""One logger for console (progress bar + lines), TensorBoard (`<workdir>/tensorboard`)
and `<workdir>/metrics.jsonl` (a JSON line per logged step, for plots: read_metrics)."""

import json
import math
import os
import sys

import tqdm

from lm.errors import open_own

_CONSOLE_FORMATS = {
    'loss': '{:.4f}', 'eval_loss': '{:.4f}', 'eval_perplexity': '{:.2f}',
    'learning_rate': '{:.2e}', 'tokens_per_second': '{:,.0f}', 'mfu': '{:.1%}',
    'reward_accuracy': '{:.1%}', 'eval_reward_accuracy': '{:.1%}',
    'reward_margin': '{:.3f}', 'eval_reward_margin': '{:.3f}', 'eval_chosen_nll': '{:.3f}',
    'reward': '{:.3f}', 'eval_reward': '{:.3f}', 'kl': '{:.4f}', 'eval_kl': '{:.4f}',
    'clipped': '{:.1%}', 'accuracy': '{:.1%}', 'eval_accuracy': '{:.1%}',
    'margin': '{:.3f}', 'eval_margin': '{:.3f}', 'sampled_tokens_per_second': '{:,.0f}',
    'update_tokens_per_second': '{:,.0f}',
    'finished': '{:.0%}', 'eval_finished': '{:.0%}', 'eval_completion_length': '{:.0f}',
}


METRICS_FILE = 'metrics.jsonl'


def read_metrics(workdir: str) -> dict[str, tuple[list[int], list[float]]]:
  """{metric: (steps, values)} of a run's logged steps, in step order. A step logged
  twice (a run resumed from before it) keeps its last value."""
  by_step: dict[int, dict] = {}
  path = os.path.join(workdir, METRICS_FILE)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:  # A last line cut short by a kill.
          continue
        by_step.setdefault(row.pop('step'), {}).update(row)
  series: dict[str, tuple[list[int], list[float]]] = {}
  for step in sorted(by_step):
    for name, value in by_step[step].items():
      steps, values = series.setdefault(name, ([], []))
      steps.append(step)
      values.append(value)
  return series


def _tensorboardx():
  """tensorboardX, imported by the process that logs, when it first logs. Where torch is
  installed, tensorboardX imports it to accept its tensors, which lm never logs: seconds
  at the start of every run (4 s of a test's 19). It is imported with torch hidden,
  unless torch is already in."""
  if 'torch' in sys.modules:
    import tensorboardX  # pylint: disable=import-outside-toplevel
    return tensorboardX
  sys.modules['torch'] = None  # An import of it fails, as if it were not installed.
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules['torch']
  return tensorboardX


class MetricLogger:

  def __init__(self, workdir: str, initial_step: int, total_steps: int, enabled: bool = True):
    self.enabled = enabled  # Only the first process logs.
    if not enabled:
      return
    self.writer = _tensorboardx().SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self.lines = open_own(os.path.join(workdir, METRICS_FILE), 'a')
    self.progress = tqdm.tqdm(total=total_steps, initial=initial_step, unit='step',
                              dynamic_ncols=True, mininterval=1.0)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    """Flat dict of scalars -> TensorBoard, progress-bar postfix and a console line."""
    if not self.enabled:
      return
    for name, value in metrics.items():
      self.writer.add_scalar(name, value, step)
    self.writer.flush()
    finite = {name: float(value) for name, value in metrics.items() if math.isfinite(value)}
    self.lines.write(json.dumps({'step': step, **finite}) + '\n')
    self.lines.flush()
    shown = {name: _CONSOLE_FORMATS[name].format(value)
             for name, value in metrics.items() if name in _CONSOLE_FORMATS}
    self.progress.set_postfix(shown, refresh=False)
    self.progress.write(f'step {step}: ' + ', '.join(f'{k}={v}' for k, v in shown.items()))

  def advance(self, step: int) -> None:
    if self.enabled:
      self.progress.update(step - self.progress.n)

  def print(self, text: str) -> None:
    if self.enabled:
      self.progress.write(text)

  def __enter__(self):
    return self

  def __exit__(self, error_type, *_):
    if error_type is not None:  # The error's message then prints below the progress bar.
      self.close()

  def close(self) -> None:
    if self.enabled:
      self.progress.close()
      self.writer.close()
      self.lines.close()
