"""Attention knockout (Geva et al. 2023; "Cross-modal Information Flow in Multimodal Large Language Models"
(Zhang et al.), sec. 3.2): block the edges from a source set of positions
to a target set, over a window of layers, and record how the probability of the unablated answer changes.

Edges ``(t, s)`` with ``t`` in the target set and ``s`` in the source set get a score of ``-inf`` before the
softmax (``blocks.{l}.attn.hook_attn_scores``), for every head. For centre layer ``l`` and window ``k`` the
layers ``max(0, l - k//2) .. min(L-1, l + (k-1)//2)`` are blocked (cut short at the edges, not shifted): for odd
``k`` that is ``k//2`` layers on each side; an even ``k`` blocks exactly ``k`` layers, one more before the centre
than after it (the window rule of the causal-tracing code of "Locating and Editing Factual Associations in GPT"
(Meng et al., 2022), which Geva et al. reuse).

Empty or degenerate selections (a source or target set with no position, a source entirely after its target,
a window covering every layer) raise :class:`~hooked_vlm.errors.SelectionWarning`: the result is then 0% change
or a flat curve by construction, not a finding.

A query row whose every key is blocked gets an all-zero pattern (TransformerLens turns the NaN of an
all ``-inf`` softmax into zeros; transformers' eager attention would return NaN there).

Speed: knockout cannot change anything at a position before the first blocked target row, nor anything
before the first blocked layer. One unablated forward (of one input or a left-padded batch of records) records
the residual stream after that row and the keys/values before it; every knocked run then starts at its first
blocked layer and computes only the rows from the first target on (for a batch: the earliest example's), reading
the earlier rows' keys and values from that record. For flows into the last position that is one row per layer
instead of the whole sequence. Sequences of (flow, centre layer, example) run ``batch_size`` at a time; flows with
the same first recomputed row (the three into the question; the three into the last position) share forwards.
On the Llama/Mistral decoders with no hook attached the attention of the knocked rows is written out: every
setting's queries of a record are rows of one matmul against that record's cached (already rotated) keys and
values, which are never concatenated, copied per setting or rotated again. Otherwise (a user's hooks, another
decoder) the knocked runs go through TransformerLens's forward with a frozen KV cache, hooks included.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field

import einops
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from hooked_vlm.analysis.base import (
    PALETTE,
    Aggregate,
    AnalysisResult,
    aggregate,
    correct_only,
    record_field,
    record_inputs,
)
from hooked_vlm.errors import PromptError, warn_selection
from hooked_vlm.hooks import block_attention, block_edges, knockout_hooks, warn_partial_rows
from hooked_vlm.inputs import VLMInputs
from hooked_vlm.plot import escape_label, line_style
from hooked_vlm.positions import (
    POSITION_NAMES,
    Positions,
    as_integers,
    as_vlm_inputs,
    blocked_edges,
    lacks_footprint,
    object_patches,
    positions,
    require_footprint,
)

# The six flows of Zhang et al.: label -> (source, target).
FLOWS: dict[str, tuple[str, str]] = {
    "Image→Question": ("image", "question"),
    "Image→Last": ("image", "last"),
    "Question→Last": ("question", "last"),
    "Last→Last": ("last", "last"),
    "Related→Question": ("related", "question"),
    "Other→Question": ("other", "question"),
}


def _label(spec: Positions) -> str:
    return spec.capitalize() if isinstance(spec, str) else "positions"


def _check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise PromptError(f"window must be a positive whole number of layers, got {window!r}.")
    return int(window)


def window_layers(centre: int, window: int, n_layers: int) -> range:
    """Layers blocked for a centre layer: ``max(0, c - k//2) .. min(L-1, c + (k-1)//2)``, exactly ``k`` layers
    before the edges cut them (even ``k``: one more before the centre than after it)."""
    window = _check_window(window)
    return range(max(0, centre - window // 2), min(n_layers - 1, centre + (window - 1) // 2) + 1)


# ---------------------------------------------------------------------------------------------- engine
def _fused_ok(model) -> bool:
    """Whether the knocked rows can run in :meth:`_Baseline._knocked_fused`: a pre-norm rotary decoder (the Llama
    and Mistral decoders hooked_vlm converts) on one device, with no hook attached to the decoder (the fused path
    calls no hook point, so a user's hook would be skipped; with one the runs go through TransformerLens)."""
    cfg = model.cfg
    plain = (
        cfg.positional_embedding_type == "rotary" and cfg.attention_dir == "causal" and not cfg.attn_only
        and not cfg.parallel_attn_mlp and not cfg.use_attn_result and not cfg.use_split_qkv_input
        and not cfg.use_attn_in and not cfg.use_normalization_before_and_after and not cfg.use_logn_attn
        and not getattr(cfg, "use_attention_sinks", False) and not getattr(cfg, "use_dynamic_ntk_rope", False)
        and getattr(cfg, "clip_qkv", None) is None and not getattr(cfg, "load_in_4bit", False)
        and (cfg.attn_scores_soft_cap is None or cfg.attn_scores_soft_cap <= 0) and cfg.n_devices == 1
        and cfg.original_architecture in ("LlamaForCausalLM", "MistralForCausalLM")
        and all(block.attn.attn_type == "global" for block in model.blocks)
    )
    if not plain:
        return False
    modules = [*model.blocks.modules(), *model.ln_final.modules(), *model.unembed.modules()]
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class _Baseline:
    """One unablated forward, recording what the knocked runs reuse.

    ``resid[l]``: ``blocks.{l}.hook_resid_pre`` rows ``lo:`` ``[batch, pos, d_model]``; ``keys[l]`` /
    ``values[l]``: rows ``:hi`` of ``hook_rot_k`` / ``hook_v`` as ``[batch, kv_head, pos, d_head]`` for the fused
    path (keys rotated once here, not again per knocked run), else ``hook_k`` / ``hook_v`` ``[batch, pos, kv_head,
    d_head]`` (before rotary, what a TransformerLens KV cache holds).
    """

    def __init__(self, model, inputs: VLMInputs, lo: int, hi: int, fused: bool):
        self.model, self.lo, self.hi, self.fused = model, lo, hi, fused
        n_layers = model.cfg.n_layers
        self.mask = inputs.attention_mask.to(model.cfg.device) if inputs.has_padding else None
        self.resid: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
        self.keys: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
        self.values: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]

        def keep(store, layer, rows, heads_first=False):
            def hook(x, hook):
                kept = x[:, rows].detach()
                # a copy: a view would keep the whole tensor alive
                store[layer] = kept.transpose(1, 2).contiguous() if heads_first else kept.clone()

            return hook

        key = "hook_rot_k" if fused else "hook_k"
        hooks = []
        for layer in range(n_layers):
            hooks += [
                (f"blocks.{layer}.hook_resid_pre", keep(self.resid, layer, slice(lo, None))),
                (f"blocks.{layer}.attn.{key}", keep(self.keys, layer, slice(None, hi), fused)),
                (f"blocks.{layer}.attn.hook_v", keep(self.values, layer, slice(None, hi), fused)),
            ]
        final = model.run_with_hooks(inputs, fwd_hooks=hooks, stop_at_layer=n_layers)
        self.probs = self.last_probs(final)

    def last_probs(self, resid: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch d_vocab"]:
        logits = self.model.unembed(self.model.ln_final(resid[:, -1:]))[:, 0]
        return logits.float().softmax(-1)

    def knocked_probs(
        self, blocked: Bool[torch.Tensor, "setting batch query key"], windows: list[range], start: int,
        examples: slice = slice(None),
    ) -> Float[torch.Tensor, "setting batch d_vocab"]:
        """Last-position probabilities of ``examples`` with setting ``i``'s ``blocked[i]`` edges at the layers of
        ``windows[i]``, every (setting, example) one sequence of one batched forward; rows ``start:`` are
        recomputed (``blocked`` holds those query rows), from the earliest window start on."""
        assert self.lo <= start <= self.hi and len(windows) == blocked.shape[0]
        run = self._knocked_fused if self.fused else self._knocked_tl
        out = run(blocked.to(self.model.cfg.device), windows, start, examples)
        return self.last_probs(out).view(*blocked.shape[:2], -1)

    def _knocked_tl(self, blocked, windows, start, examples) -> Float[torch.Tensor, "sequence query d_model"]:
        """Through TransformerLens's forward with a frozen KV cache (any decoder it runs; hooks fire)."""
        model = self.model
        n_set, batch = blocked.shape[:2]
        first = min(w.start for w in windows)

        def tile(x: torch.Tensor) -> torch.Tensor:
            # a view where possible: the frozen entries are only read by torch.cat, which copies anyway
            x = x[examples, :start]
            return x.expand(n_set, *x.shape[1:]) if batch == 1 else x.repeat(n_set, *[1] * (x.dim() - 1))

        entries = [
            TransformerLensKeyValueCacheEntry(
                tile(self.keys[i]) if i >= first else self.keys[i][examples, :0],
                tile(self.values[i]) if i >= first else self.values[i][examples, :0],
                frozen=True,
            )
            for i in range(model.cfg.n_layers)
        ]
        mask = None if self.mask is None else self.mask[examples].repeat(n_set, 1)
        if mask is not None:
            prev = mask[:, :start]
        else:
            prev = torch.ones(n_set * batch, start, dtype=torch.int, device=model.cfg.device)
        cache = TransformerLensKeyValueCache(entries, prev, frozen=True)
        fwd_hooks = []
        for layer in range(first, model.cfg.n_layers):
            active = torch.tensor([layer in w for w in windows], device=blocked.device)
            if active.any():
                per_row = (active[:, None, None, None] & blocked).flatten(0, 1)  # [setting * batch, query, key]
                fwd_hooks.append((f"blocks.{layer}.attn.hook_attn_scores", block_edges(per_row)))
        resid = self.resid[first][examples, start - self.lo :].repeat(n_set, 1, 1)
        with model.hooks(fwd_hooks=fwd_hooks):
            return model(resid, start_at_layer=first, stop_at_layer=model.cfg.n_layers, past_kv_cache=cache,
                         attention_mask=mask)

    def _knocked_fused(self, blocked, windows, start, examples) -> Float[torch.Tensor, "sequence query d_model"]:
        """The same computation, attention written out: the frozen keys/values are read in place (every setting's
        queries of an example are rows of one matmul against that example's cached keys, grouped-query heads
        included), never concatenated, repeated or rotated again; new rows are rotated at their positions."""
        model = self.model
        n_set, batch, rows, n = blocked.shape
        first = min(w.start for w in windows)
        x = self.resid[first][examples, start - self.lo :]
        x = x.expand(n_set, *x.shape).reshape(n_set * batch, rows, -1)  # [(setting batch), query, d_model]
        mask = None if self.mask is None else self.mask[examples]
        rot_mask = None if mask is None else mask.repeat(n_set, 1)  # RoPE positions of a left-padded batch
        # Layout of scores: [batch, kv_head, setting, group, query, key]; True = the edge is cut.
        cut = torch.zeros(batch, rows, n, dtype=torch.bool, device=blocked.device)
        cut[:, :, start:] = torch.ones(rows, rows, dtype=torch.bool, device=blocked.device).triu(1)
        if mask is not None:
            cut |= ~mask.bool()[:, None, :]
        cut = cut[:, None, None, None]
        knocked = einops.rearrange(blocked, "s b q k -> b 1 s 1 q k")
        for layer in range(first, model.cfg.n_layers):
            block = model.blocks[layer]
            attn = block.attn
            normed = block.ln1(x)
            q, k, v = attn.calculate_qkv_matrices(normed, normed, normed)
            q = attn.apply_rotary(q, start, rot_mask)
            k = attn.apply_rotary(k, start, rot_mask)
            kv_heads, d_head = k.shape[2], k.shape[3]
            q = einops.rearrange(q, "(s b) q (h g) d -> b h s g q d", s=n_set, h=kv_heads)
            k = einops.rearrange(k, "(s b) q h d -> b h s 1 d q", s=n_set)
            v = einops.rearrange(v, "(s b) q h d -> b h s 1 q d", s=n_set)
            cached_k = self.keys[layer][examples, :, :start]  # [batch, kv_head, start, d_head]
            cached_v = self.values[layer][examples, :, :start]
            earlier = q.reshape(batch, kv_heads, -1, d_head) @ cached_k.transpose(-1, -2)
            scores = torch.cat([earlier.view(*q.shape[:-1], start), q @ k], -1) / attn.attn_scale
            active = [layer in w for w in windows]
            if any(active):
                on = torch.tensor(active, device=blocked.device)[None, None, :, None, None, None]
                gone = cut | (knocked & on)
            else:
                gone = cut
            scores.masked_fill_(gone, float("-inf"))
            pattern = scores.softmax(-1)
            empty = gone.all(-1, keepdim=True)  # rows with every key cut: NaN, zeros in TransformerLens
            if empty.any():
                pattern.masked_fill_(empty, 0.0)
            queries = q.shape[2] * q.shape[3] * q.shape[4]  # setting x group x row
            z = (pattern[..., :start].reshape(batch, kv_heads, queries, start) @ cached_v).view(*q.shape)
            z = z + pattern[..., start:] @ v
            z = einops.rearrange(z, "b h s g q d -> (s b) q (h g d)")
            attn_out = z @ attn.W_O.reshape(-1, attn.W_O.shape[-1]) + attn.b_O
            mid = x + attn_out
            x = mid + block.mlp(block.ln2(mid))
        return x


def _first_row(blocked: Bool[torch.Tensor, "batch query key"]) -> int:
    rows = torch.nonzero(blocked.any(-1).any(0)).flatten()
    return int(rows[0]) if len(rows) else blocked.shape[-1] - 1


def _centres(layers, n_layers: int) -> list[int]:
    centres = list(range(n_layers)) if layers is None else as_integers(layers, "Centre layers").tolist()
    bad = [x for x in centres if not 0 <= x < n_layers]
    if bad:
        raise PromptError(f"Centre layers {bad} are outside 0..{n_layers - 1}.")
    if not centres:
        raise PromptError("No centre layers given.")
    return centres


# ---------------------------------------------------------------------------------------------- results
@dataclass
class KnockoutResult(AnalysisResult):
    """Relative change of the answer probability when ``source -> target`` is blocked around each centre layer.

    For a single example: ``p_base`` ``[]``, ``token`` ``[]``, ``p_knocked`` / ``relative_change`` ``[layer]``.
    For a batch every tensor gains a leading ``[batch]`` dimension. ``relative_change`` is in percent,
    ``(p_knocked - p_base) / p_base * 100``.
    """

    layers: Int[torch.Tensor, " layer"]
    token: Int[torch.Tensor, "*batch"]
    p_base: Float[torch.Tensor, "*batch"]
    p_knocked: Float[torch.Tensor, "*batch layer"]
    window: int
    source: str = "source"
    target: str = "target"
    token_str: list[str] = field(default_factory=list)

    @property
    def relative_change(self) -> Float[torch.Tensor, "*batch layer"]:
        return (self.p_knocked - self.p_base[..., None]) / self.p_base[..., None] * 100

    @property
    def label(self) -> str:
        return f"{self.source}→{self.target}"

    def to_frame(self) -> pd.DataFrame:
        """Long frame: ``condition`` (the flow), ``x`` (centre layer), ``value`` (relative change, %),
        plus ``example`` for batches."""
        rc = self.relative_change
        rows = rc[None] if rc.dim() == 1 else rc
        frames = [
            pd.DataFrame({"condition": self.label, "x": self.layers.tolist(), "value": r.tolist(), "example": b})
            for b, r in enumerate(rows)
        ]
        df = pd.concat(frames, ignore_index=True)
        return df.drop(columns="example") if rc.dim() == 1 else df

    def plot(self, **layout) -> go.Figure:
        return _plot_frames(self.to_frame(), f"Attention knockout (window {self.window})", **layout)


@dataclass
class KnockoutFlows(AnalysisResult):
    """The flows of Zhang et al. on one input: ``flows[label]`` is a :class:`KnockoutResult`."""

    flows: dict[str, KnockoutResult]
    window: int

    def __getitem__(self, label: str) -> KnockoutResult:
        return self.flows[label]

    def to_frame(self) -> pd.DataFrame:
        frames = [r.to_frame().assign(condition=label) for label, r in self.flows.items()]
        return pd.concat(frames, ignore_index=True)

    def plot(self, **layout) -> go.Figure:
        return _plot_frames(self.to_frame(), f"Attention knockout (window {self.window})", **layout)


def _plot_frames(df: pd.DataFrame, title: str, **layout) -> go.Figure:
    if "example" in df:
        df = df.groupby(["condition", "x"], sort=False)["value"].mean().reset_index()
    fig = go.Figure()
    for i, (cond, part) in enumerate(df.groupby("condition", sort=False)):
        fig.add_trace(go.Scatter(x=part["x"], y=part["value"], mode="lines+markers", name=escape_label(cond),
                                 line=dict(color=PALETTE[i % len(PALETTE)]), marker=dict(size=8))
                      .update(line_style(i)))
    fig.add_hline(y=0, line=dict(color="grey", width=1, dash="dot"))
    fig.update_layout(title=escape_label(title), xaxis_title="centre layer", yaxis_title="relative change of p (%)",
                      template="plotly_white")
    fig.update_xaxes(dtick=1)
    fig.update_layout(**layout)
    return fig


# ---------------------------------------------------------------------------------------------- analyses
def _as_inputs(model, inputs) -> VLMInputs:
    return as_vlm_inputs(model, inputs)


def _run_flows(model, inputs: VLMInputs, specs: dict[str, tuple[Positions, Positions]], window: int, layers,
               box, batch_size: int, boxes=None) -> dict[str, KnockoutResult]:
    window = _check_window(window)
    warn_partial_rows(model, "Attention knockout")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise PromptError(f"batch_size must be a positive integer, got {batch_size!r}.")
    n_layers = model.cfg.n_layers
    centres = _centres(layers, n_layers)
    blocked = {label: blocked_edges(inputs, s, t, box=box, boxes=boxes) for label, (s, t) in specs.items()}
    if window >= n_layers:
        full = sum(len(window_layers(c, window, n_layers)) == n_layers for c in centres)
        warn_selection(f"window={window} is at least the model's n_layers={n_layers}: {full} of the {len(centres)} "
                       "centre layers block every layer, so the curve is flat there. Use a smaller window.")
    starts = {label: _first_row(b) for label, b in blocked.items()}
    base = _Baseline(model, inputs, lo=min(starts.values()), hi=max(starts.values()), fused=_fused_ok(model))
    token = base.probs.argmax(-1)
    p_base = base.probs.gather(-1, token[:, None])[:, 0].cpu()
    n_ex = inputs.batch_size
    p_knocked = {label: torch.empty(n_ex, len(centres)) for label in specs}
    # Flows with the same first recomputed row share forwards: (flow, centre, example) sequences, batch_size each.
    groups: dict[int, list[str]] = {}
    for label, start in starts.items():
        groups.setdefault(start, []).append(label)
    per_forward = min(n_ex, batch_size)
    for start, labels in groups.items():
        settings = [(label, i) for label in labels for i in range(len(centres))]
        step = max(1, batch_size // per_forward)
        for lo_ex in range(0, n_ex, per_forward):
            examples = slice(lo_ex, min(n_ex, lo_ex + per_forward))
            for lo in range(0, len(settings), step):
                chunk = settings[lo : lo + step]
                rows = torch.stack([blocked[label][examples, start:] for label, _ in chunk])
                windows = [window_layers(centres[i], window, n_layers) for _, i in chunk]
                probs = base.knocked_probs(rows, windows, start, examples)  # [setting, example, vocab]
                picked = probs.gather(-1, token[None, examples, None].expand(len(chunk), -1, 1))[..., 0].cpu()
                for (label, i), p in zip(chunk, picked):
                    p_knocked[label][examples, i] = p
    single = n_ex == 1
    words = [model.tokenizer.convert_ids_to_tokens(int(t)) for t in token]
    return {
        label: KnockoutResult(
            layers=torch.tensor(centres),
            token=token[0].cpu() if single else token.cpu(),
            p_base=p_base[0] if single else p_base,
            p_knocked=p_knocked[label][0] if single else p_knocked[label],
            window=window,
            source=_label(s),
            target=_label(t),
            token_str=words,
        )
        for label, (s, t) in specs.items()
    }


@torch.no_grad()
def attention_knockout(
    model,
    inputs: VLMInputs,
    source: Positions,
    target: Positions,
    *,
    window: int = 9,
    layers: Iterable[int] | None = None,
    box=None,
    batch_size: int = 16,
) -> KnockoutResult:
    """Block ``source -> target`` attention in a window of layers around each centre layer.

    Args:
        source, target: position sets: names (``"image"``, ``"question"``, ``"last"``, ``"text"``,
            ``"related"``, ``"other"``) or explicit positions (see :func:`~hooked_vlm.positions.positions`).
        window: k, the number of layers blocked around the centre (``k//2`` on each side for odd k; see
            :func:`window_layers`; cut at the edges). ``k >= n_layers`` warns: windows then cover every layer.
        layers: the centre layers (default: every layer).
        box: the object box(es) for ``"related"`` / ``"other"`` (see :func:`~hooked_vlm.positions.object_patches`).
        batch_size: sequences (one per example and centre layer) computed together in one batched forward
            (memory grows with it: attention scores of the recomputed rows, and on the TransformerLens path the
            cached keys/values before the first target row, once per sequence).

    Returns:
        A :class:`KnockoutResult`; ``p_base`` is the probability of the unablated greedy token at the last
        position, ``p_knocked`` that of the same token with the window blocked.
    """
    inputs = _as_inputs(model, inputs)
    return _run_flows(model, inputs, {"flow": (source, target)}, window, layers, box, batch_size)["flow"]


def _record_box(record):
    objects = getattr(record, "question_objects", None) or record_field(record, "objects")
    return list(objects) if objects else None


@torch.no_grad()
def knockout_flows(
    model,
    inputs: VLMInputs,
    record=None,
    *,
    flows: Iterable[str] | None = None,
    window: int = 9,
    layers: Iterable[int] | None = None,
    box=None,
    batch_size: int = 16,
) -> KnockoutFlows:
    """The six flows of Zhang et al. (:data:`FLOWS`) on one input or a left-padded batch, sharing one unablated
    forward; flows whose first recomputed row is the same (the three into the question, the three into the last
    position) share knocked forwards.

    Related→Question and Other→Question run when a box is known: ``box=`` (for every example), or the
    ``question_objects`` of ``record`` (the objects the question names), else its ``objects``; their union is the
    related region. For a batch of several records (``model.prepare([q1, q2], [im1, im2])``) pass ``record`` as
    the list of them, one per example: each example uses its own record's boxes (all records must have objects,
    or none). ``flows`` picks labels of :data:`FLOWS`; ``batch_size`` counts sequences (one per example, flow and
    centre layer) per forward; the other arguments are those of :func:`attention_knockout`. On InstructBLIP
    (query tokens without a patch footprint) the default leaves Related/Other out, and asking for them raises
    :class:`PromptError`.
    """
    inputs = _as_inputs(model, inputs)
    boxes = None
    if isinstance(record, (list, tuple)):
        if len(record) != inputs.batch_size:
            raise PromptError(f"record has {len(record)} records for a batch of {inputs.batch_size} examples; "
                              "give one record per example.")
        if box is None:
            boxes = [_record_box(r) for r in record]
            missing = [b for b, x in enumerate(boxes) if x is None]
            if missing and len(missing) < len(boxes):
                raise PromptError(f"The records of examples {missing} have no objects but the others do: "
                                  "Related/Other would run for only some examples; batch them separately.")
            if missing:
                boxes = None
    elif box is None and record is not None:
        box = _record_box(record)
    wanted = list(FLOWS) if flows is None else list(flows)
    unknown = [f for f in wanted if f not in FLOWS]
    if unknown:
        raise PromptError(f"Unknown flows {unknown}; choose from {list(FLOWS)}.")
    if flows is None and lacks_footprint(inputs):
        box = boxes = None  # query tokens: Related/Other are undefined, run the other flows
    elif any(FLOWS[f][0] in ("related", "other") for f in wanted):
        require_footprint(inputs, next(FLOWS[f][0] for f in wanted if FLOWS[f][0] in ("related", "other")))
    if box is None and boxes is None:
        if flows is not None and any(FLOWS[f][0] in ("related", "other") for f in wanted):
            raise PromptError("Related/Other flows need object boxes: pass record= with objects or box=.")
        wanted = [f for f in wanted if FLOWS[f][0] not in ("related", "other")]
    specs = {f: FLOWS[f] for f in wanted}
    return KnockoutFlows(_run_flows(model, inputs, specs, window, layers, box, batch_size, boxes), window=window)


def aggregate_knockout(
    model,
    records: Iterable,
    *,
    flows: Iterable[str] | None = None,
    window: int = 9,
    layers: Iterable[int] | None = None,
    only_correct: bool = True,
    template: str | None = "auto",
    vqa_suffix: bool = False,
    batch_size: int = 16,
    progress: bool = True,
) -> Aggregate:
    """:func:`knockout_flows` over records, keeping only those the model answers correctly (Zhang et al.).

    Returns an :class:`~hooked_vlm.analysis.base.Aggregate` (condition = flow, x = centre layer,
    value = relative change in %); ``.plot()`` draws the mean curves with 95% bands.
    """
    keep = correct_only(model, template=template, vqa_suffix=vqa_suffix) if only_correct else None

    def run(record) -> pd.DataFrame:
        inputs = record_inputs(model, record, template=template, vqa_suffix=vqa_suffix)
        return knockout_flows(model, inputs, record, flows=flows, window=window, layers=layers,
                              batch_size=batch_size).to_frame()

    return aggregate(records, run, keep=keep, title=f"Attention knockout (window {window})",
                     x_label="centre layer", y_label="relative change of p (%)", progress=progress)


# block_attention, knockout_hooks (hooked_vlm.hooks), positions, object_patches, blocked_edges, POSITION_NAMES and
# Positions (hooked_vlm.positions) were defined here first and stay importable from here.
__all__ = [
    "FLOWS",
    "POSITION_NAMES",
    "Positions",
    "KnockoutFlows",
    "KnockoutResult",
    "aggregate_knockout",
    "attention_knockout",
    "block_attention",
    "blocked_edges",
    "knockout_flows",
    "knockout_hooks",
    "object_patches",
    "positions",
    "window_layers",
]
