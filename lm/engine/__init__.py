"""Generation with continuous batching over a paged KV cache (engine.py), and the
pages' bookkeeping (pages.py)."""
