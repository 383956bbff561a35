"""Data sets: the synthetic shapes world and readers for the papers' local data."""

from hooked_vlm.datasets.shapes import (
    CAPTION_QUESTION,
    COLORS,
    SHAPES,
    TASKS,
    ShapesRecord,
    caption,
    generate,
    load_gqa_csv,
    vocabulary,
)

__all__ = [
    "CAPTION_QUESTION",
    "COLORS",
    "SHAPES",
    "TASKS",
    "ShapesRecord",
    "caption",
    "generate",
    "load_gqa_csv",
    "vocabulary",
]
