"""Tiny, randomly initialised LLaVA-family checkpoints built in code.

They use the real transformers architecture classes and processors, and a small
word-level tokenizer built with ``tokenizers``, so tests and examples run
without any download.
"""

from __future__ import annotations

from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)

from hooked_vlm.templates import LLAMA3_CHAT_TEMPLATE, LLAMA3_SYSTEM, VICUNA_CHAT_TEMPLATE, VICUNA_SYSTEM

Family = Literal["llava", "llava_next", "llama3_next"]

BASE_WORDS = (
    "a the is what which color shape of in on left right or and are same there image "
    "red blue green yellow purple orange circle square triangle bus cat dog yes no "
    "answer question using single word phrase describe this picture ?"
).split()

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _words_of(*texts: str) -> list[str]:
    pre = pre_tokenizers.Whitespace()
    out: list[str] = []
    for text in texts:
        out.extend(w for w, _ in pre.pre_tokenize_str(text))
    return out


def build_word_tokenizer(
    words: list[str] | None = None,
    *,
    llama3: bool = False,
    extra_texts: tuple[str, ...] = (),
    image_token_attribute: bool = True,
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with ``<s>``/``</s>``/``<unk>``/``<pad>``/``<image>``.

    ``words`` plus every word of the prompt templates (and ``extra_texts``) form the vocabulary;
    anything else maps to ``<unk>``. With ``llama3`` the Llama-3 header tokens are added and
    ``<|begin_of_text|>`` is the BOS token. ``image_token_attribute=False`` leaves ``<image>`` a plain special
    token without the ``tokenizer.image_token`` attribute (InstructBLIP's processor expects that).
    """
    specials = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
    if llama3:
        specials += LLAMA3_SPECIALS
    vocab_words = list(dict.fromkeys(
        _words_of(VICUNA_SYSTEM, LLAMA3_SYSTEM, "USER: ASSISTANT: user assistant system", *extra_texts)
        + list(words if words is not None else BASE_WORDS)
        + [w.capitalize() for w in (words if words is not None else BASE_WORDS)]
    ))
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in vocab_words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    bos = "<|begin_of_text|>" if llama3 else "<s>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|eot_id|>" if llama3 else "</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"} if image_token_attribute else {},
    )
    fast.chat_template = LLAMA3_CHAT_TEMPLATE if llama3 else VICUNA_CHAT_TEMPLATE
    return fast


def tiny_text_config(
    vocab_size: int,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    rope_theta: float = 10000.0,
    pad_token_id: int | None = 1,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2 + 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        pad_token_id=pad_token_id,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )


def tiny_vision_config(image_size: int = 28, patch_size: int = 7, hidden: int = 32) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )


def llava_processor(tokenizer, image_size: int, patch_size: int, chat_template: str) -> LlavaProcessor:
    """A LLaVA-1.5 ``LlavaProcessor``: CLIP preprocessing to ``image_size`` squares, CLS dropped from the
    ``(image_size // patch_size) ** 2`` image tokens."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


def build_tiny(
    family: Family = "llava",
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    image_size: int = 28,
    patch_size: int = 7,
    dtype: torch.dtype = torch.float32,
):
    """A random tiny ``(hf_model, processor)`` pair of the given family, in eval mode.

    ``llava``: LLaVA-1.5 layout (CLIP tower, 2-layer MLP projector, Llama decoder with MHA).
    ``llava_next``: LLaVA-v1.6-Vicuna layout (anyres tiling, ``image_newline``).
    ``llama3_next``: Llama3-LLaVA-NeXT layout (GQA 4q/2kv, rope_theta 500000, Llama-3 chat format).
    """
    llama3 = family == "llama3_next"
    tokenizer = build_word_tokenizer(llama3=llama3)
    vocab = len(tokenizer)
    text = tiny_text_config(
        vocab,
        hidden=hidden,
        layers=layers,
        kv_heads=2 if llama3 else None,
        rope_theta=500000.0 if llama3 else 10000.0,
    )
    vision = tiny_vision_config(image_size, patch_size)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    if family == "llava":
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=image_token_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )
        model = LlavaForConditionalGeneration(config)
        processor = llava_processor(tokenizer, image_size, patch_size, tokenizer.chat_template)
    else:
        pinpoints = [[image_size, image_size * 2], [image_size * 2, image_size], [image_size * 2, image_size * 2]]
        config = LlavaNextConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=image_token_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_grid_pinpoints=pinpoints,
            projector_hidden_act="gelu",
        )
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=tokenizer.chat_template,
        )
    # Random init leaves the image_newline at zero-ish scale; give it content so tests see it.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.abs().sum() == 0 and p.numel() == hidden:
                p.normal_(0, 0.02)
    model = model.to(dtype).eval()
    return model, processor


QFORMER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_wordpiece_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer (lower-casing, ``[CLS] ... [SEP]``), like InstructBLIP's Q-Former's.

    ``words`` (default: :data:`BASE_WORDS`) plus the letters and a few ``##`` suffixes form the vocabulary,
    so unknown words split into pieces instead of mapping to ``[UNK]``.
    """
    pieces = list(dict.fromkeys(
        [w.lower() for w in (words if words is not None else BASE_WORDS)]
        + list("abcdefghijklmnopqrstuvwxyz0123456789.,?!:;'")
        + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + ["##s", "##ed", "##ing"]
    ))
    vocab = {tok: i for i, tok in enumerate(QFORMER_SPECIALS)}
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=512,
    )


def instructblip_processor(tokenizer, qformer_tokenizer, image_size: int, num_query_tokens: int):
    """An ``InstructBlipProcessor``: BLIP preprocessing to ``image_size`` squares, ``num_query_tokens``
    ``<image>`` placeholders before the prompt, and the Q-Former tokenizer on the same text."""
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return InstructBlipProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=num_query_tokens,
    )


def build_tiny_instructblip(
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    image_size: int = 28,
    patch_size: int = 7,
    num_query_tokens: int = 4,
    qformer_hidden: int = 32,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """A random tiny ``(InstructBlipForConditionalGeneration, InstructBlipProcessor)`` pair, in eval mode.

    InstructBLIP-Vicuna layout: BLIP vision tower, an instruction-aware Q-Former with
    ``num_query_tokens`` learned queries (cross-attention every other layer) and its own WordPiece
    tokenizer, ``language_projection``, and a Llama (Vicuna) decoder with a word-level tokenizer.
    """
    tokenizer = build_word_tokenizer(image_token_attribute=False)
    qformer_tokenizer = build_wordpiece_tokenizer()
    text = tiny_text_config(len(tokenizer), hidden=hidden, layers=layers)
    text.tie_word_embeddings = tie_word_embeddings
    vision = InstructBlipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size,
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=len(qformer_tokenizer), hidden_size=qformer_hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=qformer_hidden * 2, cross_attention_frequency=2, max_position_embeddings=64,
    )
    config = InstructBlipConfig(
        vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():  # random init leaves the queries at zero: give them content
        model.query_tokens.normal_(0, 0.02)
    processor = instructblip_processor(tokenizer, qformer_tokenizer, image_size, num_query_tokens)
    return model.to(dtype).eval(), processor


def hf_merged_embeds(hf, inputs, ids: torch.Tensor) -> torch.Tensor:
    """transformers' own merged ``inputs_embeds`` ``[pos, d_model]`` of a LLaVA / LLaVA-NeXT prompt (``inputs``, one
    example) followed by the token ids ``ids``: what its language model reads, image features scattered in."""
    full = torch.cat([inputs.input_ids, ids[None]], 1)
    seen = {}
    handle = hf.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            hf(input_ids=full, attention_mask=torch.ones_like(full), pixel_values=inputs.pixel_values,
               image_sizes=inputs.image_sizes, logits_to_keep=1)
    finally:
        handle.remove()
    return seen["embeds"][0]
