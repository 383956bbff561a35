"""A self-contained HTML report: sections of text, plotly figures and images."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
from PIL import Image, ImageDraw

from hooked_vlm.geometry import KIND_NEWLINE

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; } h2 { margin-top: 2.2em; border-bottom: 1px solid #eee; }
.note { background: #f6f8fa; border-left: 4px solid #4a7; padding: .6em 1em; margin: .8em 0; }
.disagree { border-left-color: #d73; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; width: 250px; font-size: 13px; }
.card img { width: 100%; image-rendering: pixelated; }
.ok { color: #171; font-weight: bold; } .bad { color: #b21; font-weight: bold; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
"""


def image_with_patches(image: Image.Image, layout, scale: int = 4, boxes: list[tuple] | None = None) -> Image.Image:
    """The image enlarged, with the patch grid of its base tokens drawn and optional object boxes in red."""
    big = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    for kind, box in zip(layout.kinds, layout.boxes):
        if kind == KIND_NEWLINE or box[0] != box[0]:
            continue
        if layout.anyres and kind != "base":
            continue
        x0, y0, x1, y1 = (float(v) * scale for v in box)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 255, 255))
    for x, y, w, h in boxes or []:
        draw.rectangle([x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1], outline=(255, 0, 0), width=2)
    return big


def png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Section:
    title: str
    explanation: str
    figures: list[go.Figure] = field(default_factory=list)
    html_blocks: list[str] = field(default_factory=list)
    verdict: str | None = None
    agrees: bool | None = None
    side_by_side: bool = False


@dataclass
class Report:
    title: str
    intro: str
    sections: list[Section] = field(default_factory=list)

    def add(self, section: Section) -> Section:
        self.sections.append(section)
        return section

    def to_html(self) -> str:
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 f"<style>{CSS}</style></head><body><h1>{html.escape(self.title)}</h1><p>{self.intro}</p>"]
        parts.append("<ol>" + "".join(f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>"
                                       for i, s in enumerate(self.sections)) + "</ol>")
        first = True
        for i, s in enumerate(self.sections):
            parts.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2><p>{s.explanation}</p>")
            parts.extend(s.html_blocks)
            if s.side_by_side:
                parts.append("<div class='gallery'>")
            for fig in s.figures:
                parts.append(fig.to_html(full_html=False, include_plotlyjs=first))
                first = False
            if s.side_by_side:
                parts.append("</div>")
            if s.verdict:
                cls = "note" + (" disagree" if s.agrees is False else "")
                parts.append(f"<div class='{cls}'>{s.verdict}</div>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path
