"""Image-token truncation and masking against transformers on the shortened inputs_embeds."""

import warnings
from dataclasses import replace
from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from conftest import noise_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hooked_vlm import PromptError, SelectionWarning
from hooked_vlm.analysis import truncation
from hooked_vlm.analysis.truncation import (
    aggregate_truncation,
    image_token_masking,
    image_token_truncation,
    plateau_point,
    target_ids,
    tokens_for_fraction,
)
from hooked_vlm.testing import hf_merged_embeds

PROMPT = "Describe this picture"
CAPTION = "a red circle left of a blue square"


def hf_loss(hf, embeds, keep, ids):
    with torch.no_grad():
        logits = hf(inputs_embeds=embeds[keep][None]).logits[0]
    n = logits.shape[0]
    return F.cross_entropy(logits[n - len(ids) - 1 : n - 1], ids).item()


@pytest.mark.parametrize("family", ["llava", "llava_next", "llama3_next"])
def test_truncation_and_masking_equal_transformers(tiny, hooked, family):
    hf, _ = tiny[family]
    model = hooked(family)
    inputs = model.prepare(PROMPT, noise_image(60, 40))
    image = inputs.image_positions
    n_image = len(image)
    ids = target_ids(model, CAPTION)
    embeds = hf_merged_embeds(hf, inputs, ids)
    counts = [0, 1, 7, n_image - 1, n_image]
    ours = image_token_truncation(model, inputs, CAPTION, counts=counts, batch_size=2)
    for n, loss in zip(counts, ours.loss):
        keep = torch.ones(len(embeds), dtype=torch.bool)
        keep[image[n:]] = False
        assert abs(loss.item() - hf_loss(hf, embeds, keep, ids)) < 1e-4
    intervals = [(0, 1), (3, 9), torch.tensor([2, n_image - 1]), (n_image - 1, n_image)]
    masked = image_token_masking(model, inputs, CAPTION, intervals, batch_size=3)
    for drop, loss in zip([[0], list(range(3, 9)), [2, n_image - 1], [n_image - 1]], masked.loss):
        keep = torch.ones(len(embeds), dtype=torch.bool)
        keep[image[drop]] = False
        assert abs(loss.item() - hf_loss(hf, embeds, keep, ids)) < 1e-4
    assert masked.labels == ["0", "3-8", f"2,{n_image - 1}", f"{n_image - 1}"]
    assert len(ours.loss.unique()) == len(counts)  # the settings really differ


def test_all_image_tokens_is_the_unablated_loss(hooked):
    model = hooked("llama3_next")
    inputs = model.prepare(PROMPT, noise_image(60, 40))
    ids = target_ids(model, CAPTION)
    n_prompt = inputs.seq_len
    tokens = torch.cat([inputs.input_ids, ids[None]], 1)
    full = replace(inputs, input_ids=tokens, attention_mask=torch.ones_like(tokens))
    with torch.no_grad():
        logits = model(full)[0]
    base = F.cross_entropy(logits[n_prompt - 1 : -1], ids).item()
    n_image = len(inputs.image_positions)
    result = image_token_truncation(model, inputs, ids, counts=[n_image])
    with pytest.warns(SelectionWarning, match="selects no image token"):
        masked = image_token_masking(model, inputs, ids, [torch.zeros(0, dtype=torch.long)])
    assert abs(result.loss.item() - base) < 1e-5
    assert abs(masked.base_loss - base) < 1e-5 and abs(masked.loss.item() - base) < 1e-5


def test_summaries_on_a_known_curve():
    counts = torch.arange(1, 11)
    loss = torch.tensor([5.0, 4.0, 3.2, 2.6, 2.3, 2.1, 2.05, 2.0, 2.02, 2.0])
    # mean 2.727: first at or below at n=4 and it stays there
    assert plateau_point(counts, loss) == 4
    # total reduction 3.0; 70% = 2.1 reached when loss <= 2.9: n=4 (2.6)
    assert tokens_for_fraction(counts, loss, 0.7) == 4
    assert tokens_for_fraction(counts, loss, 1.0) == 8
    bumpy = torch.tensor([5.0, 2.0, 4.0, 3.0, 2.5, 2.2, 2.1, 2.0, 2.0, 2.0])  # mean 2.68
    assert plateau_point(counts, bumpy, sustained=False) == 2
    assert plateau_point(counts, bumpy) == 5
    assert tokens_for_fraction(counts, torch.linspace(1, 2, 10)) is None
    shuffled = torch.randperm(10)
    assert tokens_for_fraction(counts[shuffled], loss[shuffled], 0.7) == 4


def test_result_summary_plot_and_errors(hooked):
    model = hooked("llava")
    inputs = model.prepare(PROMPT, noise_image(60, 40))
    result = image_token_truncation(model, inputs, CAPTION)
    assert result.counts.tolist() == list(range(1, result.n_image + 1))
    assert set(result.summary()) == {"threshold", "plateau_point", "tokens_for_0.7", "share_for_0.7"}
    assert len(result.plot().data) == 1
    assert list(result.to_frame().columns) == ["condition", "x", "value"]
    with pytest.raises(PromptError, match="counts"):
        image_token_truncation(model, inputs, CAPTION, counts=[result.n_image + 1])
    with pytest.raises(PromptError, match="outside"):
        image_token_masking(model, inputs, CAPTION, [(0, result.n_image + 2)])
    with pytest.raises(PromptError, match="no tokens"):
        image_token_truncation(model, inputs, [])
    with pytest.raises(PromptError, match="no image"):
        image_token_truncation(model, model.prepare(PROMPT), CAPTION)


def test_aggregate_over_records(hooked):
    model = hooked("llava")
    records = [SimpleNamespace(image=noise_image(60, 40, seed=s), question=PROMPT, caption=CAPTION) for s in (1, 2)]
    records.append(SimpleNamespace(image=noise_image(60, 40), question=PROMPT, caption=None))
    agg = aggregate_truncation(model, records, counts=[0, 4, 16], progress=False)
    assert (agg.n_seen, agg.n_kept) == (3, 2)
    assert agg.summary()["x"].tolist() == [0, 4, 16]


def full_forward_losses(model, inputs, ids, drops) -> torch.Tensor:
    """The computation without prefix reuse: one whole forward per setting on the shortened embeddings."""
    image = inputs.image_positions
    with torch.no_grad():
        embeds = model.hook_embed(torch.cat([model.embed_inputs(inputs), model.embed(ids[None])], 1))[0]
        out = []
        for drop in drops:
            keep = torch.ones(len(embeds), dtype=torch.bool)
            keep[image[drop]] = False
            logits = model(embeds[keep][None], start_at_layer=0)[0]
            n = logits.shape[0]
            out.append(F.cross_entropy(logits[n - len(ids) - 1 : n - 1], ids))
    return torch.stack(out)


@pytest.fixture(scope="module")
def gqa_case(hooked):
    model = hooked("llama3_next")
    inputs = model.prepare(PROMPT, noise_image(60, 40))
    return model, inputs, target_ids(model, CAPTION)


@pytest.mark.parametrize("shared", [True, False], ids=["shared_prefix", "kv_cache"])
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), batch_size=st.integers(1, 5))
def test_prefix_reuse_equals_full_forwards_on_random_settings(gqa_case, shared, data, batch_size):
    """Truncation counts and masked sets (runs and scattered indices, batched in any size) against one whole
    forward per setting, for both engines (the shared-prefix attention and TransformerLens's KV cache)."""
    model, inputs, ids = gqa_case
    with patch.object(truncation, "_shared_prefix_supported", lambda cfg: shared):
        check_against_full_forwards(model, inputs, ids, data, batch_size)


def check_against_full_forwards(model, inputs, ids, data, batch_size):
    n = len(inputs.image_positions)
    counts = data.draw(st.lists(st.integers(0, n), min_size=1, max_size=6), label="counts")
    runs = st.tuples(st.integers(0, n - 1), st.integers(1, n)).map(lambda t: (t[0], max(t[0] + 1, min(n, t[1]))))
    scattered = st.lists(st.integers(0, n - 1), min_size=1, max_size=8, unique=True).map(sorted)
    intervals = data.draw(st.lists(st.one_of(runs, scattered), min_size=1, max_size=6), label="intervals")
    ours = image_token_truncation(model, inputs, ids, counts=counts, batch_size=batch_size).loss
    ref = full_forward_losses(model, inputs, ids, [torch.arange(c, n) for c in counts])
    assert (ours - ref).abs().max() < 1e-4
    as_tensors = [torch.tensor(i) if isinstance(i, list) else i for i in intervals]
    masked = image_token_masking(model, inputs, ids, as_tensors, batch_size=batch_size)
    drops = [torch.tensor(i) if isinstance(i, list) else torch.arange(*i) for i in intervals]
    ref = full_forward_losses(model, inputs, ids, [torch.zeros(0, dtype=torch.long), *drops])
    assert abs(masked.base_loss - ref[0]) < 1e-4
    assert (masked.loss - ref[1:]).abs().max() < 1e-4


def test_prefix_reuse_leaves_no_hooks_and_keeps_the_model(hooked):
    model = hooked("llava")
    inputs = model.prepare(PROMPT, noise_image(60, 40))
    with torch.no_grad():
        before = model(inputs)
    image_token_truncation(model, inputs, CAPTION, counts=[0, 3, 9])
    image_token_masking(model, inputs, CAPTION, [(1, 4)])
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
    with torch.no_grad():
        assert torch.equal(model(inputs), before)


def test_hooks_attached_during_truncation_warn_by_name(hooked):
    """Prefix reuse recomputes only suffix rows: a user's decoder hook would see partial activations."""
    from hooked_vlm.errors import HookedVLMWarning

    model = hooked("llava")
    inputs = model.prepare(PROMPT, noise_image(60, 40))
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x)]):
        with pytest.warns(HookedVLMWarning, match="blocks.0.hook_resid_post"):
            image_token_truncation(model, inputs, CAPTION, counts=[1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", HookedVLMWarning)
        image_token_truncation(model, inputs, CAPTION, counts=[1, 2])


def test_batches_hold_no_more_attention_scores_than_one_full_forward(hooked, monkeypatch):
    """Masking an early block leaves a long suffix: such settings run fewer per forward, the losses unchanged."""
    model = hooked("llava")
    inputs = model.prepare(PROMPT, noise_image(60, 40))
    n = len(inputs.image_positions)
    intervals = [(i, i + 1) for i in range(n)]
    one = image_token_masking(model, inputs, CAPTION, intervals, batch_size=1)
    seen = []
    real = truncation._Losses._batches

    def spy(self, settings):
        for batch in real(self, settings):
            suffix = max(len(r) for _, r in batch)
            seen.append((len(batch), len(batch) * suffix * (max(s for s, _ in batch) + suffix), self.embeds.shape[0]))
            yield batch

    monkeypatch.setattr(truncation._Losses, "_batches", spy)
    many = image_token_masking(model, inputs, CAPTION, intervals, batch_size=64)
    assert all(size == 1 or scores <= n_all**2 for size, scores, n_all in seen)
    assert len(seen) > 1 and max(size for size, _, _ in seen) > 1
    torch.testing.assert_close(many.loss, one.loss, rtol=1e-5, atol=1e-5)
