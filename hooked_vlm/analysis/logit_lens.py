"""Logit lens over the residual stream: per-layer decoding, answer probability across layers
("Cross-modal Information Flow in Multimodal Large Language Models" (Zhang et al.), sec. 7) and visual
verbalization ("Investigating Multimodal Interaction in Vision Large Language Models" (Wei, JAIST master's
thesis 2025), ch. 3).

Layers are numbered ``0..L`` (``L = model.cfg.n_layers``): layer ``l < L`` is ``blocks.l.hook_resid_pre``
(transformers' ``hidden_states[l]``, layer 0 being the embeddings) and layer ``L`` is the final
``blocks.{L-1}.hook_resid_post``, so that ``LogitLens`` at layer ``L`` is the model's own prediction.

Only the residuals at the requested positions are kept (``[L+1, pos, d_model]``); log-probabilities
``[.., vocab]`` are computed on demand, one layer and ``chunk_size`` positions at a time.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
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
    correct_only,
    examples,
    record_field,
    record_inputs,
)
from hooked_vlm.errors import HookedVLMError, PromptError, warn_selection
from hooked_vlm.hooks import ResidualCollector as ResidualCollector  # re-exported: it was defined here first
from hooked_vlm.hooks import resid_hook_names as resid_hook_names  # re-exported: these were defined here first
from hooked_vlm.hooks import residual_hook as residual_hook
from hooked_vlm.plot import escape_label, escape_labels
from hooked_vlm.positions import as_integers, as_vlm_inputs

DEFAULT_CHUNK = 128

# NLTK's English stop-word list (179 words), inlined so the toolkit needs no NLTK download.
STOP_WORDS = frozenset(
    """i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him
    his himself she she's her hers herself it it's its itself they them their theirs themselves what which who
    whom this that that'll these those am is are was were be been being have has had having do does did doing a
    an the and but if or because as until while of at by for with about against between into through during
    before after above below to from up down in out on off over under again further then once here there when
    where why how all any both each few more most other some such no nor not only own same so than too very s t
    can will just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't
    doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't
    shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't""".split()
)
_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})


# --------------------------------------------------------------------------- positions
def image_token_positions(inputs) -> Int[Tensor, " n_image"]:
    """Image positions of a one-example input, anyres newline tokens excluded."""
    check_single(inputs)
    image, newline = inputs.image_positions, inputs.image_newline_positions
    return image[~torch.isin(image, newline)]


def _positions(inputs, positions) -> Int[Tensor, " pos"]:
    if positions is None:
        return torch.arange(inputs.seq_len)
    pos = as_integers(positions, "Positions")
    bad = pos[(pos < -inputs.seq_len) | (pos >= inputs.seq_len)]
    if len(bad):
        raise PromptError(f"Positions {bad.tolist()} are out of range for {inputs.seq_len} positions.")
    if len(pos) == 0:
        warn_selection("The logit lens positions select no position: the result is empty.")
    return pos % inputs.seq_len


@torch.no_grad()
def collect_residuals(model, inputs, positions=None) -> Float[Tensor, "layer pos d_model"]:
    """Lens residuals of a one-example input at ``positions`` (default: all), layers ``0..L``."""
    inputs = as_vlm_inputs(model, inputs)
    check_single(inputs)
    return _collect_examples(model, inputs, [_positions(inputs, positions)])[0]


@torch.no_grad()  # detached residuals (autograd would hold every layer), and the image memo needs no autograd
def _collect_examples(model, inputs, columns: list[Int[Tensor, " pos"]]) -> list[Float[Tensor, "layer pos d_model"]]:
    """Lens residuals of each example ``b`` of a batch at its own batch columns ``columns[b]``, layers ``0..L``.

    The hooks keep only those rows."""
    names = resid_hook_names(model.cfg.n_layers)
    wanted = set(names)
    store: dict[str, list[Tensor]] = {}

    def hook(act: Float[Tensor, "batch seq d_model"], hook) -> None:
        store[hook.name] = [act[b, cols.to(act.device)].detach() for b, cols in enumerate(columns)]

    model.run_with_hooks(inputs, fwd_hooks=[(wanted.__contains__, hook)], return_type=None)
    return [torch.stack([store[name][b] for name in names]) for b in range(len(columns))]


def _per_example(values, n: int, what: str) -> list:
    """``values`` as one entry per example (None: ``[None] * n``)."""
    if values is None:
        return [None] * n
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != n:
        raise PromptError(f"{what} must give one entry per example of the batch of {n}; got {values!r}.")
    return list(values)


# --------------------------------------------------------------------------- the lens itself
def _unfold_final_norm(model, x: Tensor) -> Tensor:
    """With ``fold_ln=True`` the final norm weight w lives in ``W_U``; ``(x / w) @ W_U`` is ``x @ W_U_raw``."""
    if model.cfg.normalization_type not in ("RMSPre", "LNPre"):
        return x
    w = getattr(model, "final_norm_weight", None)
    if w is None:
        raise HookedVLMError(
            "apply_ln=False needs the final norm's weight, which this model folded into W_U without keeping. "
            "Load it with HookedVLM.from_pretrained(..., fold_ln=False)."
        )
    return x / w.to(x.dtype)


def lens_log_probs(
    model, resid: Float[Tensor, "*batch d_model"], *, apply_ln: bool = True
) -> Float[Tensor, "*batch vocab"]:
    """``log_softmax(ln_final(resid) @ W_U + b_U)`` in float32 (without ``ln_final`` if ``apply_ln=False``).

    ``apply_ln=False`` is transformers' ``lm_head(resid)``; on a ``fold_ln=True`` model the folded final-norm
    weight is divided back out (the centring of ``W_U`` shifts all logits equally, so log-probs are unchanged).
    """
    x = resid.to(model.cfg.device, model.cfg.dtype)
    if apply_ln:
        x = model.ln_final(x)
    else:
        x = _unfold_final_norm(model, x)
    logits = x @ model.W_U + model.b_U
    return logits.float().log_softmax(-1)


def spellings(word: str) -> dict[str, str]:
    """``{"lower": "red", "capitalized": "Red"}``: the word with its first letter lower- and upper-cased."""
    word = word.strip()
    if not word:
        raise PromptError("Empty word.")
    return {"lower": word[0].lower() + word[1:], "capitalized": word[0].upper() + word[1:]}


def _index_list(index, n: int) -> tuple[list[int], bool]:
    """Layer ``index`` (int, slice, sequence, tensor) as a list, and whether it drops the dimension."""
    if isinstance(index, slice):
        return list(range(n))[index], False
    scalar = isinstance(index, (int, np.integer)) or (isinstance(index, Tensor) and index.dim() == 0)
    layers = as_integers(index, "Layer indices")
    bad = layers[(layers < -n) | (layers >= n)]
    if len(bad):
        raise IndexError(f"layers {bad.tolist()} out of range for {n} layers")
    return (layers % n).tolist(), scalar


class LazyLogProbs:
    """Log-probabilities ``[layer, pos, vocab]`` computed on indexing, never all at once.

    ``lp[l]`` is ``[pos, vocab]``; ``lp[l, p, token]``, ``lp[:, :, token_ids]``, ``lp[-1, 3:5]`` work as on a
    tensor (ints, slices, lists or tensors per axis). Positions are indices into ``result.positions``.
    Positions are selected before unembedding, so ``lp[:, :, token]`` costs one chunked pass and little memory.
    """

    def __init__(self, result: LogitLensResult):
        self._r = result

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self._r.n_layers, len(self._r.positions), self._r.d_vocab)

    def __len__(self) -> int:
        return self._r.n_layers

    def __iter__(self):
        for layer in range(self._r.n_layers):
            yield self[layer]

    def __getitem__(self, index) -> Tensor:
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 3:
            raise IndexError("LogitLensResult.log_probs has three axes: layer, position, vocab.")
        layer_index, pos_index, vocab_index = index + (slice(None),) * (3 - len(index))
        layers, drop = _index_list(layer_index, self._r.n_layers)
        out = [self._r._map_layer(layer, lambda lp: lp[..., vocab_index], pos_index) for layer in layers]
        if drop:
            return out[0]
        return torch.stack(out) if out else torch.empty(0)

    def materialize(self) -> Float[Tensor, "layer pos vocab"]:
        """All of it as one tensor: only for small models or few positions."""
        return self[:]


class TopK(NamedTuple):
    probs: Float[Tensor, "layer pos k"]
    ids: Int[Tensor, "layer pos k"]


@dataclass
class LogitLensResult(AnalysisResult):
    """The residual stream at ``positions`` for layers ``0..L``, decoded through the unembedding on demand.

    Attributes:
        resid: ``[L+1, pos, d_model]`` lens residuals (layer ``L`` is the final ``resid_post``).
        positions: ``[pos]`` sequence positions, in the order of the ``pos`` axis.
        labels: the token label of each position (``model.to_str_tokens`` spelling).
        apply_ln: whether intermediate layers go through ``ln_final`` (layer ``L`` always does, as in the model).
    """

    resid: Float[Tensor, "layer pos d_model"]
    positions: Int[Tensor, " pos"]
    labels: list[str]
    apply_ln: bool
    model: object = field(repr=False)
    chunk_size: int = DEFAULT_CHUNK

    @property
    def n_layers(self) -> int:
        """``L+1``: the embeddings, the input of every later block and the final residual."""
        return self.resid.shape[0]

    @property
    def d_vocab(self) -> int:
        return self.model.cfg.d_vocab_out

    @property
    def log_probs(self) -> LazyLogProbs:
        """Lazy ``[L+1, pos, vocab]`` log-probabilities; index it like a tensor."""
        return LazyLogProbs(self)

    def _map_layer(self, layer: int, fn: Callable, pos_index=slice(None)):
        """``fn(log_probs[layer, pos_index])`` (a tensor or a tuple of them), ``chunk_size`` positions at a time."""
        resid = self.resid[layer][pos_index]
        apply_ln = self.apply_ln or layer == self.n_layers - 1
        with torch.no_grad():
            if resid.dim() == 1 or resid.shape[0] <= self.chunk_size:
                return fn(lens_log_probs(self.model, resid, apply_ln=apply_ln))
            parts = [fn(lens_log_probs(self.model, resid[i : i + self.chunk_size], apply_ln=apply_ln))
                     for i in range(0, resid.shape[0], self.chunk_size)]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(p) for p in zip(*parts))
        return torch.cat(parts)

    def _map(self, fn: Callable):
        """``fn`` applied to every layer's ``[pos, vocab]`` log-probs, stacked over layers."""
        per_layer = [self._map_layer(layer, fn) for layer in range(self.n_layers)]
        if isinstance(per_layer[0], tuple):
            return tuple(torch.stack(p) for p in zip(*per_layer))
        return torch.stack(per_layer)

    def top_k(self, k: int = 5) -> TopK:
        """The ``k`` most probable tokens per layer and position: ``probs, ids`` each ``[L+1, pos, k]``."""
        values, ids = self._map(lambda lp: tuple(lp.topk(k, dim=-1)))
        return TopK(values.exp(), ids)

    def prob(self, token: int | str | Tensor) -> Float[Tensor, "layer pos"] | dict[str, Float[Tensor, "layer pos"]]:
        """Probability ``[L+1, pos]`` of a token id; for a word, a dict ``{spelling: [L+1, pos]}``.

        A word gives its first answer token (``model.token_id``) in two spellings, keyed by the spelling:
        first letter lower-cased and upper-cased (``{"red": ..., "Red": ...}``; one entry if they coincide).
        They are kept apart, not summed: add them if you want the case-blind probability.
        """
        if isinstance(token, str):
            return {s: self.prob(self.model.token_id(s)) for s in dict.fromkeys(spellings(token).values())}
        ids = as_integers(token, "A token id")
        if len(ids) != 1:
            raise PromptError(f"prob takes one token id or word; got {ids.tolist()}.")
        tok = int(ids[0])
        if not 0 <= tok < self.d_vocab:
            raise PromptError(f"Token id {tok} is outside the vocabulary 0..{self.d_vocab - 1}.")
        return self._map(lambda lp: lp[..., tok]).exp()

    def to_frame(self, k: int = 1) -> pd.DataFrame:
        """Long format: one row per (layer, position, rank) with ``token_id``, ``token`` and ``prob``."""
        top = self.top_k(k)
        decode = _decoder(self.model.tokenizer)
        n_layers, n_pos, _ = top.ids.shape
        layer, pos, rank = torch.meshgrid(torch.arange(n_layers), torch.arange(n_pos), torch.arange(k), indexing="ij")
        ids = top.ids.flatten().tolist()
        return pd.DataFrame({
            "layer": layer.flatten().numpy(),
            "position": self.positions[pos.flatten()].numpy(),
            "label": [self.labels[i] for i in pos.flatten().tolist()],
            "rank": rank.flatten().numpy(),
            "token_id": ids,
            "token": [decode(i) for i in ids],
            "prob": top.probs.flatten().cpu().numpy(),
        })

    def plot(self, words: Iterable[str] | None = None, *, position: int = -1, **layout) -> go.Figure:
        """Heatmap of the top-1 token (text) and its probability (colour) over layers x positions.

        With ``words``, instead the probability across layers of each word's two spellings at
        ``position`` (an index into ``self.positions``; default the last one). Token text is escaped.
        """
        fig = go.Figure()
        if words is not None:
            for i, word in enumerate(words):
                for dash, (spelling, p) in zip(("solid", "dot"), self.prob(word).items()):
                    fig.add_trace(go.Scatter(x=list(range(self.n_layers)), y=p[:, position].cpu().numpy(),
                                             mode="lines+markers", name=escape_label(spelling),
                                             line=dict(color=PALETTE[i % len(PALETTE)], dash=dash)))
            fig.update_layout(title=f"Logit lens at {escape_label(repr(self.labels[position]))}", xaxis_title="layer",
                              yaxis_title="probability", template="plotly_white")
            fig.update_xaxes(dtick=1)
        else:
            top = self.top_k(1)
            decode = _decoder(self.model.tokenizer)
            text = [escape_labels(decode(i) for i in row) for row in top.ids[..., 0].tolist()]
            labels = escape_labels(self.labels)
            fig.add_trace(go.Heatmap(z=top.probs[..., 0].cpu().numpy(), text=text, texttemplate="%{text}",
                                     x=list(range(len(self.positions))), y=list(range(self.n_layers)),
                                     customdata=[labels] * self.n_layers,
                                     hovertemplate="layer %{y}, position %{customdata}<br>top-1 %{text}: "
                                                   "p=%{z:.3f}<extra></extra>",
                                     colorscale="Blues", zmin=0, zmax=1, colorbar=dict(title="p(top-1)")))
            fig.update_xaxes(tickvals=list(range(len(self.positions))), ticktext=labels)
            fig.update_yaxes(dtick=1)
            fig.update_layout(title="Logit lens: top-1 token", xaxis_title="position", yaxis_title="layer",
                              template="plotly_white")
        fig.update_layout(**layout)
        return fig


def _decoder(tokenizer) -> Callable[[int], str]:
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id])
        return cache[token_id]

    return decode


def logit_lens(
    model, inputs, *, positions=None, apply_ln: bool = True, chunk_size: int = DEFAULT_CHUNK
) -> LogitLensResult:
    """Run the model once and keep the lens residuals at ``positions`` (default: every position).

    Args:
        positions: sequence positions (whole numbers, negative allowed, or a tensor such as
            ``inputs.image_positions``); an empty selection warns (:class:`~hooked_vlm.errors.SelectionWarning`).
        apply_ln: pass intermediate layers through ``ln_final`` (the default); ``False`` is the reference
            code of Zhang et al. (``lm_head(hidden_states[l])``); works with or without ``fold_ln``.
            The last layer always gets ``ln_final``, so it equals the model's own log-probs.
        chunk_size: positions unembedded at a time.
    """
    inputs = as_vlm_inputs(model, inputs)
    check_single(inputs)
    return _lens(model, inputs, [(inputs, 0)], [_positions(inputs, positions)], apply_ln, chunk_size)[0]


def logit_lens_batch(
    model, inputs, *, positions: Sequence | None = None, apply_ln: bool = True, chunk_size: int = DEFAULT_CHUNK
) -> list[LogitLensResult]:
    """:func:`logit_lens` of every example of a left-padded batch from one forward pass: ``result[b]`` equals
    ``logit_lens(model, inputs[b], positions=positions[b])`` up to float rounding.

    Args:
        positions: one entry per example, in that example's own positions (those of ``inputs[b]``, padding
            dropped), as :func:`logit_lens` takes them; default every position of every example.

    Raises:
        PromptError: not one ``positions`` entry per example, bad positions, a batch that is not left-padded.
    """
    inputs = as_vlm_inputs(model, inputs)
    singles = examples(inputs)
    wanted = _per_example(positions, len(singles), "positions")
    pos = [_positions(single, p) for (single, _), p in zip(singles, wanted)]
    return _lens(model, inputs, singles, pos, apply_ln, chunk_size)


def _lens(model, inputs, singles: list, pos: list[Tensor], apply_ln: bool, chunk_size: int) -> list[LogitLensResult]:
    """One forward of ``inputs``; per example ``(inputs[b], padding)`` of ``singles`` its lens at ``pos[b]``."""
    resid = _collect_examples(model, inputs, [p + offset for p, (_, offset) in zip(pos, singles)])
    out = []
    for r, p, (single, _) in zip(resid, pos, singles):
        labels = model.to_str_tokens(single)
        out.append(LogitLensResult(r, p, [labels[i] for i in p.tolist()], apply_ln, model, chunk_size))
    return out


# --------------------------------------------------------------------------- answer probability (Zhang et al., sec. 7)
@dataclass
class AnswerProbabilityResult(AnalysisResult):
    """Probability across layers ``0..L`` of the answer's first token at the last position.

    Attributes:
        probs: ``{condition: [L+1]}`` with conditions ``answer_lower``, ``answer_capitalized`` and, given a
            false option, ``false_lower``, ``false_capitalized`` (first letter lower-/upper-cased).
        spellings, token_ids: per condition, the spelling used and its first token id.
    """

    probs: dict[str, Float[Tensor, " layer"]]
    spellings: dict[str, str]
    token_ids: dict[str, int]
    apply_ln: bool

    def to_frame(self) -> pd.DataFrame:
        """Columns ``condition, layer, spelling, token_id, prob``."""
        rows = [
            {"condition": c, "layer": layer, "spelling": self.spellings[c], "token_id": self.token_ids[c], "prob": v}
            for c, p in self.probs.items()
            for layer, v in enumerate(p.tolist())
        ]
        return pd.DataFrame(rows, columns=["condition", "layer", "spelling", "token_id", "prob"])

    def plot(self, **layout) -> go.Figure:
        fig = go.Figure()
        for i, (cond, p) in enumerate(self.probs.items()):
            who = "answer" if cond.startswith("answer") else "false option"
            fig.add_trace(go.Scatter(x=list(range(len(p))), y=p.cpu().numpy(), mode="lines+markers",
                                     name=f"{who} {escape_label(repr(self.spellings[cond]))}",
                                     line=dict(color=PALETTE[i % len(PALETTE)],
                                               dash="dot" if cond.endswith("capitalized") else "solid")))
        title = "Answer probability at the last position" + ("" if self.apply_ln else " (no final norm)")
        fig.update_layout(title=title, xaxis_title="layer", yaxis_title="probability", template="plotly_white")
        fig.update_xaxes(dtick=1)
        fig.update_layout(**layout)
        return fig


def answer_probability(
    model, inputs, answer: str, *, false_option: str | None = None, apply_ln: bool = True
) -> AnswerProbabilityResult:
    """Per-layer probability, at the last position, of the first token of ``answer`` (and ``false_option``),
    each lower- and Capitalized (first letter). ``apply_ln=False``: see :func:`logit_lens`.

    Raises:
        PromptError: a spelling whose first token is the tokenizer's unknown token (its probability would be
            that of ``<unk>``), named with its word; an empty word.
    """
    inputs = as_vlm_inputs(model, inputs)
    spelled, ids = _answer_ids(model, answer, false_option)
    lens = logit_lens(model, inputs, positions=[inputs.last_position], apply_ln=apply_ln)
    return _answer_result(lens, spelled, ids, apply_ln)


def answer_probability_batch(
    model,
    inputs,
    answers: Sequence[str],
    *,
    false_options: Sequence[str | None] | None = None,
    apply_ln: bool = True,
) -> list[AnswerProbabilityResult]:
    """:func:`answer_probability` of every example of a left-padded batch from one forward pass, with one answer
    (and false option, or None) per example: ``result[b]`` equals ``answer_probability(model, inputs[b],
    answers[b], false_option=false_options[b])`` up to float rounding.

    Raises:
        PromptError: as :func:`answer_probability`; not one answer (false option) per example.
    """
    inputs = as_vlm_inputs(model, inputs)
    singles = examples(inputs)
    answers = _per_example(answers, len(singles), "answers")
    words = [_answer_ids(model, a, f) for a, f in zip(answers, _per_example(false_options, len(singles),
                                                                                "false_options"))]
    last = [torch.tensor([single.last_position]) for single, _ in singles]
    lenses = _lens(model, inputs, singles, last, apply_ln, DEFAULT_CHUNK)
    return [_answer_result(lens, spelled, ids, apply_ln) for lens, (spelled, ids) in zip(lenses, words)]


def _answer_ids(model, answer: str, false_option: str | None) -> tuple[dict[str, str], dict[str, int]]:
    """Per condition of :class:`AnswerProbabilityResult`, the spelling and its first token id."""
    words = {"answer": answer} | ({"false": false_option} if false_option else {})
    spelled = {f"{who}_{case}": s for who, w in words.items() for case, s in spellings(w).items()}
    ids = {}
    for c, s in spelled.items():
        try:
            ids[c] = int(model.token_id(s))
        except PromptError as err:
            who = "answer" if c.startswith("answer") else "false option"
            raise PromptError(f"The {who} {words[c.split('_')[0]]!r} (spelling {s!r}): {err}") from err
    if false_option and ids["false_lower"] == ids["answer_lower"]:
        warn_selection(f"The answer {answer!r} and the false option {false_option!r} start with the same token "
                       f"{ids['answer_lower']}: their curves are identical.")
    return spelled, ids


def _answer_result(lens: LogitLensResult, spelled: dict[str, str], ids: dict[str, int], apply_ln: bool
                   ) -> AnswerProbabilityResult:
    probs = lens._map(lambda lp: lp[0, list(ids.values())]).exp()
    return AnswerProbabilityResult({c: probs[:, i] for i, c in enumerate(ids)}, spelled, ids, apply_ln)


# --------------------------------------------------------------------------- visual verbalization (Wei 2025, ch. 3)
def content_words(text: str, stop_words: frozenset[str] = STOP_WORDS) -> list[str]:
    """Lower-cased words of ``text`` with punctuation (as spaces) and stop words removed."""
    return [w for w in text.lower().translate(_PUNCT_TO_SPACE).split() if w not in stop_words]


@dataclass
class VerbalizationResult(AnalysisResult):
    """Per-layer precision and recall of the image tokens' top-1 decoded words against a caption.

    Attributes:
        precision: ``[L+1]`` decoded words found in the caption / all decoded words (NaN if none decoded).
        recall: ``[L+1]`` distinct caption words decoded by some image token / distinct caption words.
        top1: ``[L+1, n_image]`` top-1 token id of every image position (newline tokens excluded).
        decoded: per layer, the content words decoded there (a multiset, in position order).
        caption_words: the distinct caption content words.
    """

    precision: Float[Tensor, " layer"]
    recall: Float[Tensor, " layer"]
    top1: Int[Tensor, "layer n_image"]
    decoded: list[list[str]]
    caption_words: list[str]
    positions: Int[Tensor, " n_image"]

    def to_frame(self) -> pd.DataFrame:
        """Columns ``condition`` (precision/recall), ``layer``, ``value``."""
        rows = [{"condition": name, "layer": layer, "value": v}
                for name, t in (("precision", self.precision), ("recall", self.recall))
                for layer, v in enumerate(t.tolist())]
        return pd.DataFrame(rows, columns=["condition", "layer", "value"])

    def plot(self, **layout) -> go.Figure:
        fig = go.Figure()
        for i, (name, t) in enumerate((("precision", self.precision), ("recall", self.recall))):
            fig.add_trace(go.Scatter(x=list(range(len(t))), y=t.cpu().numpy(), mode="lines+markers", name=name,
                                     line=dict(color=PALETTE[i])))
        fig.update_layout(title="Visual verbalization (logit lens on image tokens)", xaxis_title="layer",
                          yaxis_title="score", yaxis_range=[0, 1], template="plotly_white")
        fig.update_xaxes(dtick=1)
        fig.update_layout(**layout)
        return fig


def verbalization_scores(
    decoded_tokens: Sequence[str], caption: str | Sequence[str], stop_words: frozenset[str] = STOP_WORDS
) -> tuple[float, float, list[str], list[str]]:
    """``precision, recall, decoded content words, distinct caption words`` for one layer's decoded tokens.

    Every decoded token is cleaned like the caption (lower case, punctuation and stop words dropped), and
    whatever words remain count as decoded words. Several captions are pooled into one word set.
    """
    captions = [caption] if isinstance(caption, str) else list(caption)
    caption_words = list(dict.fromkeys(w for c in captions for w in content_words(c, stop_words)))
    decoded = [w for tok in decoded_tokens for w in content_words(tok, stop_words)]
    wanted = set(caption_words)
    precision = sum(w in wanted for w in decoded) / len(decoded) if decoded else math.nan
    recall = len(wanted & set(decoded)) / len(wanted) if wanted else math.nan
    return precision, recall, decoded, caption_words


def visual_verbalization(
    model, inputs, caption: str | Sequence[str], *, apply_ln: bool = True, stop_words: frozenset[str] = STOP_WORDS
) -> VerbalizationResult:
    """Wei (2025), ch. 3: decode every image token (anyres newlines excluded) at every layer to its top-1 token
    (special tokens decode to nothing) and score the words against ``caption`` (one or several captions).

    An empty caption, or one of stop words only, warns (:class:`~hooked_vlm.errors.SelectionWarning`): recall is
    then NaN at every layer and precision 0 or NaN."""
    inputs = as_vlm_inputs(model, inputs)
    _check_caption(caption, stop_words)
    positions = image_token_positions(inputs)
    if len(positions) == 0:
        raise PromptError("The input has no image tokens.")
    lens = logit_lens(model, inputs, positions=positions, apply_ln=apply_ln)
    return _verbalize(model, lens, caption, stop_words)


def visual_verbalization_batch(
    model,
    inputs,
    captions: Sequence[str | Sequence[str]],
    *,
    apply_ln: bool = True,
    stop_words: frozenset[str] = STOP_WORDS,
) -> list[VerbalizationResult]:
    """:func:`visual_verbalization` of every example of a left-padded batch from one forward pass, with one
    caption (or list of captions) per example: ``result[b]`` equals ``visual_verbalization(model, inputs[b],
    captions[b])`` up to float rounding (and the rare top-1 tie it can flip).

    Raises:
        PromptError: as :func:`visual_verbalization` (naming the example without image tokens); not one caption
            entry per example.
    """
    inputs = as_vlm_inputs(model, inputs)
    singles = examples(inputs)
    captions = _per_example(captions, len(singles), "captions")
    for caption in captions:
        _check_caption(caption, stop_words)
    positions = [image_token_positions(single) for single, _ in singles]
    empty = [b for b, p in enumerate(positions) if len(p) == 0]
    if empty:
        raise PromptError(f"Examples {empty} of the batch have no image tokens.")
    lenses = _lens(model, inputs, singles, positions, apply_ln, DEFAULT_CHUNK)
    return [_verbalize(model, lens, caption, stop_words) for lens, caption in zip(lenses, captions)]


def _check_caption(caption, stop_words: frozenset[str]) -> None:
    captions = [caption] if isinstance(caption, str) else list(caption)
    if not all(isinstance(c, str) for c in captions):
        raise PromptError(f"caption must be a string or a list of strings; got {caption!r}.")
    if not any(content_words(c, stop_words) for c in captions):
        warn_selection(f"The caption {caption!r} has no content words (it is empty or all stop words): recall is "
                       "NaN and precision is 0 or NaN at every layer.")


def _verbalize(model, lens: LogitLensResult, caption, stop_words: frozenset[str]) -> VerbalizationResult:
    """Scores of the top-1 tokens of ``lens`` (at the image positions) against ``caption``."""
    top1 = lens._map(lambda lp: lp.argmax(-1))
    cache: dict[int, str] = {}
    precision, recall, decoded = [], [], []
    caption_words: list[str] = []
    for row in top1.tolist():
        tokens = [cache.setdefault(i, model.tokenizer.decode([i], skip_special_tokens=True)) for i in row]
        p, r, words, caption_words = verbalization_scores(tokens, caption, stop_words)
        precision.append(p)
        recall.append(r)
        decoded.append(words)
    return VerbalizationResult(torch.tensor(precision), torch.tensor(recall), top1, decoded, caption_words,
                               lens.positions)


# --------------------------------------------------------------------------- over records
def _as_xframe(df: pd.DataFrame, value: str) -> pd.DataFrame:
    return df.rename(columns={"layer": "x", value: "value"})[["condition", "x", "value"]]


def answer_probability_over(
    model,
    records: Iterable,
    *,
    apply_ln: bool = True,
    only_correct: bool = True,
    template: str | None = "auto",
    vqa_suffix: bool = False,
    progress: bool = True,
) -> Aggregate:
    """:func:`answer_probability` over records (``answer``, ``false_option`` where set), conditions
    ``answer_lower``, ``answer_capitalized``, ``false_lower``, ``false_capitalized``.

    ``only_correct`` keeps the records the model answers correctly (Zhang et al.'s filter, :func:`correct_only`);
    Zhang et al. also appended their VQA suffix (``vqa_suffix=True``).
    """

    def one(record) -> pd.DataFrame:
        inputs = record_inputs(model, record, template=template, vqa_suffix=vqa_suffix)
        false = _optional(record, "false_option")
        res = answer_probability(model, inputs, str(record_field(record, "answer")), false_option=false,
                                 apply_ln=apply_ln)
        return _as_xframe(res.to_frame(), "prob")

    keep = correct_only(model, template=template, vqa_suffix=vqa_suffix) if only_correct else None
    return aggregate(records, one, keep=keep, title="Answer probability at the last position",
                     y_label="probability", progress=progress)


def visual_verbalization_over(
    model,
    records: Iterable,
    *,
    apply_ln: bool = True,
    template: str | None = "auto",
    progress: bool = True,
) -> Aggregate:
    """:func:`visual_verbalization` over records with their ``caption`` (records without one are skipped);
    conditions ``precision`` and ``recall``. The prompt is each record's ``question``."""

    def one(record) -> pd.DataFrame | None:
        caption = _optional(record, "caption")
        if not caption:
            return None
        inputs = record_inputs(model, record, template=template)
        return _as_xframe(visual_verbalization(model, inputs, caption, apply_ln=apply_ln).to_frame(), "value")

    return aggregate(records, one, title="Visual verbalization", y_label="score", progress=progress)


def _optional(record, name: str):
    try:
        value = record_field(record, name)
    except (KeyError, AttributeError):
        return None
    return None if value in (None, "", "-") else value
