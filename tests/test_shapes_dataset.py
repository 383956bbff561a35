"""The shapes world: determinism, record fields, pixel-exact boxes, and answers that follow from the scene."""

from __future__ import annotations

import csv
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from hooked_vlm.datasets import shapes
from hooked_vlm.datasets.shapes import COLORS, SHAPES, TASKS, ShapesRecord, generate, load_gqa_csv, vocabulary

RECORDS = list(generate(240, seed=7))


def _centre(o: dict, axis: str) -> float:
    return o["x"] + o["w"] / 2 if axis == "x" else o["y"] + o["h"] / 2


def _solve(r: ShapesRecord) -> str:
    """The answer, worked out from the objects alone by reading the question."""
    by_shape = {o["name"]: o for o in r.objects}
    present = {(o["color"], o["name"]) for o in r.objects}
    q = r.question
    if r.task == "ChooseAttr":
        shape, a, b = re.fullmatch(r"Is the (\w+) (\w+) or (\w+)\?", q).groups()
        assert by_shape[shape]["color"] in (a, b)
        return by_shape[shape]["color"]
    if r.task == "QueryAttr":
        return by_shape[re.fullmatch(r"What color is the (\w+)\?", q).group(1)]["color"]
    if r.task == "ChooseRel":
        shape, a, b, other = re.fullmatch(r"Is the (\w+) (\w+) or (\w+) (?:of )?the (\w+)\?", q).groups()
        axis = "x" if {a, b} == {"left", "right"} else "y"
        assert {a, b} in ({"left", "right"}, {"above", "below"})
        before = _centre(by_shape[shape], axis) < _centre(by_shape[other], axis)
        return {"x": ("left", "right"), "y": ("above", "below")}[axis][0 if before else 1]
    if r.task == "ChooseCat":
        color, a, b = re.fullmatch(r"Which shape is (\w+), the (\w+) or the (\w+)\?", q).groups()
        matches = [o["name"] for o in r.objects if o["color"] == color]
        assert len(matches) == 1 and matches[0] in (a, b)
        return matches[0]
    if r.task == "CompareAttr":
        a, b = re.fullmatch(r"Are the (\w+) and the (\w+) the same color\?", q).groups()
        return "yes" if by_shape[a]["color"] == by_shape[b]["color"] else "no"
    c1, s1, c2, s2 = re.fullmatch(r"Is there a (\w+) (\w+) or a (\w+) (\w+)\?", q).groups()
    return "yes" if (c1, s1) in present or (c2, s2) in present else "no"


def test_same_seed_same_records_and_streams_can_be_read_in_pieces():
    again = list(generate(240, seed=7))
    assert [(r.question, r.answer, r.objects, r.caption) for r in again] == [
        (r.question, r.answer, r.objects, r.caption) for r in RECORDS
    ]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(again, RECORDS))
    piece = list(generate(5, seed=7, start=100))
    assert [r.question_id for r in piece] == [r.question_id for r in RECORDS[100:105]]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(piece, RECORDS[100:105]))
    other = list(generate(20, seed=8))
    assert sum(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(other, RECORDS)) == 0


def test_fields_and_options():
    for r in RECORDS:
        assert r.task in TASKS
        assert isinstance(r.image, Image.Image) and r.image.mode == "RGB"
        assert r.image.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
        assert re.fullmatch(r"[a-z]+", r.answer)
        assert r["answer"] == r.answer and r["image"] is r.image
        assert 1 <= len(r.objects) <= 3
        assert len({o["name"] for o in r.objects}) == len(r.objects), "shapes must be unique referents"
        assert all(o["name"] in SHAPES and o["color"] in COLORS for o in r.objects)
        words = re.findall(r"\w+", r.question)
        if r.task.startswith("Choose"):
            assert r.true_option == r.answer and r.false_option != r.answer
            assert r.true_option in words and r.false_option in words
        else:
            assert r.true_option is None and r.false_option is None
    with pytest.raises(KeyError):
        RECORDS[0]["nope"]


def test_every_task_present_and_yes_no_balanced():
    counts = Counter(r.task for r in RECORDS)
    assert set(counts) == set(TASKS) and min(counts.values()) == len(RECORDS) // len(TASKS)
    yes_no = [r.answer for r in RECORDS if r.task in ("CompareAttr", "LogicalObj")]
    assert set(yes_no) == {"yes", "no"} and 0.3 < yes_no.count("yes") / len(yes_no) < 0.7


def test_answers_follow_from_objects():
    for r in RECORDS:
        assert _solve(r) == r.answer, r


def test_boxes_inside_image_and_match_drawn_pixels():
    for r in RECORDS:
        pixels = np.asarray(r.image).astype(int)
        covered = np.zeros(pixels.shape[:2], dtype=bool)
        for o in r.objects:
            x, y, w, h = o["x"], o["y"], o["w"], o["h"]
            assert 0 <= x and 0 <= y and x + w <= shapes.IMAGE_SIZE and y + h <= shapes.IMAGE_SIZE
            inside = (pixels[y : y + h, x : x + w] == COLORS[o["color"]]).all(-1)
            rows, cols = np.nonzero(inside)
            assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, h - 1, 0, w - 1), o
            assert inside.mean() > 0.4  # a filled shape, not an outline
            covered[y : y + h, x : x + w] = True
        shape_coloured = np.zeros_like(covered)
        for rgb in COLORS.values():
            shape_coloured |= (pixels == rgb).all(-1)
        assert not (shape_coloured & ~covered).any(), "shape colours outside every box"


def test_caption_lists_objects_left_to_right():
    for r in RECORDS:
        ordered = sorted(r.objects, key=lambda o: _centre(o, "x"))
        assert r.caption == " left of ".join(f"a {o['color']} {o['name']}" for o in ordered)


def test_vocabulary_covers_every_text():
    vocab = set(vocabulary())
    for r in RECORDS:
        for text in (r.question.lower(), r.answer, r.caption, shapes.CAPTION_QUESTION.lower()):
            assert set(re.findall(r"\w+|[^\w\s]", text)) <= vocab, text


def test_unknown_task_rejected():
    with pytest.raises(ValueError, match="unknown task"):
        next(generate(1, 0, tasks=("CountObj",)))


def _write_gqa(tmp_path, rows: list[dict], name: str = "ChooseAttr.csv"):
    columns = ["question_id", "img_id", "question", "answer", "image_w", "image_h", "true option", "false option"]
    columns += [f"central object {k}" for k in ("name", "x", "y", "w", "h")]
    path = tmp_path / name
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_load_gqa_csv(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (9, 8, 7)).save(images / "n123.jpg")
    row = {
        "question_id": "q1", "img_id": "n123", "question": "Is the bus red or blue?", "answer": "red",
        "image_w": 40, "image_h": 30, "true option": "red", "false option": "blue",
        "central object name": "bus", "central object x": 3, "central object y": 4,
        "central object w": 10, "central object h": 12,
    }
    (r,) = load_gqa_csv(_write_gqa(tmp_path, [row]), images)
    expected = ("ChooseAttr", "q1", "red", "red", "blue")
    assert (r.task, r.question_id, r.answer, r.true_option, r.false_option) == expected
    assert r.objects == [{"name": "bus", "color": None, "x": 3, "y": 4, "w": 10, "h": 12}]
    assert r.image.size == (40, 30) and r.image.mode == "RGB"

    with pytest.raises(FileNotFoundError, match="n999"):
        load_gqa_csv(_write_gqa(tmp_path, [row, {**row, "img_id": "n999"}]), images)
    with pytest.raises(FileNotFoundError, match="GQA CSV not found"):
        load_gqa_csv(tmp_path / "QueryAttr.csv", images)
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_gqa_csv(_write_gqa(tmp_path, [row]), tmp_path / "missing")


def test_question_objects_are_the_named_ones():
    for r in generate(60, seed=5):
        named = [o for o in r.objects if o["name"] in r.question]
        assert r.question_objects == (named or r.objects)
