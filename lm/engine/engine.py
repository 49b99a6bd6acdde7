"""A generation engine: continuous batching over a paged KV cache.

A fixed number of slots (rows of every compiled call) and a fixed pool of pages, so two
programs serve every request: a prefill chunk ([slots, chunk] tokens) and a decode step
([slots, 1]). Each `step()`:
1. admits waiting requests into free slots (first come, first served) while their pages
   fit: the pages of prompt + max_tokens, reserved at admission, so a running request
   never waits for memory (whole pages of prompt already cached are shared, not taken);
2. runs one prefill chunk for every slot with prompt left (so a long prompt advances a
   chunk per step beside the running batch rather than stalling it), sampling the first
   token of each prompt that ends in it;
3. runs one decode step for every slot with a sampled token to feed;
4. reports each request's new tokens and text, and frees the slots and pages of those
   that ended (a stop id, a stop string, max_tokens, or `cancel`).

Sampling is per request (temperature, top-k, top-p, seed; lm.sampling.sample_rows): token
i of a request draws with its seed folded with i, so what a request gets does not depend
on what else shares the batch, and greedy decoding gives what lm.sampling.generate gives.

Prefix caching: a whole page of prompt, once written, is kept under a key of its tokens
and all before them (lm/engine/pages.py); a later prompt with that prefix points its table
at the same pages and skips their prefill. A request waits (one chunk) for a prefix page
that an earlier request is still writing, so a group of equal prompts (GRPO's) prefills
once. The last prompt token is always recomputed, for its logits: where it falls in a
shared page, the page is copied first (copy on write). Models with Mamba layers keep a
state per slot beside the pages (reset when a slot takes a new request) and share no
prefixes: their state is not in pages.
"""

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lm import models, sampling, sharding
from lm.engine import pages as pages_lib
from lm.models import transformer

_PAGE_LEAVES = ('key_pages', 'value_pages')
# A call's fixed cost, in rows x table pages (on the CPU a call of 32 rows over 4 pages
# took 2.8 ms, over 48 pages 13.5 ms: about 240 row-pages of fixed time).
_CALL_COST = 256


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_tokens: int = 16
  temperature: float = 0.0  # 0: greedy.
  top_k: int = 0  # 0: off.
  top_p: float = 1.0  # 1: off.
  seed: int = 0
  key: tuple[int, ...] | None = None  # A key's data (jax.random.key_data) to draw with, for the seed's.
  stop: tuple[str, ...] = ()  # The completion ends before the first of these.
  stop_ids: tuple[int, ...] | None = None  # None: the tokenizer's.

  def problem(self) -> str | None:
    """What is wrong with these options, in one line, or None."""
    if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
      return f'max_tokens={self.max_tokens!r} must be an integer >= 1'
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      return f'temperature={self.temperature!r} must be a number >= 0 (0: greedy)'
    if not isinstance(self.top_k, int) or self.top_k < 0:
      return f'top_k={self.top_k!r} must be an integer >= 0 (0: off)'
    if not 0 < self.top_p <= 1:
      return f'top_p={self.top_p!r} must be in (0, 1] (1: off)'
    if not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
      return f'seed={self.seed!r} must be an integer in [0, 2**31)'
    if any(not isinstance(s, str) or not s for s in self.stop):
      return f'stop={self.stop!r} must be non-empty strings'
    return None


@dataclasses.dataclass
class Output:
  """What one step did for one request."""
  request_id: int
  token_ids: list[int]  # New this step (a stop id included).
  text: str  # New this step: whole characters, less what may yet begin a stop string.
  finished: bool = False
  finish_reason: str | None = None  # 'stop' or 'length' once finished.


@dataclasses.dataclass
class Completion:
  request_id: int
  prompt_ids: list[int]
  token_ids: list[int]
  text: str
  finish_reason: str


@dataclasses.dataclass
class _Request:
  id: int
  prompt: list[int]
  params: SamplingParams
  stop_ids: frozenset
  slot: int = -1
  pages: list = dataclasses.field(default_factory=list)
  computed: int = 0  # Prompt tokens in the cache.
  generated: list = dataclasses.field(default_factory=list)
  sent: int = 0  # Characters of text reported.
  text: str = ''  # The completion's text so far (less a character not yet whole).
  ids: list = dataclasses.field(default_factory=list)  # Its ids, less stop ids.
  prefix_offset: int = 0  # ids[prefix_offset:read_offset]: the context of the next decode.
  read_offset: int = 0
  pending_keys: dict = dataclasses.field(default_factory=dict)  # Page index -> prefix key.
  key_data: np.ndarray | None = None  # The sampling key's data.

  @property
  def prefilling(self) -> bool:
    return self.computed < len(self.prompt)


class Engine:
  """Requests in (`add`), tokens and text out (`step`). Not thread-safe: one thread
  drives it (lm/serving's runner does, for the server). With `tokenizer` None, requests
  give their stop ids and get ids alone."""

  def __init__(self, model, params, tokenizer, *, slots: int = 8, page_size: int = 16,
               num_pages: int | None = None, max_length: int | None = None, chunk: int = 64,
               prefix_caching: bool = True, split_rows: bool = True):
    cfg = model.config
    self.model, self.tokenizer = model, tokenizer
    self.max_length = max_length or cfg.max_seq_len
    if not 1 <= self.max_length <= cfg.max_seq_len:
      raise ValueError(f'max_length={self.max_length} must be in [1, the model\'s '
                       f'max_seq_len={cfg.max_seq_len}]')
    if cfg.get('kv_cache_dtype', ''):
      raise ValueError(f'kv_cache_dtype={cfg.kv_cache_dtype!r}: the engine\'s pages hold the'
                       ' compute dtype')
    self.slots, self.page_size, self.chunk = slots, page_size, chunk
    self.pages_per_row = -(-self.max_length // page_size)
    num_pages = num_pages or slots * self.pages_per_row + 1
    self.pool = pages_lib.PagePool(num_pages, page_size)
    self.load(params)
    self.cache = self._empty_cache(num_pages)
    # State kept per slot (Mamba's) is not in pages: no prefix of it can be shared.
    self._slot_state = self._has_slot_state()
    self._multiple = sharding.rows_multiple()  # Rows of a call split over the mesh's devices.
    # Calls of part of the slots, and decoding split by width: faster steps, more shapes
    # to compile (a run of short rollouts may rather compile fewer).
    self.split_rows = split_rows
    self.prefix_caching = prefix_caching and not self._slot_state
    self._table = np.zeros((slots, self.pages_per_row), np.int32)
    self._running: list[_Request | None] = [None] * slots
    self._waiting: collections.deque[_Request] = collections.deque()
    self._writing = {}  # Prefix key -> the request writing that page now.
    self._next_id = 0
    self._forward = jax.jit(self._forward_impl, donate_argnums=(1,))
    self._reset_slots = jax.jit(self._reset_slots_impl, donate_argnums=(0,))
    self._copy_page = jax.jit(self._copy_page_impl, donate_argnums=(0,))

  def load(self, params) -> None:
    """Generates with `params` from the next step (a policy's, updated between rollouts).
    Cached prefix pages were computed with the old ones: dropped."""
    self.params = sampling.cast_weights(params, self.model.config.dtype)
    if hasattr(self, 'pool'):
      self.pool.clear_cache()

  # Requests.

  def add(self, prompt_ids: list[int], params: SamplingParams = SamplingParams()) -> int:
    """Queues a request; returns its id. A prompt that cannot fit, or bad options, raise
    ValueError with one line."""
    problem = params.problem()
    if problem:
      raise ValueError(problem)
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
      raise ValueError('the prompt needs at least one token')
    if len(prompt) + params.max_tokens > self.max_length:
      raise ValueError(f'the prompt\'s {len(prompt)} tokens + max_tokens={params.max_tokens}'
                       f' exceed the context of {self.max_length} tokens')
    if any(not 0 <= t < self.model.config.vocab_size for t in prompt):
      raise ValueError(f'prompt ids must be in [0, {self.model.config.vocab_size})')
    pages = -(-(len(prompt) + params.max_tokens) // self.page_size)
    if pages > self.pool.num_pages - 1:  # It would wait for ever.
      raise ValueError(f'the prompt\'s {len(prompt)} tokens + max_tokens={params.max_tokens}'
                       f' need {pages} pages of {self.page_size}; the engine has'
                       f' {self.pool.num_pages - 1}')
    stop_ids = self.tokenizer.stop_ids if params.stop_ids is None else params.stop_ids
    request = _Request(self._next_id, prompt, params, frozenset(int(t) for t in stop_ids))
    request.key_data = (np.asarray(params.key, np.uint32) if params.key is not None else
                        np.asarray(jax.random.key_data(jax.random.key(params.seed))))
    self._next_id += 1
    self._waiting.append(request)
    return request.id

  def cancel(self, request_id: int) -> None:
    """Drops a request, waiting or running, and frees its pages now."""
    for request in self._waiting:
      if request.id == request_id:
        self._waiting.remove(request)
        return
    for request in self._running:
      if request is not None and request.id == request_id:
        self._finish(request)
        return

  def has_work(self) -> bool:
    return bool(self._waiting) or any(r is not None for r in self._running)

  def generate(self, prompts: list[list[int]], params) -> list[Completion]:
    """Runs `prompts` (with one SamplingParams, or one each) to the end, in order."""
    params = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
    ids = [self.add(prompt, options) for prompt, options in zip(prompts, params)]
    prompts_by_id = dict(zip(ids, prompts))
    tokens, texts = collections.defaultdict(list), collections.defaultdict(str)
    reasons = {}
    while self.has_work():
      for output in self.step():
        tokens[output.request_id] += output.token_ids
        texts[output.request_id] += output.text
        if output.finished:
          reasons[output.request_id] = output.finish_reason
    return [Completion(i, list(prompts_by_id[i]), tokens[i], texts[i], reasons[i]) for i in ids]

  # The loop.

  def step(self) -> list[Output]:
    self._admit()
    outputs = {}
    prefilling = [r for r in self._running if r is not None and r.prefilling]
    if prefilling:
      self._prefill(prefilling, outputs)
    decoding = [r for r in self._running if r is not None and not r.prefilling]
    if decoding:
      self._decode(decoding, outputs)
    self._admit()  # Into slots just freed, and behind prefix pages just written.
    return list(outputs.values())

  def _admit(self) -> None:
    while self._waiting and None in self._running:
      request = self._waiting[0]
      if not self._place(request, self._running.index(None)):
        return  # First come, first served: the next waits for this one.
      self._waiting.popleft()

  def _place(self, request: _Request, slot: int) -> bool:
    """Gives `request` the slot and its pages, sharing cached prefix pages; False (nothing
    taken) when its pages do not fit now or a prefix page it could share is being written."""
    size, prompt = self.page_size, request.prompt
    shared, key, keys = [], None, {}
    for index in range(len(prompt) // size if self.prefix_caching else 0):
      key = self.pool.key(key, prompt[index * size:(index + 1) * size])
      page = self.pool.lookup(key) if len(shared) == index else None
      if page is not None:
        shared.append(page)
      elif key in self._writing:
        return False  # Shared in a chunk's time, rather than written twice.
      else:
        keys[index] = key
    needed = -(-(len(prompt) + request.params.max_tokens) // size)
    for page in shared:
      self.pool.hold(page)
    computed = len(shared) * size
    copy = computed == len(prompt)  # The last prompt token is recomputed, in a shared page.
    try:
      own = self.pool.allocate(needed - len(shared) + copy)
    except pages_lib.OutOfPages:
      self.pool.release(shared)
      return False
    if copy:
      self.cache = self._copy_page(self.cache, shared[-1], own[0])
      self.pool.release([shared.pop()])
      shared.append(own.pop(0))
      computed -= 1
    request.slot, request.pages, request.computed = slot, shared + own, computed
    request.pending_keys = keys
    for key in keys.values():
      self._writing[key] = request
    self._running[slot] = request
    self._table[slot] = 0
    self._table[slot, :len(request.pages)] = request.pages
    if self._slot_state:
      mask = np.zeros(self.slots, bool)
      mask[slot] = True
      self.cache = self._reset_slots(self.cache, mask)
    return True

  def _prefill(self, requests: list[_Request], outputs: dict) -> None:
    pieces = [r.prompt[r.computed:r.computed + self.chunk] for r in requests]
    ids = self._run(requests, [r.computed for r in requests], pieces, self.chunk)
    for request, token in zip(requests, ids):
      request.computed = min(request.computed + self.chunk, len(request.prompt))
      self._cache_written_pages(request)
      if not request.prefilling:  # The prompt's last token was in this chunk.
        self._accept(request, token, outputs)

  def _decode(self, requests: list[_Request], outputs: dict) -> None:
    for group in self._width_groups(requests):
      ids = self._run(group, [len(r.prompt) + len(r.generated) - 1 for r in group],
                      [[r.generated[-1]] for r in group], 1)
      for request, token in zip(group, ids):
        self._accept(request, token, outputs)

  def _width(self, end: int) -> int:
    """Table pages for positions below `end`, rounded up to a power of two: attention
    reads no page past it, at a few compiled widths."""
    needed = -(-end // self.page_size)
    return min(1 << (needed - 1).bit_length(), self.pages_per_row)

  def _rows(self, count: int) -> int:
    """Rows of a call holding `count` requests: a quarter, half or all of the slots (per
    slot state keeps all: a row is its slot)."""
    if self._slot_state or not self.split_rows:
      return self.slots
    sizes = [-(-max(self.slots // d, 1) // self._multiple) * self._multiple for d in (4, 2, 1)]
    return min(size for size in sizes + [self.slots] if size >= count)

  def _width_groups(self, requests: list[_Request]) -> list[list[_Request]]:
    """The decoding requests in one call, or two: the narrow ones apart from the widest
    when that costs less (a call costs about its rows x table pages, plus a fixed part),
    so that one long request does not widen every row's attention."""
    if self._slot_state or not self.split_rows or len(requests) < 2:
      return [requests]
    ranked = sorted(requests, key=lambda r: len(r.prompt) + len(r.generated))
    widths = [self._width(len(r.prompt) + len(r.generated)) for r in ranked]
    cost = lambda part, width: self._rows(len(part)) * width + _CALL_COST
    best, split = cost(ranked, widths[-1]), None
    for k in range(1, len(ranked)):
      if widths[k] != widths[k - 1]:  # A split between two widths.
        both = cost(ranked[:k], widths[k - 1]) + cost(ranked[k:], widths[-1])
        if both < best:
          best, split = both, k
    return [ranked] if split is None else [ranked[:split], ranked[split:]]

  def _run(self, requests: list[_Request], starts: list[int], pieces: list[list[int]],
           length: int) -> list[int]:
    """One compiled call: each request's `piece` of tokens from position `start` (a
    prefill chunk, or the token to decode), in rows of [rows, length]; the id each samples
    next."""
    rows = self._rows(len(requests))
    place = ([r.slot for r in requests] if self._slot_state else list(range(len(requests))))
    tokens, positions, segments = (np.zeros((rows, length), np.int32) for _ in range(3))
    last, counts, top_k = (np.zeros(rows, np.int32) for _ in range(3))
    temperature, top_p = np.zeros(rows, np.float32), np.ones(rows, np.float32)
    keys = np.zeros((rows,) + requests[0].key_data.shape, np.uint32)
    table = np.zeros((rows, self.pages_per_row), np.int32)  # Padding rows: the null page.
    for row, request, start, piece in zip(place, requests, starts, pieces):
      tokens[row, :len(piece)] = piece
      positions[row, :len(piece)] = np.arange(start, start + len(piece))
      segments[row, :len(piece)] = 1
      last[row] = len(piece) - 1
      options = request.params
      temperature[row], top_k[row], top_p[row] = options.temperature, options.top_k, options.top_p
      keys[row], counts[row] = request.key_data, len(request.generated)
      table[row] = self._table[request.slot]
    width = self._width(max(start + len(piece) for start, piece in zip(starts, pieces)))
    ids, self.cache = self._forward(self.params, self.cache, tokens, positions, segments,
                                    table[:, :width], last, keys, counts, temperature,
                                    top_k, top_p)
    ids = np.asarray(ids)
    return [int(ids[row]) for row in place]

  def _forward_impl(self, params, cache, tokens_bt, positions_bt, segments_bt, table_bm,
                    last_b, key_data_b, counts_b, temperature_b, top_k_b, top_p_b):
    layout = transformer.Pages(table_bm, self.pool.num_pages, self.page_size)
    logits_btv, variables = self.model.apply(
        {'params': params, 'cache': cache}, tokens_bt, segments_bt, positions_bt,
        decode=layout, mutable=['cache'])
    logits_bv = logits_btv[jnp.arange(tokens_bt.shape[0]), last_b]
    ids_b = sampling.sample_rows(logits_bv, jax.random.wrap_key_data(key_data_b), counts_b,
                                 temperature_b, top_k_b, top_p_b)
    return ids_b, variables['cache']

  # A request's tokens, text and end.

  def _accept(self, request: _Request, token: int, outputs: dict) -> None:
    request.generated.append(token)
    output = outputs.setdefault(request.id, Output(request.id, [], ''))
    output.token_ids.append(token)
    reason = None
    if token in request.stop_ids:
      reason = 'stop'
    elif len(request.generated) >= request.params.max_tokens:
      reason = 'length'
    if self.tokenizer is not None:  # Else ids alone (training's rollouts).
      self._detokenize(request, token, flush=reason is not None)
    text = request.text
    cut = _first_stop(text, request.params.stop)
    if cut is not None:
      text, reason = text[:cut], 'stop'
    if reason is None:  # Hold back what may begin a stop string.
      text = text[:len(text) - _held_back(text, request.params.stop)]
    output.text += text[request.sent:]
    request.sent = max(request.sent, len(text))
    if reason is not None:
      output.finished, output.finish_reason = True, reason
      self._finish(request)

  def _detokenize(self, request: _Request, token: int, flush: bool) -> None:
    """Extends request.text by the new token's text, decoding only the last few ids: the
    ids since the last whole text, after those before it (the context a tokenizer needs
    for spaces: the text new is what decoding with the token adds to decoding without),
    as vLLM does. A token that ends mid-character waits for the rest, or the end."""
    if token not in request.stop_ids:
      request.ids.append(token)
    ids, start, read = request.ids, request.prefix_offset, request.read_offset
    before = self.tokenizer.decode(ids[start:read])
    after = self.tokenizer.decode(ids[start:])
    if len(after) > len(before) and (flush or not after.endswith('\ufffd')):
      request.text += after[len(before):]
      request.prefix_offset, request.read_offset = read, len(ids)

  def _finish(self, request: _Request) -> None:
    for key in request.pending_keys.values():
      self._writing.pop(key, None)
    request.pending_keys = {}
    self.pool.release(request.pages)
    request.pages = []
    self._running[request.slot] = None
    self._table[request.slot] = 0

  def _cache_written_pages(self, request: _Request) -> None:
    for index in [i for i in request.pending_keys if (i + 1) * self.page_size <= request.computed]:
      key = request.pending_keys.pop(index)
      self._writing.pop(key, None)
      self.pool.cache(key, request.pages[index])

  # The cache on the device.

  def _empty_cache(self, num_pages: int):
    layout = transformer.Pages(jnp.zeros((self.slots, self.pages_per_row), jnp.int32),
                               num_pages, self.page_size)
    shapes = jax.eval_shape(lambda: models.init_variables(
        self.model, jax.random.key(0), batch_size=self.slots, length=1,
        decode=layout)['cache'])
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

  def _has_slot_state(self) -> bool:
    return any(_leaf_name(path) not in _PAGE_LEAVES
               for path, _ in jax.tree_util.tree_leaves_with_path(self.cache))

  @staticmethod
  def _reset_slots_impl(cache, mask_b):
    """Zeroes the per-slot state (Mamba's) of the slots in `mask_b`."""
    def reset(path, leaf):
      if _leaf_name(path) in _PAGE_LEAVES:
        return leaf
      return jnp.where(mask_b.reshape((-1,) + (1,) * (leaf.ndim - 1)), 0, leaf)
    return jax.tree_util.tree_map_with_path(reset, cache)

  @staticmethod
  def _copy_page_impl(cache, source, target):
    def copy(path, leaf):
      return leaf.at[target].set(leaf[source]) if _leaf_name(path) in _PAGE_LEAVES else leaf
    return jax.tree_util.tree_map_with_path(copy, cache)


def _leaf_name(path) -> str:
  return getattr(path[-1], 'key', '')


def _first_stop(text: str, stops) -> int | None:
  found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
  return min(found) if found else None


def _held_back(text: str, stops) -> int:
  """How many characters at the end of `text` to hold: the longest end that begins a stop
  string."""
  held = 0
  for stop in stops:
    for length in range(min(len(stop) - 1, len(text)), 0, -1):
      if stop.startswith(text[len(text) - length:]):
        held = max(held, length)
        break
  return held


def complete_ids(model, params, tokenizer, ids: list[list[int]], *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_ids: tuple[int, ...] | None = None, slots: int = 32) -> list[str]:
  """lm.sampling.complete_ids through an engine of up to `slots` rows: the same texts
  (request i samples with seed + i, as row i does there), batched continuously. The
  static sampler runs instead with several processes (the engine drives one process) and
  for an int8 cache (the engine's pages hold the compute dtype)."""
  options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, seed=seed, stop_ids=stop_ids)
  if jax.process_count() > 1 or model.config.get('kv_cache_dtype', '') or not ids:
    return sampling.complete_ids(model, params, tokenizer, ids, **options)
  # Rows split over the mesh's data-parallel devices, when one is active.
  multiple = sharding.rows_multiple()
  engine = Engine(model, params, tokenizer, slots=-(-min(slots, len(ids)) // multiple) * multiple,
                  max_length=max(len(i) for i in ids) + max_new_tokens)
  stop_ids = tuple(tokenizer.stop_ids) if stop_ids is None else tuple(stop_ids)
  completions = engine.generate([list(i) for i in ids], [
      SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, seed=seed + index, stop_ids=stop_ids)
      for index in range(len(ids))])
  return [completion.text for completion in completions]


_ENGINES = {}  # (model, slots, max_length, where) -> an engine, compiled once: complete_rows'.


def complete_rows(model, params, prompt_tokens_bt: np.ndarray, prompt_lengths_b: np.ndarray,
                  rng, stop_ids, *, max_new_tokens: int, max_length: int,
                  temperature: float) -> list[np.ndarray]:
  """Each row's completion ids (its stop id included when it stopped) of right-padded
  prompts, row b drawing with jax.random.split(rng, B)[b] as lm.sampling.generate's row b
  does: training's rollouts, on one process. The engine is kept between calls."""
  rows = len(prompt_lengths_b)
  slots = -(-rows // sharding.rows_multiple()) * sharding.rows_multiple()
  # Its cache lives where the params do (a run's mesh).
  key = (model, slots, max_length, jax.tree.leaves(params)[0].sharding)
  engine = _ENGINES.get(key)
  if engine is None:
    # Every row starts at once and most decode together: one shape per table width.
    engine = _ENGINES[key] = Engine(model, params, None, slots=slots, max_length=max_length,
                                    split_rows=False)
  else:
    engine.load(params)
  key_data = np.asarray(jax.random.key_data(jax.random.split(rng, rows)))
  completions = engine.generate(
      [list(prompt_tokens_bt[row, :prompt_lengths_b[row]]) for row in range(rows)],
      [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, key=tuple(key),
                      stop_ids=tuple(int(t) for t in stop_ids)) for key in key_data])
  return [np.asarray(c.token_ids, np.int32) for c in completions]
