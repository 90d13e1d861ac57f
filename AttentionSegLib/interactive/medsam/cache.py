"""The embedding cache: each slice's image embedding, encoded once per process."""

from __future__ import annotations

from collections import OrderedDict

import torch


class EmbeddingCache:
    """Image embeddings keyed by the encoder's input (a digest of the 256x256 slice), computed on first use
    and kept (float16, CPU) up to ``max_bytes``.

    One cache is shared by every session of the process (:data:`SHARED_CACHE`): a session opened again on the
    same image, or a click and a scribble session on the same crop, find their slices already encoded.

    An entry is *speculative* while only a prefetch has asked for it (:meth:`.MedSAMFamily.prefetch`, stored
    with ``speculative=True``) and *used* once a decoding looked it up. Speculative entries take only the room
    the used ones leave and go first, oldest first; used entries go in least-recently-used order when used
    entries alone exceed the bound. So scrolling through a long CT, which prefetches at every rest, never
    pushes out the slices of the structures the user made (a refine would otherwise encode them again).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._speculative: OrderedDict[str, None] = OrderedDict()  # keys in the order they were stored
        self._nbytes = 0
        self._entry_bytes = 0  # the largest entry stored so far

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def speculative_count(self) -> int:
        """Entries only a prefetch has asked for."""
        return len(self._speculative)

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, key: str, *, speculative: bool = False) -> torch.Tensor | None:
        """The entry of ``key`` (``None`` when absent). A lookup that is not ``speculative`` (a decoding)
        makes it the most recently used, and used."""
        value = self._items.get(key)
        if value is not None and not speculative:
            self._items.move_to_end(key)
            self._speculative.pop(key, None)
        return value

    def has_room_for_speculative(self) -> bool:
        """Whether a speculative entry would be kept: the used entries leave room for one more."""
        used = self._nbytes - sum(self._bytes(self._items[key]) for key in self._speculative)
        return used + self._entry_bytes <= self.max_bytes

    def store(self, key: str, value: torch.Tensor, *, speculative: bool = False) -> torch.Tensor:
        """Keep ``value`` under ``key`` (float16, CPU) and return the kept tensor; a speculative entry is not
        kept when the used entries leave no room for it."""
        value = value.detach().to("cpu", torch.float16).contiguous()
        self._entry_bytes = max(self._entry_bytes, self._bytes(value))
        speculative = speculative and (key not in self._items or key in self._speculative)  # used stays used
        if key in self._items:
            self._nbytes -= self._bytes(self._items.pop(key))
        self._items[key] = value
        self._nbytes += self._bytes(value)
        if speculative:
            self._speculative[key] = None
            self._speculative.move_to_end(key)
        else:
            self._speculative.pop(key, None)
        while len(self._items) > 1 and self._nbytes > self.max_bytes:
            if self._speculative:
                dropped, _ = self._speculative.popitem(last=False)
            else:
                dropped = next(iter(self._items))
            self._nbytes -= self._bytes(self._items.pop(dropped))
        return value

    @staticmethod
    def _bytes(value: torch.Tensor) -> int:
        return value.numel() * value.element_size()

    def clear(self) -> None:
        self._items.clear()
        self._speculative.clear()
        self._nbytes = 0


#: The process's embedding cache: 512 MiB = 256 slices of 256x64x64 float16 (2 MiB each).
SHARED_CACHE = EmbeddingCache(512 << 20)
