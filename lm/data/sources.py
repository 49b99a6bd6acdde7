"""Document sources: random-access lists of texts, read lazily, for grain.

Every source also gives each document a group key; the train/validation split
holds out whole groups (a file, or a stdlib top-level module) by a stable hash of
the key, so the split never changes between runs or resumes.
"""

import glob
import json
import os
import sysconfig
import zlib

from lm.errors import ConfigError

# Directories of the standard library that are tests or third-party code.
_STDLIB_EXCLUDED_DIRS = {'test', 'tests', 'idle_test', 'site-packages', 'dist-packages',
                         '__pycache__'}


class TextFiles:
  """One document per plain-text file."""

  def __init__(self, paths: list[str], keys: list[str] | None = None):
    self.paths = paths
    self.keys = keys if keys is not None else paths

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index: int) -> str:
    with open(self.paths[index], encoding='utf-8', errors='replace') as f:
      return f.read()


class JsonLines:
  """One document per line of JSON-lines files, the text in a named field."""

  def __init__(self, paths: list[str], text_field: str):
    self.text_field = text_field
    self.locations = []  # (path, byte offset, line number)
    for path in paths:
      with open(path, 'rb') as f:
        offset = 0
        for line_number, line in enumerate(f, start=1):
          if line.strip():
            self.locations.append((path, offset, line_number))
          offset += len(line)
    self.keys = [f'{path}:{line_number}' for path, _, line_number in self.locations]

  def __len__(self):
    return len(self.locations)

  def __getitem__(self, index: int) -> str:
    path, offset, line_number = self.locations[index]
    with open(path, 'rb') as f:
      f.seek(offset)
      line = f.readline()
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise ConfigError(f'{path}:{line_number} is not valid JSON: {error}') from error
    if not isinstance(record, dict) or self.text_field not in record:
      raise ConfigError(f'{path}:{line_number} has no field {self.text_field!r}'
                       ' (config.data.text_field)')
    return str(record[self.text_field])


class Subset:
  def __init__(self, source, indices: list[int]):
    self.source, self.indices = source, indices

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, index: int) -> str:
    return self.source[self.indices[index]]


def expand_paths(pattern: str) -> list[str]:
  """Comma-separated files or globs -> sorted file list; errors name the field."""
  if not pattern:
    raise ConfigError('config.data.path is empty; give files or globs (comma-separated)')
  paths = []
  for part in pattern.split(','):
    matches = sorted(p for p in glob.glob(os.path.expanduser(part.strip()), recursive=True)
                     if os.path.isfile(p))
    if not matches:
      raise ConfigError(f'config.data.path: {part.strip()!r} matches no files')
    paths.extend(matches)
  if not any(os.path.getsize(p) for p in paths):
    raise ConfigError(f'config.data.path={pattern!r}: every file is empty')
  return paths


def stdlib_source() -> TextFiles:
  """The Python standard library's own .py files, tests excluded: on every machine."""
  root = sysconfig.get_paths()['stdlib']
  paths, keys = [], []
  for directory, subdirectories, files in os.walk(root):
    subdirectories[:] = sorted(d for d in subdirectories if d not in _STDLIB_EXCLUDED_DIRS)
    for name in sorted(files):
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        relative = os.path.relpath(path, root)
        paths.append(path)
        keys.append(relative.split(os.sep)[0].removesuffix('.py'))  # top-level module
  if not paths:
    raise ConfigError(f'no standard-library sources under {root}')
  return TextFiles(paths, keys)


def build(data_config):
  """From `config.data`: source 'stdlib', 'text' (files/globs) or 'jsonl'."""
  if data_config.source == 'stdlib':
    return stdlib_source()
  if data_config.source == 'text':
    return TextFiles(expand_paths(data_config.path))
  if data_config.source == 'jsonl':
    source = JsonLines(expand_paths(data_config.path), data_config.text_field)
    if not len(source):
      raise ConfigError(f'config.data.path={data_config.path!r} holds no JSON lines')
    return source
  raise ConfigError(f'config.data.source={data_config.source!r} is not one of'
                   ' "stdlib", "text", "jsonl"')


def is_validation(key: str, fraction: float) -> bool:
  return zlib.crc32(key.encode('utf-8')) % 10_000 < fraction * 10_000


def split(source, validation_fraction: float) -> tuple[Subset, Subset]:
  """Holds out whole groups of documents (same key) for validation."""
  train, validation = [], []
  for index, key in enumerate(source.keys):
    (validation if is_validation(key, validation_fraction) else train).append(index)
  if not train or not validation:
    raise ConfigError(
        f'config.data.validation_fraction={validation_fraction} leaves'
        f' {len(train)} training and {len(validation)} validation documents out of'
        f' {len(source)}; both need at least one')
  return Subset(source, train), Subset(source, validation)
