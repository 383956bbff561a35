"""What every analysis result shares, and aggregation of results over many records."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm

from hooked_vlm.errors import PromptError, warn_selection
from hooked_vlm.plot import escape_label, line_style, readable_name
from hooked_vlm.positions import as_integers, as_vlm_inputs, check_in_sequence, hook_positions

# as_integers, as_vlm_inputs, check_in_sequence, hook_positions (hooked_vlm.positions) and warn_selection
# (hooked_vlm.errors) lived here first and stay importable from here.
__all__ = [
    "PALETTE",
    "Aggregate",
    "AnalysisResult",
    "aggregate",
    "as_integers",
    "as_vlm_inputs",
    "check_in_sequence",
    "check_single",
    "correct_only",
    "examples",
    "hook_positions",
    "record_field",
    "record_inputs",
    "warn_selection",
]

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


class AnalysisResult:
    """Base of the small result objects: tensors as attributes, ``.to_frame()`` and ``.plot()``."""

    def to_frame(self) -> pd.DataFrame:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def plot(self, **kwargs) -> go.Figure:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def _repr_html_(self) -> str:
        return self.plot().to_html(include_plotlyjs="cdn", full_html=False)


@dataclass
class Aggregate(AnalysisResult):
    """Per-record values of one analysis over a data set, in long format.

    ``frame`` has columns ``record`` (int), ``condition`` (str: a flow, a modality pair, ...),
    ``x`` (layer, token count, ...) and ``value``. ``.summary()`` gives the mean and a normal
    95% confidence band per (condition, x).
    """

    frame: pd.DataFrame
    title: str = ""
    x_label: str = "layer"
    y_label: str = "value"
    n_seen: int = 0
    n_kept: int = 0

    def to_frame(self) -> pd.DataFrame:
        return self.frame

    def summary(self, z: float = 1.96) -> pd.DataFrame:
        g = self.frame.groupby(["condition", "x"], sort=False)["value"]
        out = g.agg(["mean", "std", "count"]).reset_index()
        half = z * out["std"].fillna(0.0) / out["count"].clip(lower=1).map(math.sqrt)
        out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
        return out

    def plot(self, **layout) -> go.Figure:
        """Mean per condition with its 95% band; conditions told apart by colour, dash and marker."""
        s = self.summary()
        fig = go.Figure()
        for i, (cond, part) in enumerate(s.groupby("condition", sort=False)):
            color = PALETTE[i % len(PALETTE)]
            fig.add_trace(go.Scatter(
                x=list(part["x"]) + list(part["x"])[::-1],
                y=list(part["ci_high"]) + list(part["ci_low"])[::-1],
                fill="toself", fillcolor=color, opacity=0.15, line=dict(width=0),
                hoverinfo="skip", showlegend=False, legendgroup=str(cond),
            ))
            fig.add_trace(go.Scatter(x=part["x"], y=part["mean"], mode="lines+markers", name=readable_name(cond),
                                     line=dict(color=color), legendgroup=str(cond)).update(line_style(i)))
        title = self.title + (f" (n={self.n_kept} of {self.n_seen})" if self.n_seen else "")
        fig.update_layout(title=escape_label(title), xaxis_title=escape_label(self.x_label),
                          yaxis_title=escape_label(self.y_label), template="plotly_white")
        if "layer" in self.x_label:
            fig.update_xaxes(dtick=1)
        fig.update_layout(**layout)
        return fig


def aggregate(
    records: Iterable,
    fn: Callable[[object], pd.DataFrame | None],
    *,
    keep: Callable[[object], bool] | None = None,
    title: str = "",
    x_label: str = "layer",
    y_label: str = "value",
    progress: bool = True,
    total: int | None = None,
    model=None,
) -> Aggregate:
    """Run ``fn(record)`` over ``records`` and stack the long frames it returns.

    ``fn`` returns a frame with columns ``condition``, ``x``, ``value`` (or None to skip the record).
    ``keep(record)`` is the paper's sample filter (e.g. :func:`correct_only`); rejected records are
    counted in ``n_seen`` but not run. ``model``: the HookedVLM that ``keep`` and ``fn`` run; given, the
    records run inside ``model.reuse_images()``, so the filter's forward and ``fn``'s share one vision-tower run
    per image.
    """
    frames, seen, kept = [], 0, 0
    if total is None and hasattr(records, "__len__"):
        total = len(records)  # type: ignore[arg-type]
    with model.reuse_images() if model is not None else contextlib.nullcontext():
        for i, rec in enumerate(tqdm(records, total=total, desc=title or "records", disable=not progress)):
            seen += 1
            if keep is not None and not keep(rec):
                continue
            df = fn(rec)
            if df is None:
                continue
            kept += 1
            frames.append(df.assign(record=i))
    empty = pd.DataFrame(columns=["condition", "x", "value", "record"])
    frame = pd.concat(frames, ignore_index=True) if frames else empty
    return Aggregate(frame, title=title, x_label=x_label, y_label=y_label, n_seen=seen, n_kept=kept)


def record_inputs(model, record, *, template: str | None = "auto", vqa_suffix: bool = False):
    """``model.prepare(record.question, record.image)`` for a shapes or GQA record."""
    return model.prepare(record_field(record, "question"), record_field(record, "image"), template=template,
                         vqa_suffix=vqa_suffix)


def correct_only(model, *, template: str | None = "auto", vqa_suffix: bool = False) -> Callable[[object], bool]:
    """The filter of "Cross-modal Information Flow in Multimodal Large Language Models" (Zhang et al.): the greedy
    answer, stripped and lowercased, equals the record's answer."""

    def keep(record) -> bool:
        return answers_correct(model, record_inputs(model, record, template=template, vqa_suffix=vqa_suffix),
                               [record])[0]

    return keep


def answers_correct(model, inputs, records: Sequence) -> list[bool]:
    """:func:`correct_only` for a (left-padded) batch at once: greedy answers of ``inputs``, one per record.

    Raises:
        PromptError: not one record per example.
    """
    if len(records) != inputs.batch_size:
        raise PromptError(f"{len(records)} records for a batch of {inputs.batch_size} examples.")
    answers = model.answer(inputs)
    return [a == str(record_field(r, "answer")).strip().lower() for a, r in zip(answers, records)]


def record_field(record, name: str):
    """``record[name]`` for a dict record, ``record.name`` otherwise (a dataclass such as a shapes or GQA record).

    Raises:
        KeyError, AttributeError: the record has no such field.
    """
    return record[name] if isinstance(record, dict) else getattr(record, name)


def examples(inputs) -> list[tuple[object, int]]:
    """Each example of a left-padded batch alone (``inputs[b]``, padding dropped) with its padding width: its
    position ``p`` is column ``p + offset`` of the batch. A single example gives ``[(inputs, 0)]``.

    Raises:
        PromptError: an example whose padding is not all on the left.
    """
    if inputs.batch_size == 1 and not inputs.has_padding:
        return [(inputs, 0)]
    out = []
    for b in range(inputs.batch_size):
        mask = inputs.attention_mask[b].bool()
        offset = int((~mask).sum())
        if mask[offset:].sum() != len(mask) - offset:
            raise PromptError(f"Example {b} of the batch is not left-padded (its attention mask has a 0 after a 1); "
                              "prepare batches with model.prepare.")
        out.append((inputs[b], offset))
    return out


def check_single(inputs) -> None:
    """Refuse a batch: the analyses that read one example take ``inputs[i]``.

    Raises:
        PromptError: ``inputs`` holds more than one example.
    """
    if inputs.batch_size != 1:
        raise PromptError(f"This analysis takes one example; got a batch of {inputs.batch_size} (use inputs[i]).")
