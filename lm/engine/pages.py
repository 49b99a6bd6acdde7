"""The engine's page bookkeeping, on the host: which pages are free, who holds each, and
which hold a prompt prefix that a later request may share.

Page 0 is the null page (padding writes there; lm.models.transformer.NULL_PAGE) and is
never handed out. A page is held by the requests whose tables point at it and, once it
holds a whole page of prompt, by the prefix cache; it is free when nobody holds it. A
cached page nobody else holds is evicted (oldest first) when a request needs pages and
none is free.

Prefix keys chain: a page's key is its tokens and the key of the page before it, so a
match means the whole prefix up to that page is the same.
"""

import collections


class OutOfPages(Exception):
  """Fewer free (or evictable) pages than a request needs."""


class PagePool:
  """Reference-counted pages 1 .. num_pages - 1, and the prefix cache over them."""

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 2:
      raise ValueError(f'{num_pages=}: need at least 2 (page 0 is the null page)')
    self.num_pages, self.page_size = num_pages, page_size
    self._free = collections.deque(range(1, num_pages))
    self._holders = [0] * num_pages  # Requests (and the prefix cache) holding each page.
    self._cached = collections.OrderedDict()  # Prefix key -> page, oldest first.
    self._key_of = {}  # Page -> its prefix key, for the cached ones.

  def available(self) -> int:
    """Pages a request could get now: the free ones and the cached ones only the cache holds."""
    return len(self._free) + sum(1 for page in self._cached.values() if self._holders[page] == 1)

  def allocate(self, count: int) -> list[int]:
    if count > self.available():
      raise OutOfPages(f'{count} pages asked for, {self.available()} available')
    while len(self._free) < count:
      self._evict_one()
    pages = [self._free.popleft() for _ in range(count)]
    for page in pages:
      self._holders[page] = 1
    return pages

  def hold(self, page: int) -> None:
    """One more holder of a page already held (a request sharing a cached prefix page)."""
    assert self._holders[page] > 0, page
    self._holders[page] += 1

  def release(self, pages) -> None:
    for page in pages:
      assert self._holders[page] > 0, page
      self._holders[page] -= 1
      if not self._holders[page]:
        self._free.append(page)

  def _evict_one(self) -> None:
    for key, page in self._cached.items():
      if self._holders[page] == 1:
        del self._cached[key], self._key_of[page]
        self.release([page])
        return
    raise OutOfPages('no cached page to evict')

  # The prefix cache.

  @staticmethod
  def key(previous_key, tokens) -> tuple:
    return (previous_key, tuple(tokens))

  def lookup(self, key) -> int | None:
    page = self._cached.get(key)
    if page is not None:
      self._cached.move_to_end(key)  # Recently used: evicted last.
    return page

  def cache(self, key, page: int) -> None:
    """Keeps `page` (a whole page of prompt, written) for later requests with its prefix."""
    if key in self._cached or page in self._key_of:
      return
    self._cached[key], self._key_of[page] = page, key
    self._holders[page] += 1

  def clear_cache(self) -> None:
    """Drops every cached prefix: what requests hold stays."""
    pages = list(self._cached.values())
    self._cached.clear()
    self._key_of.clear()
    self.release(pages)

  def holders(self, page: int) -> int:
    return self._holders[page]

  def free_count(self) -> int:
    """Pages nobody holds (not even the prefix cache)."""
    return len(self._free)
