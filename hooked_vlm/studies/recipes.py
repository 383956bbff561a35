"""The studies: named recipes from (model, records, options) to long-form rows.

Each recipe runs the per-example analyses of :mod:`hooked_vlm.analysis` on one record at a time (a study's
``batch_rows``: on a chunk's inputs in left-padded batches, through the batched analyses) and turns their results
into rows; nothing here computes an analysis itself. Every row has the columns

``record`` (index in the data's order), ``record_id``, ``task``, ``condition``, ``x``, ``value``

plus the study's own columns (see :data:`STUDIES` and docs/studies/).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from hooked_vlm.errors import PromptError, RunError, SelectionWarning
from hooked_vlm.studies.records import captions_of, field_of, has_objects, record_id, task_of

if TYPE_CHECKING:
    from hooked_vlm.inputs import VLMInputs

ZHANG = '"Cross-modal Information Flow in Multimodal Large Language Models" (Zhang et al.)'
WEI = '"Investigating Multimodal Interaction in Vision Large Language Models" (Wei, JAIST master\'s thesis 2025)'
PHASE = ('"Phase Diagram of Vision Large Language Models Inference: A Perspective from Interaction across Image '
         'and Instruction" (Wei, Shi, Inoue)')

# Prompt kinds: "question" (the record's own question) and the three instruction kinds of Wei (2025), see
# hooked_vlm.datasets.prompts: "normal" (all five paraphrased caption instructions), "noisy", "empty".
PROMPT_KINDS = ("question", "normal", "noisy", "empty")

BASE_COLUMNS = ["record", "record_id", "task", "condition", "x", "value"]


def instructions(kind: str, model, record, ctx: Context) -> list[tuple[int, VLMInputs]]:
    """The inputs of prompt kind ``kind`` for the record ``ctx.index``: ``(prompt_index, inputs)`` pairs.

    - ``"question"``: the record's question (``vqa_suffix`` applies), index 0; none (one warning) without one;
    - ``"normal"``: each of the five paraphrases :data:`~hooked_vlm.datasets.prompts.NORMAL_PROMPTS`, index 0..4
      (Wei's design: five paraphrased prompts per image), or the study's ``instructions`` option when given;
    - ``"noisy"``: :func:`~hooked_vlm.datasets.prompts.noise` seeded with ``(ctx.seed, ctx.index)``, index 0, so a
      resumed run draws the same tokens;
    - ``"empty"``: the model's template with no instruction (``empty_prompt(model)`` with ``template=None``),
      index 0; none (one warning) for InstructBLIP, which has no prompt around the instruction.
    """
    image = _image(record)
    return [(i, model.prepare(text, image, template=template, vqa_suffix=suffix))
            for i, text, template, suffix in _instruction_texts(kind, model, record, ctx)]


def _instruction_texts(kind: str, model, record, ctx: Context) -> list[tuple[int, str, str | None, bool]]:
    """What :func:`instructions` prepares: ``(prompt_index, text, template, vqa_suffix)`` per input."""
    from hooked_vlm.datasets.prompts import NORMAL_PROMPTS, empty_prompt, prompt

    if kind == "question":
        question = field_of(record, "question")
        if not question:
            ctx.warn_once("question", "Some records have no question: prompt kind 'question' gives no rows for "
                          "them (use --prompts normal, noisy or empty for caption data).")
            return []
        return [(0, str(question), "auto", ctx.options.get("vqa_suffix", False))]
    if kind == "normal":
        texts = ctx.options.get("instructions") or NORMAL_PROMPTS
        return [(i, p, "auto", False) for i, p in enumerate(texts)]
    if kind == "noisy":
        return [(0, prompt("noisy", index=ctx.index, tokenizer=model, seed=ctx.seed), "auto", False)]
    if kind == "empty":
        try:
            text = empty_prompt(model)
        except PromptError as err:
            ctx.warn_once("empty", f"Prompt kind 'empty' gives no rows: {err}")
            return []
        return [(0, text, None, False)]
    raise RunError(f"Unknown prompt kind {kind!r}; this version knows {list(PROMPT_KINDS)}.")


def _image(record):
    return record["image"] if isinstance(record, dict) else record.image


def _answer(record) -> str:
    return str(record["answer"] if isinstance(record, dict) else record.answer)


def _false_option(record) -> str | None:
    value = record.get("false_option") if isinstance(record, dict) else getattr(record, "false_option", None)
    return None if value in (None, "", "-") else str(value)


@dataclass
class Context:
    """What a recipe gets besides the model and the record: its options, the batch size, the run's seed (of the
    noisy prompts), the index of the record in the data (set per record), one-time warnings."""

    options: dict[str, Any]
    batch_size: int | None = None
    seed: int = 0
    index: int = 0
    warned: set[str] = field(default_factory=set)

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, SelectionWarning, stacklevel=3)

    def batch(self, default: int) -> int:
        return default if self.batch_size is None else self.batch_size


@dataclass(frozen=True)
class Study:
    """A named recipe. ``options`` are its options with their defaults; ``rows(model, record, ctx)`` gives one
    record's rows (without the record columns) and a dict of per-record facts (e.g. ``correct``).

    ``batch_rows(model, [(index, record), ...], ctx)``, when set, does the same for several records at once (a
    chunk of a run, or all records of :func:`run_study`) and returns one ``(rows, facts)`` per record, in order;
    it batches records into forwards as its analysis allows. Its rows must equal those of ``rows`` record by
    record (up to float rounding).
    """

    name: str
    title: str
    papers: str
    figure: str
    options: dict[str, Any]
    rows: Callable[[Any, Any, Context], tuple[pd.DataFrame, dict]]
    columns: list[str]
    option_help: dict[str, str] = field(default_factory=dict)
    prompt_kinds: tuple[str, ...] = PROMPT_KINDS
    batch_rows: Callable[[Any, list[tuple[int, Any]], Context], list[tuple[pd.DataFrame, dict]]] | None = None

    def __post_init__(self):
        object.__setattr__(self, "__doc__", f"{self.title}: {self.figure} of {self.papers}. Options (defaults): "
                           + ", ".join(f"{k}={v!r}" for k, v in self.options.items()) + ".")

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` completed with the defaults and checked.

        Raises:
            RunError: an option this study does not have, or a value of the wrong kind.
        """
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise RunError(f"Study {self.name!r} has no option {', '.join(map(repr, unknown))}; its options are "
                           f"{sorted(self.options) or 'none'}.")
        out = dict(self.options)
        out.update({k: v for k, v in options.items() if v is not None})
        for key, value in out.items():
            default = self.options[key]
            if isinstance(default, bool) and not isinstance(value, bool):
                raise RunError(f"Option {key!r} of {self.name!r} must be true or false, got {value!r}.")
            if key == "window" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RunError(f"Option 'window' must be a positive number of layers, got {value!r}.")
            if key == "prompts":
                kinds = [value] if isinstance(value, str) else list(value)
                bad = [k for k in kinds if k not in PROMPT_KINDS]
                if bad or not kinds:
                    raise RunError(f"Unknown prompt kinds {bad or kinds} for {self.name!r}; choose from "
                                   f"{list(PROMPT_KINDS)}.")
                bad = [k for k in kinds if k not in self.prompt_kinds]
                if bad:
                    raise RunError(f"Study {self.name!r} takes no prompt kind {bad}: it compares image tokens "
                                   f"with instruction tokens, which an empty prompt has none of; choose from "
                                   f"{list(self.prompt_kinds)}.")
                if len(set(kinds)) != len(kinds):
                    raise RunError(f"Prompt kinds {kinds} for {self.name!r} name a kind twice.")
                out[key] = tuple(kinds)
            if key == "instructions" and value is not None:
                texts = [value] if isinstance(value, str) else list(value)
                if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                    raise RunError(f"Option 'instructions' of {self.name!r} must be non-empty texts, got {value!r}.")
                out[key] = tuple(texts)
            if key == "counts" and value is not None:
                out[key] = tuple(int(c) for c in value)
            if key == "block" and value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                                         or value < 1):
                raise RunError(f"Option 'block' must be a positive number of image tokens, got {value!r}.")
        return out


# --------------------------------------------------------------------------- recipes
def _correct(model, record, options) -> bool:
    from hooked_vlm.analysis import correct_only

    return bool(correct_only(model, vqa_suffix=options["vqa_suffix"])(record))


def _information_flow(model, record, ctx: Context) -> tuple[pd.DataFrame, dict]:
    from hooked_vlm.analysis import knockout_flows, record_inputs

    o = ctx.options
    correct = _correct(model, record, o) if o["only_correct"] else None
    if correct is False:
        return pd.DataFrame(), {"correct": correct}
    inputs = record_inputs(model, record, vqa_suffix=o["vqa_suffix"])
    flows = knockout_flows(model, inputs, record, window=o["window"], batch_size=ctx.batch(16))
    _warn_flows(flows, [record], ctx)
    return _flow_rows(flows, None, correct), {"correct": correct}


# Records per batched forward of the information-flow study (the recording forward holds every layer's keys and
# values before the first question row of each).
FLOW_RECORDS = 8


def _information_flow_batch(model, indexed: list[tuple[int, Any]], ctx: Context) -> list[tuple[pd.DataFrame, dict]]:
    """:func:`_information_flow` for a chunk of records: the correctness check by greedy decoding of left-padded
    batches, then :func:`~hooked_vlm.analysis.knockout_flows` on batches of the kept records (those with objects
    and those without apart, as their flows differ), ``FLOW_RECORDS`` records at a time."""
    from hooked_vlm.analysis import knockout_flows
    from hooked_vlm.analysis.base import answers_correct, record_field

    o = ctx.options
    records = [record for _, record in indexed]
    size = max(1, min(FLOW_RECORDS, ctx.batch(16)))

    def prepare(chunk: list[int]):
        return model.prepare([str(record_field(records[i], "question")) for i in chunk],
                             [record_field(records[i], "image") for i in chunk], vqa_suffix=o["vqa_suffix"])

    correct: list[bool | None] = [None] * len(records)
    if o["only_correct"]:
        for lo in range(0, len(records), size):
            chunk = list(range(lo, min(len(records), lo + size)))
            for i, ok in zip(chunk, answers_correct(model, prepare(chunk), [records[i] for i in chunk])):
                correct[i] = ok
    out: list[tuple[pd.DataFrame, dict]] = [(pd.DataFrame(), {"correct": c}) for c in correct]
    kept = [i for i, c in enumerate(correct) if c is not False]
    for group in ([i for i in kept if has_objects(records[i])], [i for i in kept if not has_objects(records[i])]):
        for lo in range(0, len(group), size):
            chunk = group[lo : lo + size]
            chunk_records = [records[i] for i in chunk]
            flows = knockout_flows(model, prepare(chunk), chunk_records, window=o["window"], batch_size=ctx.batch(16))
            _warn_flows(flows, chunk_records, ctx)
            for b, i in enumerate(chunk):
                out[i] = (_flow_rows(flows, b if len(chunk) > 1 else None, correct[i]), {"correct": correct[i]})
    return out


def _warn_flows(flows, records, ctx: Context) -> None:
    if any(has_objects(r) for r in records) and "Related→Question" not in flows.flows:
        ctx.warn_once("related", "Related→Question and Other→Question are left out: this model's image tokens "
                      "have no patch footprint (InstructBLIP queries).")
    elif not all(has_objects(r) for r in records):
        ctx.warn_once("objects", "Some records have no objects: Related→Question and Other→Question are left out "
                      "for them.")


def _flow_rows(flows, example: int | None, correct: bool | None) -> pd.DataFrame:
    """The rows of one example (``None``: a single-example result) of a :class:`KnockoutFlows`."""
    frames = []
    for label, res in flows.flows.items():
        pick = (lambda t: t) if example is None else (lambda t: t[example])
        token = res.token_str[0 if example is None else example] if res.token_str else ""
        frames.append(pd.DataFrame({
            "condition": label, "x": res.layers.tolist(), "value": pick(res.relative_change).tolist(),
            "p_base": float(pick(res.p_base)), "p_knocked": pick(res.p_knocked).tolist(),
            "token": token, "window": flows.window, "correct": correct,
        }))
    return pd.concat(frames, ignore_index=True)


def _answer_emergence(model, record, ctx: Context) -> tuple[pd.DataFrame, dict]:
    from hooked_vlm.analysis import answer_probability, record_inputs

    o = ctx.options
    correct = _correct(model, record, o) if o["only_correct"] else None
    if correct is False:
        return pd.DataFrame(), {"correct": correct}
    inputs = record_inputs(model, record, vqa_suffix=o["vqa_suffix"])
    res = answer_probability(model, inputs, _answer(record), false_option=_false_option(record),
                             apply_ln=o["apply_ln"])
    return _answer_frame(res, correct), {"correct": correct}


def _answer_frame(res, correct: bool | None) -> pd.DataFrame:
    return res.to_frame().rename(columns={"layer": "x", "prob": "value"}).assign(correct=correct)


def _answer_emergence_batch(model, indexed: list[tuple[int, Any]], ctx: Context) -> list[tuple[pd.DataFrame, dict]]:
    """:func:`_answer_emergence` of a chunk: the correctness check (greedy generation) and the lens each run on
    left-padded batches of ``ctx.batch(8)`` records (the lens on the correct ones only)."""
    from hooked_vlm.analysis import answer_probability_batch
    from hooked_vlm.analysis.base import answers_correct

    o = ctx.options
    records = [record for _, record in indexed]

    def analyse(inputs, prompts: list[_Prompt]) -> list[tuple[pd.DataFrame, dict]]:
        chosen = [records[p.k] for p in prompts]
        correct = answers_correct(model, inputs, chosen) if o["only_correct"] else [None] * len(chosen)
        keep = [b for b, c in enumerate(correct) if c is not False]
        out = [(pd.DataFrame(), {"correct": c}) for c in correct]
        if keep:
            kept = [chosen[b] for b in keep]
            results = answer_probability_batch(model, inputs if len(keep) == len(chosen) else inputs[keep],
                                               [_answer(r) for r in kept],
                                               false_options=[_false_option(r) for r in kept], apply_ln=o["apply_ln"])
            for b, res in zip(keep, results):
                out[b] = (_answer_frame(res, correct[b]), {"correct": correct[b]})
        return out

    prompts = [_Prompt(k, "question", 0, field_of(r, "question"), _image(r), "auto", o["vqa_suffix"])
               for k, r in enumerate(records)]
    return _in_batches(model, prompts, ctx.batch(8), analyse)


def _captions(record, ctx: Context) -> list[str] | None:
    captions = captions_of(record)
    if not captions:
        ctx.warn_once("captions", "Some records have no caption: they are skipped (no rows).")
        return None
    return captions


def _prompted(model, record, ctx: Context):
    """``(kind, prompt_index, inputs)`` for each prompt kind of ``ctx.options["prompts"]``, in order."""
    for kind in ctx.options["prompts"]:
        for i, inputs in instructions(kind, model, record, ctx):
            yield kind, i, inputs


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _verbalization(model, record, ctx: Context) -> tuple[pd.DataFrame, dict]:
    from hooked_vlm.analysis import visual_verbalization

    captions = _captions(record, ctx)
    if captions is None:
        return pd.DataFrame(), {}
    frames = []
    for kind, i, inputs in _prompted(model, record, ctx):
        res = visual_verbalization(model, inputs, captions, apply_ln=ctx.options["apply_ln"])
        frames.append(_prompt_frame(res, kind, i))
    return _concat(frames), {}


def _prompt_frame(res, kind: str, i: int) -> pd.DataFrame:
    return res.to_frame().rename(columns={"layer": "x"}).assign(prompt=kind, prompt_index=i)


def _verbalization_batch(model, indexed: list[tuple[int, Any]], ctx: Context) -> list[tuple[pd.DataFrame, dict]]:
    """:func:`_verbalization` of a chunk: every (record, prompt) input of it, in left-padded batches of
    ``ctx.batch(8)``."""
    from hooked_vlm.analysis import visual_verbalization_batch

    captions, prompts = [], []
    for k, (index, record) in enumerate(indexed):
        ctx.index = index
        captions.append(_captions(record, ctx))
        if captions[-1] is not None:
            prompts += _chunk_prompts(k, model, record, ctx)
    results = _in_batches(model, prompts, ctx.batch(8), lambda inputs, ps: visual_verbalization_batch(
        model, inputs, [captions[p.k] for p in ps], apply_ln=ctx.options["apply_ln"]))
    return _per_record(len(indexed), prompts, [_prompt_frame(r, p.kind, p.index) for p, r in zip(prompts, results)])


def _truncation(model, record, ctx: Context) -> tuple[pd.DataFrame, dict]:
    from hooked_vlm.analysis import image_token_truncation

    captions = _captions(record, ctx)
    if captions is None:
        return pd.DataFrame(), {}
    counts = ctx.options["counts"]
    frames = []
    for kind, i, inputs in _prompted(model, record, ctx):
        res = image_token_truncation(model, inputs, captions[0], counts=None if counts is None else list(counts),
                                     batch_size=ctx.batch(32))
        frames.append(res.to_frame().assign(prompt=kind, prompt_index=i, n_image=res.n_image))
    return _concat(frames), {}


def masking_intervals(n_image: int, block: int | None) -> list[tuple[int, int]]:
    """Consecutive blocks of ``block`` image tokens; ``None``: one row of a square patch grid (else 1 token)."""
    if block is None:
        side = math.isqrt(n_image)
        block = side if side * side == n_image else 1
    return [(s, min(s + block, n_image)) for s in range(0, n_image, block)]


def _masking(model, record, ctx: Context) -> tuple[pd.DataFrame, dict]:
    from hooked_vlm.analysis import image_token_masking

    captions = _captions(record, ctx)
    if captions is None:
        return pd.DataFrame(), {}
    frames = []
    for kind, i, inputs in _prompted(model, record, ctx):
        intervals = masking_intervals(len(inputs.image_positions), ctx.options["block"])
        res = image_token_masking(model, inputs, captions[0], intervals, batch_size=ctx.batch(8))
        frames.append(pd.DataFrame({
            "condition": "masking", "x": [s for s, _ in intervals], "value": res.loss.tolist(),
            "removed": res.labels, "change": res.change.tolist(), "base_loss": res.base_loss, "prompt": kind,
            "prompt_index": i, "n_image": res.n_image,
        }))
    return _concat(frames), {}


def _contextualization(model, record, ctx: Context) -> tuple[pd.DataFrame, dict]:
    from hooked_vlm.analysis import contextualization

    frames = []
    for kind, i, inputs in _prompted(model, record, ctx):
        res = contextualization(model, inputs)
        frames.append(_prompt_frame(res, kind, i))
    return _concat(frames), {}


def _contextualization_batch(model, indexed: list[tuple[int, Any]], ctx: Context
                             ) -> list[tuple[pd.DataFrame, dict]]:
    """:func:`_contextualization` of a chunk: every (record, prompt) input of it, in left-padded batches of
    ``ctx.batch(8)``."""
    from hooked_vlm.analysis import contextualization_batch

    prompts = []
    for k, (index, record) in enumerate(indexed):
        ctx.index = index
        prompts += _chunk_prompts(k, model, record, ctx)
    results = _in_batches(model, prompts, ctx.batch(8), lambda inputs, _: contextualization_batch(model, inputs))
    return _per_record(len(indexed), prompts, [_prompt_frame(r, p.kind, p.index) for p, r in zip(prompts, results)])


def _norm_attention(model, record, ctx: Context) -> tuple[pd.DataFrame, dict]:
    from hooked_vlm.analysis import norm_attention, record_inputs

    inputs = record_inputs(model, record, vqa_suffix=ctx.options["vqa_suffix"])
    return _modality_frame(norm_attention(model, inputs)), {}


def _modality_frame(res) -> pd.DataFrame:
    wide = res.by_modality()
    df = wide.melt(id_vars="layer", var_name="condition", value_name="value").rename(columns={"layer": "x"})
    return df[["condition", "x", "value"]]


def _norm_attention_batch(model, indexed: list[tuple[int, Any]], ctx: Context) -> list[tuple[pd.DataFrame, dict]]:
    """:func:`_norm_attention` of a chunk, in left-padded batches of ``ctx.batch(8)`` records."""
    from hooked_vlm.analysis import norm_attention_batch

    prompts = [_Prompt(k, "question", 0, field_of(r, "question"), _image(r), "auto", ctx.options["vqa_suffix"])
               for k, (_, r) in enumerate(indexed)]
    results = _in_batches(model, prompts, ctx.batch(8), lambda inputs, _: norm_attention_batch(model, inputs))
    return [(_modality_frame(res), {}) for res in results]


# --------------------------------------------------------------------------- batches of a chunk's inputs
@dataclass(frozen=True)
class _Prompt:
    """One input of a chunk: its record's place ``k`` in the chunk, prompt kind and index, and what to prepare."""

    k: int
    kind: str
    index: int
    text: str
    image: Any
    template: str | None
    vqa_suffix: bool


def _chunk_prompts(k: int, model, record, ctx: Context) -> list[_Prompt]:
    """The inputs :func:`_prompted` gives record ``k`` of a chunk (``ctx.index`` set to it), not yet prepared."""
    image = _image(record)
    return [_Prompt(k, kind, i, text, image, template, suffix)
            for kind in ctx.options["prompts"]
            for i, text, template, suffix in _instruction_texts(kind, model, record, ctx)]


def _in_batches(model, prompts: list[_Prompt], size: int, analyse: Callable[[VLMInputs, list[_Prompt]], list]
                ) -> list:
    """``analyse(inputs, prompts)`` (one result per input) on left-padded batches of at most ``size`` prompts that
    share their prepare options, in order; the results in the order of ``prompts``.

    Raises:
        RunError: a batch size below 1.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise RunError(f"The batch size must be a positive number of inputs, got {size!r}.")
    groups: dict[tuple[str | None, bool], list[int]] = {}
    for j, p in enumerate(prompts):
        groups.setdefault((p.template, p.vqa_suffix), []).append(j)
    out: list = [None] * len(prompts)
    for (template, suffix), members in groups.items():
        for lo in range(0, len(members), size):
            part = [prompts[j] for j in members[lo : lo + size]]
            inputs = model.prepare([p.text for p in part], [p.image for p in part], template=template,
                                   vqa_suffix=suffix)
            results = analyse(inputs, part)
            if len(results) != len(part):
                raise RunError(f"A batched analysis returned {len(results)} results for {len(part)} inputs.")
            for j, res in zip(members[lo : lo + size], results):
                out[j] = res
    return out


def _per_record(n: int, prompts: list[_Prompt], frames: list[pd.DataFrame]) -> list[tuple[pd.DataFrame, dict]]:
    """Each record's frames (in prompt order) concatenated, for ``n`` records."""
    mine: list[list[pd.DataFrame]] = [[] for _ in range(n)]
    for p, frame in zip(prompts, frames):
        mine[p.k].append(frame)
    return [(_concat(f), {}) for f in mine]


_PROMPTS_HELP = ("prompt kinds (see docs/datasets.md): 'question' (the record's question), 'normal' (the five "
                 "paraphrased caption instructions, column prompt_index 0..4), 'noisy' (random vocabulary tokens, "
                 "seeded by --seed and the record), 'empty' (no instruction)")
_INSTRUCTIONS_HELP = ("the caption instructions of prompt kind 'normal', in place of the five paraphrases (e.g. the "
                      "one instruction a small model was trained on)")
STUDIES: dict[str, Study] = {
    s.name: s
    for s in [
        Study(
            "information-flow", "Cross-modal information flow (attention knockout)", ZHANG,
            "figures 3-5 (relative change of the answer probability per flow and centre layer, per task)",
            {"window": 9, "only_correct": True, "vqa_suffix": False},
            _information_flow,
            ["p_base", "p_knocked", "token", "window", "correct"],
            {"window": "layers blocked around each centre layer (9 in the paper; use 1 or 3 on shapes-llava)",
             "only_correct": "answer each record first; rows only for the correct ones (the paper's filter)",
             "vqa_suffix": "append the paper's 'Answer the question using a single word or phrase.'"},
            batch_rows=_information_flow_batch,
        ),
        Study(
            "answer-emergence", "Answer probability across layers", ZHANG,
            "section 7 (probability of the answer and the false option at the last position per layer)",
            {"only_correct": True, "vqa_suffix": False, "apply_ln": True},
            _answer_emergence,
            ["spelling", "token_id", "correct"],
            {"only_correct": "rows only for records the model answers correctly",
             "vqa_suffix": "append the paper's VQA suffix to the question",
             "apply_ln": "read intermediate layers through the final norm (false: the paper's reference code)"},
            batch_rows=_answer_emergence_batch,
        ),
        Study(
            "verbalization", "Visual verbalization of image tokens (logit lens)", WEI,
            "chapter 3 (precision and recall of the image tokens' decoded words against the captions, per layer)",
            {"prompts": ("normal",), "instructions": None, "apply_ln": True},
            _verbalization,
            ["prompt", "prompt_index"],
            {"prompts": _PROMPTS_HELP, "instructions": _INSTRUCTIONS_HELP,
             "apply_ln": "read layers through the final norm"},
            batch_rows=_verbalization_batch,
        ),
        Study(
            "truncation", "Image-token truncation", WEI,
            "section 4.3 (caption cross-entropy keeping the first n image tokens, n = 1..N)",
            {"prompts": ("normal",), "instructions": None, "counts": None},
            _truncation,
            ["prompt", "prompt_index", "n_image"],
            {"prompts": _PROMPTS_HELP, "instructions": _INSTRUCTIONS_HELP,
             "counts": "image-token counts to keep (default 1..N)"},
        ),
        Study(
            "masking", "Image-token masking", WEI,
            "section 4.3 (caption cross-entropy with blocks of image tokens removed)",
            {"prompts": ("normal",), "instructions": None, "block": None},
            _masking,
            ["removed", "change", "base_loss", "prompt", "prompt_index", "n_image"],
            {"prompts": _PROMPTS_HELP, "instructions": _INSTRUCTIONS_HELP,
             "block": "image tokens removed per setting (default: one row of a square patch grid, else 1)"},
        ),
        Study(
            "contextualization", "Cosine contextualization and its phases", f"{PHASE}; {WEI}",
            "the phase diagram (inter- and intra-modal cosine similarity per layer; chapter 4 of Wei's 2025 "
            "master's thesis)",
            {"prompts": ("question",), "instructions": None, "vqa_suffix": False},
            _contextualization,
            ["prompt", "prompt_index"],
            {"prompts": _PROMPTS_HELP, "instructions": _INSTRUCTIONS_HELP,
             "vqa_suffix": "append the VQA suffix to the question (prompt kind 'question')"},
            prompt_kinds=("question", "normal", "noisy"),
            batch_rows=_contextualization_batch,
        ),
        Study(
            "norm-attention", "Norm-based attention of the last token by modality", WEI,
            "section 4.2 (Kobayashi et al.'s norm-based attention of the last token, summed over image, question "
            "and other text keys, per layer)",
            {"vqa_suffix": False},
            _norm_attention,
            [],
            {"vqa_suffix": "append the VQA suffix to the question"},
            batch_rows=_norm_attention_batch,
        ),
    ]
}


def get_study(name: str) -> Study:
    """The study called ``name``.

    Raises:
        RunError: no such study (the message lists them).
    """
    try:
        return STUDIES[name]
    except KeyError:
        raise RunError(f"Unknown study {name!r}; choose from {sorted(STUDIES)}.") from None


def study_rows(study: Study, model, records, ctx: Context, start: int = 0, on_record=None
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows and per-record facts of ``records`` (indices ``start, start+1, ...``).

    Runs inside ``model.reuse_images()``: the vision tower runs once per image, however many forwards the recipe
    makes on it (correctness filter, paraphrased prompts, knockout batches).
    """
    reuse = getattr(model, "reuse_images", None)
    with reuse() if reuse is not None else contextlib.nullcontext():
        return _study_rows(study, model, records, ctx, start, on_record)


def _study_rows(study: Study, model, records, ctx: Context, start: int, on_record
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    frames, facts = [], []
    indexed = list(enumerate(records, start))
    if study.batch_rows is not None:
        results = study.batch_rows(model, indexed, ctx)
        if len(results) != len(indexed):
            raise RunError(f"Study {study.name!r} returned {len(results)} results for {len(indexed)} records.")
    else:
        results = None
    for k, (index, record) in enumerate(indexed):
        if results is None:
            ctx.index = index
            rows, info = study.rows(model, record, ctx)
        else:
            rows, info = results[k]
        rid, task = record_id(record, index), task_of(record)
        if len(rows):
            rows = rows.assign(record=index, record_id=rid, task=task)
            frames.append(rows[BASE_COLUMNS + [c for c in rows.columns if c not in BASE_COLUMNS]])
        facts.append({"record": index, "record_id": rid, "task": task, "n_rows": len(rows),
                      "correct": info.get("correct")})
        if on_record is not None:
            on_record()
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=BASE_COLUMNS + study.columns)
    return frame, pd.DataFrame(facts, columns=["record", "record_id", "task", "n_rows", "correct"])


def run_study(name: str, model, records, *, batch_size: int | None = None, seed: int = 0, **options
              ) -> pd.DataFrame:
    """Run study ``name`` on ``records`` in memory; the long-form rows (see :data:`STUDIES`).

    ``seed`` seeds the noisy prompts (with each record's index).
    ``frame.attrs["records"]`` holds one row per record: ``record, record_id, task, n_rows, correct`` (``correct``
    for the studies that filter on it, else None).

    Raises:
        RunError: an unknown study or option.
    """
    study = get_study(name)
    ctx = Context(study.check_options(options), batch_size=batch_size, seed=seed)
    frame, facts = study_rows(study, model, list(records), ctx)
    frame.attrs["records"] = facts
    return frame
