"""Attention knockout against transformers (eager attention, per-layer 4D additive masks)."""

from types import SimpleNamespace

import pytest
import torch
from conftest import noise_image

from hooked_vlm import HookedVLM, PromptError, SelectionWarning
from hooked_vlm.analysis import knockout as knockout_module
from hooked_vlm.analysis.knockout import (
    FLOWS,
    aggregate_knockout,
    attention_knockout,
    blocked_edges,
    knockout_flows,
    knockout_hooks,
    object_patches,
    window_layers,
)
from hooked_vlm.testing import build_tiny

QUESTION = "What color is the circle ?"
N_LAYERS = 4


@pytest.fixture(scope="module")
def pair():
    """family -> (eager hf model with sharpened attention, HookedVLM)."""
    out = {}
    for family in ["llava", "llama3_next"]:
        hf, proc = build_tiny(family, layers=N_LAYERS, seed=1)
        with torch.no_grad():  # larger weights: peaky attention, so knockout effects are percents, not noise
            for layer in hf.model.language_model.layers:
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    getattr(layer.self_attn, proj).weight.mul_(6)
        hf.set_attn_implementation("eager")
        out[family] = (hf, HookedVLM.from_pretrained(family, hf_model=hf, processor=proc, device="cpu"))
    return out


def hf_knockout(hf, inputs, blocked, window):
    """The information-flow paper's method (Zhang et al.): one transformers forward per centre layer, a 4D -inf
    mask on the window's layers."""
    n_layers = hf.config.text_config.num_hidden_layers
    n = inputs.seq_len
    causal = torch.full((n, n), float("-inf")).triu(1)
    knocked = causal.masked_fill(blocked[0], float("-inf"))[None, None]

    def probs(layers):
        handles = [
            layer.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "attention_mask": knocked}), with_kwargs=True)
            for i, layer in enumerate(hf.model.language_model.layers) if i in layers
        ]
        try:
            with torch.no_grad():
                out = hf(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                         pixel_values=inputs.pixel_values, image_sizes=inputs.image_sizes)
        finally:
            for h in handles:
                h.remove()
        return out.logits[0, -1].double().softmax(-1)

    base = probs(set())
    token = base.argmax()
    rel = [(probs(set(window_layers(c, window, n_layers)))[token] / base[token] - 1) * 100 for c in range(n_layers)]
    return torch.stack(rel).float(), int(token)


@pytest.mark.parametrize("family", ["llava", "llama3_next"])
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("flow", [("image", "question"), ("question", "last")])
def test_knockout_equals_transformers(pair, family, window, flow):
    hf, model = pair[family]
    inputs = model.prepare(QUESTION, noise_image(60, 40))
    ours = attention_knockout(model, inputs, *flow, window=window)
    ref, token = hf_knockout(hf, inputs, blocked_edges(inputs, *flow), window)
    assert int(ours.token) == token
    assert ours.relative_change.abs().max() > 0.05  # the flow matters in this model
    assert (ours.relative_change - ref).abs().max() < 1e-3  # percentage points


def test_blocking_nothing_changes_nothing(pair):
    _, model = pair["llama3_next"]
    inputs = model.prepare(QUESTION, noise_image(60, 40))
    cases = [([], "question", "source positions \\[\\] selects no position for example 0"),
             ("image", [], "target positions \\[\\] selects no position for example 0"),
             ("question", "image", "source 'question' lies entirely after the target 'image'")]  # Q is after I
    for source, target, message in cases:
        with pytest.warns(SelectionWarning, match=message):
            result = attention_knockout(model, inputs, source, target, window=3)
        assert result.relative_change.abs().max() < 1e-3


def test_image_blocked_everywhere_makes_logits_image_independent(pair):
    _, model = pair["llava"]
    a = model.prepare(QUESTION, noise_image(60, 40, seed=1))
    b = model.prepare(QUESTION, noise_image(60, 40, seed=2))
    text = a.text_positions
    everything = torch.arange(a.seq_len)
    logits_a = model.run_with_hooks(a, fwd_hooks=knockout_hooks(model, "image", everything, inputs=a))
    logits_b = model.run_with_hooks(b, fwd_hooks=knockout_hooks(model, "image", everything, inputs=b))
    assert torch.allclose(logits_a[0, text], logits_b[0, text], atol=1e-5)
    assert not torch.allclose(model(a)[0, text], model(b)[0, text], atol=1e-3)
    for block in model.blocks:
        assert not block.attn.hook_attn_scores._forward_hooks


def test_padded_batch_equals_single_examples(pair):
    _, model = pair["llama3_next"]
    texts = [QUESTION, "Is the circle left or right of the square ? Answer using a single word"]
    images = [noise_image(60, 40, seed=1), noise_image(32, 90, seed=2)]
    batch = model.prepare(texts, images)
    assert batch.has_padding
    together = attention_knockout(model, batch, "image", "last", window=3)
    for b in range(2):
        alone = attention_knockout(model, model.prepare(texts[b], images[b]), "image", "last", window=3)
        assert int(together.token[b]) == int(alone.token)
        assert (together.relative_change[b] - alone.relative_change).abs().max() < 1e-3


def test_window_is_cut_at_the_edges_not_shifted():
    assert list(window_layers(0, 9, 12)) == [0, 1, 2, 3, 4]
    assert list(window_layers(6, 9, 12)) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert list(window_layers(11, 9, 12)) == [7, 8, 9, 10, 11]
    assert list(window_layers(5, 1, 12)) == [5]


@pytest.mark.parametrize("window", range(1, 12))
def test_window_blocks_exactly_window_layers_away_from_the_edges(window):
    n_layers = 40
    for centre in range(window, n_layers - window):
        layers = list(window_layers(centre, window, n_layers))
        assert len(layers) == window and centre in layers
        assert layers[0] == centre - window // 2  # even windows: one more layer before the centre than after


def test_object_patches_partition_the_image(pair):
    _, model = pair["llama3_next"]
    inputs = model.prepare(QUESTION, noise_image(60, 40))
    related, other = object_patches(inputs, {"x": 10, "y": 5, "w": 12, "h": 10})
    newline = inputs.image_newline_positions
    assert len(related) and len(other)
    parts = torch.cat([related, other, newline])
    assert len(torch.unique(parts)) == len(parts)
    assert torch.equal(torch.sort(parts).values, inputs.image_positions)


def test_flows_frame_plot_and_aggregate(pair):
    _, model = pair["llava"]
    image = noise_image(60, 40)
    record = SimpleNamespace(image=image, question=QUESTION, answer="", task="QueryAttr", true_option=None,
                             false_option=None, objects=[{"name": "circle", "color": "red", "x": 5, "y": 5, "w": 15,
                                                          "h": 15}], caption="a red circle")
    flows = knockout_flows(model, model.prepare(QUESTION, image), record, window=3)
    assert list(flows.flows) == list(FLOWS)
    df = flows.to_frame()
    assert set(df["condition"]) == set(FLOWS) and len(df) == len(FLOWS) * N_LAYERS
    assert len(flows.plot().data) == len(FLOWS)
    record.answer = model.answer(model.prepare(QUESTION, image))[0]
    wrong = SimpleNamespace(**{**vars(record), "answer": "certainly-not-this"})
    agg = aggregate_knockout(model, [record, wrong], window=3, flows=["Image→Last", "Last→Last"], progress=False)
    assert (agg.n_seen, agg.n_kept) == (2, 1)
    assert set(agg.summary()["condition"]) == {"Image→Last", "Last→Last"}


def test_bad_positions_raise(pair):
    _, model = pair["llava"]
    inputs = model.prepare(QUESTION, noise_image(60, 40))
    with pytest.raises(PromptError, match="Unknown position set"):
        attention_knockout(model, inputs, "pictures", "last")
    with pytest.raises(PromptError, match="outside"):
        attention_knockout(model, inputs, [inputs.seq_len + 3], "last")
    with pytest.raises(PromptError, match="box"):
        attention_knockout(model, inputs, "related", "question")
    with pytest.raises(PromptError, match="inputs="):
        knockout_hooks(model, "image", "last")
    with pytest.raises(PromptError, match="Centre layers"):
        attention_knockout(model, inputs, "image", "last", layers=[N_LAYERS])


# ---------------------------------------------------------------------------------------------- batched flows
def _record(question, image, box):
    return SimpleNamespace(image=image, question=question, answer="", task="QueryAttr", true_option=None,
                           false_option=None, objects=[{"name": "circle", **box}], caption="")


MULTI = [
    ("What color is the circle ?", (60, 40, 1), {"x": 5, "y": 5, "w": 20, "h": 15}),
    ("Is the circle left or right of the square ? Answer using a single word", (32, 90, 2),
     {"x": 10, "y": 40, "w": 12, "h": 30}),
    ("Which shape is red ?", (50, 50, 3), {"x": 25, "y": 20, "w": 20, "h": 25}),
]


@pytest.fixture(scope="module")
def next_pair():
    hf, proc = build_tiny("llava_next", layers=N_LAYERS, seed=2)
    with torch.no_grad():
        for layer in hf.model.language_model.layers:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, proj).weight.mul_(6)
    hf.set_attn_implementation("eager")
    return hf, HookedVLM.from_pretrained("llava_next", hf_model=hf, processor=proc, device="cpu")


def _model(pair, next_pair, family):
    return next_pair[1] if family == "llava_next" else pair[family][1]


@pytest.mark.parametrize("family", ["llava", "llava_next", "llama3_next"])
def test_batch_of_records_equals_each_record(pair, next_pair, family):
    model = _model(pair, next_pair, family)
    records = [_record(q, noise_image(w, h, seed=s), box) for q, (w, h, s), box in MULTI]
    batch = model.prepare([r.question for r in records], [r.image for r in records])
    assert batch.has_padding
    for batch_size in (2, 16):  # 2: the examples split over forwards too
        together = knockout_flows(model, batch, records, window=3, batch_size=batch_size)
        assert list(together.flows) == list(FLOWS)
        for b, record in enumerate(records):
            alone = knockout_flows(model, model.prepare(record.question, record.image), record, window=3)
            for label in FLOWS:
                assert int(together[label].token[b]) == int(alone[label].token)
                gap = (together[label].relative_change[b] - alone[label].relative_change).abs().max()
                assert gap < 1e-4, (label, b, gap)
    assert max(alone[f].relative_change.abs().max() for f in FLOWS) > 0.05


@pytest.mark.parametrize("family", ["llava", "llava_next", "llama3_next"])
def test_shared_forwards_equal_single_flows_and_transformerlens_path(pair, next_pair, family, monkeypatch):
    """Six flows sharing forwards (fused attention) == each flow alone == TransformerLens's KV-cache path."""
    model = _model(pair, next_pair, family)
    question, (w, h, s), box = MULTI[1]
    inputs = model.prepare(question, noise_image(w, h, seed=s))
    shared = knockout_flows(model, inputs, box=box, window=3)
    monkeypatch.setattr(knockout_module, "_fused_ok", lambda model: False)
    slow = knockout_flows(model, inputs, box=box, window=3, batch_size=3)
    for label, (source, target) in FLOWS.items():
        single = attention_knockout(model, inputs, source, target, window=3, box=box, batch_size=1)
        assert (shared[label].relative_change - single.relative_change).abs().max() < 1e-4
        assert (shared[label].relative_change - slow[label].relative_change).abs().max() < 1e-4


@pytest.mark.parametrize("flow", [("related", "question"), ("image", "last")])
def test_llava_next_knockout_equals_transformers(next_pair, flow):
    hf, model = next_pair
    question, (w, h, s), box = MULTI[0]
    inputs = model.prepare(question, noise_image(w, h, seed=s))
    ours = attention_knockout(model, inputs, *flow, window=3, box=box)
    ref, token = hf_knockout(hf, inputs, blocked_edges(inputs, *flow, box=box), 3)
    assert int(ours.token) == token
    assert (ours.relative_change - ref).abs().max() < 1e-3


def test_fused_path_steps_aside_for_user_hooks(pair):
    _, model = pair["llava"]
    assert knockout_module._fused_ok(model)
    model.blocks[1].hook_resid_post.add_hook(lambda x, hook: x)
    try:
        assert not knockout_module._fused_ok(model)
    finally:
        model.reset_hooks()
    assert knockout_module._fused_ok(model)


def test_batch_of_records_refuses_mixed_or_miscounted_records(pair):
    _, model = pair["llava"]
    records = [_record(q, noise_image(w, h, seed=s), box) for q, (w, h, s), box in MULTI[:2]]
    batch = model.prepare([r.question for r in records], [r.image for r in records])
    with pytest.raises(PromptError, match="2 examples"):
        knockout_flows(model, batch, records[:1], window=3)
    records[1].objects = []
    with pytest.raises(PromptError, match=r"examples \[1\] have no objects"):
        knockout_flows(model, batch, records, window=3)
    for block in model.blocks:
        assert not block.attn.hook_attn_scores._forward_hooks


def test_user_hooks_during_knockout_warn_by_name(pair):
    """Knocked runs recompute only some rows and layers: a user's decoder hook would see partial activations."""
    from hooked_vlm.errors import HookedVLMWarning

    _, model = pair["llava"]
    inputs = model.prepare("What color is the circle?", noise_image(40, 30))
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda x, hook: x)]):
        with pytest.warns(HookedVLMWarning, match=r"blocks\.1\.attn\.hook_pattern"):
            attention_knockout(model, inputs, "image", "last", window=1, layers=[0])


def test_target_at_position_zero_recomputes_every_row(pair):
    """A target at position 0: no frozen rows at all (the fused attention with an empty cache)."""
    hf, model = pair["llava"]
    inputs = model.prepare(QUESTION, noise_image(60, 40))
    target = [0, int(inputs.last_position)]
    ours = attention_knockout(model, inputs, "image", target, window=1)
    ref, token = hf_knockout(hf, inputs, blocked_edges(inputs, "image", target), 1)
    assert int(ours.token) == token
    assert (ours.relative_change - ref).abs().max() < 1e-3
