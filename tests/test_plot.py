"""image_overlay puts each image token's value on its patch of the original image."""

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from conftest import noise_image

from hooked_vlm import PromptError
from hooked_vlm.plot import image_overlay

QUESTION = "What color is the circle ?"


def hot_cells(fig):
    """Pixel-coordinate extent of the cells equal to 1 in the heatmap layer."""
    heat = next(d for d in fig.data if isinstance(d, go.Heatmap))
    z, xs, ys = np.asarray(heat.z, dtype=float), np.asarray(heat.x), np.asarray(heat.y)
    rows, cols = np.nonzero(z == 1)
    return xs[cols].min(), xs[cols].max() + 1, ys[rows].min(), ys[rows].max() + 1, z


@pytest.mark.parametrize("family,which", [("llava", "auto"), ("llava_next", "tile"), ("llava_next", "base")])
def test_single_hot_patch_lands_on_its_box(hooked, family, which):
    model = hooked(family)
    inputs = model.prepare(QUESTION, noise_image(60, 40))
    layout = inputs.layouts[0][0]
    kinds = np.array(layout.kinds)
    kind = "base" if which in ("auto", "base") else "tile"
    candidates = np.nonzero(kinds == kind)[0]
    for token in candidates[[0, len(candidates) // 2, -1]]:
        values = torch.zeros(len(layout))
        values[token] = 1
        fig = image_overlay(inputs, values, which=which)
        x0, x1, y0, y1, z = hot_cells(fig)
        # pixels whose centre (i + 0.5) lies inside the patch's footprint
        expected = tuple(float(np.ceil(v - 0.5)) for v in layout.boxes[token])
        assert (x0, y0, x1, y1) == expected
        assert np.nansum(z) == (x1 - x0) * (y1 - y0)  # nothing else is hot
    assert isinstance(fig.data[0], go.Image)


def test_newline_values_are_ignored_and_short_vectors_accepted(hooked):
    model = hooked("llava_next")
    inputs = model.prepare(QUESTION, noise_image(60, 40))
    layout = inputs.layouts[0][0]
    newline = np.array(layout.kinds) == "newline"
    values = torch.arange(len(layout), dtype=torch.float)
    with_newlines = image_overlay(inputs, values)
    values[torch.from_numpy(newline)] = 1e6
    changed_newlines = image_overlay(inputs, values)
    without = image_overlay(inputs, values[torch.from_numpy(~newline)])
    z = [np.asarray(f.data[-1].z, dtype=float) for f in (with_newlines, changed_newlines, without)]
    assert np.array_equal(z[0], z[1], equal_nan=True) and np.array_equal(z[0], z[2], equal_nan=True)


def test_large_images_are_downsampled(hooked):
    model = hooked("llava")
    inputs = model.prepare(QUESTION, noise_image(900, 500))
    fig = image_overlay(inputs, torch.rand(len(inputs.image_positions)), title="t")
    z = np.asarray(fig.data[-1].z)
    assert max(z.shape) <= 400 and fig.layout.title.text == "t"


def test_bad_arguments_raise(hooked):
    model = hooked("llava")
    inputs = model.prepare(QUESTION, noise_image(60, 40))
    with pytest.raises(PromptError, match="values"):
        image_overlay(inputs, torch.zeros(3))
    with pytest.raises(PromptError, match="which"):
        image_overlay(inputs, torch.zeros(len(inputs.image_positions)), which="grid")
    with pytest.raises(PromptError, match="image=1"):
        image_overlay(inputs, torch.zeros(len(inputs.image_positions)), image=1)
