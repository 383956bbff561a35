"""Where each image token comes from in the original image.

The layout is read off the checkpoint's own image processor: we run it once on a
"coordinate image" whose pixels encode their own (x, y), with nearest resampling and
no normalisation, so every resize, crop, pad and anyres tile of the real pipeline is
followed exactly. For LLaVA-NeXT the high-resolution feature grid is unpadded with
transformers' own ``unpad_image``.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import numpy as np
import torch
from PIL import Image
from transformers.image_utils import PILImageResampling
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

KIND_BASE, KIND_TILE, KIND_NEWLINE = "base", "tile", "newline"


@dataclass
class ImageLayout:
    """The image tokens of one image, in sequence order.

    Attributes:
        kinds: per token ``"base"`` (the whole image at low resolution; LLaVA-1.5 has only these),
            ``"tile"`` (anyres high-resolution grid) or ``"newline"`` (anyres row end).
        rows, cols: grid coordinates of each token (its own grid: base or unpadded tile grid).
        boxes: ``[n_tokens, 4]`` float ``(x0, y0, x1, y1)`` in original-image pixels that the token's
            patch covers (clipped to the image); NaN for newline tokens and pure padding.
        image_size: ``(width, height)`` of the original image.
        anyres: whether the layout has tile and newline tokens.
    """

    kinds: list[str]
    rows: list[int]
    cols: list[int]
    boxes: np.ndarray
    image_size: tuple[int, int]
    anyres: bool = False

    def __len__(self) -> int:
        return len(self.kinds)

    def labels(self) -> list[str]:
        """``"<img r3 c17>"`` (LLaVA-1.5) or ``"<img base r3 c17>"`` / ``"<img tile r3 c17>"`` /
        ``"<img newline r3>"`` (anyres)."""
        out = []
        for kind, r, c in zip(self.kinds, self.rows, self.cols):
            if kind == KIND_NEWLINE:
                out.append(f"<img newline r{r}>")
            elif self.anyres:
                out.append(f"<img {kind} r{r} c{c}>")
            else:
                out.append(f"<img r{r} c{c}>")
        return out

    def in_box(self, x: float, y: float, w: float, h: float) -> np.ndarray:
        """Indices (into this layout) of patches overlapping the box; newline tokens never."""
        b = self.boxes
        with np.errstate(invalid="ignore"):
            hit = (b[:, 0] < x + w) & (b[:, 2] > x) & (b[:, 1] < y + h) & (b[:, 3] > y)
        return np.nonzero(hit)[0]


def _coordinate_image(width: int, height: int) -> Image.Image:
    """RGB image whose pixel (x, y) stores x+1 and y+1 in 12 bits each (0 means padding)."""
    xs = np.arange(width, dtype=np.int64)[None, :] + 1
    ys = np.arange(height, dtype=np.int64)[:, None] + 1
    xs, ys = np.broadcast_arrays(xs, ys)
    r = xs & 0xFF
    g = ys & 0xFF
    b = ((xs >> 8) << 4) | (ys >> 8)
    return Image.fromarray(np.stack([r, g, b], axis=-1).astype(np.uint8), "RGB")


def _decode(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[3, H, W] raw pixels of a processed coordinate image -> source x, y (-1 for padding)."""
    p = np.rint(pixels).astype(np.int64)
    x = p[0] | ((p[2] >> 4) << 8)
    y = p[1] | ((p[2] & 0xF) << 8)
    pad = (x == 0) | (y == 0)
    return np.where(pad, -1, x - 1), np.where(pad, -1, y - 1)


def _axis_map(coord: np.ndarray) -> tuple[float, float] | None:
    """Fit ``source = a * processed + b`` (pixel edges) along one axis from nearest-sampled coordinates."""
    idx = np.nonzero(coord >= 0)[0]
    if len(idx) == 0:
        return None
    if len(idx) == 1:
        return 1.0, float(coord[idx[0]] - idx[0])
    a, b = np.polyfit(idx + 0.5, coord[idx] + 0.5, 1)
    return float(a), float(b)


def _snap(edges: np.ndarray, size: int) -> np.ndarray:
    """Edges within half a pixel of the image border are the border (nearest sampling is that coarse)."""
    edges = np.where(edges < 0.5, 0.0, edges)
    return np.where(edges > size - 0.5, float(size), edges)


def _patch_boxes(pixels: np.ndarray, patch: int, image_size: tuple[int, int]) -> np.ndarray:
    """Boxes ``[gh, gw, 4]``: the footprint in the original image of each ``patch``x``patch`` block.

    Resize, crop and pad are affine per axis, so the map from processed to original pixels is fitted
    from the decoded samples; a patch's box is its block mapped back, clipped to the image, and NaN
    when the block is all padding. Neighbouring boxes share their edges (no gaps).
    """
    x, y = _decode(pixels)
    gh, gw = x.shape[0] // patch, x.shape[1] // patch
    fx, fy = _axis_map(x.max(0)), _axis_map(y.max(1))
    boxes = np.full((gh, gw, 4), np.nan)
    if fx is None or fy is None:
        return boxes
    width, height = image_size
    cols = np.arange(gw + 1) * patch
    rows = np.arange(gh + 1) * patch
    xe = _snap(np.clip(fx[0] * cols + fx[1], 0, width), width)
    ye = _snap(np.clip(fy[0] * rows + fy[1], 0, height), height)
    boxes[..., 0], boxes[..., 2] = xe[None, :-1], xe[None, 1:]
    boxes[..., 1], boxes[..., 3] = ye[:-1, None], ye[1:, None]
    valid = einops.reduce(x[: gh * patch, : gw * patch] >= 0, "(gh p) (gw q) -> gh gw", "max", p=patch, q=patch)
    boxes[~valid] = np.nan
    return boxes


def _raw_pixels(image_processor, size: tuple[int, int]) -> tuple[np.ndarray, list | None]:
    out = image_processor(
        _coordinate_image(*size),
        do_rescale=False,
        do_normalize=False,
        resample=PILImageResampling.NEAREST,
        return_tensors="np",
    )
    return np.asarray(out["pixel_values"][0], dtype=np.float64), out.get("image_sizes")


def llava_layout(image_processor, image_size: tuple[int, int], patch_size: int) -> ImageLayout:
    """Layout of a LLaVA-1.5 image: one square grid of patches, row-major."""
    pixels, _ = _raw_pixels(image_processor, image_size)
    boxes = _patch_boxes(pixels, patch_size, image_size)
    gh, gw = boxes.shape[:2]
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    return ImageLayout(
        kinds=[KIND_BASE] * (gh * gw),
        rows=rows.tolist(),
        cols=cols.tolist(),
        boxes=boxes.reshape(-1, 4),
        image_size=image_size,
    )


def llava_next_layout(image_processor, image_size: tuple[int, int], patch_size: int, config) -> ImageLayout:
    """Layout of an anyres image: base grid, then the unpadded tile grid with a newline per row.

    Mirrors ``LlavaNextModel.pack_image_features`` (``vision_feature_select_strategy="default"``).
    """
    pixels, _ = _raw_pixels(image_processor, image_size)  # [1 + n_tiles, 3, S, S]
    side = config.vision_config.image_size // config.vision_config.patch_size
    base = _patch_boxes(pixels[0], patch_size, image_size).reshape(-1, 4)
    w, h = image_size
    gh, gw = get_anyres_image_grid_shape((h, w), config.image_grid_pinpoints, config.vision_config.image_size)
    tiles = np.stack([_patch_boxes(t, patch_size, image_size) for t in pixels[1 : 1 + gh * gw]])  # [t, side, side, 4]
    grid = einops.rearrange(tiles, "(gh gw) s t c -> (gh s) (gw t) c", gh=gh, gw=gw)
    # Unpad exactly as transformers does, by unpadding a tensor of grid indices.
    rr, cc = np.meshgrid(np.arange(gh * side), np.arange(gw * side), indexing="ij")
    idx = torch.from_numpy(np.stack([rr, cc]))
    kept = unpad_image(idx, (h, w)).numpy()  # [2, H', W']
    kr, kc = kept
    n_rows, n_cols = kr.shape
    kinds, rows, cols, boxes = [KIND_BASE] * (side * side), [], [], [base]
    brow, bcol = np.divmod(np.arange(side * side), side)
    rows += brow.tolist()
    cols += bcol.tolist()
    nan = np.full((1, 4), np.nan)
    for i in range(n_rows):
        kinds += [KIND_TILE] * n_cols + [KIND_NEWLINE]
        rows += [i] * (n_cols + 1)
        cols += list(range(n_cols)) + [n_cols]
        boxes += [grid[kr[i], kc[i]], nan]
    return ImageLayout(
        kinds=kinds,
        rows=rows,
        cols=cols,
        boxes=np.concatenate(boxes, 0),
        image_size=image_size,
        anyres=True,
    )
