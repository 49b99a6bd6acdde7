"""Document sources: random-access lists, read lazily, for grain.

For pretraining an item is a text. For post-training it is a list of examples, dicts
of texts such as {'prompt', 'response'} (a JSON line holds one; a stdlib file, all of
its documented functions). Each objective (lm/objectives/) says which of these it reads.

Every source also gives each item a group key; the train/validation split holds out
whole groups (a file, or a stdlib top-level module) by a stable hash of the key, so
the split never changes between runs or resumes.
"""

import ast
import functools
import glob
import json
import operator
import os
import sysconfig
import threading
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
  """One record per line of JSON-lines files; an item is the dict of the named fields,
  which every line must have, or with `keep_all` of all of its fields."""

  def __init__(self, paths: list[str], fields: tuple[str, ...], keep_all: bool = False):
    self.fields, self.keep_all = fields, keep_all
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

  def __getitem__(self, index: int) -> dict[str, str]:
    path, offset, line_number = self.locations[index]
    with open(path, 'rb') as f:
      f.seek(offset)
      line = f.readline()
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise ConfigError(f'{path}:{line_number} is not valid JSON: {error}') from error
    missing = [field for field in self.fields
               if not isinstance(record, dict) or field not in record]
    if missing:
      raise ConfigError(f'{path}:{line_number} has no field {missing[0]!r} (this objective'
                        f' reads {", ".join(map(repr, self.fields))})')
    return {field: str(record[field]) for field in (record if self.keep_all else self.fields)}


class Mapped:
  """source[i] passed through `function` when read; the same keys."""

  def __init__(self, source, function):
    self.source, self.function, self.keys = source, function, source.keys

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index: int):
    return self.function(self.source[index])


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


# grain reads items from several threads, and CPython 3.11's parser is not thread-safe
# ("SystemError: AST constructor recursion depth mismatch"); it holds the GIL anyway.
AST_LOCK = threading.Lock()


def _dedent(lines: list[str], indent: int) -> str:
  # Blank lines may be shorter than the indent; lines inside strings may start anywhere.
  return ''.join((line[indent:] if not line[:indent].strip() else line) or '\n'
                 for line in lines)


def function_examples(text: str, *, pairs: bool) -> list[dict[str, str]]:
  """Every documented function of Python source `text` as an SFT example: prompt its
  `def` line(s) and the first paragraph of its docstring, response the rest of its
  body. With `pairs`, DPO examples instead: chosen the body, rejected its lines in
  reverse order. The two hold the same tokens, so only their order can be preferred
  (not length); and no body is both chosen and rejected, as it would be if another
  function's body were the rejected one."""
  try:
    with AST_LOCK:
      tree = ast.parse(text)
  except (SyntaxError, ValueError):  # Not Python this interpreter reads: no examples.
    return []
  lines = text.splitlines(keepends=True)
  functions = []
  for node in ast.walk(tree):
    docstring = (ast.get_docstring(node)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
    if docstring and len(node.body) > 1:
      first, second = node.body[0], node.body[1]
      indent = ' ' * (first.col_offset - node.col_offset)
      summary = ' '.join(docstring.split('\n\n')[0].split()).replace('"' * 3, "'" * 3)
      signature = _dedent(lines[node.lineno - 1:first.lineno - 1], node.col_offset)
      # From the line after the docstring: a body statement sharing its line is rare.
      body = _dedent(lines[first.end_lineno:node.end_lineno], node.col_offset)
      if second.lineno > first.end_lineno and body.strip():
        functions.append((node.lineno, f'{signature}{indent}"""{summary}"""\n', body))
  functions.sort()
  if not pairs:
    return [{'prompt': prompt, 'response': body} for _, prompt, body in functions]
  examples = []
  for _, prompt, body in functions:
    reversed_body = ''.join(line + '\n' for line in reversed(body.splitlines()))
    if reversed_body != body:
      examples.append({'prompt': prompt, 'chosen': body, 'rejected': reversed_body})
  return examples


def stdlib_functions(*, pairs: bool) -> Mapped:
  """Every standard-library file's documented functions (`function_examples`)."""
  return Mapped(stdlib_source(), functools.partial(function_examples, pairs=pairs))


def jsonl_texts(data_config) -> Mapped:
  """Pretraining documents: the `config.data.text_field` of each JSON line."""
  records = JsonLines(expand_paths(data_config.path), (data_config.text_field,))
  return _nonempty(Mapped(records, operator.itemgetter(data_config.text_field)), data_config)


def jsonl_examples(data_config, fields: tuple[str, ...], keep_all: bool = False) -> Mapped:
  """Post-training examples from config.data.path, one per JSON line, each with
  `fields` (or all of the line's, with `keep_all`), as one-example lists."""
  records = JsonLines(expand_paths(data_config.path), fields, keep_all)
  return _nonempty(Mapped(records, _one_example), data_config)


def _one_example(record: dict[str, str]) -> list[dict[str, str]]:
  return [record]


def _nonempty(source, data_config):
  if not len(source):
    raise ConfigError(f'config.data.path={data_config.path!r} holds no JSON lines')
  return source


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
