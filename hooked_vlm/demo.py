"""The demo: answer shapes questions, run every analysis, write ``report.html``."""

from __future__ import annotations

import html
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hooked_vlm import HookedVLM
from hooked_vlm.analysis.base import record_inputs
from hooked_vlm.analysis.contextualization import contextualization_over
from hooked_vlm.analysis.logit_lens import (
    answer_probability,
    answer_probability_over,
    logit_lens,
    visual_verbalization_over,
)
from hooked_vlm.datasets import shapes
from hooked_vlm.report import Report, Section, image_with_patches, png_data_uri

DEMO_SEED = 20261121  # never used in training


def _answers_section(model, records) -> tuple[Section, list]:
    cards, correct = [], []
    for rec in tqdm(records, desc="answering"):
        inputs = record_inputs(model, rec)
        got = model.answer(inputs)[0]
        ok = got == rec.answer.lower()
        correct.append(ok)
        boxes = [(o["x"], o["y"], o["w"], o["h"]) for o in rec.objects]
        img = image_with_patches(rec.image, inputs.layouts[0][0], boxes=boxes)
        mark = "<span class='ok'>✓</span>" if ok else "<span class='bad'>✗</span>"
        cards.append(
            f"<div class='card'><img src='{png_data_uri(img)}'><br><b>{html.escape(rec.task)}</b>: "
            f"{html.escape(rec.question)}<br>model: <b>{html.escape(got)}</b> {mark} (truth: {html.escape(rec.answer)})"
            "</div>"
        )
    section = Section(
        "Answers",
        f"The model answers {len(records)} fresh questions (greedy decoding, vicuna_v1 prompt). White lines are "
        "the image patches the vision tower sees, one image token each; red boxes are the objects.",
        html_blocks=["<div class='gallery'>" + "".join(cards) + "</div>"],
        verdict=f"{sum(correct)} of {len(correct)} answered correctly.",
    )
    return section, correct


def _logit_lens_section(model, record) -> Section:
    inputs = record_inputs(model, record)
    lens = logit_lens(model, inputs, positions=inputs.question_positions.tolist() + [inputs.last_position])
    probs = answer_probability(model, inputs, record.answer, false_option=record.false_option)
    p = probs.probs["answer_lower"]
    first = int(torch.nonzero(p >= 0.5 * p[-1]).flatten()[0]) if p[-1] > 0 else -1
    return Section(
        "Logit lens of one answer",
        f"Question: <i>{html.escape(record.question)}</i> (answer <b>{html.escape(record.answer)}</b>). Left: the "
        "top-1 token that the final norm and unembedding read from each layer's residual stream at the question "
        "and last positions. Right: the probability of the answer (and false option) at the last position.",
        figures=[lens.plot(height=420), probs.plot(height=380)],
        verdict=f"The answer reaches half of its final probability ({p[-1]:.2f}) at layer {first} of "
        f"{model.cfg.n_layers}: it is decided in the upper half of the decoder, as paper 002 reports for LLaVA.",
        agrees=first >= model.cfg.n_layers // 2,
    )


def _answer_probability_section(model, records) -> Section:
    agg = answer_probability_over(model, records, only_correct=False, progress=False)
    s = agg.summary()
    mean = s[s.condition == "answer_lower"].sort_values("x")["mean"].to_numpy()
    jump = int(np.argmax(np.diff(mean))) + 1
    agrees = jump > model.cfg.n_layers // 2
    return Section(
        "Answer probability across layers (paper 002, section 7)",
        "Mean probability, over correctly answered records, of the answer's first token (lowercase and "
        "Capitalized) and of the false option at the last position, read through the final norm at every layer. "
        "Bands are 95% confidence intervals.",
        figures=[agg.plot(height=420)],
        verdict=f"The largest rise happens entering layer {jump} of {model.cfg.n_layers}. Paper 002 finds the "
        "answer emerging only in the later layers of LLaVA; "
        + ("our model agrees." if agrees else "our shallow model decides earlier, which disagrees."),
        agrees=agrees,
    )


def _contextualization_section(model, records) -> Section:
    agg = contextualization_over(model, records, progress=False)
    phases = agg.phases()
    return Section(
        "Cosine contextualization and the four phases (thesis ch. 4, phase-diagram paper)",
        "Mean cosine similarity between image and question tokens (inter-modal) and within each modality "
        "(intra-modal, distinct pairs) of the residual stream at every layer; shaded: the phases found by "
        "<code>.phases()</code>.",
        figures=[agg.plot(height=420)],
        verdict=f"Phase boundaries at layers {phases.boundaries} with confidence {phases.confidence:.2f} "
        f"(feature scores {', '.join(f'{k} {v:.2f}' for k, v in phases.scores.items())}). The papers report four "
        "phases over 32-40 layers; with only "
        f"{model.cfg.n_layers} layers our model has room for a few of them at most, so read this loosely.",
        agrees=phases.confidence >= 0.6,
    )


def _verbalization_section(model, records) -> Section:
    caption_records = [
        shapes.ShapesRecord(question=shapes.CAPTION_QUESTION, answer=r.caption, task="Caption", objects=r.objects,
                            source=r.image)
        for r in records
    ]
    agg = visual_verbalization_over(model, caption_records, progress=False)
    s = agg.summary()
    best = s.loc[s.groupby("condition")["mean"].idxmax()]
    peak = {row.condition: (int(row.x), float(row["mean"])) for _, row in best.iterrows()}
    return Section(
        "Visual verbalization of image tokens (thesis ch. 3)",
        "Each image token is decoded with the logit lens at every layer; precision is the share of decoded words "
        "(stop words and punctuation removed) that occur in the caption, recall the share of caption words hit.",
        figures=[agg.plot(height=400)],
        verdict="Peak precision {:.2f} at layer {}, peak recall {:.2f} at layer {}. The thesis finds image tokens "
        "verbalizing object words in the middle-to-late layers of LLaVA.".format(
            peak["precision"][1], peak["precision"][0], peak["recall"][1], peak["recall"][0]
        ),
    )


def run_demo(out: str | Path, *, model_name: str = "shapes-llava", n_answers: int = 8, n_records: int = 120,
             device: str | None = None, seed: int = DEMO_SEED) -> Path:
    """Run the demo and write ``out/report.html``; returns its path."""
    start = time.perf_counter()
    out = Path(out)
    print(f"loading {model_name} ...", flush=True)
    model = HookedVLM.from_pretrained(model_name, device=device or "cpu")
    records = list(shapes.generate(n_answers + n_records, seed=seed))
    report = Report(
        f"hooked_vlm demo: {model_name}",
        f"{model.cfg.n_layers}-layer decoder, d_model {model.cfg.d_model}, {model.cfg.n_heads} heads "
        f"({model.cfg.n_key_value_heads or model.cfg.n_heads} KV heads). Aggregates use up to {n_records} fresh "
        f"shapes records (seed {seed}).",
    )
    answers, _ = _answers_section(model, records[:n_answers])
    report.add(answers)
    pool = records[n_answers:]
    correct = [r for r in tqdm(pool, desc="filtering correct") if model.answer(record_inputs(model, r))[0] == r.answer]
    report.add(_logit_lens_section(model, next((r for r in correct if r.false_option), correct[0])))
    steps = [
        ("answer probability", lambda: _answer_probability_section(model, correct)),
        ("contextualization", lambda: _contextualization_section(model, correct)),
        ("verbalization", lambda: _verbalization_section(model, pool[:40])),
    ]
    for name, step in tqdm(steps, desc="analyses"):
        tqdm.write(f"  {name}")
        report.add(step())
    path = report.write(out / "report.html")
    print(f"wrote {path} in {time.perf_counter() - start:.0f}s", flush=True)
    return path
