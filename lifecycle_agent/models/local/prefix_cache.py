"""The prefix cache: key/value states of prompts already computed, reused by later prompts that share a prefix.

An eval's and a rollout's prompts repeat long prefixes: the system prompt and task
instructions of every episode, and within a pack, the update episode's prompt extends the
solve episode's prompt and reply. Once a row is prefilled (and again when it ends), its
key/value states are kept here, keyed by its tokens. A new row looks up the entry sharing
the longest token prefix with its prompt, starts from those states (sliced to the shared
length: a causal model's states of the first ``n`` tokens depend only on those tokens) and
computes only the rest.

Bounds and validity:

- Memory: entries are evicted least recently used first once their key/value tensors
  exceed ``max_mb`` (``prefix_cache_mb`` of :class:`LocalModel`; ``0`` switches the cache
  off). An entry whose tokens are a prefix of a newer one is replaced by it.
- Weights: every lookup and store first compares the model's *weights version*
  (:func:`weights_version`: identity, storage and torch's in-place version counter of every
  parameter, plus each adapter layer's active / disabled / merged state). Any change (an
  optimizer step, a ``load_state_dict``, a new or switched or disabled adapter, a merge)
  empties the cache, so no caller has to remember to invalidate it. States computed while
  the weights changed under a running row are not stored.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Optional


def weights_version(model: Any) -> tuple:
    """A value that changes whenever the weights ``model`` computes with change (see the module docstring)."""
    params = tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())
    adapters = tuple(
        (m._disable_adapters, str(getattr(m, "_active_adapter", None)), tuple(getattr(m, "merged_adapters", ())))
        for m in model.modules() if hasattr(m, "_disable_adapters")
    )
    return params, adapters


def _common_prefix(a: tuple, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Least-recently-used store of ``tokens -> per-layer (keys, values)`` with a memory bound in MiB."""

    def __init__(self, model: Any, max_mb: float):
        if max_mb is None or float(max_mb) < 0:
            raise ValueError(f"prefix_cache_mb must be a number >= 0 (MiB; 0 = off), got {max_mb!r}")
        self.model = model
        self.max_bytes = int(float(max_mb) * 2**20)
        self._entries: "collections.OrderedDict[tuple, tuple[list, int]]" = collections.OrderedDict()
        self._bytes = 0
        self._version: Optional[tuple] = None
        self._lock = threading.Lock()
        self._stats = {"prefix_cache_hits": 0, "prefix_cache_tokens_reused": 0, "prefix_cache_invalidations": 0}

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def stats(self) -> dict:
        with self._lock:
            return {**self._stats, "prefix_cache_entries": len(self._entries),
                    "prefix_cache_mb": round(self._bytes / 2**20, 2)}

    def current_version(self) -> tuple:
        """The weights version now; empties the cache if it differs from the cached states' version."""
        version = weights_version(self.model)
        with self._lock:
            if version != self._version:
                if self._entries:
                    self._stats["prefix_cache_invalidations"] += 1
                self._entries.clear()
                self._bytes = 0
                self._version = version
        return version

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def lookup(self, tokens: list[int], version: tuple) -> tuple[int, Optional[list]]:
        """``(n, layers)``: the cached states of ``tokens[:n]`` (``n < len(tokens)``: the last prompt
        token is always computed, its logits pick the first reply token), or ``(0, None)``."""
        if not self.enabled:
            return 0, None
        with self._lock:
            if version != self._version:
                return 0, None
            best, best_key = 0, None
            for key in self._entries:
                n = _common_prefix(key, tokens)
                if n > best:
                    best, best_key = n, key
            best = min(best, len(tokens) - 1)
            if best <= 0:
                return 0, None
            self._entries.move_to_end(best_key)
            layers = self._entries[best_key][0]
            self._stats["prefix_cache_hits"] += 1
            self._stats["prefix_cache_tokens_reused"] += best
        return best, [(k[..., :best, :], v[..., :best, :]) for k, v in layers]

    def store(self, tokens: list[int], layers: list, version: tuple) -> None:
        """Keep ``layers`` (per layer ``(keys, values)`` of shape ``[1, heads, len(tokens), dim]``) for ``tokens``."""
        if not self.enabled or not tokens:
            return
        size = sum(k.element_size() * k.nelement() + v.element_size() * v.nelement() for k, v in layers)
        key = tuple(tokens)
        with self._lock:
            if version != self._version or size > self.max_bytes:
                return
            for other in list(self._entries):
                n = _common_prefix(other, tokens)
                if n == len(key):  # already held (as this entry or a longer one)
                    self._entries.move_to_end(other)
                    return
                if n == len(other):  # a longer version of an entry replaces it
                    self._bytes -= self._entries.pop(other)[1]
            self._entries[key] = (layers, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._bytes -= self._entries.popitem(last=False)[1][1]
