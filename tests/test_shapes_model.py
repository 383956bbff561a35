"""The shipped ``shapes-llava`` checkpoint loads offline with plain transformers and answers every task."""

from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from hooked_vlm import zoo
from hooked_vlm.datasets import shapes
from hooked_vlm.templates import VICUNA_SYSTEM, chat_messages, vicuna_v1

TEST_SEED = 4242  # training used seed 0 and monitored on 1_000_003
N_EVAL = 600  # 100 per task, as in the model card


@pytest.fixture(scope="module")
def shipped():
    os.environ["HF_HUB_OFFLINE"] = "1"
    folder = zoo.path("shapes-llava")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    return model, processor


def test_zoo_lists_and_rejects_names():
    assert "shapes-llava" in zoo.available()
    assert (zoo.path("shapes-llava") / "model.safetensors").is_file()
    weights = sum(p.stat().st_size for p in zoo.path("shapes-llava").iterdir())
    assert weights <= 20 * 2**20
    with pytest.raises(KeyError, match="shapes-llava"):
        zoo.path("no-such-model")


def test_architecture_and_processor(shipped):
    model, processor = shipped
    assert isinstance(model, LlavaForConditionalGeneration)
    text, vision = model.config.text_config, model.config.vision_config
    assert text.model_type == "llama" and vision.model_type == "clip_vision_model"
    assert text.num_key_value_heads < text.num_attention_heads  # GQA
    assert not model.config.tie_word_embeddings
    assert model.config.projector_hidden_act == "gelu"
    assert model.config.vision_feature_select_strategy == "default"
    assert isinstance(processor.image_processor, CLIPImageProcessorPil)
    n_patches = (vision.image_size // vision.patch_size) ** 2
    image = next(shapes.generate(1, TEST_SEED)).image
    ids = processor(images=image, text=vicuna_v1("What color is the circle?"), return_tensors="pt")["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == n_patches
    assert processor.tokenizer.unk_token_id not in ids[0].tolist()
    prompt = processor.apply_chat_template(
        chat_messages("What color is the circle?", 1, VICUNA_SYSTEM), add_generation_prompt=True, tokenize=False
    )
    assert prompt == vicuna_v1("What color is the circle?")


@torch.no_grad()
def test_greedy_accuracy_per_task(shipped):
    model, processor = shipped
    processor.tokenizer.padding_side = "left"
    hits: dict[str, list[bool]] = defaultdict(list)
    records = list(shapes.generate(N_EVAL, TEST_SEED))
    for s in range(0, N_EVAL, 120):
        chunk = records[s : s + 120]
        enc = processor(
            images=[r.image for r in chunk], text=[vicuna_v1(r.question) for r in chunk],
            padding=True, return_tensors="pt",
        )
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
        answers = processor.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for r, a in zip(chunk, answers):
            hits[r.task].append(a.strip().lower() == r.answer)
    accuracy = {task: sum(h) / len(h) for task, h in hits.items()}
    assert set(accuracy) == set(shapes.TASKS) and all(len(h) == N_EVAL // 6 for h in hits.values())
    assert all(accuracy[task] >= 0.97 for task in shapes.TASKS), accuracy
