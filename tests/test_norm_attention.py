"""Norm-based attention against the formula computed from transformers' weights and output_attentions."""

import pytest
import torch
from conftest import noise_image

from hooked_vlm import HookedVLM, PromptError
from hooked_vlm.analysis.norm_attention import norm_attention, norms_from_values
from hooked_vlm.testing import build_tiny

QUESTION = "What color is the circle ?"


@pytest.fixture(scope="module")
def eager():
    """family -> eager hf model (output_attentions) and its processor."""
    out = {}
    for family in ["llava", "llama3_next"]:
        hf, proc = build_tiny(family, layers=2, seed=2)
        hf.set_attn_implementation("eager")
        out[family] = (hf, proc)
    return out


def reference(hf, inputs, query):
    """alpha_{h,i,j} ||f_h(x_j)|| and ||sum_h alpha_{h,i,j} f_h(x_j)|| from transformers, all keys at once."""
    tc = hf.config.text_config
    n_heads, n_kv = tc.num_attention_heads, tc.num_key_value_heads
    d_head = tc.hidden_size // n_heads
    with torch.no_grad():
        out = hf(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
                 image_sizes=inputs.image_sizes, output_hidden_states=True, output_attentions=True)
        per_head, summed = [], []
        for layer, block in enumerate(hf.model.language_model.layers):
            x = block.input_layernorm(out.hidden_states[layer][0])
            v = block.self_attn.v_proj(x).view(-1, n_kv, d_head).repeat_interleave(n_heads // n_kv, dim=1)
            w_o = block.self_attn.o_proj.weight.view(tc.hidden_size, n_heads, d_head)
            f = torch.einsum("khd,mhd->khm", v, w_o)  # [key, head, d_model]
            alpha = out.attentions[layer][0][:, query]  # [head, query, key]
            per_head.append(alpha * f.norm(dim=-1).T[:, None])
            summed.append(torch.einsum("hqk,khm->qkm", alpha, f).norm(dim=-1))
    return torch.stack(per_head), torch.stack(summed)


@pytest.mark.parametrize("family", ["llava", "llama3_next"])  # llama3_next: GQA 4q/2kv
@pytest.mark.parametrize("fold", [True, False])
def test_norm_attention_equals_formula(eager, family, fold):
    hf, proc = eager[family]
    model = HookedVLM.from_pretrained(family, hf_model=hf, processor=proc, device="cpu", fold_ln=fold,
                                      center_unembed=fold)
    inputs = model.prepare(QUESTION, noise_image(60, 40))
    query = torch.tensor([3, int(inputs.image_positions[5]), inputs.last_position])
    result = norm_attention(model, inputs, query_positions=query)
    per_head, summed = reference(hf, inputs, query)
    assert result.per_head.shape == (2, 4, 3, inputs.seq_len)
    assert result.summed.shape == (2, 3, inputs.seq_len)
    scale = summed.abs().max()
    assert (result.per_head - per_head).abs().max() < 1e-5 * scale
    assert (result.summed - summed).abs().max() < 1e-5 * scale
    # summing vectors before the norm differs from summing the per-head norms
    assert not torch.allclose(result.summed, result.per_head.sum(1), rtol=1e-3)


def test_default_query_is_last_and_layers_subset(eager):
    hf, proc = eager["llava"]
    model = HookedVLM.from_pretrained("llava", hf_model=hf, processor=proc, device="cpu")
    inputs = model.prepare(QUESTION, noise_image(60, 40))
    full = norm_attention(model, inputs)
    assert full.query_positions.tolist() == [inputs.last_position]
    one = norm_attention(model, inputs, layers=[1])
    assert torch.allclose(one.summed[0], full.summed[1])
    frame = one.by_modality()
    total = frame[["image", "question", "other text"]].sum(axis=1)
    assert abs(float(total[0]) - float(one.summed[0, 0].sum())) < 1e-5
    fig = full.plot(skip=[0])
    assert fig.data[0].z.shape == (2, inputs.seq_len - 1)
    assert len(full.plot(by="modality").data) == 3


def test_key_chunks_do_not_change_results():
    torch.manual_seed(0)
    pattern = torch.rand(4, 3, 50).softmax(-1)
    values = torch.randn(50, 2, 8)
    w_o = torch.randn(4, 8, 16)
    big = norms_from_values(pattern, values, w_o)
    small = norms_from_values(pattern, values, w_o, chunk_elements=16 * 4 * 3)  # one key per chunk
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(big, small))


def test_bad_inputs_raise(eager):
    hf, proc = eager["llava"]
    model = HookedVLM.from_pretrained("llava", hf_model=hf, processor=proc, device="cpu")
    batch = model.prepare([QUESTION, QUESTION + " now"], [noise_image(60, 40), noise_image(60, 40)])
    with pytest.raises(PromptError, match="one example"):
        norm_attention(model, batch)
    single = batch[0]
    with pytest.raises(PromptError, match="layers"):
        norm_attention(model, single, layers=[5])
    with pytest.raises(PromptError, match="outside"):
        norm_attention(model, single, query_positions=[10_000])
