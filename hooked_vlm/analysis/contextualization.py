"""Cosine contextualization across depth ("Investigating Multimodal Interaction in Vision Large Language
Models" (Wei, JAIST master's thesis 2025), ch. 4; "Phase Diagram of Vision Large Language Models Inference:
A Perspective from Interaction across Image and Instruction" (Wei, Shi, Inoue)).

``s(l) = 1/(m n) sum_i sum_j cos(v_i(l), w_j(l))`` over residual-stream vectors at lens layers ``0..L``
(``resid_pre`` of every block, then the final ``resid_post``). Means over pairs come from sums of unit
vectors, so no ``n x m`` similarity matrix is ever built:

- inter (image x text): ``(sum_i v_i/|v_i|) . (sum_j w_j/|w_j|) / (m n)``;
- intra over distinct pairs: ``(|sum_i v_i/|v_i||^2 - n) / (n (n - 1))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_vlm.analysis.base import (
    PALETTE,
    Aggregate,
    AnalysisResult,
    aggregate,
    check_single,
    examples,
    record_field,
    record_inputs,
)
from hooked_vlm.analysis.logit_lens import image_token_positions
from hooked_vlm.errors import PromptError, warn_selection
from hooked_vlm.hooks import resid_hook_names
from hooked_vlm.plot import escape_label, line_style
from hooked_vlm.positions import as_integers, as_vlm_inputs

CURVES = ("inter", "intra_image", "intra_text")
PHASE_NAMES = ("I", "II", "III", "IV")
_PHASE_COLORS = ("#9ecae1", "#fdd0a2", "#c7e9c0", "#dadaeb")


def mean_cosines(
    a: Float[Tensor, "n d"], b: Float[Tensor, "m d"] | None = None
) -> float:
    """Mean cosine over all pairs ``a x b``, or over distinct pairs of ``a`` when ``b`` is None (float64).

    NaN when there is no pair. Zero vectors count as cosine 0.
    """
    ua = torch.nn.functional.normalize(a.double(), dim=-1)
    sa = ua.sum(0)
    if b is None:
        n = ua.shape[0]
        if n < 2:
            return math.nan
        return float((sa @ sa - (ua * ua).sum()) / (n * (n - 1)))
    if len(a) == 0 or len(b) == 0:
        return math.nan
    ub = torch.nn.functional.normalize(b.double(), dim=-1)
    return float(sa @ ub.sum(0) / (ua.shape[0] * ub.shape[0]))


# --------------------------------------------------------------------------- phases
@dataclass(frozen=True)
class Phases:
    """Phase boundaries found in a contextualization curve (a heuristic; see :func:`find_phases`).

    Attributes:
        boundaries: ``(b1, b2, b3)`` layers where phase I/II, II/III and III/IV meet (the early peak, the
            trough and the late peak of the inter-modal curve).
        spans: ``{"I": (0, b1), "II": (b1, b2), "III": (b2, b3), "IV": (b3, L)}``, inclusive layer ranges
            (neighbouring phases share their boundary layer).
        confidence: in ``[0, 1]``, the mean of ``scores``; 1 means every expected feature is clearly present.
            Not a probability.
        scores: per feature, how clearly it shows (``early_rise``, ``dip``, ``late_rise``, ``final_fall``,
            and ``intra_rise`` when intra-modal curves were given), each in ``[0, 1]``.
    """

    boundaries: tuple[int, int, int]
    spans: dict[str, tuple[int, int]]
    confidence: float
    scores: dict[str, float] = field(default_factory=dict)

    def phase_of(self, layer: int) -> str:
        """The phase a layer belongs to (a boundary layer goes to the earlier phase)."""
        for name in PHASE_NAMES:
            if layer <= self.spans[name][1]:
                return name
        raise IndexError(f"layer {layer} is past the last layer {self.spans['IV'][1]}")


def _smooth(x: Tensor, window: int) -> Tensor:
    if window <= 1:
        return x
    half = window // 2
    return torch.stack([x[max(0, i - half) : i + half + 1].mean() for i in range(len(x))])


def _clear(delta: float, scale: float, min_fraction: float) -> float:
    """How clearly a change ``delta`` shows against ``scale``: 0 if not positive, 1 from ``min_fraction`` on."""
    if not scale > 0 or math.isnan(delta):
        return 0.0
    return float(min(max(delta / (min_fraction * scale), 0.0), 1.0))


def find_phases(
    inter: Sequence[float] | Tensor,
    intra: Iterable[Sequence[float] | Tensor] = (),
    *,
    smooth: int = 1,
    min_fraction: float = 0.1,
) -> Phases:
    """Locate the four phases of "Phase Diagram of Vision Large Language Models Inference: A Perspective from
    Interaction across Image and Instruction" (Wei, Shi, Inoue) in an inter-modal similarity curve.

    The heuristic reads the curve as rise (I), fall (II), rise (III), fall (IV), after an optional
    centred moving average of ``smooth`` layers:

    1. ``b3`` (late peak, end of III) is the maximum over the last two thirds of the layers;
    2. ``b2`` (trough, end of II) is the minimum before ``b3``;
    3. ``b1`` (early peak, end of I) is the maximum up to ``b2``.

    Each expected feature is scored by its size relative to the curve's range (1 once it reaches
    ``min_fraction`` of the range): the early rise ``s[b1] - s[0]``, the dip ``s[b1] - s[b2]``, the late
    rise ``s[b3] - s[b2]``, the final fall ``s[b3] - s[L]`` and, for each given intra-modal curve, its rise
    over phase II (intra-modal encoding). ``confidence`` is their mean. This always returns boundaries;
    on a curve without the four-phase shape they are meaningless and the confidence says so.
    """
    s = _smooth(torch.as_tensor(inter, dtype=torch.float64).flatten(), smooth)
    n = len(s)
    if n < 2 or torch.isnan(s).any():
        raise ValueError(f"find_phases needs a curve of at least 2 finite values, got {s.tolist()}.")
    start = n // 3
    b3 = start + int(s[start:].argmax())
    b2 = int(s[: b3 + 1].argmin())
    b1 = int(s[: b2 + 1].argmax())
    scale = float(s.max() - s.min())
    scores = {
        "early_rise": _clear(float(s[b1] - s[0]), scale, min_fraction),
        "dip": _clear(float(s[b1] - s[b2]), scale, min_fraction),
        "late_rise": _clear(float(s[b3] - s[b2]), scale, min_fraction),
        "final_fall": _clear(float(s[b3] - s[-1]), scale, min_fraction),
    }
    intra_scores = []
    for curve in intra:
        c = _smooth(torch.as_tensor(curve, dtype=torch.float64).flatten(), smooth)
        if len(c) == n and not torch.isnan(c).any():
            intra_scores.append(_clear(float(c[b2] - c[b1]), float(c.max() - c.min()), min_fraction))
    if intra_scores:
        scores["intra_rise"] = sum(intra_scores) / len(intra_scores)
    spans = {"I": (0, b1), "II": (b1, b2), "III": (b2, b3), "IV": (b3, n - 1)}
    return Phases((b1, b2, b3), spans, sum(scores.values()) / len(scores), scores)


def _shade_phases(fig: go.Figure, phases: Phases) -> None:
    for name, color in zip(PHASE_NAMES, _PHASE_COLORS):
        lo, hi = phases.spans[name]
        if hi > lo:
            fig.add_vrect(x0=lo, x1=hi, fillcolor=color, opacity=0.35, line_width=0, layer="below",
                          annotation_text=name, annotation_position="top left")


# --------------------------------------------------------------------------- one input
@dataclass
class ContextualizationResult(AnalysisResult):
    """Mean cosine similarities per lens layer ``0..L`` (``L+1`` values each).

    Attributes:
        inter: image x text, all pairs.
        intra_image: image x image, distinct pairs.
        intra_text: text x text, distinct pairs.
        image_positions, text_positions: the two position sets.
    """

    inter: Float[Tensor, " layer"]
    intra_image: Float[Tensor, " layer"]
    intra_text: Float[Tensor, " layer"]
    image_positions: Int[Tensor, " n_image"]
    text_positions: Int[Tensor, " n_text"]

    def curves(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in CURVES}

    def phases(self, *, smooth: int = 1, min_fraction: float = 0.1) -> Phases:
        """Phase boundaries of the inter-modal curve, phase II checked on both intra curves (:func:`find_phases`)."""
        return find_phases(self.inter, (self.intra_image, self.intra_text), smooth=smooth, min_fraction=min_fraction)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``condition`` (inter, intra_image, intra_text), ``layer``, ``value``."""
        rows = [{"condition": name, "layer": layer, "value": v}
                for name, t in self.curves().items() for layer, v in enumerate(t.tolist())]
        return pd.DataFrame(rows, columns=["condition", "layer", "value"])

    def plot(self, *, phases: bool = True, **layout) -> go.Figure:
        """The three curves, with the phases shaded (``phases=False`` to leave them out)."""
        fig = go.Figure()
        for i, (name, t) in enumerate(self.curves().items()):
            fig.add_trace(go.Scatter(x=list(range(len(t))), y=t.cpu().numpy(), mode="lines+markers",
                                     name=escape_label(name), line=dict(color=PALETTE[i])).update(line_style(i)))
        if phases:
            _shade_phases(fig, self.phases())
        fig.update_layout(title="Cosine contextualization", xaxis_title="layer", yaxis_title="mean cosine",
                          template="plotly_white")
        fig.update_xaxes(dtick=1)
        fig.update_layout(**layout)
        return fig


@torch.no_grad()
def contextualization(
    model,
    inputs,
    *,
    image: Int[Tensor, " n"] | Sequence[int] | None = None,
    text: Int[Tensor, " m"] | Sequence[int] | None = None,
) -> ContextualizationResult:
    """Inter- and intra-modal mean cosine similarity at every lens layer of one example.

    Args:
        image: image positions (default: ``inputs.image_positions`` without anyres newline tokens).
        text: text positions (default: the instruction, ``inputs.question_positions``: the raw question's
            tokens, without template, BOS or answer suffix; pass ``text=`` for inputs prepared with
            ``template=None``).

    Only the ``L+1`` residual hooks run; each keeps two ``[d_model]`` sums, not the activations.

    Raises:
        PromptError: positions that are not whole numbers or outside the input, or an empty image or text set.

    Warns (:class:`~hooked_vlm.errors.SelectionWarning`) when a set has one position (its intra-modal curve is
    NaN: there is no pair) or the two sets share positions (the inter-modal mean then includes self-pairs).
    """
    inputs = as_vlm_inputs(model, inputs)
    check_single(inputs)
    image, text = _position_sets(inputs, image, text)
    return _contextualize(model, inputs, [(inputs, 0)], [(image, text)])[0]


@torch.no_grad()
def contextualization_batch(
    model,
    inputs,
    *,
    image: Sequence[Int[Tensor, " n"] | Sequence[int] | None] | None = None,
    text: Sequence[Int[Tensor, " m"] | Sequence[int] | None] | None = None,
) -> list[ContextualizationResult]:
    """:func:`contextualization` of every example of a left-padded batch from one forward pass: ``result[b]``
    equals ``contextualization(model, inputs[b], image=image[b], text=text[b])`` up to float rounding.

    ``image`` and ``text`` give one entry per example (None: that example's default), in its own positions
    (those of ``inputs[b]``, padding dropped). Each hook keeps three numbers per example.

    Raises:
        PromptError: as :func:`contextualization`; not one ``image`` / ``text`` entry per example; a batch that
            is not left-padded.
    """
    inputs = as_vlm_inputs(model, inputs)
    singles = examples(inputs)
    n = len(singles)
    for what, given in (("image", image), ("text", text)):
        if given is not None and (isinstance(given, Tensor) or len(given) != n):
            raise PromptError(f"{what}= must give one entry per example of the batch of {n}; got {given!r}.")
    image = [None] * n if image is None else list(image)
    text = [None] * n if text is None else list(text)
    sets = [_position_sets(single, i, t) for (single, _), i, t in zip(singles, image, text)]
    return _contextualize(model, inputs, singles, sets)


def _position_sets(inputs, image, text) -> tuple[Int[Tensor, " n"], Int[Tensor, " m"]]:
    """The checked image and text positions of a one-example input (warning as :func:`contextualization` says)."""
    n = inputs.seq_len

    def resolve(values, what: str) -> Tensor:
        pos = as_integers(values, f"{what} positions")
        bad = pos[(pos < -n) | (pos >= n)]
        if len(bad):
            raise PromptError(f"{what} positions {bad.tolist()} are outside the {n}-position input.")
        return torch.unique(pos % n)

    image = image_token_positions(inputs) if image is None else resolve(image, "Image")
    if text is None:
        if inputs.questions[0] is None:
            raise PromptError("This input was prepared with template=None; pass text= positions.")
        text = inputs.question_positions
    text = resolve(text, "Text")
    if len(image) == 0 or len(text) == 0:
        raise PromptError(f"Need image and text positions; got {len(image)} image and {len(text)} text positions.")
    for what, pos in (("image", image), ("text", text)):
        if len(pos) == 1:
            warn_selection(f"The {what} set has one position ({int(pos[0])}): intra_{what} is NaN (no pair).")
    shared = image[torch.isin(image, text)]
    if len(shared):
        warn_selection(f"The image and text sets share positions {shared.tolist()}: the inter-modal mean includes "
                       "self-pairs (cosine 1).")
    return image, text


def _contextualize(model, inputs, singles: list, sets: list[tuple[Tensor, Tensor]]) -> list[ContextualizationResult]:
    """One forward of ``inputs``; per example ``(inputs[b], padding)`` of ``singles`` the curves of ``sets[b]``."""
    names = resid_hook_names(model.cfg.n_layers)
    columns = [(image + offset, text + offset) for (image, text), (_, offset) in zip(sets, singles)]
    stats: dict[str, list[tuple[float, float, float]]] = {}

    def hook(act: Float[Tensor, "batch seq d_model"], hook) -> None:
        stats[hook.name] = []
        for b, (image, text) in enumerate(columns):
            v, w = act[b, image.to(act.device)], act[b, text.to(act.device)]
            stats[hook.name].append((mean_cosines(v, w), mean_cosines(v), mean_cosines(w)))

    model.run_with_hooks(inputs, fwd_hooks=[(lambda name: name in names, hook)], return_type=None)
    out = []
    for b, (image, text) in enumerate(sets):
        values = torch.tensor([stats[name][b] for name in names], dtype=torch.float64)
        out.append(ContextualizationResult(values[:, 0], values[:, 1], values[:, 2], image, text))
    return out


# --------------------------------------------------------------------------- over records
@dataclass
class ContextualizationAggregate(Aggregate):
    """:class:`Aggregate` of contextualization curves, with phases found on the mean curves."""

    def phases(self, *, smooth: int = 1, min_fraction: float = 0.1) -> Phases:
        summary = self.summary()
        means = {c: part.sort_values("x")["mean"].to_numpy(copy=True) for c, part in summary.groupby("condition")}
        intra = [means[c] for c in ("intra_image", "intra_text") if c in means]
        return find_phases(means["inter"], intra, smooth=smooth, min_fraction=min_fraction)

    def plot(self, *, phases: bool = True, **layout) -> go.Figure:
        fig = super().plot(**layout)
        if phases and len(self.frame):
            _shade_phases(fig, self.phases())
        return fig


def contextualization_over(
    model,
    records: Iterable,
    *,
    instruction: Callable[[object], str] | None = None,
    template: str | None = "auto",
    vqa_suffix: bool = False,
    progress: bool = True,
) -> ContextualizationAggregate:
    """:func:`contextualization` over records, conditions ``inter``, ``intra_image``, ``intra_text``.

    The instruction is each record's ``question``, or ``instruction(record)`` (e.g. a fixed caption prompt,
    or random vocabulary tokens for Wei's (2025) noisy prompts). Text positions are the instruction's tokens.
    """

    def one(record) -> pd.DataFrame:
        if instruction is None:
            inputs = record_inputs(model, record, template=template, vqa_suffix=vqa_suffix)
        else:
            inputs = model.prepare(instruction(record), record_field(record, "image"), template=template,
                                   vqa_suffix=vqa_suffix)
        res = contextualization(model, inputs)
        return res.to_frame().rename(columns={"layer": "x"})[["condition", "x", "value"]]

    agg = aggregate(records, one, title="Cosine contextualization", y_label="mean cosine", progress=progress)
    return ContextualizationAggregate(**vars(agg))
