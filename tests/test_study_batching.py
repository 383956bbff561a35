"""Batched studies (``Study.batch_rows``: a chunk's inputs in left-padded batches) give the rows of the per-record
path, and the batched analyses give the results of the single-example ones on ``inputs[b]``."""

import dataclasses
import warnings

import pandas as pd
import pytest
import torch
from conftest import noise_image

from hooked_vlm import HookedVLM, PromptError, RunError
from hooked_vlm.analysis import (
    answer_probability,
    answer_probability_batch,
    contextualization,
    contextualization_batch,
    logit_lens,
    logit_lens_batch,
    norm_attention,
    norm_attention_batch,
    visual_verbalization,
    visual_verbalization_batch,
)
from hooked_vlm.datasets import shapes
from hooked_vlm.studies import STUDIES, run_study
from hooked_vlm.studies.recipes import Context, study_rows

BATCHED = ("answer-emergence", "verbalization", "contextualization", "norm-attention")
# (study, options): every prompt kind each study takes, and the correctness filter on and off
CASES = [
    ("answer-emergence", {}),
    ("answer-emergence", {"only_correct": False}),
    ("verbalization", {"prompts": ["question", "empty"]}),  # "normal": test_studies, through the batched path
    ("contextualization", {"prompts": ["question", "noisy"]}),
    ("norm-attention", {}),
]


@pytest.fixture(scope="module")
def model():
    return HookedVLM.from_pretrained("shapes-llava", device="cpu", progress=False)


@pytest.fixture(scope="module")
def records():
    recs = list(shapes.generate(3, seed=7))
    recs[1] = dataclasses.replace(recs[1], answer="green")  # answered "red": the filter drops it
    return recs


@pytest.fixture(scope="module")
def next_model(tiny):
    hf, proc = tiny["llava_next"]
    return HookedVLM.from_pretrained("llava_next", hf_model=hf, processor=proc, device="cpu")


@pytest.fixture(scope="module")
def next_records():
    """Dict records whose images give anyres grids of different sizes (so different numbers of image tokens)."""
    rows = [("What color is the bus ?", 60, 40, "red", "blue", "a red bus"),
            ("Is the circle left or right of the square ?", 32, 90, "left", "right", "a circle left of a square"),
            ("What shape is this ?", 28, 28, "circle", None, "a green circle"),
            ("Is there a cat or a dog in the picture ?", 80, 30, "cat", "dog", "a cat on the left")]
    return [dict(question=q, image=noise_image(w, h, seed=i), answer=a, false_option=f, caption=c, id=f"r{i}")
            for i, (q, w, h, a, f, c) in enumerate(rows)]


def per_record(name, model, records, **options):
    """``run_study`` through the per-record recipe ``study.rows`` (no batching)."""
    study = dataclasses.replace(STUDIES[name], batch_rows=None)
    frame, facts = study_rows(study, model, list(records), Context(study.check_options(options)))
    frame.attrs["records"] = facts
    return frame


def assert_same_rows(batched, single):
    pd.testing.assert_frame_equal(batched.attrs["records"], single.attrs["records"])
    assert list(batched.columns) == list(single.columns)
    assert len(batched) == len(single) > 0
    # non-float columns exactly, floats within 1e-5 (NaN where NaN)
    pd.testing.assert_frame_equal(batched, single, check_exact=False, rtol=0, atol=1e-5)


def counting_prepare(model, monkeypatch):
    """Record (batch size, has padding) of every model.prepare call."""
    seen, prepare = [], model.prepare

    def prep(*args, **kwargs):
        out = prepare(*args, **kwargs)
        seen.append((out.batch_size, out.has_padding))
        return out

    monkeypatch.setattr(model, "prepare", prep)
    return seen


def test_the_four_studies_are_batched():
    assert all(STUDIES[name].batch_rows is not None for name in BATCHED)


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_batched_rows_equal_the_per_record_rows(name, options, model, records, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = per_record(name, model, records, **options)
        seen = counting_prepare(model, monkeypatch)
        batched = run_study(name, model, records, batch_size=2, **options)
    assert any(size > 1 and padded for size, padded in seen)  # left padding really happened
    assert max(size for size, _ in seen) <= 2
    assert_same_rows(batched, single)
    for hook in model.hook_dict.values():
        assert not hook._forward_hooks
    if name == "answer-emergence" and options.get("only_correct", True):
        facts = batched.attrs["records"]
        assert facts["correct"].tolist() == [True, False, True] and facts.loc[1, "n_rows"] == 0


@pytest.mark.parametrize("name", BATCHED)
def test_batched_rows_on_anyres_images_of_different_sizes(name, next_model, next_records, monkeypatch):
    counts = {len(next_model.prepare(r["question"], r["image"]).image_positions) for r in next_records}
    assert len(counts) == len(next_records)  # every image gives its own number of image tokens
    options = {"verbalization": {"prompts": ["noisy", "question"]}, "answer-emergence": {"only_correct": False},
               "contextualization": {"prompts": ["question", "noisy"]}}.get(name, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = per_record(name, next_model, next_records, **options)
        seen = counting_prepare(next_model, monkeypatch)
        batched = run_study(name, next_model, next_records, **options)  # the default batch of 8
    assert any(size > 1 and padded for size, padded in seen)
    assert_same_rows(batched, single)


def test_batched_analyses_equal_the_single_ones(next_model, next_records):
    model, recs = next_model, next_records[:3]
    batch = model.prepare([r["question"] for r in recs], [r["image"] for r in recs])
    assert batch.has_padding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lens = logit_lens_batch(model, batch, positions=[[0, -1], None, [2]])
        answers = answer_probability_batch(model, batch, [r["answer"] for r in recs],
                                           false_options=[r["false_option"] for r in recs])
        verbal = visual_verbalization_batch(model, batch, [r["caption"] for r in recs])
        context = contextualization_batch(model, batch, text=[None, [1, 2, 3], None])
        norms = norm_attention_batch(model, batch, query_positions=[None, "question", [3, 5]], layers=[1])
        for b, rec in enumerate(recs):
            one = batch[b]
            want = logit_lens(model, one, positions=[[0, -1], None, [2]][b])
            assert torch.equal(lens[b].positions, want.positions) and lens[b].labels == want.labels
            torch.testing.assert_close(lens[b].resid, want.resid, rtol=0, atol=1e-5)
            want = answer_probability(model, one, rec["answer"], false_option=rec["false_option"])
            assert answers[b].token_ids == want.token_ids
            for cond, p in want.probs.items():
                torch.testing.assert_close(answers[b].probs[cond], p, rtol=0, atol=1e-6)
            want = visual_verbalization(model, one, rec["caption"])
            assert torch.equal(verbal[b].top1, want.top1) and torch.equal(verbal[b].positions, want.positions)
            torch.testing.assert_close(verbal[b].precision, want.precision, equal_nan=True)
            want = contextualization(model, one, text=[None, [1, 2, 3], None][b])
            for curve, t in want.curves().items():
                torch.testing.assert_close(context[b].curves()[curve], t, rtol=0, atol=1e-6, equal_nan=True)
            want = norm_attention(model, one, query_positions=[None, "question", [3, 5]][b], layers=[1])
            assert torch.equal(norms[b].query_positions, want.query_positions)
            assert norms[b].str_tokens == want.str_tokens and norms[b].summed.shape == want.summed.shape
            torch.testing.assert_close(norms[b].summed, want.summed, rtol=0, atol=1e-5)
            torch.testing.assert_close(norms[b].per_head, want.per_head, rtol=0, atol=1e-5)
            pd.testing.assert_frame_equal(norms[b].by_modality(), want.by_modality(), check_exact=False, atol=1e-5)


def test_batched_analyses_refuse_bad_batches_before_running(next_model, next_records):
    model = next_model
    batch = model.prepare([r["question"] for r in next_records[:2]], [r["image"] for r in next_records[:2]])
    with pytest.raises(PromptError, match="captions must give one entry per example of the batch of 2"):
        visual_verbalization_batch(model, batch, "a red bus")
    with pytest.raises(PromptError, match="answers must give one entry per example"):
        answer_probability_batch(model, batch, ["red"])
    with pytest.raises(PromptError, match="text= must give one entry per example"):
        contextualization_batch(model, batch, text=[[1, 2]])
    with pytest.raises(PromptError, match="query_positions must give one entry per example"):
        norm_attention_batch(model, batch, query_positions=["last"])
    with pytest.raises(PromptError, match="answer 'zebra'"):
        answer_probability_batch(model, batch, ["red", "zebra"])
    right = dataclasses.replace(batch, input_ids=batch.input_ids.flip(1), attention_mask=batch.attention_mask.flip(1))
    with pytest.raises(PromptError, match="Example 1 of the batch is not left-padded"):
        contextualization_batch(model, right)
    for hook in model.hook_dict.values():
        assert not hook._forward_hooks


def test_a_batch_size_below_one_is_refused(model, records):
    with pytest.raises(RunError, match="batch size must be a positive number.*0"):
        run_study("norm-attention", model, records[:1], batch_size=0)
    with pytest.raises(RunError, match="batch size"):
        run_study("contextualization", model, records[:1], batch_size=-2)


def test_records_without_captions_or_questions_give_no_rows_batched(model, records):
    recs = [records[0], {"image": records[1].image, "question": None, "caption": ""}, records[2]]
    with pytest.warns(Warning):
        batched = run_study("verbalization", model, recs, prompts=["question"], batch_size=2)
        single = per_record("verbalization", model, recs, prompts=["question"])
    assert_same_rows(batched, single)
    assert batched.attrs["records"]["n_rows"].tolist() == [10, 0, 10]


def test_batched_rows_on_instructblip(records):
    """InstructBLIP batches: padding moved left of the queries, the Q-Former instruction padded too."""
    from hooked_vlm.testing import build_tiny_instructblip

    hf, proc = build_tiny_instructblip(seed=0)
    iblip = HookedVLM.from_pretrained("iblip", hf_model=hf, processor=proc, device="cpu", progress=False)
    assert iblip.prepare([r.question for r in records], [r.image for r in records]).has_padding
    for name, options in [("answer-emergence", {"only_correct": False}), ("verbalization", {"prompts": ["question"]}),
                          ("contextualization", {}), ("norm-attention", {})]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert_same_rows(run_study(name, iblip, records, **options), per_record(name, iblip, records, **options))
