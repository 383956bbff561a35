"""Position sets of :class:`~hooked_vlm.inputs.VLMInputs`: names (``"image"``, ``"question"``, ``"last"``,
``"text"``, ``"related"``, ``"other"``) or explicit positions resolved to sorted unique positions, object boxes
to image patches, and the whole-number checks every position-indexing hook and analysis shares.

The related/other sets are those of "Cross-modal Information Flow in Multimodal Large Language Models"
(Zhang et al.). Nothing here imports :mod:`hooked_vlm.analysis`, so :mod:`hooked_vlm.hooks` and the analyses
can both build on it.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Bool, Int

from hooked_vlm.errors import PromptError, warn_selection
from hooked_vlm.inputs import VLMInputs
from hooked_vlm.qformer import is_query_layout

POSITION_NAMES = ("image", "question", "last", "text", "related", "other")
Positions = str | int | Sequence[int] | torch.Tensor


# ---------------------------------------------------------------------------------------------- checks
def as_integers(values, what: str) -> Int[torch.Tensor, " n"]:
    """``values`` (an int, a sequence, an array or a tensor) as a flat LongTensor, refusing anything that is not
    a whole number: ``1.7`` is not silently read as ``1``. Integral floats (``2.0``) are accepted; bools are not.

    Raises:
        PromptError: naming ``what`` and the offending values.
    """
    if isinstance(values, (str, bytes)):
        raise PromptError(f"{what} must be integers; got the string {values!r}.")
    if isinstance(values, torch.Tensor):
        t = values.detach().cpu()
    else:
        if isinstance(values, (bool, np.bool_)) or (
            isinstance(values, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in values)
        ):
            raise PromptError(f"{what} must be integers, not booleans; got {values!r}.")
        if isinstance(values, range):
            values = list(values)
        try:
            t = torch.as_tensor(np.asarray(values) if not isinstance(values, numbers.Number) else values)
        except (TypeError, ValueError, RuntimeError) as err:
            raise PromptError(f"{what} must be integers; got {values!r}.") from err
    t = t.flatten()
    if t.dtype == torch.bool:
        raise PromptError(f"{what} must be integers, not booleans; got {t.tolist()}.")
    if t.is_floating_point():
        bad = t[~torch.isfinite(t) | (t != t.round())]
        if len(bad):
            raise PromptError(f"{what} must be whole numbers; got {bad.tolist()} (they would be truncated).")
    elif t.is_complex():
        raise PromptError(f"{what} must be integers; got dtype {t.dtype}.")
    return t.long()


def hook_positions(positions, what: str = "Positions") -> Int[torch.Tensor, " p"] | None:
    """Positions for a position-indexing hook: whole numbers (checked now), None for all; empty warns."""
    if positions is None:
        return None
    index = as_integers(positions, what)
    if len(index) == 0:
        warn_selection(f"{what} select no position: the hook acts on nothing.")
    return index


def check_in_sequence(index: torch.Tensor, n: int, name: str) -> None:
    """Inside a hook: refuse positions outside a sequence of ``n`` positions (negative ones count from the end)."""
    bad = index[(index < -n) | (index >= n)]
    if len(bad):
        raise PromptError(f"Positions {bad.tolist()} are outside the {n}-position sequence at {name}.")


def as_vlm_inputs(model, inputs):
    """``inputs`` checked as :class:`~hooked_vlm.inputs.VLMInputs` that can run on ``model``."""
    if not isinstance(inputs, VLMInputs):
        raise PromptError(f"Expected VLMInputs from model.prepare(...), got {type(inputs).__name__}.")
    check = getattr(model, "check_inputs", None)
    return inputs if check is None else check(inputs)


# ---------------------------------------------------------------------------------------------- positions
def for_example(value, example: int) -> torch.Tensor:
    """One example's entry of a :class:`~hooked_vlm.inputs.VLMInputs` position attribute: batched inputs give a
    list with one ``[n]`` tensor per example, a single example the tensor itself."""
    return value[example] if isinstance(value, list) else value


def parse_boxes(box) -> list[tuple[float, float, float, float]]:
    """One box or a list of boxes, each ``(x, y, w, h)`` or a dict with keys x, y, w, h, as a list of float tuples.

    Raises:
        PromptError: a dict without those keys, a box that is not four numbers, or no box at all.
    """
    single = isinstance(box, dict) or (
        isinstance(box, (tuple, list)) and len(box) == 4 and all(isinstance(v, numbers.Real) for v in box)
    )
    if single:
        box = [box]
    out = []
    for b in box:
        if isinstance(b, dict):
            try:
                b = (b["x"], b["y"], b["w"], b["h"])
            except KeyError as err:
                raise PromptError(f"A box dict needs keys x, y, w, h; got {sorted(b)}.") from err
        if len(b) != 4:
            raise PromptError(f"A box is (x, y, w, h) in original-image pixels; got {b!r}.")
        out.append(tuple(float(v) for v in b))
    if not out:
        raise PromptError("No box given.")
    return out


def object_patches(
    inputs: VLMInputs, box, *, example: int = 0, image: int = 0
) -> tuple[Int[torch.Tensor, " n_related"], Int[torch.Tensor, " n_other"]]:
    """Related and other image patches of an object (the position sets of Zhang et al.).

    Args:
        box: ``(x, y, w, h)`` in original-image pixels, a dict with those keys (a record's object), or a
            list of them (their union, e.g. both objects of a two-object question).
        image: which of the example's images the boxes refer to.

    Returns:
        ``related``: positions of the patches of that image overlapping any box (base and tile patches for
        anyres); ``other``: every image position of the example minus related minus newline tokens.
    """
    related = torch.cat([inputs.image_positions_in_box(*b, image=image, example=example) for b in parse_boxes(box)])
    related = torch.unique(related)
    everything = for_example(inputs.image_positions, example)
    newline = for_example(inputs.image_newline_positions, example)
    drop = torch.isin(everything, torch.cat([related, newline]))
    return related, everything[~drop]


def positions(inputs: VLMInputs, spec: Positions, *, example: int = 0, box=None) -> Int[torch.Tensor, " n"]:
    """Resolve a position set of one example to sorted unique positions (padded coordinates for batches).

    ``spec`` is a name: ``"image"`` (I, anyres newlines included), ``"question"`` (Q), ``"last"`` (L),
    ``"text"`` (every non-image, non-padding position), ``"related"`` / ``"other"`` (need ``box``, see
    :func:`object_patches`); or explicit positions (an int, a sequence or a 1-D tensor of whole numbers;
    negative values count from the end). An empty set is allowed (the analyses warn about it).

    Raises:
        PromptError: unknown name, positions out of range or not whole numbers, or related/other without a box.
    """
    n = inputs.seq_len
    if isinstance(spec, str):
        name = spec.lower()
        if name == "image":
            out = for_example(inputs.image_positions, example)
        elif name == "question":
            out = for_example(inputs.question_positions, example)
        elif name == "last":
            out = torch.tensor([inputs.last_position])
        elif name == "text":
            out = for_example(inputs.text_positions, example)
        elif name in ("related", "other"):
            require_footprint(inputs, spec)
            if box is None:
                raise PromptError(f"{spec!r} needs the object's box: pass box=(x, y, w, h) or a record's objects.")
            out = object_patches(inputs, box, example=example)[0 if name == "related" else 1]
        else:
            raise PromptError(f"Unknown position set {spec!r}; use one of {POSITION_NAMES} or explicit positions.")
        return torch.unique(out.long().cpu())
    out = as_integers(spec, "Positions")
    if ((out < -n) | (out >= n)).any():
        raise PromptError(f"Positions {out[(out < -n) | (out >= n)].tolist()} are outside the {n}-token input.")
    return torch.unique(torch.where(out < 0, out + n, out))


def lacks_footprint(inputs: VLMInputs) -> bool:
    """True when some image tokens of ``inputs`` are InstructBLIP Q-Former queries, which cover no image region."""
    return any(is_query_layout(lay) for lays in inputs.layouts for lay in lays)


def require_footprint(inputs: VLMInputs, spec: str) -> None:
    """Refuse the position set ``spec`` (``"related"``/``"other"``) on inputs whose image tokens have no patch
    footprint (see :func:`lacks_footprint`).

    Raises:
        PromptError: naming ``spec``.
    """
    if lacks_footprint(inputs):
        raise PromptError(
            f"{spec!r} needs image tokens with a patch footprint; InstructBLIP's image tokens are Q-Former "
            "queries, which do not belong to any region of the image (see hooked_vlm.qformer.query_attention)."
        )


def _describe(spec: Positions) -> str:
    if isinstance(spec, str):
        return repr(spec)
    values = as_integers(spec, "Positions").tolist()
    return f"positions {values if len(values) <= 8 else values[:8] + ['...']}"


def _examples(indices: list[int]) -> str:
    return f"example {indices[0]}" if len(indices) == 1 else f"examples {indices}"


def blocked_edges(inputs: VLMInputs, source: Positions, target: Positions, *, box=None, boxes=None) -> Bool[
        torch.Tensor, "batch query key"]:
    """``[batch, pos, pos]`` True where target query ``t`` may not read source key ``s`` (causal edges only).

    ``box`` is the object box(es) of ``"related"`` / ``"other"`` for every example; ``boxes`` (instead) one entry
    per example of a batch of several records.

    Warns (:class:`~hooked_vlm.errors.SelectionWarning`) naming the set when an example blocks nothing: the
    source or target selects no position, or every source position is after every target position.
    """
    n = inputs.seq_len
    out = torch.zeros(inputs.batch_size, n, n, dtype=torch.bool)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    empty: dict[str, list[int]] = {"source": [], "target": []}
    after: list[int] = []
    if boxes is not None and len(boxes) != inputs.batch_size:
        raise PromptError(f"boxes has {len(boxes)} entries for a batch of {inputs.batch_size} examples.")
    for b in range(inputs.batch_size):
        example_box = box if boxes is None else boxes[b]
        src = positions(inputs, source, example=b, box=example_box)
        tgt = positions(inputs, target, example=b, box=example_box)
        out[b, tgt[:, None], src[None, :]] = True
        out[b] &= causal
        if len(src) == 0:
            empty["source"].append(b)
        elif len(tgt) == 0:
            empty["target"].append(b)
        elif not out[b].any():
            after.append(b)
    for role, spec in (("source", source), ("target", target)):
        if empty[role]:
            warn_selection(f"The knockout {role} {_describe(spec)} selects no position for "
                           f"{_examples(empty[role])}: nothing is blocked there.")
    if after:
        warn_selection(f"The knockout source {_describe(source)} lies entirely after the target {_describe(target)} "
                       f"in {_examples(after)}: no causal edge joins them, so nothing is blocked there.")
    return out


__all__ = [
    "POSITION_NAMES",
    "Positions",
    "as_integers",
    "as_vlm_inputs",
    "blocked_edges",
    "check_in_sequence",
    "for_example",
    "hook_positions",
    "lacks_footprint",
    "object_patches",
    "parse_boxes",
    "positions",
    "require_footprint",
]
