"""TransformerLens features on HookedVLM, loading from disk, and bad input."""

import warnings

import pytest
import torch
from conftest import hf_forward, noise_image
from PIL import Image
from transformer_lens import HookedTransformer, patching
from transformer_lens import utilities as utils

from hooked_vlm import (
    CheckpointNotFoundError,
    DeviceDtypeError,
    HookedVLM,
    ImageError,
    PromptError,
    UnsupportedModelError,
)
from hooked_vlm.testing import build_tiny


def test_is_a_hooked_transformer_with_image_hooks(hooked):
    model = hooked("llava")
    assert isinstance(model, HookedTransformer)
    inputs = model.prepare("What color is the bus ?", noise_image(60, 40))
    _, cache = model.run_with_cache(inputs)
    assert cache["hook_image_features"].shape == (1, 16, model.hf_config.vision_config.hidden_size)
    assert cache["hook_image_embeds"].shape == (1, 16, model.cfg.d_model)
    emb = cache["hook_embed"][0, inputs.image_positions]
    assert torch.equal(emb, cache["hook_image_embeds"][0])
    assert cache["pattern", 1].shape == (1, model.cfg.n_heads, inputs.seq_len, inputs.seq_len)
    assert model.W_U.shape == (model.cfg.d_model, model.cfg.d_vocab)
    assert model.blocks[0].attn.W_O.shape == (model.cfg.n_heads, model.cfg.d_head, model.cfg.d_model)


def test_cache_utilities_reconstruct_logits(hooked):
    model = hooked("llama3_next")
    inputs = model.prepare("What color is the bus ?", noise_image(60, 40))
    logits, cache = model.run_with_cache(inputs)
    last = inputs.last_position
    acc = cache.accumulated_resid(layer=-1, incl_mid=False, pos_slice=last, apply_ln=True)
    assert acc.shape[0] == model.cfg.n_layers + 1
    decomposed = cache.decompose_resid(layer=-1, pos_slice=last, apply_ln=False)
    assert torch.allclose(decomposed.sum(0), cache["resid_post", model.cfg.n_layers - 1][:, last], atol=1e-4)
    token = logits[0, last].argmax()
    raw = cache.accumulated_resid(layer=-1, incl_mid=False, pos_slice=last, apply_ln=False)
    attrs = cache.logit_attrs(raw, tokens=token[None], pos_slice=last)  # applies the final LN itself
    assert torch.allclose(attrs[-1, 0], logits[0, last, token], atol=1e-4)


def test_run_with_hooks_edits_scores_and_leaves_no_hooks(hooked):
    model = hooked("llava")
    inputs = model.prepare("What color is the bus ?", noise_image(60, 40))
    clean = model(inputs)
    img = inputs.image_positions

    def block_image(scores, hook):
        scores[:, :, :, img] = float("-inf")
        scores[:, :, img, :] = float("-inf")  # image rows then attend to nothing and become zeros
        return scores

    hooks = [(utils.get_act_name("attn_scores", layer), block_image) for layer in range(model.cfg.n_layers)]
    blocked = model.run_with_hooks(inputs, fwd_hooks=hooks)
    other = model.run_with_hooks(model.prepare("What color is the bus ?", noise_image(60, 40, seed=9)), fwd_hooks=hooks)
    text = inputs.text_positions
    assert torch.allclose(blocked[0, text], other[0, text], atol=1e-5)
    assert not torch.allclose(blocked, clean)
    assert all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())
    assert torch.equal(model(inputs), clean)


def test_activation_patching_accepts_inputs(hooked):
    model = hooked("llava")
    prompt = "USER: <image>\ncolor ? ASSISTANT:"
    clean = model.prepare(prompt, noise_image(60, 40, seed=1), template=None)
    corrupt = model.prepare(prompt, noise_image(60, 40, seed=2), template=None)
    _, clean_cache = model.run_with_cache(clean)
    last = clean.last_position
    metric = lambda logits: logits[0, last].log_softmax(-1).max()
    result = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
    assert result.shape == (model.cfg.n_layers, clean.seq_len)
    # Patching position p of resid_pre 0 equals running with that one position of the clean embedding:
    p = int(clean.image_positions[3])
    one = model.run_with_hooks(corrupt, fwd_hooks=[("blocks.0.hook_resid_pre", lambda r, hook: torch.cat(
        [r[:, :p], clean_cache["blocks.0.hook_resid_pre"][:, p : p + 1], r[:, p + 1 :]], 1))])
    assert torch.allclose(result[0, p], metric(one), atol=1e-5)
    full = model.run_with_hooks(
        corrupt, fwd_hooks=[("blocks.0.hook_resid_pre", lambda r, hook: clean_cache["blocks.0.hook_resid_pre"])]
    )
    assert torch.allclose(full, model(clean), atol=1e-5)


def test_save_pretrained_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf, proc = build_tiny("llava_next", seed=4)
    hf.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    model = HookedVLM.from_pretrained(tmp_path, device="cpu")
    inputs = model.prepare("What color is the bus ?", noise_image(70, 40))
    gap = (model(inputs).log_softmax(-1) - hf_forward(hf, inputs).logits.log_softmax(-1)).abs().max()
    assert gap < 1e-4
    assert not hasattr(model.image_adapter.core, "language_model")


def test_no_deprecation_noise():
    hf, proc = build_tiny("llava")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HookedVLM.from_pretrained("x", hf_model=hf, processor=proc, device="cpu")


def test_hf_model_passed_in_is_left_intact(tiny):
    hf, proc = tiny["llava"]
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    HookedVLM.from_pretrained("x", hf_model=hf, processor=proc, device="cpu")
    after = hf.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _assert_untouched(model, inputs, clean):
    assert all(len(hp.fwd_hooks) == 0 and len(hp.bwd_hooks) == 0 for hp in model.hook_dict.values())
    assert torch.equal(model(inputs), clean)


def test_bad_inputs_raise_named_errors_and_leave_model_clean(hooked):
    model = hooked("llava")
    img = noise_image(60, 40)
    inputs = model.prepare("What color is the bus ?", img)
    clean = model(inputs)
    with pytest.raises(PromptError, match="placeholder"):
        model.prepare("USER: what is this ? ASSISTANT:", img, template=None)
    with pytest.raises(PromptError, match="placeholder"):
        model.prepare("USER: <image>\nwhat is this ? ASSISTANT:", None, template=None)
    with pytest.raises(PromptError, match="more images"):
        model.prepare("USER: <image>\nwhat ? ASSISTANT:", [img, img], template=None)
    with pytest.raises(PromptError, match="Empty"):
        model.prepare("   ", img)
    with pytest.raises(PromptError, match="n_ctx"):
        model.prepare("red " * (model.cfg.n_ctx + 5), img)
    with pytest.raises(ImageError):
        model.prepare("What color ?", "not an image")
    with pytest.raises(PromptError, match="template"):
        model.prepare("What color ?", img, template="nonsense")
    with pytest.raises(PromptError):
        model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.hook_resid_pre", lambda r, hook: r)], start_at_layer=1)
    _assert_untouched(model, inputs, clean)


def test_non_rgb_images_are_converted(hooked):
    model = hooked("llava")
    rgb = noise_image(60, 40)
    for mode in ["RGBA", "L", "P", "CMYK"]:
        other = rgb.convert(mode)
        a = model(model.prepare("What color ?", other))
        b = model(model.prepare("What color ?", other.convert("RGB")))
        assert torch.equal(a, b)
    assert isinstance(model.prepare("What color ?", Image.new("RGBA", (30, 30))).images[0][0], Image.Image)


def test_unsupported_checkpoint_and_device(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="LLaVA"):
        HookedVLM.from_pretrained(tmp_path, device="cpu")
    hf, proc = build_tiny("llava")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceDtypeError, match="CUDA"):
            HookedVLM.from_pretrained("x", hf_model=hf, processor=proc, device="cuda")
    with pytest.raises(DeviceDtypeError):
        HookedVLM.from_pretrained("x", hf_model=hf, processor=proc, device="cpu", dtype=torch.int8)


def test_missing_checkpoint_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match="save_pretrained"):
        HookedVLM.from_pretrained("nobody/no-such-llava", device="cpu", cache_dir=str(tmp_path))


def test_mistral_decoder_matches_transformers():
    from transformers import LlavaNextForConditionalGeneration, MistralConfig

    hf, proc = build_tiny("llava_next")
    text = hf.config.text_config
    mistral = MistralConfig(vocab_size=text.vocab_size, hidden_size=64, intermediate_size=144, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, sliding_window=None, pad_token_id=1)
    config = hf.config
    config.text_config = mistral
    torch.manual_seed(0)
    hf = LlavaNextForConditionalGeneration(config).eval()
    model = HookedVLM.from_pretrained("x", hf_model=hf, processor=proc, device="cpu")
    inputs = model.prepare("What color is the bus ?", noise_image(50, 70))
    gap = (model(inputs).log_softmax(-1) - hf_forward(hf, inputs).logits.log_softmax(-1)).abs().max()
    assert gap < 1e-4
