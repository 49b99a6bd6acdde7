"""The results file of `experiments.evaluate`, <workdir>/eval/step_<step>.json: one entry per
task with the settings it was evaluated with, so runs on the same checkpoint add up; and,
on request, each record's samples beside it."""

import json
import os
import re

from lm.errors import ConfigError, open_own


def path(workdir: str, step: int) -> str:
  return os.path.join(workdir, 'eval', f'step_{step}.json')


def save(path: str, step: int, metrics_by_task: dict[str, dict], settings: dict) -> None:
  """Writes each task's metrics with `settings` into the file at `path`: a task evaluated
  again replaces its entry, the others are kept. `settings` is also kept at the top, as the
  latest run's."""
  try:
    merged = {}
    if os.path.exists(path):
      with open(path) as f:
        previous = json.load(f)
      # Files written before results carried their settings hold them once, at the top.
      merged = {name: {**entry, 'settings': entry.get('settings', previous.get('settings'))}
                for name, entry in previous['results'].items()}
    merged.update({name: {**metrics, 'settings': settings}
                   for name, metrics in metrics_by_task.items()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open_own(path + '.tmp') as f:
      json.dump({'step': step, 'settings': settings, 'results': merged}, f, indent=2)
    os.replace(path + '.tmp', path)  # Atomic: a reader never sees half a file.
  except ConfigError:
    raise
  except OSError as error:
    raise ConfigError(f'could not write the results to {path}: {error}') from error
  except ValueError as error:
    raise ConfigError(f'could not add the results to {path}: it is not valid JSON'
                      f' ({error})') from error


def samples_directory(workdir: str, step: int) -> str:
  return os.path.join(workdir, 'eval', f'step_{step}_samples')


def save_samples(directory: str, samples_by_task: dict[str, list[dict]]) -> None:
  """Each task's per-record samples as <directory>/<task>.jsonl (the task's name with any
  character a file name should not hold replaced by '_'), one JSON object a line."""
  try:
    os.makedirs(directory, exist_ok=True)
    for name, samples in samples_by_task.items():
      file = os.path.join(directory, re.sub(r'[^A-Za-z0-9_.-]', '_', name) + '.jsonl')
      with open_own(file + '.tmp') as f:
        f.writelines(json.dumps(sample) + '\n' for sample in samples)
      os.replace(file + '.tmp', file)
  except OSError as error:
    raise ConfigError(f'could not write the samples to {directory}: {error}') from error
