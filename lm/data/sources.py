"""Document sources: random-access lists, read lazily, for grain.

For pretraining an item is a text. For post-training it is a list of examples, dicts
of texts such as {'prompt', 'response'} (a JSON line holds one; a stdlib file, all of
its documented functions). Each objective (lm/objectives/) says which of these it reads.

Every source also gives each item a group key; the train/validation split holds out
whole groups (a file, or a stdlib top-level module) by a stable hash of the key, so
the split never changes between runs or resumes.

Every source also records what it read (`files`: {path: [bytes, CRC-32]}, taken in the
one pass at start that checks it), saved with each checkpoint: a run resumes its data
position only in the same files (`check_same_files`).
"""

import ast
import functools
import glob
import hashlib
import json
import math
import operator
import os
import sysconfig
import threading
import zlib

from lm.errors import ConfigError, check_utf8

# Directories of the standard library that are tests or third-party code.
_STDLIB_EXCLUDED_DIRS = {'test', 'tests', 'idle_test', 'site-packages', 'dist-packages',
                         '__pycache__'}


BAD_RECORDS = ('error', 'skip')  # config.data.bad_records


def _screen(items, check, bad_records: str, what: str):
  """The items that `check` (item -> None, or why it is bad) passes. Under 'error' any
  bad item is refused, naming the first and counting all; under 'skip' the bad ones are
  dropped and kept in the second list as (item, why), for the run's log. Done once at
  start, so a bad record never surfaces mid-run."""
  good, skipped = [], []
  for item in items:
    reason = check(item)
    if reason is None:
      good.append(item)
    else:
      skipped.append((item, reason))
  if skipped and bad_records == 'error':
    raise ConfigError(f'{skipped[0][1]} ({len(skipped)} bad {what} in all; fix them, or'
                      ' set config.data.bad_records=skip to leave them out)')
  return good, skipped


class TextFiles:
  """One document per plain-text file (UTF-8)."""

  def __init__(self, paths: list[str], keys: list[str] | None = None,
               bad_records: str = 'error'):
    keys = keys if keys is not None else paths
    self.files = {}
    kept, self.skipped = _screen(list(zip(paths, keys)),
                                 lambda item: _not_utf8(item[0], self.files),
                                 bad_records, 'files')
    self.paths = [path for path, _ in kept]
    self.keys = [key for _, key in kept]

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index: int) -> str:
    with open(self.paths[index], encoding='utf-8') as f:
      return f.read()


def _not_utf8(path: str, files: dict) -> str | None:
  """Why the file is not UTF-8 text, or None; records its size and CRC in `files`."""
  with open(path, 'rb') as f:
    data = f.read()
  files[path] = [len(data), zlib.crc32(data)]
  try:
    data.decode('utf-8')
  except UnicodeDecodeError as error:
    line = data[:error.start].count(b'\n') + 1
    return f'{path}:{line} is not UTF-8 text (byte {error.start})'
  return None


class JsonLines:
  """One record per line of JSON-lines files; an item is the dict of the named fields,
  which every line must have as strings, or with `keep_all` of all of its fields. Every
  line is parsed once at start (see `_screen`). `fields_from` names the config field that
  chose `fields`, if one did."""

  def __init__(self, paths: list[str], fields: tuple[str, ...], keep_all: bool = False,
               bad_records: str = 'error', fields_from: str = '',
               conversations: bool = False, messages: bool = False,
               numbers: tuple[str, ...] = ()):
    self.fields, self.keep_all, self.fields_from = fields, keep_all, fields_from
    self.numbers = numbers  # Optional fields that, where a line has them, are numbers.
    # Post-training lines may hold conversations: any field as a list of messages (TRL's
    # conversational format) and, with `messages`, a whole 'messages' one in their place.
    self.conversations, self.messages = conversations, messages
    locations, self.files = [], {}  # (path, byte offset, line number); as TextFiles'
    for path in paths:
      with open(path, 'rb') as f:
        offset, crc = 0, 0
        for line_number, line in enumerate(f, start=1):
          if line.strip():
            locations.append((path, offset, line_number))
          offset += len(line)
          crc = zlib.crc32(line, crc)
      self.files[path] = [offset, crc]
    self.locations, self.skipped = _screen(locations, self._why_bad, bad_records, 'lines')
    self.keys = [f'{path}:{line_number}' for path, _, line_number in self.locations]

  def __len__(self):
    return len(self.locations)

  def _read(self, location) -> dict:
    """The line's record; raises ConfigError naming file:line and what is wrong."""
    path, offset, line_number = location
    with open(path, 'rb') as f:
      f.seek(offset)
      line = f.readline()
    where = f'{path}:{line_number}'
    try:
      record = json.loads(line.decode('utf-8'))
    except UnicodeDecodeError as error:
      raise ConfigError(f'{where} is not UTF-8 text (byte {error.start})') from error
    except json.JSONDecodeError as error:
      raise ConfigError(f'{where} is not valid JSON: {error}') from error
    if not isinstance(record, dict):
      raise ConfigError(f'{where} is a JSON {type(record).__name__}, not an object')
    for field, value in record.items():
      check_utf8(f'{where}: field {field!r}', value)
    if self.messages and 'messages' in record:
      _check_conversation(record['messages'], f'{where}: field \'messages\'')
      if not any(m['role'] == 'assistant' for m in record['messages']):
        raise ConfigError(f'{where}: field \'messages\' has no assistant message to learn')
      return {'messages': record['messages']}
    for field in self.fields:
      if self.conversations and isinstance(record.get(field), list):
        _check_conversation(record[field], f'{where}: field {field!r}')
        continue
      if field not in record:
        raise ConfigError(f'{where} has no field {field!r} (' + (
            f'{self.fields_from}={field!r}' if self.fields_from else
            f'this objective reads {", ".join(map(repr, self.fields))}') + ')')
      if not isinstance(record[field], str):
        raise ConfigError(f'{where}: field {field!r} is {json.dumps(record[field])[:40]},'
                          ' not a string')
    for field in self.numbers:
      value = record.get(field, 0.0)
      if (isinstance(value, bool) or not isinstance(value, (int, float))
          or not math.isfinite(value)):
        raise ConfigError(f'{where}: field {field!r} is {json.dumps(value)[:40]}, not a'
                          ' finite number')
    return record

  def _why_bad(self, location) -> str | None:
    try:
      self._read(location)
    except ConfigError as error:
      return str(error)
    return None

  def __getitem__(self, index: int) -> dict:
    record = self._read(self.locations[index])
    if self.messages and 'messages' in record:
      return record
    return {**{field: record[field] if isinstance(record[field], list) else str(record[field])
               for field in (record if self.keep_all else self.fields)},
            **{field: float(record[field]) for field in self.numbers if field in record}}


ROLES = ('system', 'user', 'assistant')



def _check_conversation(messages, where: str) -> None:
  """A conversation: a non-empty list of {'role': one of ROLES, 'content': str}."""
  if not isinstance(messages, list) or not messages:
    raise ConfigError(f'{where} is not a non-empty list of messages')
  for i, message in enumerate(messages):
    if not (isinstance(message, dict) and message.get('role') in ROLES
            and isinstance(message.get('content'), str)):
      raise ConfigError(f'{where}: message {i} is {json.dumps(message)[:60]}, not'
                        f' {{"role": one of {"/".join(ROLES)}, "content": a string}}')


class Mapped:
  """source[i] passed through `function` when read; the same keys."""

  def __init__(self, source, function):
    self.source, self.function, self.keys = source, function, source.keys
    self.skipped, self.files = source.skipped, source.files

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


# Parsing is most of what reading a built-in example costs, and a run reads a file again
# each epoch, for validation and on resume (a tiny run: 7 times over): each text's
# functions are kept, by the text's digest.
_FUNCTIONS: dict[bytes, tuple] = {}
_FUNCTIONS_KEPT = 8192  # Above the standard library's files; then it starts afresh.


def documented_functions(text: str) -> list[tuple[str, str, str, str]]:
  """(signature, indent, summary, body) of every documented function of Python source
  `text`, in source order: its `def` line(s), the body's indent, the first paragraph of
  its docstring on one line, and the rest of its body (from the line after the
  docstring); each dedented to column 0."""
  key = hashlib.sha1(text.encode('utf-8', 'surrogatepass')).digest()
  functions = _FUNCTIONS.get(key)
  if functions is None:
    functions = tuple(_parse_functions(text))
    if len(_FUNCTIONS) >= _FUNCTIONS_KEPT:
      _FUNCTIONS.clear()
    _FUNCTIONS[key] = functions
  return list(functions)


def _parse_functions(text: str) -> list[tuple[str, str, str, str]]:
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
        functions.append((node.lineno, signature, indent, summary, body))
  return [function[1:] for function in sorted(functions)]


def function_examples(text: str, *, pairs: bool) -> list[dict[str, str]]:
  """Every documented function of Python source `text` as an SFT example: prompt its
  `def` line(s) and the first paragraph of its docstring, response the rest of its
  body. With `pairs`, DPO examples instead: chosen the body, rejected its lines in
  reverse order. The two hold the same tokens, so only their order can be preferred
  (not length); and no body is both chosen and rejected, as it would be if another
  function's body were the rejected one."""
  functions = [(f'{signature}{indent}"""{summary}"""\n', body)
               for signature, indent, summary, body in documented_functions(text)]
  if not pairs:
    return [{'prompt': prompt, 'response': body} for prompt, body in functions]
  examples = []
  for prompt, body in functions:
    reversed_body = ''.join(line + '\n' for line in reversed(body.splitlines()))
    if reversed_body != body:
      examples.append({'prompt': prompt, 'chosen': body, 'rejected': reversed_body})
  return examples


def chat_examples(text: str) -> list[dict[str, list]]:
  """Every documented function of Python source `text` as a two-turn conversation: the
  user asks for a function with its signature that does what the docstring's first
  paragraph says, the assistant writes it; the user asks for a docstring, the assistant
  writes the function again with it."""
  examples = []
  for signature, indent, summary, body in documented_functions(text):
    examples.append({'messages': [
        {'role': 'user', 'content': f'Write a Python function `{signature.strip()}` that'
                                    f' does this: {summary}'},
        {'role': 'assistant', 'content': signature + body},
        {'role': 'user', 'content': 'Now add a docstring.'},
        {'role': 'assistant', 'content': f'{signature}{indent}"""{summary}"""\n{body}'},
    ]})
  return examples


def stdlib_functions(*, pairs: bool) -> Mapped:
  """Every standard-library file's documented functions (`function_examples`)."""
  return Mapped(stdlib_source(), functools.partial(function_examples, pairs=pairs))


def stdlib_chats() -> Mapped:
  """Every standard-library file's documented functions as conversations (`chat_examples`)."""
  return Mapped(stdlib_source(), chat_examples)


def jsonl_texts(data_config) -> Mapped:
  """Pretraining documents: the `config.data.text_field` of each JSON line."""
  records = JsonLines(expand_paths(data_config.path), (data_config.text_field,),
                      bad_records=data_config.bad_records, fields_from='config.data.text_field')
  return _nonempty(Mapped(records, operator.itemgetter(data_config.text_field)), data_config)


def jsonl_examples(data_config, fields: tuple[str, ...], keep_all: bool = False,
                   messages: bool = False, numbers: tuple[str, ...] = ()) -> Mapped:
  """Post-training examples from config.data.path, one per JSON line, each with
  `fields` (or all of the line's, with `keep_all`), as one-example lists; a field may be
  a conversation (a list of messages), or with `messages` the line one 'messages'
  conversation in their place; `numbers` are optional numeric fields."""
  records = JsonLines(expand_paths(data_config.path), fields, keep_all,
                      bad_records=data_config.bad_records, conversations=True,
                      messages=messages, numbers=numbers)
  return _nonempty(Mapped(records, _one_example), data_config)


def _one_example(record: dict[str, str]) -> list[dict[str, str]]:
  return [record]


def _nonempty(source, data_config):
  if not len(source):
    raise ConfigError(f'config.data.path={data_config.path!r} holds no JSON lines')
  return source


def check_same_files(saved: dict, files: dict, step: int, directory: str) -> None:
  """Raises ConfigError naming the first file that the checkpoint at `step` read and the
  source now reads otherwise (changed, gone, or new): the saved data position counts
  items of the old contents, and would resume silently elsewhere in the new."""
  changes = [(path, 'changed since' if path in files else 'is no longer read, but was at')
             for path in saved if files.get(path, saved[path]) != saved[path]
             or path not in files]
  changes += [(path, 'is read now, but was not at') for path in files if path not in saved]
  if changes:
    path, what = changes[0]
    raise ConfigError(
        f'config.data: the file {path} {what} checkpoint step {step} in {directory}'
        f' ({len(changes)} file(s) differ): the saved data position is one in the old'
        ' contents; restore them, or start a new --workdir')


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
