"""Paged attention: one decoding step of attention over a KV cache kept in pages shared by
all rows, with a page table per row (api.paged_attention)."""
