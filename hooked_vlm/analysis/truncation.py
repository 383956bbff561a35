"""Image-token truncation and masking ("Investigating Multimodal Interaction in Vision Large Language Models"
(Wei, JAIST master's thesis 2025), sec. 4.3): the teacher-forced loss of a target text when only some
image tokens are in the sequence.

Truncation keeps the first ``n`` image tokens and drops the rest; masking drops given intervals. Dropped
tokens leave the sequence: the later positions move up, exactly as a transformers forward on the shortened
``inputs_embeds``. The target is appended after the prompt and its mean cross-entropy is reported.

The merged embeddings are computed once and sliced. Settings run as a batch padded on the right: causal
attention never lets a position read the padding after it, so no attention mask is needed and every row
keeps positions ``0..len-1``. Only the rows that predict the target are unembedded.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int

from hooked_vlm.analysis.base import Aggregate, AnalysisResult, aggregate, record_field
from hooked_vlm.errors import PromptError, warn_selection
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


# Attention scores per head that one batched forward of truncation/masking settings may hold (a 2,048-position
# sequence's): LLaVA-1.5 inputs (~600 positions) still run 8 settings at once, 2,900-position anyres ones one.
SCORES_BUDGET = 2048**2


class _Losses:
    """Merged embeddings of prompt + target, computed once; the loss of any subset of prompt positions."""

    def __init__(self, model, inputs: VLMInputs, target, batch_size: int):
        self.model = model
        self.inputs = _single(inputs, model)
        self.target = target_ids(model, target).to(model.cfg.device)
        if batch_size < 1:
            raise PromptError(f"batch_size must be positive, got {batch_size}.")
        self.batch_size = batch_size
        prompt = model.embed_inputs(self.inputs)[0]
        full = torch.cat([prompt, model.embed(self.target[None])[0]])
        if full.shape[0] > model.cfg.n_ctx:
            raise PromptError(f"Prompt and target have {full.shape[0]} positions, more than n_ctx={model.cfg.n_ctx}.")
        self.embeds = model.hook_embed(full[None])[0]
        self.n_prompt = prompt.shape[0]
        self.image = self.inputs.image_positions.to(model.cfg.device)

    def without(self, drop_image_indices: list[torch.Tensor]) -> Float[torch.Tensor, " setting"]:
        """Mean cross-entropy of the target for each set of removed image-token indices."""
        n_all, n_target = self.embeds.shape[0], len(self.target)
        keeps: list[Bool[torch.Tensor, " pos"]] = []
        for drop in drop_image_indices:
            keep = torch.ones(n_all, dtype=torch.bool, device=self.embeds.device)
            keep[self.image[drop.to(self.image.device)]] = False
            keeps.append(keep)
        out = []
        for chunk in self._chunks(keeps):
            out.append(self._batch(chunk, n_target))
        return torch.cat(out).cpu()

    def _chunks(self, keeps: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Consecutive settings, at most ``batch_size`` per forward and at most ``SCORES_BUDGET`` attention scores
        per head (``rows * longest**2``), else one setting: a long input's batch would hold several
        ``[head, pos, pos]`` patterns at once."""
        chunks: list[list[torch.Tensor]] = []
        longest = 0
        for keep in keeps:
            n = int(keep.sum())
            if chunks:
                grown = max(longest, n)
                if len(chunks[-1]) < self.batch_size and (len(chunks[-1]) + 1) * grown**2 <= SCORES_BUDGET:
                    chunks[-1].append(keep)
                    longest = grown
                    continue
            chunks.append([keep])
            longest = n
        return chunks

    def _batch(self, keeps, n_target: int) -> Float[torch.Tensor, " batch"]:
        model = self.model
        lengths = [int(k.sum()) for k in keeps]
        longest = max(lengths)
        batch = self.embeds.new_zeros(len(keeps), longest, self.embeds.shape[-1])
        for b, keep in enumerate(keeps):
            batch[b, : lengths[b]] = self.embeds[keep]
        resid = model(batch, start_at_layer=0, stop_at_layer=model.cfg.n_layers)
        # row i predicts target token i from the position just before it
        rows = torch.stack([torch.arange(n - n_target - 1, n - 1) for n in lengths]).to(resid.device)
        picked = resid.gather(1, rows[..., None].expand(-1, -1, resid.shape[-1]))
        logits = model.unembed(model.ln_final(picked)).float()
        labels = self.target[None].expand(len(keeps), -1)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(len(keeps), -1).mean(-1)


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
    batch_size: int = 8,
) -> TruncationResult:
    """Teacher-forced loss of ``target`` keeping only the first ``n`` image tokens, for each ``n`` in ``counts``.

    Args:
        inputs: one example (``model.prepare(instruction, image)``).
        target: the text appended after the prompt (e.g. a caption), or its token ids.
        counts: image tokens kept (default ``1..N`` as in Wei (2025); 0 is allowed).
        batch_size: settings per forward pass (fewer on long inputs: a forward holds at most the attention scores
            of one 2,048-position sequence, ``SCORES_BUDGET``, or one setting).
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
        batch_size: settings per forward pass (fewer on long inputs, as in :func:`image_token_truncation`).
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
    batch_size: int = 8,
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
