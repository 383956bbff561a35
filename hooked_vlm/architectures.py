"""The checkpoint families hooked_vlm converts, recognised from their transformers config."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from hooked_vlm.conversion.transformer_lens import SUPPORTED_DECODERS
from hooked_vlm.errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchitectureSpec:
    family: str  # "llava" | "llava_next"
    model_class: type
    description: str


SUPPORTED = {
    "llava": ArchitectureSpec("llava", LlavaForConditionalGeneration, "LLaVA-1.5 (LlavaForConditionalGeneration)"),
    "llava_next": ArchitectureSpec(
        "llava_next", LlavaNextForConditionalGeneration, "LLaVA-NeXT / v1.6 anyres (LlavaNextForConditionalGeneration)"
    ),
}


def supported_text() -> str:
    return "; ".join(s.description for s in SUPPORTED.values()) + f" with a {'/'.join(SUPPORTED_DECODERS)} decoder"


def spec_for(config) -> ArchitectureSpec:
    """The spec of a checkpoint config, or :class:`UnsupportedModelError` naming what is supported."""
    spec = SUPPORTED.get(getattr(config, "model_type", None))
    if spec is None:
        raise UnsupportedModelError(
            f"Checkpoint type {getattr(config, 'model_type', None)!r} "
            f"({', '.join(getattr(config, 'architectures', None) or [])}) is not supported. "
            f"Supported: {supported_text()}."
        )
    text_type = getattr(getattr(config, "text_config", None), "model_type", None)
    if text_type not in SUPPORTED_DECODERS:
        raise UnsupportedModelError(f"Decoder type {text_type!r} is not supported. Supported: {supported_text()}.")
    return spec
