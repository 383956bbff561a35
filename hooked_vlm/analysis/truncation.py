"""Image-token truncation and masking ("Investigating Multimodal Interaction in Vision Large Language Models"
(Wei, JAIST master's thesis 2025), sec. 4.3): the teacher-forced loss of a target text when only some
image tokens are in the sequence.

Truncation keeps the first ``n`` image tokens and drops the rest; masking drops given intervals. Dropped
tokens leave the sequence: the later positions move up, exactly as a transformers forward on the shortened
``inputs_embeds``. The target is appended after the prompt and its mean cross-entropy is reported.

The merged embeddings are computed once. Positions before the first dropped one do not depend on what comes
later (causal attention), so one unablated forward over prompt + target records every layer's keys and values
(and gives the loss with nothing dropped); each setting then recomputes only its kept positions from its first
dropped position on (for truncation: the text after the image and the target), at their new positions, with
the recorded keys and values of the positions before it. Settings run in batches: the rows of a batch read
the same recorded tensor, each up to its own start (see ``_Losses``). Only the rows that predict the target
are unembedded. Hooks already on the model run in these forwards and see the recomputed rows only.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import einops
import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from hooked_vlm.analysis.base import Aggregate, AnalysisResult, aggregate, record_field
from hooked_vlm.errors import PromptError, warn_selection
from hooked_vlm.hooks import warn_partial_rows
from hooked_vlm.inputs import VLMInputs
from hooked_vlm.positions import as_integers, as_vlm_inputs


# ---------------------------------------------------------------------------------------------- summaries
def _sorted_curve(counts, loss) -> tuple[torch.Tensor, torch.Tensor]:
    counts, loss = torch.as_tensor(counts), torch.as_tensor(loss, dtype=torch.float64)
    if counts.shape != loss.shape or counts.dim() != 1 or len(counts) == 0:
        raise ValueError("counts and loss must be 1-D and of the same, non-zero length.")
    order = torch.argsort(counts)
    return counts[order], loss[order]


def plateau_point(counts, loss, *, threshold: float | None = None, sustained: bool = True) -> int | None:
    """Where the loss curve stops improving, by Wei's (2025) threshold rule.

    The threshold is the mean loss over all settings of the curve (Wei 2025, sec. 4.3) unless given. The plateau
    point is the smallest count from which the loss stays at or below the threshold for every larger count
    (``sustained=False``: the first count at or below it). None if the curve never gets there.
    """
    counts, loss = _sorted_curve(counts, loss)
    level = float(loss.mean()) if threshold is None else float(threshold)
    below = loss <= level
    if sustained:
        # below for this count and every larger one
        below = torch.flip(torch.cummin(torch.flip(below.int(), [0]), 0).values, [0]).bool()
    hits = torch.nonzero(below).flatten()
    return int(counts[hits[0]]) if len(hits) else None


def tokens_for_fraction(counts, loss, fraction: float = 0.7) -> int | None:
    """The fewest tokens giving ``fraction`` of the total loss reduction.

    Total reduction = loss at the smallest count minus loss at the largest count of the curve; the answer is
    the smallest count ``n`` with ``loss[smallest] - loss[n] >= fraction * total``. None if the loss does not
    go down overall.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    counts, loss = _sorted_curve(counts, loss)
    total = loss[0] - loss[-1]
    if total <= 0:
        return None
    hits = torch.nonzero(loss[0] - loss >= fraction * total).flatten()
    return int(counts[hits[0]])


# ---------------------------------------------------------------------------------------------- results
@dataclass
class TruncationResult(AnalysisResult):
    """Loss against the number of image tokens kept (the first ``n``).

    Attributes:
        counts: ``[setting]`` image tokens kept; loss: ``[setting]`` mean teacher-forced cross-entropy;
        n_image: image tokens of the full input; n_target: target tokens.
    """

    counts: Int[torch.Tensor, " setting"]
    loss: Float[torch.Tensor, " setting"]
    n_image: int
    n_target: int

    @property
    def threshold(self) -> float:
        """Wei's (2025) threshold: the mean loss over all settings."""
        return float(self.loss.mean())

    def plateau_point(self, *, threshold: float | None = None, sustained: bool = True) -> int | None:
        """See :func:`plateau_point`."""
        return plateau_point(self.counts, self.loss, threshold=threshold, sustained=sustained)

    def tokens_for_fraction(self, fraction: float = 0.7) -> int | None:
        """See :func:`tokens_for_fraction`; divide by ``n_image`` for the share of image tokens."""
        return tokens_for_fraction(self.counts, self.loss, fraction)

    def summary(self, fraction: float = 0.7) -> dict:
        n = self.tokens_for_fraction(fraction)
        return {
            "threshold": self.threshold,
            "plateau_point": self.plateau_point(),
            f"tokens_for_{fraction:g}": n,
            f"share_for_{fraction:g}": None if n is None else n / self.n_image,
        }

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"condition": "truncation", "x": self.counts.tolist(), "value": self.loss.tolist()})

    def plot(self, fraction: float = 0.7, **layout) -> go.Figure:
        fig = go.Figure(go.Scatter(x=self.counts.tolist(), y=self.loss.tolist(), mode="lines", name="loss"))
        fig.add_hline(y=self.threshold, line=dict(color="grey", dash="dot"), annotation_text="mean loss")
        plateau, n = self.plateau_point(), self.tokens_for_fraction(fraction)
        if plateau is not None:
            fig.add_vline(x=plateau, line=dict(color="#d62728", dash="dash"), annotation_text="plateau")
        if n is not None:
            fig.add_vline(x=n, line=dict(color="#2ca02c", dash="dash"),
                          annotation_text=f"{fraction:.0%} of reduction", annotation_position="bottom right")
        fig.update_layout(title="Loss against image tokens kept", xaxis_title="image tokens kept (first n)",
                          yaxis_title="cross-entropy", template="plotly_white")
        fig.update_layout(**layout)
        return fig


@dataclass
class MaskingResult(AnalysisResult):
    """Loss with sets of image tokens removed.

    Attributes:
        removed: per setting, the removed image-token indices (0 = first image token); loss: ``[setting]``;
        base_loss: the loss with nothing removed; n_image, n_target: token counts of the input and target.
    """

    removed: list[Int[torch.Tensor, " n"]]
    loss: Float[torch.Tensor, " setting"]
    base_loss: float
    n_image: int
    n_target: int

    @property
    def change(self) -> Float[torch.Tensor, " setting"]:
        """Loss minus the unablated loss (negative: removing the tokens helps)."""
        return self.loss - self.base_loss

    @property
    def labels(self) -> list[str]:
        """``"3"``, ``"0-9"`` (contiguous, inclusive) or ``"1,5,7"`` per setting."""
        out = []
        for idx in self.removed:
            i = idx.tolist()
            if len(i) > 1 and i[-1] - i[0] + 1 == len(i):
                out.append(f"{i[0]}-{i[-1]}")
            else:
                out.append(",".join(map(str, i)) or "none")
        return out

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"condition": "masking", "x": self.labels, "value": self.loss.tolist(),
                             "change": self.change.tolist()})

    def plot(self, **layout) -> go.Figure:
        df = self.to_frame()
        fig = go.Figure(go.Scatter(x=df["x"], y=df["value"], mode="lines+markers", name="loss"))
        fig.add_hline(y=self.base_loss, line=dict(color="grey", dash="dot"), annotation_text="no masking")
        fig.update_layout(title="Loss with image tokens removed", xaxis_title="removed image tokens",
                          yaxis_title="cross-entropy", template="plotly_white")
        fig.update_xaxes(type="category")
        fig.update_layout(**layout)
        return fig


# ---------------------------------------------------------------------------------------------- engine
def target_ids(model, target) -> Int[torch.Tensor, " target"]:
    """Target token ids: a string is tokenised without special tokens (write its leading space if the
    tokenizer needs one), ids are used as given.

    Raises:
        PromptError: the target is empty, has words the tokenizer maps to its unknown token (the loss would be
            that of ``<unk>``), has image placeholder tokens, or ids outside the vocabulary.
    """
    from hooked_vlm.preparation import unknown_pieces

    if isinstance(target, str):
        unknown = unknown_pieces(model.tokenizer, target)
        if unknown:
            raise PromptError(
                f"The target {target!r} has {unknown} which the tokenizer does not know: they map to "
                f"{model.tokenizer.unk_token!r}, so the loss would be that of {model.tokenizer.unk_token!r}."
            )
        ids = model.tokenizer(target, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(ids, dtype=torch.long)
    else:
        ids = as_integers(target, "Target token ids")
    if len(ids) == 0:
        raise PromptError(f"The target {target!r} has no tokens.")
    vocab = model.cfg.d_vocab
    bad = ids[(ids < 0) | (ids >= vocab)]
    if len(bad):
        raise PromptError(f"Target token ids {bad.tolist()} are outside the vocabulary 0..{vocab - 1}.")
    if (ids == model.image_token_id).any():
        raise PromptError(f"The target {target!r} contains the image placeholder token {model.image_token_id}; "
                          "it would be scored as its own embedding.")
    return ids


def _single(inputs, model=None) -> VLMInputs:
    inputs = as_vlm_inputs(model, inputs)
    if inputs.batch_size != 1:
        raise PromptError("Truncation and masking take one example; pass inputs[i].")
    if inputs.has_padding:
        inputs = inputs[0]
    if len(inputs.image_positions) == 0:
        raise PromptError("The input has no image tokens.")
    return inputs


def _shared_prefix_supported(cfg) -> bool:
    """Whether the attention is TransformerLens's plain causal RoPE softmax attention, which
    :meth:`_Losses._shared_prefix` reproduces for the prefix keys."""
    from transformer_lens.utilities.activation_functions import softcap_enabled

    return (cfg.positional_embedding_type == "rotary" and cfg.attention_dir == "causal"
            and all(t == "global" for t in cfg.attn_types or [])
            and not (cfg.use_attention_sinks or cfg.use_logn_attn or cfg.use_dynamic_ntk_rope or cfg.load_in_4bit)
            and not softcap_enabled(cfg.attn_scores_soft_cap))


def _rotary(attn, x: Float[torch.Tensor, "batch pos head d_head"], cos, sin) -> torch.Tensor:
    """``attn.apply_rotary`` with the tables of given positions (``cos``, ``sin``: ``[batch, pos, 1, rotary_dim]``)."""
    r = attn.cfg.rotary_dim
    return torch.cat([x[..., :r] * cos + attn.rotate_every_two(x[..., :r]) * sin, x[..., r:]], -1)


class _Losses:
    """Merged embeddings of prompt + target, computed once; the loss of any subset of prompt positions.

    One unablated forward records every layer's keys and values and gives the unablated loss. A setting that
    drops positions recomputes only its suffix: its kept positions from the first dropped one on, at their new
    positions, attending to the recorded keys and values of the positions before.
    """

    def __init__(self, model, inputs: VLMInputs, target, batch_size: int, shared_prefix: bool | None = None):
        self.model = model
        self.inputs = _single(inputs, model)
        warn_partial_rows(model, "Image-token truncation/masking")
        self.target = target_ids(model, target).to(model.cfg.device)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise PromptError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.batch_size = int(batch_size)
        prompt = model.embed_inputs(self.inputs)[0]
        full = torch.cat([prompt, model.embed(self.target[None])[0]])
        if full.shape[0] > model.cfg.n_ctx:
            raise PromptError(f"Prompt and target have {full.shape[0]} positions, more than n_ctx={model.cfg.n_ctx}.")
        self.embeds = model.hook_embed(full[None])[0]
        self.n_prompt = prompt.shape[0]
        self.image = self.inputs.image_positions.to(model.cfg.device)
        self.shared = _shared_prefix_supported(model.cfg) if shared_prefix is None else shared_prefix
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.base_loss: float | None = None

    def without(self, drop_image_indices: list[torch.Tensor]) -> Float[torch.Tensor, " setting"]:
        """Mean cross-entropy of the target for each set of removed image-token indices."""
        n_all = self.embeds.shape[0]
        suffixes: dict[int, tuple[int, Int[torch.Tensor, " kept"]]] = {}
        for i, drop in enumerate(drop_image_indices):
            keep = torch.ones(n_all, dtype=torch.bool, device=self.embeds.device)
            keep[self.image[drop.to(self.image.device)]] = False
            if keep.all():
                continue
            kept_prompt = torch.nonzero(keep[: self.n_prompt]).flatten()
            if len(kept_prompt) == 0:
                raise PromptError("A setting removes every prompt position: nothing predicts the first target token.")
            # the row predicting the first target token must be recomputed with the rest
            start = min(int(torch.nonzero(~keep)[0]), int(kept_prompt[-1]))
            # the last position predicts nothing
            suffixes[i] = (start, torch.nonzero(keep[start:-1]).flatten() + start)
        self._record()
        loss = torch.full((len(drop_image_indices),), self.base_loss, dtype=torch.float32)
        order = sorted(suffixes, key=lambda i: (suffixes[i][0], len(suffixes[i][1])))
        done = 0
        for batch in self._batches([suffixes[i] for i in order]):
            run = self._shared_prefix if self.shared else self._cached_prefix
            loss[order[done : done + len(batch)]] = run(batch).cpu()
            done += len(batch)
        return loss

    def _batches(self, settings: list[tuple[int, torch.Tensor]]):
        """Consecutive settings, at most ``batch_size`` per batch, cache + suffix within n_ctx (the rotary table),
        and attention scores (rows x suffix x keys) no larger than one unablated forward's, so that long suffixes
        (masking early image tokens of a long input) do not multiply the peak memory by the batch size."""
        n_all = self.embeds.shape[0]
        batch: list[tuple[int, torch.Tensor]] = []
        for setting in settings:
            grown = batch + [setting]
            start, suffix = max(s for s, _ in grown), max(len(r) for _, r in grown)
            if batch and (len(grown) > self.batch_size or start + suffix > self.model.cfg.n_ctx
                          or len(grown) * suffix * (start + suffix) > n_all * n_all):
                yield batch
                grown = [setting]
            batch = grown
        if batch:
            yield batch

    def _record(self) -> None:
        """The unablated forward: every layer's keys (shared prefix: after rotary, ``[kv_head, d_head, pos]``;
        else ``hook_k``, before rotary, what a TransformerLens cache holds) and values of the prompt, and the
        unablated loss."""
        if self.keys:
            return
        model, n_layers, n = self.model, self.model.cfg.n_layers, self.n_prompt
        self.keys, self.values = [None] * n_layers, [None] * n_layers  # type: ignore[list-item]

        def keep(store, layer, pattern):
            def hook(x, hook):
                x = x[0, :n].detach()
                store[layer] = einops.rearrange(x, pattern).contiguous() if self.shared else x[None].clone()

            return hook

        hooks = []
        for layer in range(n_layers):
            hooks += [(f"blocks.{layer}.attn.hook_{'rot_k' if self.shared else 'k'}",
                       keep(self.keys, layer, "pos kv d_head -> kv d_head pos")),
                      (f"blocks.{layer}.attn.hook_v", keep(self.values, layer, "pos kv d_head -> kv pos d_head"))]
        with model.hooks(fwd_hooks=hooks):
            resid = model(self.embeds[None, :-1], start_at_layer=0, stop_at_layer=n_layers)
        self.base_loss = float(self._cross_entropy(resid[:, self.n_prompt - 1 :])[0])

    def _suffix_batch(self, batch) -> tuple[Float[torch.Tensor, "batch suffix d_model"], Int[torch.Tensor, " batch"]]:
        """The suffixes' embeddings padded on the right, and their starts."""
        longest = max(len(rows) for _, rows in batch)
        resid = self.embeds.new_zeros(len(batch), longest, self.embeds.shape[-1])
        for b, (_, rows) in enumerate(batch):
            resid[b, : len(rows)] = self.embeds[rows]
        return resid, torch.tensor([start for start, _ in batch], device=resid.device)

    def _predicting(self, out, batch) -> Float[torch.Tensor, " batch"]:
        """The loss from the last ``n_target`` kept rows of each suffix (they predict the target)."""
        n_target = len(self.target)
        rows = torch.stack([torch.arange(len(r) - n_target, len(r)) for _, r in batch]).to(out.device)
        return self._cross_entropy(out.gather(1, rows[..., None].expand(-1, -1, out.shape[-1])))

    def _shared_prefix(self, batch: list[tuple[int, torch.Tensor]]) -> Float[torch.Tensor, " batch"]:
        """One forward over the suffixes of a batch of settings, the prefix attention added at ``hook_z``.

        TransformerLens runs the suffixes alone (positions ``0..``; RoPE scores depend only on the distance,
        so the suffix-to-suffix scores are those at the true positions). At each layer the queries, rotated at
        their true positions ``start + i``, attend to the recorded rotated keys ``[:start]``, read by every row
        of the batch from one tensor; the two partial softmaxes merge by their log-sum-exp.
        """
        model = self.model
        resid, starts = self._suffix_batch(batch)
        prefix, lowest = int(starts.max()), int(starts.min())
        if prefix == 0:
            return self._predicting(model(resid, start_at_layer=0, stop_at_layer=model.cfg.n_layers), batch)
        n_batch, n_suffix = resid.shape[:2]
        positions = starts[:, None] + torch.arange(n_suffix, device=resid.device)
        table = model.blocks[0].attn
        cos, sin = table.rotary_cos[positions][:, :, None], table.rotary_sin[positions][:, :, None]
        # a row's keys from its own start on are not its prefix; only columns from the lowest start can be
        hidden = (torch.arange(lowest, prefix, device=resid.device) >= starts[:, None])[None, :, None]
        state: dict[str, torch.Tensor] = {}

        def keep_q(q, hook):
            state["q"] = q

        def keep_lse(scores, hook):
            state["lse"] = einops.rearrange(scores.float().logsumexp(-1), "b h s -> b s h")

        def merge(z, hook):
            attn = model.blocks[hook.layer()].attn
            keys, values = self.keys[hook.layer()][..., :prefix], self.values[hook.layer()][:, :prefix]
            n_kv = keys.shape[0]
            q = einops.rearrange(_rotary(attn, state.pop("q"), cos, sin), "b s (kv g) d -> kv (b s g) d", kv=n_kv)
            scores = torch.bmm(q, keys).div_(attn.attn_scale)
            scores.view(n_kv, n_batch, -1, prefix)[..., lowest:].masked_fill_(hidden, float("-inf"))
            top = scores.amax(-1, keepdim=True)
            top = torch.where(top.isinf(), 0.0, top)  # a row without prefix
            weights = scores.sub_(top).exp_()
            total = weights.sum(-1, keepdim=True)
            z_prefix = torch.bmm(weights, values) / total.clamp_min(torch.finfo(total.dtype).tiny)
            z_prefix = einops.rearrange(z_prefix, "kv (b s g) d -> b s (kv g) d", b=n_batch, s=n_suffix)
            lse = einops.rearrange((top + total.log())[..., 0].float(), "kv (b s g) -> b s (kv g)", b=n_batch,
                                   s=n_suffix)
            share = torch.sigmoid(lse - state.pop("lse"))[..., None].to(z.dtype)  # of the prefix in the softmax
            return z + share * (z_prefix - z)

        hooks = []
        for layer in range(model.cfg.n_layers):
            hooks += [(f"blocks.{layer}.attn.hook_q", keep_q), (f"blocks.{layer}.attn.hook_attn_scores", keep_lse),
                      (f"blocks.{layer}.attn.hook_z", merge)]
        with model.hooks(fwd_hooks=hooks):
            out = model(resid, start_at_layer=0, stop_at_layer=model.cfg.n_layers)
        return self._predicting(out, batch)

    def _cached_prefix(self, batch: list[tuple[int, torch.Tensor]]) -> Float[torch.Tensor, " batch"]:
        """One forward over the suffixes of a batch of settings with a frozen TransformerLens KV cache.

        Every row reads the same recorded keys/values ``[:prefix]`` (a broadcast view), ``prefix`` the batch's
        longest; the attention mask hides a row's cache slots from its own start on and its suffix padding.
        TransformerLens takes the rotary position of every slot from the mask's cumulative sum, so a row's
        suffix continues at its own start: ``[1] * start + [0] * (prefix - start) + [1] * kept + [0] * pad``.
        """
        model = self.model
        resid, starts = self._suffix_batch(batch)
        prefix = int(starts.max())
        mask = torch.zeros(len(batch), prefix + resid.shape[1], dtype=torch.int, device=resid.device)
        for b, (start, rows) in enumerate(batch):
            mask[b, :start] = 1
            mask[b, prefix : prefix + len(rows)] = 1
        entries = [
            TransformerLensKeyValueCacheEntry(k[:, :prefix].expand(len(batch), -1, -1, -1),
                                              v[:, :prefix].expand(len(batch), -1, -1, -1), frozen=True)
            for k, v in zip(self.keys, self.values)
        ]
        cache = TransformerLensKeyValueCache(entries, mask[:, :prefix], frozen=True)
        out = model(resid, start_at_layer=0, stop_at_layer=model.cfg.n_layers, past_kv_cache=cache,
                    attention_mask=mask)
        return self._predicting(out, batch)

    def _cross_entropy(self, resid: Float[torch.Tensor, "batch target d_model"]) -> Float[torch.Tensor, " batch"]:
        logits = self.model.unembed(self.model.ln_final(resid)).float()
        labels = self.target[None].expand(resid.shape[0], -1)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        return ce.view(resid.shape[0], -1).mean(-1)


def _as_indices(interval, n_image: int) -> torch.Tensor:
    whole = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)  # noqa: E731
    if isinstance(interval, slice):
        if not all(v is None or whole(v) for v in (interval.start, interval.stop, interval.step)):
            raise PromptError(f"A slice interval takes whole numbers; got {interval!r}.")
        idx = torch.arange(n_image)[interval]
    elif isinstance(interval, range):
        idx = torch.tensor(list(interval), dtype=torch.long)
    elif isinstance(interval, torch.Tensor):
        idx = as_integers(interval, "Interval indices")
    elif isinstance(interval, Sequence) and len(interval) == 2 and all(whole(v) for v in interval):
        idx = torch.arange(int(interval[0]), int(interval[1]))
    else:
        raise PromptError(f"An interval is (start, stop) of whole numbers, a range, a slice or a LongTensor; "
                          f"got {interval!r}.")
    if len(idx) and (idx.min() < 0 or idx.max() >= n_image):
        raise PromptError(f"Interval {interval!r} reaches outside the image tokens (indices 0..{n_image - 1}).")
    if len(idx) == 0:
        warn_selection(f"Interval {interval!r} selects no image token: that setting removes nothing.")
    return torch.unique(idx)


# ---------------------------------------------------------------------------------------------- analyses
@torch.no_grad()
def image_token_truncation(
    model,
    inputs: VLMInputs,
    target,
    *,
    counts: Iterable[int] | None = None,
    batch_size: int = 32,
) -> TruncationResult:
    """Teacher-forced loss of ``target`` keeping only the first ``n`` image tokens, for each ``n`` in ``counts``.

    Args:
        inputs: one example (``model.prepare(instruction, image)``).
        target: the text appended after the prompt (e.g. a caption), or its token ids.
        counts: image tokens kept (default ``1..N`` as in Wei (2025); 0 is allowed).
        batch_size: settings per forward pass (each recomputes only the positions after its kept image tokens).
    """
    losses = _Losses(model, inputs, target, batch_size)
    n_image = len(losses.image)
    counts = list(range(1, n_image + 1)) if counts is None else as_integers(list(counts), "counts").tolist()
    bad = [c for c in counts if not 0 <= c <= n_image]
    if bad or not counts:
        raise PromptError(f"counts must be non-empty and within 0..{n_image}; got {bad or counts}.")
    loss = losses.without([torch.arange(c, n_image) for c in counts])
    return TruncationResult(torch.tensor(counts), loss, n_image=n_image, n_target=len(losses.target))


@torch.no_grad()
def image_token_masking(
    model,
    inputs: VLMInputs,
    target,
    intervals: Iterable,
    *,
    batch_size: int = 8,
) -> MaskingResult:
    """Teacher-forced loss of ``target`` with each interval of image tokens removed from the sequence.

    Args:
        intervals: per setting, image-token indices to remove (0 = first image token): ``(start, stop)``
            half-open, a ``range``, a ``slice`` or a LongTensor of indices. E.g. one token at a time:
            ``[(i, i + 1) for i in range(n)]``.
        batch_size: settings per forward pass (each recomputes the kept positions from its first removed one on).
    """
    losses = _Losses(model, inputs, target, batch_size)
    n_image = len(losses.image)
    drops = [_as_indices(i, n_image) for i in intervals]
    if not drops:
        raise PromptError("No intervals given.")
    loss = losses.without([torch.zeros(0, dtype=torch.long), *drops])
    return MaskingResult(drops, loss[1:], float(loss[0]), n_image, len(losses.target))


def aggregate_truncation(
    model,
    records: Iterable,
    *,
    counts: Iterable[int] | None = None,
    question: str | None = None,
    template: str | None = "auto",
    batch_size: int = 32,
    progress: bool = True,
) -> Aggregate:
    """:func:`image_token_truncation` over records with their captions as targets (Wei 2025, sec. 4.3).

    ``question`` is the instruction (default: each record's own question). Records without a caption are
    skipped. Counts must exist for every image (the same image size gives the same number of tokens).
    """
    counts = None if counts is None else list(counts)

    def run(record) -> pd.DataFrame | None:
        caption = record_field(record, "caption")
        if not caption:
            return None
        inputs = model.prepare(question or record_field(record, "question"), record_field(record, "image"),
                               template=template)
        return image_token_truncation(model, inputs, caption, counts=counts, batch_size=batch_size).to_frame()

    return aggregate(records, run, title="Image-token truncation", x_label="image tokens kept",
                     y_label="cross-entropy", progress=progress)


__all__ = [
    "MaskingResult",
    "TruncationResult",
    "aggregate_truncation",
    "image_token_masking",
    "image_token_truncation",
    "plateau_point",
    "target_ids",
    "tokens_for_fraction",
]
