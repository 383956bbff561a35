"""The information-flow study's batched recipe (left-padded correctness check, shared knockout forwards) against
its per-record recipe on shapes-llava."""

import dataclasses

import numpy as np
import pytest

from hooked_vlm import HookedVLM
from hooked_vlm.analysis import record_inputs
from hooked_vlm.datasets import shapes
from hooked_vlm.studies import STUDIES
from hooked_vlm.studies.recipes import Context


@pytest.fixture(scope="module")
def model():
    return HookedVLM.from_pretrained("shapes-llava", device="cpu", progress=False)


@pytest.fixture(scope="module")
def records():
    return list(shapes.generate(4, seed=11))


def test_batched_correctness_check_gives_the_per_record_answers(model, records):
    batch = model.prepare([r.question for r in records], [r.image for r in records])
    assert batch.has_padding
    alone = [model.answer(record_inputs(model, r))[0] for r in records]
    assert model.answer(batch) == alone


@pytest.mark.parametrize("window", [1, 3])
def test_batch_rows_equal_per_record_rows(model, records, window):
    study = STUDIES["information-flow"]
    options = study.check_options({"window": window})
    records = list(records)
    records[2] = dataclasses.replace(records[2], answer="certainly-not-this")  # one record the filter drops
    indexed = list(enumerate(records))
    batched = study.batch_rows(model, indexed, Context(options, batch_size=2))  # 2: kept records in chunks of 2 and 1
    per_record = []
    for index, record in indexed:
        ctx = Context(options)
        ctx.index = index
        per_record.append(study.rows(model, record, ctx))
    assert [f for _, f in batched] == [f for _, f in per_record]
    n_kept = sum(bool(f["correct"]) for _, f in per_record)
    assert 2 <= n_kept < len(records)  # both branches of the filter, and a batch of several kept records
    for (rows, _), (expected, _) in zip(batched, per_record):
        assert len(rows) == len(expected)
        if not len(expected):
            continue
        assert list(rows.columns) == list(expected.columns)
        assert rows[["condition", "x", "token", "window", "correct"]].equals(
            expected[["condition", "x", "token", "window", "correct"]])
        assert np.abs(rows["value"].to_numpy() - expected["value"].to_numpy()).max() < 1e-4  # percentage points
        assert np.allclose(rows["p_knocked"], expected["p_knocked"], rtol=1e-5, atol=1e-7)
        assert np.allclose(rows["p_base"], expected["p_base"], rtol=1e-5, atol=1e-7)
    assert any(len(rows) and "Related→Question" in set(rows["condition"]) for rows, _ in batched)
