"""A bounded memo of image features, so a study runs the vision tower once per image, not once per forward.

:meth:`HookedVLM.reuse_images <hooked_vlm.model.HookedVLM.reuse_images>` opens one. Entries are keyed by an
image's pixel content (a BLAKE2b hash of its ``pixel_values`` row, its anyres crops only, and its
``image_sizes`` row), plus, for InstructBLIP's prefix tokens, the instruction's Q-Former ids. Values are
detached tensors on the model's device, kept least-recently-used first out.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from hooked_vlm.errors import LoadOptionError

DEFAULT_MAX_IMAGES = 16


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """A BLAKE2b hex digest of the tensors' dtypes, shapes and bytes (None hashes as a marker)."""
    h = hashlib.blake2b(digest_size=20)
    for t in tensors:
        if t is None:
            h.update(b"<none>")
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class ImageMemo:
    """An LRU map ``key -> tensor`` holding at most ``max_entries`` tensors per kind.

    Kinds keep apart what one image gives: ``"tokens"`` (projected image tokens ``[n_tokens, d_model]``) and,
    for InstructBLIP, ``"vision"`` (the vision tower's output ``[1 + n_patches, d_vision]``).

    Attributes:
        hits, misses: lookups answered from the memo and computed, per kind.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_IMAGES):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise LoadOptionError(f"max_images must be a positive integer, got {max_entries!r}.")
        self.max_entries = max_entries
        self._store: dict[str, OrderedDict[str, torch.Tensor]] = {}
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}

    def get(self, kind: str, key: str) -> torch.Tensor | None:
        store = self._store.setdefault(kind, OrderedDict())
        value = store.get(key)
        if value is None:
            self.misses[kind] = self.misses.get(kind, 0) + 1
            return None
        store.move_to_end(key)
        self.hits[kind] = self.hits.get(kind, 0) + 1
        return value

    def put(self, kind: str, key: str, value: torch.Tensor) -> None:
        store = self._store.setdefault(kind, OrderedDict())
        value = value.detach()
        if value.untyped_storage().nbytes() > value.numel() * value.element_size():
            value = value.clone()  # a view of a batch's tensor would keep the whole batch alive
        store[key] = value
        store.move_to_end(key)
        while len(store) > self.max_entries:
            store.popitem(last=False)

    def __len__(self) -> int:
        return sum(len(s) for s in self._store.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the memo's tensors."""
        return sum(t.numel() * t.element_size() for s in self._store.values() for t in s.values())

    def clear(self) -> None:
        self._store.clear()

    def __repr__(self) -> str:
        return (f"ImageMemo({len(self)} entries, {self.nbytes / 2**20:.1f} MiB, max {self.max_entries} per kind, "
                f"hits {self.hits}, misses {self.misses})")
