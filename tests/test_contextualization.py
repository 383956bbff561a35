"""Cosine contextualization against explicit pairwise cosines on transformers' hidden states, and phases."""

import math
from types import SimpleNamespace

import plotly.graph_objects as go
import pytest
import torch
from conftest import hf_forward, noise_image

from hooked_vlm.analysis.contextualization import (
    ContextualizationResult,
    contextualization,
    contextualization_over,
    find_phases,
    mean_cosines,
)

FAMILIES = ["llava", "llama3_next"]
QUESTION = "What color is the circle ?"


def reference_layers(hf, inputs) -> list[torch.Tensor]:
    """``hidden_states[0..L-1]`` and the final residual before the norm (transformers' last one is normed)."""
    captured = {}
    handle = hf.model.language_model.norm.register_forward_hook(lambda m, args, out: captured.update(x=args[0]))
    try:
        out = hf_forward(hf, inputs, output_hidden_states=True)
    finally:
        handle.remove()
    return [h[0].double() for h in out.hidden_states[:-1]] + [captured["x"][0].double()]


def pairwise_mean(a: torch.Tensor, b: torch.Tensor | None) -> float:
    """Mean cosine by explicit loops over pairs (distinct pairs when ``b`` is None)."""
    cos = torch.nn.functional.cosine_similarity
    if b is not None:
        vals = [cos(v, w, dim=0) for v in a for w in b]
    else:
        vals = [cos(a[i], a[j], dim=0) for i in range(len(a)) for j in range(len(a)) if i != j]
    return float(torch.stack(vals).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_contextualization_equals_pairwise_cosines(tiny, hooked, family):
    hf, _ = tiny[family]
    model = hooked(family)
    inputs = model.prepare(QUESTION, noise_image(60, 40))
    layers = reference_layers(hf, inputs)
    ids = inputs.input_ids[0].tolist()
    image = [p for p, t in enumerate(ids) if t == model.image_token_id]
    if family != "llava":
        image = [p for p in image if not torch.allclose(layers[0][p].float(), hf.model.image_newline)]
    q = model.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i : i + len(q)] == q)
    text = list(range(start, start + len(q)))
    res = contextualization(model, inputs)
    assert res.image_positions.tolist() == image and res.text_positions.tolist() == text
    assert res.inter.shape == (model.cfg.n_layers + 1,)
    gaps = []
    for layer, h in enumerate(layers):
        gaps += [abs(res.inter[layer] - pairwise_mean(h[image], h[text])),
                 abs(res.intra_image[layer] - pairwise_mean(h[image], None)),
                 abs(res.intra_text[layer] - pairwise_mean(h[text], None))]
    assert max(gaps) < 1e-5
    # explicit position sets
    custom = contextualization(model, inputs, image=image[:3], text=[0, 1])
    h = layers[-1]
    assert abs(custom.inter[-1] - pairwise_mean(h[image[:3]], h[[0, 1]])) < 1e-5
    assert abs(custom.intra_text[-1] - pairwise_mean(h[[0, 1]], None)) < 1e-5


def test_mean_cosines_edge_cases():
    a = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    assert math.isnan(mean_cosines(a[:1]))
    assert mean_cosines(a[:2]) == pytest.approx(float(torch.nn.functional.cosine_similarity(a[0], a[1], dim=0)))
    assert mean_cosines(a, a[:0]) != mean_cosines(a, a[:0])  # NaN
    assert mean_cosines(a[:1], 3 * a[:1]) == pytest.approx(1.0)


def zigzag(knots: list[tuple[int, float]]) -> torch.Tensor:
    """A piecewise-linear curve through ``(layer, value)`` knots."""
    out = []
    for (x0, y0), (x1, y1) in zip(knots, knots[1:]):
        out += [y0 + (y1 - y0) * (x - x0) / (x1 - x0) for x in range(x0, x1)]
    return torch.tensor(out + [knots[-1][1]], dtype=torch.float64)


def test_phases_recover_known_boundaries():
    inter = zigzag([(0, 0.10), (3, 0.18), (11, 0.05), (28, 0.45), (32, 0.20)])
    intra = zigzag([(0, 0.3), (3, 0.3), (11, 0.6), (32, 0.6)])
    phases = find_phases(inter, [intra])
    assert phases.boundaries == (3, 11, 28)
    assert phases.spans == {"I": (0, 3), "II": (3, 11), "III": (11, 28), "IV": (28, 32)}
    assert phases.confidence == pytest.approx(1.0)
    assert [phases.phase_of(layer) for layer in (0, 3, 4, 11, 20, 29, 32)] == ["I", "I", "II", "II", "III", "IV", "IV"]
    noisy = inter + 0.01 * torch.randn(len(inter), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    found = find_phases(noisy, [intra], smooth=3).boundaries
    assert all(abs(f - b) <= 1 for f, b in zip(found, (3, 11, 28)))
    # intra falling during phase II, and a curve without the four-phase shape, lower the confidence
    assert find_phases(inter, [intra.flip(0)]).confidence == pytest.approx(0.8)
    assert find_phases(torch.linspace(0, 1, 33)).confidence <= 0.25


def test_frame_and_plot():
    inter = zigzag([(0, 0.10), (3, 0.18), (11, 0.05), (28, 0.45), (32, 0.20)])
    res = ContextualizationResult(inter, inter + 0.3, inter + 0.1, torch.arange(4), torch.arange(4, 6))
    frame = res.to_frame()
    assert list(frame.columns) == ["condition", "layer", "value"] and frame.shape == (3 * 33, 3)
    assert frame.query("condition == 'inter'")["value"].tolist() == pytest.approx(inter.tolist())
    fig = res.plot()
    assert isinstance(fig, go.Figure)
    assert [t.name for t in fig.data] == ["inter", "intra_image", "intra_text"]
    assert [(s.x0, s.x1) for s in fig.layout.shapes] == [(0, 3), (3, 11), (11, 28), (28, 32)]
    assert [a.text for a in fig.layout.annotations] == ["I", "II", "III", "IV"]
    assert len(res.plot(phases=False).layout.shapes) == 0


def test_contextualization_over_records(hooked):
    model = hooked("llama3_next")
    images = [noise_image(60, 40, seed=s) for s in (0, 1)]
    records = [SimpleNamespace(image=im, question=QUESTION, answer="red", caption="") for im in images]
    agg = contextualization_over(model, records, progress=False)
    n = model.cfg.n_layers + 1
    assert (agg.n_seen, agg.n_kept) == (2, 2) and len(agg.frame) == 2 * 3 * n
    singles = [contextualization(model, model.prepare(QUESTION, im)) for im in images]
    mean = agg.summary().query("condition == 'intra_image'")["mean"].to_numpy()
    assert mean == pytest.approx(((singles[0].intra_image + singles[1].intra_image) / 2).numpy())
    assert agg.phases().spans["IV"][1] == n - 1
    assert isinstance(agg.plot(), go.Figure)
    fixed = contextualization_over(model, records[:1], instruction=lambda r: "Describe this picture .", progress=False)
    assert len(fixed.frame) == 3 * n
