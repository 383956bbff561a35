import numpy as np
import pytest
import torch
from PIL import Image

from hooked_vlm import HookedVLM
from hooked_vlm.testing import build_tiny

torch.set_num_threads(2)
FAMILIES = ["llava", "llava_next", "llama3_next"]


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def tiny():
    """family -> (hf_model, processor), built once per session."""
    return {fam: build_tiny(fam) for fam in FAMILIES}


@pytest.fixture(scope="session")
def hooked(tiny):
    """(family, fold_ln) -> HookedVLM converted from the session's tiny model."""
    cache = {}

    def get(family: str, fold: bool = True) -> HookedVLM:
        key = (family, fold)
        if key not in cache:
            hf, proc = tiny[family]
            cache[key] = HookedVLM.from_pretrained(
                family, hf_model=hf, processor=proc, device="cpu", fold_ln=fold, center_unembed=fold
            )
        return cache[key]

    return get


def hf_forward(hf, inputs, **kw):
    with torch.no_grad():
        return hf(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            pixel_values=inputs.pixel_values,
            image_sizes=inputs.image_sizes,
            **kw,
        )
