"""Positions, labels and boxes, checked against the processor's own pixels."""

import numpy as np
import pytest
import torch
from conftest import noise_image
from PIL import Image, ImageDraw
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

RED = (230, 20, 20)


def rect_image(w, h, box):
    img = Image.new("RGB", (w, h), (128, 128, 128))
    x, y, bw, bh = box
    ImageDraw.Draw(img).rectangle([x, y, x + bw - 1, y + bh - 1], fill=RED)
    return img


def red_fraction(pixels: torch.Tensor, patch: int) -> np.ndarray:
    """[3, H, W] normalised pixels -> [gh, gw] fraction of clearly red pixels, and any-red mask."""
    mean = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    rgb = (pixels * std + mean).numpy()
    strong = (rgb[0] > 0.7) & (rgb[1] < 0.3)
    weak = (rgb[0] - rgb[1]) > 0.05
    gh, gw = rgb.shape[1] // patch, rgb.shape[2] // patch

    def pool(m):
        return m[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).mean((1, 3))

    return pool(strong), pool(weak) > 0


def check(selected: set, truth_cells: list, positions_of_cells: list):
    strong = {pos for pos, (s, _) in zip(positions_of_cells, truth_cells) if s >= 0.5}
    weak = {pos for pos, (_, w) in zip(positions_of_cells, truth_cells) if w}
    assert strong, "the rectangle should cover at least one patch"
    assert strong <= selected <= weak, (sorted(strong - selected), sorted(selected - weak))


@pytest.mark.parametrize("size,box", [((60, 40), (10, 5, 25, 20)), ((40, 90), (5, 50, 30, 30))])
def test_box_llava(hooked, size, box):
    model = hooked("llava")
    inputs = model.prepare("What color is the square ?", rect_image(*size, box))
    patch = model.hf_config.vision_config.patch_size
    strong, weak = red_fraction(inputs.pixel_values[0], patch)
    cells = list(zip(strong.flatten(), weak.flatten()))
    selected = set(inputs.image_positions_in_box(*box).tolist())
    check(selected, cells, inputs.image_positions.tolist())


@pytest.mark.parametrize("family", ["llava_next", "llama3_next"])
@pytest.mark.parametrize("size,box", [((90, 40), (50, 8, 30, 25)), ((36, 100), (4, 10, 20, 30))])
def test_box_anyres(hooked, family, size, box):
    model = hooked(family)
    cfg = model.hf_config
    inputs = model.prepare("What color is the square ?", rect_image(*size, box))
    patch = cfg.vision_config.patch_size
    side = cfg.vision_config.image_size // patch
    pv = inputs.pixel_values[0]
    positions = inputs.image_positions.tolist()
    selected = set(inputs.image_positions_in_box(*box).tolist())
    # Base image: the first side*side image tokens, row-major over the first crop.
    s, w = red_fraction(pv[0], patch)
    base_cells = list(zip(s.flatten(), w.flatten()))
    base_pos = positions[: side * side]
    check(selected & set(base_pos), base_cells, base_pos)
    # High-resolution grid: tiles stitched row-major, unpadded with transformers' unpad_image.
    gh, gw = get_anyres_image_grid_shape((size[1], size[0]), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    grid_s = np.zeros((gh * side, gw * side))
    grid_w = np.zeros((gh * side, gw * side), dtype=bool)
    for t in range(gh * gw):
        s, w = red_fraction(pv[1 + t], patch)
        r, c = divmod(t, gw)
        grid_s[r * side : (r + 1) * side, c * side : (c + 1) * side] = s
        grid_w[r * side : (r + 1) * side, c * side : (c + 1) * side] = w
    kept = unpad_image(torch.from_numpy(np.stack([grid_s, grid_w])), (size[1], size[0])).numpy()
    n_rows, n_cols = kept.shape[1:]
    tile_pos = positions[side * side :]
    assert len(tile_pos) == n_rows * (n_cols + 1)
    newline = set(inputs.image_newline_positions.tolist())
    assert newline == {tile_pos[i * (n_cols + 1) + n_cols] for i in range(n_rows)}
    assert not (selected & newline)
    cells, cell_pos = [], []
    for i in range(n_rows):
        for j in range(n_cols):
            cells.append((kept[0, i, j], bool(kept[1, i, j])))
            cell_pos.append(tile_pos[i * (n_cols + 1) + j])
    check(selected & set(cell_pos), cells, cell_pos)


def test_labels_tell_anyres_parts_apart(hooked):
    model = hooked("llava_next")
    inputs = model.prepare("What color is the bus ?", noise_image(90, 40))
    labels = model.to_str_tokens(inputs)
    assert len(labels) == inputs.seq_len
    image_labels = [labels[p] for p in inputs.image_positions.tolist()]
    assert sum(lbl.startswith("<img base") for lbl in image_labels) == 16
    assert sum(lbl.startswith("<img newline") for lbl in image_labels) == len(inputs.image_newline_positions)
    assert any(lbl.startswith("<img tile") for lbl in image_labels)
    assert labels[inputs.text_positions[-1]] == ":"


def test_llava_labels_are_grid_coordinates(hooked):
    model = hooked("llava")
    inputs = model.prepare("What color is the bus ?", noise_image(60, 40))
    labels = model.to_str_tokens(inputs)
    image_labels = [labels[p] for p in inputs.image_positions.tolist()]
    assert image_labels[:5] == ["<img r0 c0>", "<img r0 c1>", "<img r0 c2>", "<img r0 c3>", "<img r1 c0>"]


def test_span_and_question_positions(hooked):
    model = hooked("llava")
    inputs = model.prepare("Is the circle red or blue ?", noise_image(60, 40))
    tokens = model.to_str_tokens(inputs)
    assert [tokens[p] for p in inputs.question_positions] == ["Is", "the", "circle", "red", "or", "blue", "?"]
    assert [tokens[p] for p in inputs.span("red")] == ["red"]
    assert [tokens[p] for p in inputs.span("the", occurrence=0)] == ["the"]  # "the" inside the question
    assert inputs.last_position == inputs.seq_len - 1
    assert tokens[inputs.last_position] == ":"


def test_raw_prompt_ids_equal_processor(hooked, tiny):
    model = hooked("llava_next")
    _, proc = tiny["llava_next"]
    text = "USER: <image>\nWhat is in the picture ? ASSISTANT:"
    img = noise_image(50, 70)
    inputs = model.prepare(text, img, template=None)
    ref = proc(text=text, images=img, return_tensors="pt")
    assert torch.equal(inputs.input_ids, ref["input_ids"])
    assert torch.equal(inputs.pixel_values, ref["pixel_values"])


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("size", [(60, 40), (37, 91), (200, 50)])
def test_patch_footprints_have_no_gaps(hooked, family, size):
    model = hooked(family)
    inputs = model.prepare("What ?", noise_image(*size))
    layout = inputs.layouts[0][0]
    kinds = np.array(layout.kinds)
    base = layout.boxes[kinds == "base"]
    base = base[~np.isnan(base[:, 0])]
    area = ((base[:, 2] - base[:, 0]) * (base[:, 3] - base[:, 1])).sum()
    w, h = size
    if family == "llava":  # shortest edge resized, then a centre crop: the crop is covered
        side = min(w, h)
        assert area == pytest.approx(side * side, rel=0.02)  # resize rounding shifts the crop by < 1 px
    else:  # the base image is the whole image squashed
        assert area == pytest.approx(w * h, rel=1e-6)
        for x in range(0, w, 3):  # every pixel column lies in some base and some tile patch
            hit = inputs.image_positions_in_box(x, h // 2, 1, 1).tolist()
            labels = [model.to_str_tokens(inputs)[p] for p in hit]
            assert any("base" in lbl for lbl in labels) and any("tile" in lbl for lbl in labels), x
