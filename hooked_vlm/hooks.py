"""Hook factories for ``run_with_hooks``, usable without the analysis runners.

Each returns a TransformerLens hook ``fn(activation, hook)`` (or a list of ``(name, fn)``). Positions are whole
numbers (checked when the hook is made; an empty set warns) and must lie in the sequence (checked when it runs,
raising :class:`~hooked_vlm.errors.PromptError`; negative ones count from the end). Named position sets
(``"image"``, ``"question"``, ...) are resolved by :mod:`hooked_vlm.positions`. This module does not import
:mod:`hooked_vlm.analysis`; the analyses build on it. For example::

    store = {}
    hook = pattern_rows(store, [inputs.last_position])
    model.run_with_hooks(inputs, fwd_hooks=[("blocks.3.attn.hook_pattern", hook)])
    store["blocks.3.attn.hook_pattern"]            # [batch, head, 1, key]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hooked_vlm.errors import HookedVLMWarning, PromptError, warn_selection
from hooked_vlm.inputs import VLMInputs
from hooked_vlm.positions import Positions, as_integers, as_vlm_inputs, blocked_edges, check_in_sequence, hook_positions

__all__ = [
    "warn_partial_rows",
    "block_attention",
    "block_edges",
    "knockout_hooks",
    "pattern_rows",
    "record",
    "resid_hook_names",
    "residual_hook",
    "ResidualCollector",
    "zero_ablate",
]


def pattern_rows(store: dict, rows: Int[torch.Tensor, " q"] | Sequence[int]) -> Callable:
    """For ``blocks.{l}.attn.hook_pattern``: keep query ``rows`` as ``store[hook.name]`` ``[batch, head, q, key]``.

    The full pattern is never copied, only the rows asked for."""
    index = hook_positions(rows, "Pattern rows")

    def hook(pattern: Float[torch.Tensor, "batch head query key"], hook) -> None:
        check_in_sequence(index, pattern.shape[2], hook.name)
        store[hook.name] = pattern[:, :, index.to(pattern.device)].detach()

    return hook


def record(store: dict, positions: Int[torch.Tensor, " p"] | Sequence[int] | None = None) -> Callable:
    """Any ``[batch, pos, ...]`` hook: keep ``act[:, positions]`` (all if None) as ``store[hook.name]``."""
    index = hook_positions(positions)

    def hook(act: torch.Tensor, hook) -> None:
        if index is not None:
            check_in_sequence(index, act.shape[1], hook.name)
        store[hook.name] = (act if index is None else act[:, index.to(act.device)]).detach()

    return hook


def zero_ablate(positions: Int[torch.Tensor, " p"] | Sequence[int]) -> Callable:
    """Any ``[batch, pos, ...]`` hook: set the activation at ``positions`` to zero."""
    index = hook_positions(positions)

    def hook(act: torch.Tensor, hook) -> torch.Tensor:
        check_in_sequence(index, act.shape[1], hook.name)
        act[:, index.to(act.device)] = 0
        return act

    return hook


# ---------------------------------------------------------------------------------------------- knockout
def block_attention(source: Positions, target: Positions, *, query_offset: int | None = None) -> Callable:
    """A hook for ``blocks.{l}.attn.hook_attn_scores`` that stops ``target`` queries reading ``source`` keys.

    Sets ``scores[:, :, target, source] = -inf`` for every head and example. ``source``/``target`` are
    explicit positions (whole numbers) of the full sequence; negative ones count from its end, resolved when
    the hook runs. With a KV cache the run computes only the last query rows: their first position is
    ``keys - queries`` (``query_offset``, if given, must equal it) and earlier targets are left alone.

    Raises:
        PromptError: named or non-integer positions (now); positions outside the sequence (when the hook runs,
            inside the forward pass: ``run_with_hooks`` and ``model.hooks`` remove the hooks again).
    """
    if isinstance(source, str) or isinstance(target, str):
        raise PromptError("block_attention takes explicit positions; for named sets use "
                          "knockout_hooks(model, source, target, inputs=inputs).")
    src = as_integers(source, "Source positions")
    tgt = as_integers(target, "Target positions")
    if len(src) == 0 or len(tgt) == 0:
        warn_selection(f"block_attention got an empty {'source' if len(src) == 0 else 'target'} set: "
                       "the hook blocks nothing.")

    def hook(scores: Float[torch.Tensor, "batch head query key"], hook=None):
        q, k = scores.shape[-2:]
        first = k - q
        if query_offset is not None and query_offset != first:
            raise PromptError(f"query_offset={query_offset}, but the scores have {q} query rows of {k} keys, "
                              f"so the first query is position {first}.")
        both = torch.cat([src, tgt])
        bad = both[(both < -k) | (both >= k)]
        if len(bad):
            raise PromptError(f"Knockout positions {bad.tolist()} are outside the {k}-token sequence.")
        cols = torch.where(src < 0, src + k, src)
        rows = torch.where(tgt < 0, tgt + k, tgt) - first
        rows = rows[rows >= 0]  # earlier query rows are in the KV cache, computed before
        mask = torch.zeros(q, k, dtype=torch.bool, device=scores.device)
        mask[rows.to(scores.device)[:, None], cols.to(scores.device)[None, :]] = True
        return scores.masked_fill(mask, float("-inf"))

    return hook


def block_edges(blocked: Bool[torch.Tensor, "batch query key"]) -> Callable:
    """A hook for ``blocks.{l}.attn.hook_attn_scores`` setting the scores of every ``blocked`` edge to ``-inf``.

    ``blocked`` is ``[batch, query, key]`` (e.g. from :func:`~hooked_vlm.positions.blocked_edges`), the same for
    every head. Raises :class:`~hooked_vlm.errors.PromptError` when it runs on scores of another batch or
    sequence shape.
    """

    def hook(scores: Float[torch.Tensor, "batch head query key"], hook=None):
        if scores.shape[0] != blocked.shape[0] or scores.shape[-2:] != blocked.shape[-2:]:
            raise PromptError(
                f"These knockout hooks were built for inputs of batch {blocked.shape[0]} and {blocked.shape[-1]} "
                f"positions but run on batch {scores.shape[0]} with {scores.shape[-1]} positions; build them with "
                "inputs= of the run."
            )
        return scores.masked_fill(blocked[:, None].to(scores.device), float("-inf"))

    return hook


def knockout_hooks(
    model,
    source: Positions,
    target: Positions,
    layers: Iterable[int] | None = None,
    *,
    inputs: VLMInputs | None = None,
    box=None,
) -> list[tuple[str, Callable]]:
    """``(hook name, hook)`` pairs blocking ``source -> target`` at ``layers`` (default: every layer).

    Named position sets need ``inputs`` (per example for batches); with ``inputs`` positions are checked
    against them now, and the hooks refuse to run on inputs of another shape. Without ``inputs`` explicit
    positions are checked when the hook runs (see :func:`block_attention`). Use with
    ``model.run_with_hooks(...)`` or ``with model.hooks(fwd_hooks=...)``.

    Raises:
        PromptError: layers or positions that are not whole numbers or out of range, named sets without inputs.
    """
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else as_integers(layers, "Layers").tolist()
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise PromptError(f"Layers {bad} are outside 0..{n_layers - 1}.")
    if not layers:
        warn_selection("knockout_hooks got no layers: nothing is blocked.")
    named = isinstance(source, str) or isinstance(target, str)
    if named and inputs is None:
        raise PromptError("Named position sets need inputs=: knockout_hooks(model, 'image', 'last', inputs=inputs).")
    if inputs is not None:
        fn = block_edges(blocked_edges(as_vlm_inputs(model, inputs), source, target, box=box))
    else:
        fn = block_attention(source, target)
    return [(f"blocks.{layer}.attn.hook_attn_scores", fn) for layer in layers]


# ---------------------------------------------------------------------------------------------- residual stream
def resid_hook_names(n_layers: int) -> list[str]:
    """The ``L+1`` hook names of lens layers ``0..L``: every ``hook_resid_pre`` and the last ``hook_resid_post``."""
    return [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]


def residual_hook(store: dict[str, Tensor], positions: Int[Tensor, " pos"] | Sequence[int] | None = None) -> Callable:
    """A forward hook that keeps ``act[:, positions]`` (detached) in ``store[hook.name]``.

    ``model.run_with_hooks(inputs, fwd_hooks=[("blocks.3.hook_resid_pre", residual_hook(store, [-1]))])``.
    """
    index = hook_positions(positions)

    def hook(act: Float[Tensor, "batch seq d_model"], hook) -> None:
        if index is not None:
            check_in_sequence(index, act.shape[1], hook.name)
        kept = act if index is None else act[:, index.to(act.device)]
        store[hook.name] = kept.detach().clone()

    return hook


class ResidualCollector:
    """Collects the lens residuals ``[L+1, batch, pos, d_model]`` at chosen positions while the model runs.

    ::

        collector = ResidualCollector(model.cfg.n_layers, positions=inputs.image_positions)
        model.run_with_hooks(inputs, fwd_hooks=collector.fwd_hooks, return_type=None)
        resid = collector.stack()
    """

    def __init__(self, n_layers: int, positions: Int[Tensor, " pos"] | Sequence[int] | None = None):
        self.names = resid_hook_names(n_layers)
        self._wanted = set(self.names)
        self.store: dict[str, Tensor] = {}
        self.hook = residual_hook(self.store, positions)

    def names_filter(self, name: str) -> bool:
        return name in self._wanted

    @property
    def fwd_hooks(self) -> list[tuple[Callable[[str], bool], Callable]]:
        return [(self.names_filter, self.hook)]

    def stack(self) -> Float[Tensor, "layer batch pos d_model"]:
        missing = [n for n in self.names if n not in self.store]
        if missing:
            raise RuntimeError(f"The model has not run with this collector's hooks (missing {missing[0]}).")
        return torch.stack([self.store[n] for n in self.names])


def warn_partial_rows(model, analysis: str) -> None:
    """Warn (:class:`~hooked_vlm.errors.HookedVLMWarning`) when hooks are attached to the decoder while ``analysis``,
    which recomputes only some rows and layers, runs: those hooks would see partial activations (suffix rows at
    shifted indices), not the whole sequence, and an edit they make would change only part of the result."""
    names = [name for name, hp in model.hook_dict.items()
             if (hp._forward_hooks or hp._forward_pre_hooks) and name.startswith(("blocks.", "ln_final"))]
    if names:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warn_selection(f"{analysis} recomputes only some rows and layers, but hooks are attached at {shown}: they "
                       "see (and edit) only those partial activations. Remove them (model.reset_hooks()) or run "
                       "full forwards with model.run_with_hooks for what they do.", HookedVLMWarning)
