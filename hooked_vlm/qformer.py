"""InstructBLIP: the Q-Former image prefix, its inputs, and where its queries look in the image.

An InstructBLIP-Vicuna checkpoint turns an image into ``num_query_tokens`` (32) prefix tokens: the BLIP
vision tower encodes the image (CLS + patches), the Q-Former runs its learned query embeddings together
with the *instruction* (tokenised by the Q-Former's own BERT tokenizer, ``qformer_input_ids``) and lets the
queries cross-attend to the vision tokens, and ``language_projection`` maps the query outputs into the
decoder. So the image tokens depend on the instruction, and none of them is a patch: they are labelled
``<query i>`` and have no box; :func:`query_attention` tells where each query looked.

The processor puts the ``num_query_tokens`` ``<image>`` placeholders before BOS and pads between them
and BOS. transformers' forward gives those pad positions rotary positions (``arange``), its ``generate``
does not (``cumsum`` of the mask), so the processor's padded batches disagree with single runs. ``prepare``
moves the padding to the far left instead: every example then is exactly the single-example sequence
shifted right, and transformers' forward and generate on these ``input_ids`` agree with each other and
with the unpadded runs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from hooked_vlm import geometry, templates
from hooked_vlm.adapter import without_language_model
from hooked_vlm.errors import PromptError
from hooked_vlm.geometry import ImageLayout
from hooked_vlm.imagememo import ImageMemo, tensor_digest
from hooked_vlm.inputs import VLMInputs
from hooked_vlm.preparation import (
    check_length,
    encode,
    refuse_special_tokens,
    tokenizer_fingerprint,
    warn_unknown_words,
)

KIND_QUERY = "query"


# ------------------------------------------------------------------------------------------- adapter
class QFormerAdapter(nn.Module):
    """Vision tower + Q-Former (with ``query_tokens``) + ``language_projection`` of an InstructBLIP checkpoint.

    Runs the checkpoint's own ``get_image_features``, so the prefix tokens are bit-identical to transformers'.

    Args:
        vlm: an ``InstructBlipForConditionalGeneration``; its ``language_model`` is not kept.
    """

    def __init__(self, vlm: nn.Module):
        super().__init__()
        self.core = without_language_model(vlm)
        self.family = "instructblip"

    @property
    def vision_model(self) -> nn.Module:
        return self.core.vision_model

    @property
    def qformer(self) -> nn.Module:
        return self.core.qformer

    @property
    def language_projection(self) -> nn.Module:
        return self.core.language_projection

    @property
    def cross_attention_layers(self) -> list[int]:
        """Q-Former layers with cross-attention to the vision tokens."""
        return [i for i, layer in enumerate(self.qformer.encoder.layer) if layer.has_cross_attention]

    def forward(
        self,
        pixel_values: Float[torch.Tensor, "n_images 3 H W"],
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor | None = None,
        on_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
        on_queries: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[Float[torch.Tensor, "n_queries d_model"]]:
        """Prefix tokens per image.

        Args:
            qformer_input_ids, qformer_attention_mask: ``[n_images, n_qformer_tokens]``, the instruction.
            on_features: applied to the Q-Former's query outputs ``[n_images, n_queries, d_qformer]``
                (what ``language_projection`` reads; ``hook_image_features``).
            on_queries: applied to the learned queries entering the Q-Former ``[n_images, n_queries, d_qformer]``
                (``hook_qformer_queries``).
        """
        handles = []
        if on_features is not None:
            handles.append(self.language_projection.register_forward_pre_hook(
                lambda _m, args: (on_features(args[0]),)))
        if on_queries is not None:
            def pre(_m, args, kwargs):
                return args, {**kwargs, "query_embeds": on_queries(kwargs["query_embeds"].clone())}

            handles.append(self.qformer.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            out = self.core.get_image_features(
                pixel_values=pixel_values, qformer_input_ids=qformer_input_ids,
                qformer_attention_mask=qformer_attention_mask,
            )
        finally:
            for h in handles:
                h.remove()
        return list(out.pooler_output)

    def from_inputs(self, model, inputs: VLMInputs, memo: ImageMemo | None = None) -> list[torch.Tensor]:
        """Prefix tokens per image of ``inputs``, with the model's ``hook_image_features`` and
        ``hook_qformer_queries`` applied.

        With ``memo`` (no hook on those two: see ``HookedVLM.reuse_images``), the vision tower runs once per
        distinct image and the Q-Former once per distinct (image, instruction); the rest comes from the memo.
        """
        device = model.cfg.device
        mask = inputs.qformer_attention_mask
        if memo is None:
            return self(
                inputs.pixel_values.to(device, model.cfg.dtype),
                inputs.qformer_input_ids.to(device),
                None if mask is None else mask.to(device),
                on_features=model.hook_image_features,
                on_queries=model.hook_qformer_queries,
            )
        pixels, ids = inputs.pixel_values, inputs.qformer_input_ids
        tag = f"instructblip|{model.cfg.dtype}|{device}|"
        vision_keys = [tag + tensor_digest(pixels[i]) for i in range(pixels.shape[0])]
        keys = [k + "|" + tensor_digest(ids[i], None if mask is None else mask[i]) for i, k in enumerate(vision_keys)]
        out: list[torch.Tensor | None] = [memo.get("tokens", k) for k in keys]
        missing = [i for i, t in enumerate(out) if t is None]
        if not missing:
            return out  # type: ignore[return-value]
        vision = [memo.get("vision", vision_keys[i]) for i in missing]
        first: dict[str, int] = {}  # an image repeated within the batch (one per instruction) runs once
        for j, v in enumerate(vision):
            if v is None:
                first.setdefault(vision_keys[missing[j]], j)
        unseen = list(first.values())
        if unseen:
            fresh = self.vision_model(pixel_values=pixels[[missing[j] for j in unseen]].to(device, model.cfg.dtype),
                                      return_dict=True).last_hidden_state
            for j, v in zip(unseen, fresh):
                memo.put("vision", vision_keys[missing[j]], v)
                vision[j] = v
            vision = [v if v is not None else vision[first[vision_keys[missing[j]]]] for j, v in enumerate(vision)]
        stub = _VisionOutput(torch.stack(vision))  # type: ignore[arg-type]
        tower, self.core._modules["vision_model"] = self.core._modules["vision_model"], stub
        try:
            tokens = self(
                pixels[missing].to(device, model.cfg.dtype),
                ids[missing].to(device),
                None if mask is None else mask[missing].to(device),
                on_features=model.hook_image_features,
                on_queries=model.hook_qformer_queries,
            )
        finally:
            self.core._modules["vision_model"] = tower
        for i, t in zip(missing, tokens):
            memo.put("tokens", keys[i], t)
            out[i] = t
        return out  # type: ignore[return-value]


class _VisionOutput(nn.Module):
    """Stands in for the vision tower inside ``get_image_features``: returns memoised vision embeddings, so the
    Q-Former and projection run as transformers' own code."""

    def __init__(self, embeds: Float[torch.Tensor, "n_images n_vision d_vision"]):
        super().__init__()
        self.embeds = embeds

    def forward(self, pixel_values=None, **_kwargs) -> BaseModelOutputWithPooling:
        return BaseModelOutputWithPooling(last_hidden_state=self.embeds)


# ------------------------------------------------------------------------------------------- layout
@dataclass
class QueryLayout(ImageLayout):
    """The prefix tokens of one InstructBLIP image: learned queries, without a patch footprint.

    Attributes:
        patch_boxes: ``[n_patches, 4]`` the vision tower's patches in original-image pixels (CLS not included),
            what :func:`query_attention` weights refer to.
    """

    patch_boxes: np.ndarray | None = None
    model_ref: Callable | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "model_ref": None}  # a weak reference does not pickle

    def labels(self) -> list[str]:
        """``"<query 0>"`` ... ``"<query N-1>"``."""
        return [f"<query {i}>" for i in range(len(self.kinds))]

    def in_box(self, x: float, y: float, w: float, h: float) -> np.ndarray:
        raise PromptError(
            "InstructBLIP's image tokens are Q-Former queries, which have no patch footprint, so no position "
            "lies in a box; use hooked_vlm.qformer.query_attention to see where each query looks."
        )


def query_layout(model, image_size: tuple[int, int]) -> QueryLayout:
    n = model.hf_config.num_query_tokens
    vision = model.hf_config.vision_config
    patches = geometry.llava_layout(model.processor.image_processor, image_size, vision.patch_size).boxes
    return QueryLayout(
        kinds=[KIND_QUERY] * n, rows=[0] * n, cols=list(range(n)), boxes=np.full((n, 4), np.nan),
        image_size=image_size, patch_boxes=patches, model_ref=weakref.ref(model),
    )


def is_query_layout(layout) -> bool:
    return isinstance(layout, QueryLayout)


# ------------------------------------------------------------------------------------------- prepare
def _left_pad(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's padding to the far left, keeping the order of the rest."""
    order = torch.argsort(mask, dim=1, stable=True)  # zeros (padding) first
    return ids.gather(1, order), mask.gather(1, order)


def prepare_instructblip(model, texts: list[str], images: list[list], template: str | None,
                         vqa_suffix: bool) -> VLMInputs:
    """``model.prepare`` for InstructBLIP: the processor's ids, qformer ids and image, left-padded.

    The prompt is the instruction itself (``template="auto"``, the transformers/LAVIS InstructBLIP-Vicuna
    usage) or the text as written (``template=None``); the processor adds the query placeholders and BOS.
    """
    processor = model.processor
    if template not in ("auto", None):
        raise PromptError(f"InstructBLIP takes template='auto' (the instruction as is) or None; got {template!r}.")
    if template is None and vqa_suffix:
        raise PromptError("vqa_suffix needs a template; with template=None write the prompt in full.")
    for t in texts:
        if "<image>" in t:
            raise PromptError("The instruction contains '<image>'; InstructBLIP's processor places the image "
                              "queries itself, before BOS. Remove it.")
    if template is not None:
        for t in texts:
            refuse_special_tokens(processor.tokenizer, t)
            warn_unknown_words(processor.tokenizer, t)
    counts = [len(imgs) for imgs in images]
    if any(c > 1 for c in counts):
        raise PromptError(f"InstructBLIP takes one image per prompt; got {counts} images per prompt.")
    if len(set(counts)) > 1:
        raise PromptError(f"Give every prompt an image or none (images per prompt: {counts}).")
    prompts = [t + (templates.VQA_SUFFIX if vqa_suffix else "") for t in texts]
    flat = [i for imgs in images for i in imgs]
    qformer_max = model.hf_config.qformer_config.max_position_embeddings
    if flat:
        for b, p in enumerate(prompts):
            n = len(processor.qformer_tokenizer(p)["input_ids"])
            if n > qformer_max:
                raise PromptError(
                    f"Prompt {b} is {n} Q-Former tokens long, more than the Q-Former's "
                    f"max_position_embeddings={qformer_max}; shorten the instruction."
                )
    tokenizer = processor.tokenizer
    enc = encode(model, prompts, flat)
    input_ids, mask = _left_pad(enc["input_ids"], enc["attention_mask"])
    check_length(model, input_ids.shape[1], "Shorten the instruction.")
    image_token_id = model.image_token_id
    n_queries = model.hf_config.num_query_tokens if flat else 0
    layouts, offsets = [], []
    for b, (p, imgs) in enumerate(zip(prompts, images)):
        keep = mask[b].bool()
        row = input_ids[b][keep]
        plain = tokenizer(p, return_offsets_mapping=True)
        if row[:n_queries].ne(image_token_id).any() or row[n_queries:].tolist() != plain["input_ids"]:
            raise PromptError("The processor's tokens do not line up with the tokenizer's; cannot locate spans.")
        off = np.full((input_ids.shape[1], 2), -1, dtype=np.int64)
        spans = np.full((len(row), 2), -1, dtype=np.int64)
        spans[n_queries:] = np.asarray(plain["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        off[keep.numpy()] = spans
        offsets.append(off)
        layouts.append([query_layout(model, img.size) for img in imgs])
    return VLMInputs(
        input_ids=input_ids,
        attention_mask=mask,
        pixel_values=enc.get("pixel_values"),
        image_sizes=None,
        prompts=prompts,
        questions=[None if template is None else t for t in texts],
        layouts=layouts,
        offsets=offsets,
        image_token_id=image_token_id,
        images=images,
        qformer_input_ids=enc["qformer_input_ids"] if flat else None,
        qformer_attention_mask=enc["qformer_attention_mask"] if flat else None,
        tokenizer_fingerprint=tokenizer_fingerprint(model),
    )


# ------------------------------------------------------------------------------------------- where queries look
def _check_model(model) -> QFormerAdapter:
    adapter = getattr(model, "image_adapter", None)
    if not isinstance(adapter, QFormerAdapter):
        raise PromptError(f"Query attention needs an InstructBLIP model; this one is {model.family!r}.")
    return adapter


@torch.no_grad()
def query_attention(
    model,
    inputs: VLMInputs,
    layers: Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    *,
    example: int = 0,
) -> Float[torch.Tensor, "n_queries n_patches"]:
    """Where each query token looks: its Q-Former cross-attention weights over the vision patches.

    The weights are ``softmax(q k^T / sqrt(d_head))`` of the Q-Former's cross-attention (as transformers'
    eager attention computes them) for the example's image and instruction, averaged over the selected
    cross-attention ``layers`` (Q-Former layer indices; default: every layer with cross-attention) and
    ``heads`` (default: all). The vision CLS token (key 0) is dropped: a row sums to 1 minus its CLS weight.
    The model's ``hook_qformer_queries`` / vision hooks, if any are active, apply.

    Returns:
        ``[n_queries, n_patches]``, patches row-major over the vision grid (``QueryLayout.patch_boxes`` order).

    Raises:
        PromptError: not an InstructBLIP model, no image, or layers/heads out of range.
    """
    adapter = _check_model(model)
    if not -inputs.batch_size <= example < inputs.batch_size:
        raise PromptError(f"example={example} is out of range for a batch of {inputs.batch_size}.")
    one = inputs[example]
    if one.pixel_values is None:
        raise PromptError("This example has no image.")
    cross = adapter.cross_attention_layers
    chosen = cross if layers is None else [int(x) for x in layers]
    bad = [x for x in chosen if x not in cross]
    if bad or not chosen:
        raise PromptError(f"layers must be Q-Former layers with cross-attention {cross}; got {bad or chosen}.")
    n_heads = model.hf_config.qformer_config.num_attention_heads
    head_idx = list(range(n_heads)) if heads is None else [int(h) for h in heads]
    if not head_idx or any(not 0 <= h < n_heads for h in head_idx):
        raise PromptError(f"heads must be within 0..{n_heads - 1}; got {head_idx}.")
    store: list[torch.Tensor] = []

    def capture(module, _args, kwargs):
        h, enc = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        d = module.attention_head_size
        q = module.query(h).unflatten(-1, (-1, d)).transpose(1, 2)
        k = module.key(enc).unflatten(-1, (-1, d)).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) * module.scaling
        mask = kwargs.get("encoder_attention_mask")
        if mask is not None and mask.dtype != torch.bool:
            scores = scores + mask
        elif mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        store.append(scores.float().softmax(-1)[0])  # [heads, n_queries, 1 + n_patches]

    blocks = adapter.qformer.encoder.layer
    handles = [blocks[i].crossattention.attention.register_forward_pre_hook(capture, with_kwargs=True)
               for i in chosen]
    try:
        adapter.from_inputs(model, one)
    finally:
        for h in handles:
            h.remove()
    weights = torch.stack(store)[:, head_idx]  # [layer, head, n_queries, 1 + n_patches]
    return weights.mean((0, 1))[:, 1:].cpu()


def query_patch_map(
    values: Float[torch.Tensor, " n_queries"] | np.ndarray,
    weights: Float[torch.Tensor, "n_queries n_patches"],
) -> Float[np.ndarray, " n_patches"]:
    """A per-query quantity spread over the patches the queries looked at: ``values @ weights``."""
    v = np.asarray(values.detach().float().cpu() if isinstance(values, torch.Tensor) else values, dtype=float)
    w = np.asarray(weights.detach().float().cpu() if isinstance(weights, torch.Tensor) else weights, dtype=float)
    v = v.reshape(-1)
    if v.shape[0] != w.shape[0]:
        raise PromptError(f"Got {v.shape[0]} values for {w.shape[0]} query tokens.")
    return v @ w


def overlay_values(inputs: VLMInputs, values, *, example: int, image: int, weights=None) -> tuple[np.ndarray, str]:
    """Per-patch values and the method's description for ``plot.image_overlay`` of a query layout."""
    layout = inputs.layouts[example][image]
    if weights is None:
        model = layout.model_ref() if layout.model_ref is not None else None
        if model is None:
            raise PromptError("The model these inputs were prepared with is gone; pass weights=query_attention(...).")
        weights = query_attention(model, inputs, example=example)
    patch = query_patch_map(values, weights)
    if patch.shape[0] != len(layout.patch_boxes):
        raise PromptError(f"weights cover {patch.shape[0]} patches; the image has {len(layout.patch_boxes)}.")
    return patch, "per-query values × Q-Former cross-attention (mean over layers and heads; vision CLS dropped)"


__all__ = ["QFormerAdapter", "QueryLayout", "query_attention", "query_patch_map", "prepare_instructblip"]
