"""The image-prefix adapter: vision tower + projector (+ anyres packing) of a LLaVA checkpoint.

It wraps the transformers multimodal model *without* its language model and calls the
model's own ``get_image_features``, so the image tokens are bit-identical to transformers'.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from hooked_vlm.imagememo import ImageMemo, tensor_digest


def without_language_model(vlm_core: nn.Module) -> nn.Module:
    """A shallow copy of ``LlavaModel``/``LlavaNextModel`` sharing every submodule except the decoder."""
    trimmed = copy.copy(vlm_core)
    trimmed._modules = OrderedDict((k, v) for k, v in vlm_core._modules.items() if k != "language_model")
    trimmed._parameters = OrderedDict(vlm_core._parameters)
    trimmed._buffers = OrderedDict(vlm_core._buffers)
    return trimmed


class ImageAdapter(nn.Module):
    """Turns ``pixel_values`` into the projected image tokens the decoder reads.

    Args:
        vlm_core: the ``.model`` of a ``LlavaForConditionalGeneration`` or
            ``LlavaNextForConditionalGeneration``; its ``language_model`` is not kept.
        family: ``"llava"`` or ``"llava_next"``.
    """

    def __init__(self, vlm_core: nn.Module, family: str):
        super().__init__()
        self.core = without_language_model(vlm_core)
        self.family = family

    @property
    def vision_tower(self) -> nn.Module:
        return self.core.vision_tower

    @property
    def multi_modal_projector(self) -> nn.Module:
        return self.core.multi_modal_projector

    def forward(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        on_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Image tokens per image.

        Args:
            pixel_values: ``[n_images, 3, H, W]`` (LLaVA) or ``[n_images, n_crops, 3, H, W]`` (anyres).
            image_sizes: ``[n_images, 2]`` original (height, width), anyres only.
            on_features: applied to the projector's input ``[n_crops, n_patches, d_vision]``
                (this is where ``hook_image_features`` fires).

        Returns:
            one ``[n_tokens_i, d_model]`` tensor per image, in the order the decoder reads them.
        """
        handle = None
        if on_features is not None:
            handle = self.multi_modal_projector.register_forward_pre_hook(lambda _m, args: (on_features(args[0]),))
        try:
            kwargs = {"image_sizes": image_sizes} if self.family == "llava_next" else {}
            out = self.core.get_image_features(pixel_values=pixel_values, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        return list(out.pooler_output)

    def from_inputs(self, model, inputs, memo: ImageMemo | None = None) -> list[torch.Tensor]:
        """Image tokens per image of ``inputs`` on ``model``'s device and dtype, ``hook_image_features`` applied.

        With ``memo`` (no hook on ``hook_image_features``: see ``HookedVLM.reuse_images``), images whose tokens
        are memoised are not run; the others run together and are memoised.
        """
        if memo is None:
            pixel_values = inputs.pixel_values.to(model.cfg.device, model.cfg.dtype)
            sizes = None if inputs.image_sizes is None else inputs.image_sizes.to(model.cfg.device)
            return self(pixel_values, sizes, on_features=model.hook_image_features)
        keys = self.image_keys(model, inputs)
        out: list[torch.Tensor | None] = [memo.get("tokens", k) for k in keys]
        first: dict[str, int] = {}  # an image repeated within the batch (one per prompt) runs once
        for i, t in enumerate(out):
            if t is None:
                first.setdefault(keys[i], i)
        missing = list(first.values())
        if missing:
            pixel_values = inputs.pixel_values[missing].to(model.cfg.device, model.cfg.dtype)
            sizes = None if inputs.image_sizes is None else inputs.image_sizes[missing].to(model.cfg.device)
            for i, tokens in zip(missing, self(pixel_values, sizes, on_features=model.hook_image_features)):
                memo.put("tokens", keys[i], tokens)
                out[i] = tokens
        return [t if t is not None else out[first[keys[i]]] for i, t in enumerate(out)]  # type: ignore[misc]

    def image_keys(self, model, inputs) -> list[str]:
        """One memo key per image: its pixels (anyres: its own crops, not the batch's padding) and size."""
        pixels = inputs.pixel_values
        tag = f"{self.family}|{model.cfg.dtype}|{model.cfg.device}|"
        if self.family != "llava_next":
            return [tag + tensor_digest(pixels[i]) for i in range(pixels.shape[0])]
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.core.config
        keys = []
        for i in range(pixels.shape[0]):
            size = inputs.image_sizes[i]
            n = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            keys.append(tag + tensor_digest(pixels[i, :n] if pixels.dim() == 5 else pixels[i], size))
        return keys
