"""Norm-based attention (Kobayashi et al. 2020; "Investigating Multimodal Interaction in Vision Large Language
Models" (Wei, JAIST master's thesis 2025), sec. 4.2).

For head ``h`` the vector that key ``j`` contributes to query ``i`` is ``alpha_{h,i,j} f_h(x_j)`` with
``f_h(x) = (LN(x) W_V^h + b_V^h) W_O^h`` (no ``b_O``). Per head we report its norm
``alpha_{h,i,j} ||f_h(x_j)||``; for the whole layer the norm of the sum over heads
``||sum_h alpha_{h,i,j} f_h(x_j)||``. ``LN(x) W_V^h + b_V^h`` is read from ``hook_v`` (with and without
LayerNorm folding alike); with GQA a value head is shared by its group of query heads.

Only the requested query rows are kept, and the summed vectors are built a chunk of keys at a time, so
nothing of size ``(query, key, d_model)`` for all keys at once is ever allocated.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import einops
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int

from hooked_vlm.analysis.base import AnalysisResult
from hooked_vlm.errors import PromptError
from hooked_vlm.hooks import pattern_rows, record
from hooked_vlm.inputs import VLMInputs
from hooked_vlm.plot import escape_labels, line_style
from hooked_vlm.positions import Positions, as_integers, as_vlm_inputs, positions

CHUNK_ELEMENTS = 1 << 24  # float32 elements per (query, key chunk, d_model) block: 64 MiB


@dataclass
class NormAttentionResult(AnalysisResult):
    """Norm-based attention of some query rows of one input.

    Attributes:
        per_head: ``[layer, head, query, key]``, ``alpha_{h,i,j} ||f_h(x_j)||``.
        summed: ``[layer, query, key]``, ``||sum_h alpha_{h,i,j} f_h(x_j)||``.
        layers: ``[layer]`` the layers computed; query_positions: ``[query]`` the query rows.
        str_tokens: one label per key position; image_positions, question_positions: for grouping.
    """

    per_head: Float[torch.Tensor, "layer head query key"]
    summed: Float[torch.Tensor, "layer query key"]
    layers: Int[torch.Tensor, " layer"]
    query_positions: Int[torch.Tensor, " query"]
    str_tokens: list[str] = field(default_factory=list)
    image_positions: Int[torch.Tensor, " n_image"] = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    question_positions: Int[torch.Tensor, " n_question"] = field(
        default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def _row(self, query: int) -> int:
        q = self.query_positions.tolist()
        if query < 0 and query >= -len(q):
            return len(q) + query
        if query in q:
            return q.index(query)
        raise PromptError(f"Query {query} was not computed; query_positions are {q}.")

    def to_frame(self) -> pd.DataFrame:
        """Long frame of ``summed``: columns layer, query, key, value."""
        n_layer, n_query, n_key = self.summed.shape
        grid = torch.cartesian_prod(self.layers, self.query_positions, torch.arange(n_key))
        return pd.DataFrame({"layer": grid[:, 0].numpy(), "query": grid[:, 1].numpy(), "key": grid[:, 2].numpy(),
                             "value": self.summed.reshape(-1).numpy()})

    def by_modality(self, query: int = -1) -> pd.DataFrame:
        """Summed norm attention of one query row, totalled per layer over image, question and other text keys."""
        row = self.summed[:, self._row(query)]
        n_key = row.shape[-1]
        image = torch.zeros(n_key, dtype=torch.bool)
        image[self.image_positions] = True
        question = torch.zeros(n_key, dtype=torch.bool)
        question[self.question_positions] = True
        groups = {"image": image, "question": question & ~image, "other text": ~image & ~question}
        totals = {k: row[:, m].sum(-1).tolist() for k, m in groups.items()}
        return pd.DataFrame({"layer": self.layers.tolist(), **totals})

    def plot(self, query: int = -1, *, by: str = "position", skip: Iterable[int] = (), **layout) -> go.Figure:
        """One query row's summed norm attention across layers.

        ``by="position"``: heatmap over layers (y) and key positions (x), the image token span marked above
        (Wei's (2025) figure); ``by="modality"``: its totals over image, question and other text keys per layer.
        ``query`` is a position in ``query_positions`` or an index into it (default: the last row).
        ``skip`` hides key positions (e.g. ``skip=[0]`` for a BOS attention sink) so the rest is readable.
        Key labels in the hover text are escaped.
        """
        if by == "modality":
            df = self.by_modality(query)
            fig = go.Figure([go.Scatter(x=df["layer"], y=df[k], mode="lines+markers", name=k).update(line_style(i))
                             for i, k in enumerate(("image", "question", "other text"))])
            fig.update_xaxes(dtick=1)
            fig.update_layout(title=f"Norm-based attention of position {int(self.query_positions[self._row(query)])}"
                              " by modality", xaxis_title="layer", yaxis_title="sum of ‖Σ αf‖",
                              template="plotly_white")
            fig.update_layout(**layout)
            return fig
        if by != "position":
            raise ValueError(f"by must be 'position' or 'modality', got {by!r}.")
        r = self._row(query)
        z = self.summed[:, r].clone()
        keys = torch.arange(z.shape[-1])
        keep = ~torch.isin(keys, torch.as_tensor(list(skip), dtype=torch.long))
        keep &= keys <= self.query_positions[r]
        labels = escape_labels(self.str_tokens or [str(k) for k in keys.tolist()])
        fig = go.Figure(go.Heatmap(
            z=z[:, keep].numpy(), x=keys[keep].tolist(), y=self.layers.tolist(), colorscale="Viridis",
            customdata=[[labels[k] for k in keys[keep].tolist()]] * len(self.layers),
            hovertemplate="layer %{y}<br>key %{x}: %{customdata}<br>norm %{z:.4g}<extra></extra>",
            colorbar=dict(title="‖Σ αf‖"),
        ))
        shown = keys[keep]
        image = self.image_positions[torch.isin(self.image_positions, shown)]
        if len(image):
            lo, hi = int(image.min()), int(image.max())
            # outline over the heatmap, a band above the axis, and its label above the band
            fig.add_shape(type="rect", xref="x", yref="paper", x0=lo - 0.5, x1=hi + 0.5, y0=0, y1=1,
                          line=dict(color="#d62728", width=1.5, dash="dot"), fillcolor="rgba(0,0,0,0)")
            fig.add_shape(type="rect", xref="x", yref="paper", x0=lo - 0.5, x1=hi + 0.5, y0=1.01, y1=1.05,
                          fillcolor="rgba(214,39,40,0.35)", line=dict(color="#d62728", width=1))
            fig.add_annotation(x=(lo + hi) / 2, y=1.05, xref="x", yref="paper", yanchor="bottom", showarrow=False,
                               text=f"<b>image tokens {lo}–{hi}</b>", font=dict(size=13, color="#d62728"),
                               bgcolor="rgba(255,255,255,0.85)")
        fig.update_layout(
            title=dict(text=f"Norm-based attention of position {int(self.query_positions[r])}", y=0.97,
                       yanchor="top"),
            xaxis_title="key position", yaxis_title="layer", template="plotly_white", margin=dict(t=110),
        )
        fig.update_yaxes(dtick=1)
        fig.update_layout(**layout)
        return fig


def _value_head_index(n_heads: int, n_value_heads: int) -> torch.Tensor:
    if n_value_heads == n_heads:
        return torch.arange(n_heads)
    if n_heads % n_value_heads:
        raise PromptError(f"{n_heads} query heads cannot share {n_value_heads} value heads evenly.")
    return torch.arange(n_heads) // (n_heads // n_value_heads)  # repeat_interleave grouping, as in GQA


def norms_from_values(
    pattern: Float[torch.Tensor, "head query key"],
    values: Float[torch.Tensor, "key value_head d_head"],
    W_O: Float[torch.Tensor, "head d_head d_model"],
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[Float[torch.Tensor, "head query key"], Float[torch.Tensor, "query key"]]:
    """Per-head and summed norm attention of one layer from its pattern rows, values and ``W_O``.

    ``values`` has one entry per value head (GQA: fewer than query heads). Computed in float32, a chunk
    of keys at a time: memory is ``O(query * chunk * d_model)``.
    """
    n_heads, n_query, n_key = pattern.shape
    d_model = W_O.shape[-1]
    heads = _value_head_index(n_heads, values.shape[1]).to(values.device)
    W_O = W_O.float()
    pattern = pattern.float()
    per_head = torch.zeros(n_heads, n_query, n_key, device=pattern.device)
    summed = torch.zeros(n_query, n_key, device=pattern.device)
    chunk = max(1, chunk_elements // (d_model * max(n_heads, n_query)))
    for lo in range(0, n_key, chunk):
        hi = min(n_key, lo + chunk)
        v = values[lo:hi, heads].float()  # [chunk, head, d_head]
        f = einops.einsum(v, W_O, "key head d_head, head d_head d_model -> key head d_model")
        alpha = pattern[:, :, lo:hi]
        per_head[:, :, lo:hi] = alpha * einops.rearrange(f.norm(dim=-1), "key head -> head 1 key")
        mixed = einops.einsum(alpha, f, "head query key, key head d_model -> query key d_model")
        summed[:, lo:hi] = mixed.norm(dim=-1)
    return per_head, summed


@torch.no_grad()
def norm_attention(
    model,
    inputs: VLMInputs,
    *,
    query_positions: Positions | None = None,
    layers: Iterable[int] | None = None,
) -> NormAttentionResult:
    """Norm-based attention of the given query rows at the given layers, for one example.

    Args:
        query_positions: a position set (name such as ``"question"``, or positions); default the last position.
        layers: default every layer. The forward pass stops after the last one asked for.

    Returns:
        :class:`NormAttentionResult` with ``per_head [layer, head, query, key]`` and ``summed [layer, query, key]``
        (keys are all positions of the input; keys after a query get 0).

    Raises:
        PromptError: a batch of several examples (use ``inputs[i]``), bad positions or layers.
    """
    inputs = as_vlm_inputs(model, inputs)
    if inputs.batch_size != 1:
        raise PromptError("norm_attention takes one example; pass inputs[i].")
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else sorted(set(as_integers(layers, "Layers").tolist()))
    if not layers or any(not 0 <= x < n_layers for x in layers):
        raise PromptError(f"layers must be non-empty and within 0..{n_layers - 1}; got {layers}.")
    query = positions(inputs, "last" if query_positions is None else query_positions)
    if len(query) == 0:
        raise PromptError("No query positions given.")
    rows = query.to(model.cfg.device)
    patterns: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}

    per_head, summed = [], []

    def reduce(layer: int):
        # within the layer, so only one layer's values [pos, head, d_head] are held at a time
        def hook(_act, hook) -> None:
            pattern = patterns.pop(f"blocks.{layer}.attn.hook_pattern")[0]
            value = values.pop(f"blocks.{layer}.attn.hook_v")[0]
            h, s = norms_from_values(pattern, value, model.blocks[layer].attn.W_O)
            per_head.append(h.cpu())
            summed.append(s.cpu())

        return hook

    hooks = []
    for layer in layers:
        hooks += [(f"blocks.{layer}.attn.hook_pattern", pattern_rows(patterns, rows)),
                  (f"blocks.{layer}.attn.hook_v", record(values)),
                  (f"blocks.{layer}.hook_attn_out", reduce(layer))]
    model.run_with_hooks(inputs, fwd_hooks=hooks, stop_at_layer=layers[-1] + 1)
    image = inputs.image_positions
    try:
        question = inputs.question_positions
    except PromptError:
        question = torch.zeros(0, dtype=torch.long)
    return NormAttentionResult(
        per_head=torch.stack(per_head),
        summed=torch.stack(summed),
        layers=torch.tensor(layers),
        query_positions=query,
        str_tokens=model.to_str_tokens(inputs),
        image_positions=image.cpu(),
        question_positions=question.cpu(),
    )


__all__ = ["NormAttentionResult", "norm_attention", "norms_from_values"]
