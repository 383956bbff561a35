"""model.reuse_images(): the vision tower runs once per distinct image; hits are bit-identical; hooks bypass it."""

import pytest
import torch
from conftest import noise_image
from iblip_utils import build

from hooked_vlm.errors import LoadOptionError
from hooked_vlm.imagememo import ImageMemo

PROMPTS = ["what color is the shape ?", "describe this picture", "what shape is in the image ?",
           "is the circle left of the square ?", "what is on the right ?"]


@pytest.fixture(scope="module")
def iblip():
    return build("untied")[2]


def _model(name, hooked, iblip):
    return iblip if name == "instructblip" else hooked(name)


def _tower(model):
    adapter = model.image_adapter
    return adapter.vision_model if model.family == "instructblip" else adapter.vision_tower


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls, handle


# anyres: a non-square image so the input has base + tiles + newlines
IMAGES = {"llava": (40, 30), "llava_next": (50, 26), "instructblip": (40, 30)}


@pytest.mark.parametrize("name", ["llava", "llava_next", "instructblip"])
def test_once_per_image_and_bit_identical(name, hooked, iblip):
    model = _model(name, hooked, iblip)
    image = noise_image(*IMAGES[name], seed=1)
    inputs = [model.prepare(p, image) for p in PROMPTS]
    with torch.no_grad():
        fresh = [model(x) for x in inputs]
        fresh_embeds = [model.image_embeds(x) for x in inputs]
    calls, handle = _count_calls(_tower(model))
    try:
        with torch.no_grad(), model.reuse_images() as memo:
            reused = [model(x) for x in inputs]
            reused_embeds = [model.image_embeds(x) for x in inputs]
    finally:
        handle.remove()
    assert len(calls) == 1
    for a, b in zip(fresh + fresh_embeds, reused + reused_embeds):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert torch.equal(x, y)
    assert memo.misses["tokens"] == (len(PROMPTS) if name == "instructblip" else 1)
    assert model._image_memo is None


@pytest.mark.parametrize("name", ["llava", "llava_next", "instructblip"])
def test_batch_computes_only_missing_images(name, hooked, iblip):
    model = _model(name, hooked, iblip)
    a, b, c = (noise_image(*IMAGES[name], seed=s) for s in (2, 3, 4))
    batch = model.prepare(PROMPTS[:3], [a, b, c])
    with torch.no_grad():
        fresh = model(batch)
    calls, handle = _count_calls(_tower(model))
    try:
        with torch.no_grad(), model.reuse_images() as memo:
            model(model.prepare(PROMPTS[3], b))
            reused = model(batch)
    finally:
        handle.remove()
    assert len(calls) == 2
    kind = "vision" if name == "instructblip" else "tokens"
    assert (memo.misses[kind], memo.hits.get(kind, 0)) == (3, 1)  # b alone, then a and c; b reused
    torch.testing.assert_close(reused, fresh, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llava", "llava_next", "instructblip"])
def test_hooks_bypass_the_memo(name, hooked, iblip):
    model = _model(name, hooked, iblip)
    image = noise_image(*IMAGES[name], seed=5)
    inputs = model.prepare(PROMPTS[0], image)

    def double(t, hook):
        return t * 2

    with torch.no_grad():
        plain = model(inputs)
        edited = model.run_with_hooks(inputs, fwd_hooks=[("hook_image_features", double)])
        with model.reuse_images() as memo:
            model(inputs)
            inside = model.run_with_hooks(inputs, fwd_hooks=[("hook_image_features", double)])
            _, cache = model.run_with_cache(inputs, names_filter="hook_image_features")
            again = model(inputs)
    assert not torch.equal(edited, plain)
    assert torch.equal(inside, edited)
    assert torch.equal(again, plain)
    assert "hook_image_features" in cache
    assert memo.hits.get("tokens", 0) == 1  # only `again`; the hooked runs bypassed the memo
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())


def test_qformer_hook_bypasses(iblip):
    inputs = iblip.prepare(PROMPTS[0], noise_image(40, 30, seed=6))

    def zero(t, hook):
        return t * 0

    with torch.no_grad():
        edited = iblip.run_with_hooks(inputs, fwd_hooks=[("hook_qformer_queries", zero)])
        with iblip.reuse_images():
            iblip(inputs)
            inside = iblip.run_with_hooks(inputs, fwd_hooks=[("hook_qformer_queries", zero)])
    assert torch.equal(inside, edited)


def test_hook_image_embeds_edit_does_not_reach_memo(hooked):
    model = hooked("llava")
    inputs = model.prepare(PROMPTS[0], noise_image(40, 30, seed=7))

    def scale_in_place(t, hook):
        t.mul_(3)

    with torch.no_grad():
        plain = model(inputs)
        edited = model.run_with_hooks(inputs, fwd_hooks=[("hook_image_embeds", scale_in_place)])
        with model.reuse_images():
            model(inputs)
            inside = model.run_with_hooks(inputs, fwd_hooks=[("hook_image_embeds", scale_in_place)])
            after = model(inputs)
    assert torch.equal(inside, edited)
    assert torch.equal(after, plain)


def test_grad_mode_bypasses_and_lru_bound(hooked):
    model = hooked("llava")
    images = [noise_image(40, 30, seed=s) for s in range(10, 14)]
    calls, handle = _count_calls(model.image_adapter.vision_tower)
    try:
        with model.reuse_images(max_images=2) as memo:
            x = model.prepare(PROMPTS[0], images[0])
            model(x)
            model(x)  # grad mode on: autograd would need the tower, so it runs again
            assert len(calls) == 2
            with torch.no_grad():
                for img in images:
                    model(model.prepare(PROMPTS[0], img))
                model(model.prepare(PROMPTS[0], images[0]))  # evicted (LRU of 2): computed again
            assert len(memo) == 2
            assert memo.nbytes == 2 * 16 * model.cfg.d_model * 4
    finally:
        handle.remove()
    assert len(calls) == 2 + 4 + 1


def test_nesting_and_bad_size(hooked):
    model = hooked("llava")
    with pytest.raises(LoadOptionError, match="max_images"):
        with model.reuse_images(max_images=0):
            pass
    assert model._image_memo is None
    with model.reuse_images() as outer, model.reuse_images() as inner:
        assert inner is outer and isinstance(outer, ImageMemo)
    assert model._image_memo is None


@pytest.fixture(scope="module")
def shapes_model():
    from hooked_vlm import HookedVLM

    return HookedVLM.from_pretrained("shapes-llava", device="cpu", progress=False)


@pytest.mark.parametrize("study", ["verbalization", "information-flow", "answer-emergence", "contextualization",
                                   "norm-attention", "truncation", "masking"])
def test_studies_run_the_tower_once_per_image(study, shapes_model):
    from hooked_vlm.datasets import shapes
    from hooked_vlm.studies import run_study

    records = list(shapes.generate(2, seed=7))
    options = {"information-flow": {"window": 1, "only_correct": False}, "answer-emergence": {"only_correct": False},
               "truncation": {"counts": [1, 4]}}.get(study, {})
    images: list[int] = []  # images per vision-tower call (batched studies encode several at once)
    handle = shapes_model.image_adapter.vision_tower.register_forward_hook(
        lambda m, args, kwargs, out: images.append(kwargs.get("pixel_values", args[0] if args else None).shape[0]),
        with_kwargs=True)
    try:
        frame = run_study(study, shapes_model, records, **options)
    finally:
        handle.remove()
    assert len(frame) > 0
    assert sum(images) == len(records)
    assert shapes_model._image_memo is None


def test_aggregate_with_model_reuses_images(shapes_model):
    import pandas as pd

    from hooked_vlm.analysis import aggregate, correct_only, record_inputs
    from hooked_vlm.datasets import shapes

    records = list(shapes.generate(2, seed=3))
    model = shapes_model

    def fn(rec):
        with torch.no_grad():
            logits = model(record_inputs(model, rec))
        return pd.DataFrame({"condition": ["c"], "x": [0], "value": [float(logits[0, -1, 0])]})

    calls, handle = _count_calls(model.image_adapter.vision_tower)
    try:
        agg = aggregate(records, fn, keep=lambda r: correct_only(model)(r) or True, model=model, progress=False)
    finally:
        handle.remove()
    assert agg.n_kept == len(records)
    assert len(calls) == len(records)


def test_memo_entries_do_not_hold_a_batch():
    memo = ImageMemo(2)
    batch = torch.randn(3, 4, 5)
    for i in range(3):
        memo.put("tokens", str(i), batch[i])
    assert len(memo) == 2 and memo.nbytes == 2 * 4 * 5 * 4
    assert all(t.untyped_storage().nbytes() == 4 * 5 * 4 for t in memo._store["tokens"].values())
    assert torch.equal(memo.get("tokens", "2"), batch[2]) and memo.get("tokens", "0") is None
    assert (memo.hits, memo.misses) == ({"tokens": 1}, {"tokens": 1})
