"""The public hook factories, used on their own with run_with_hooks."""

import torch
from conftest import noise_image

from hooked_vlm.hooks import pattern_rows, record, zero_ablate


def test_pattern_rows_record_and_zero_ablate(hooked):
    model = hooked("llama3_next")
    inputs = model.prepare("What color is the bus ?", noise_image(60, 40))
    _, cache = model.run_with_cache(inputs)
    rows = [inputs.last_position, 3]
    store = {}
    model.run_with_hooks(inputs, fwd_hooks=[
        ("blocks.1.attn.hook_pattern", pattern_rows(store, rows)),
        ("blocks.0.hook_resid_post", record(store, inputs.image_positions)),
    ])
    assert torch.equal(store["blocks.1.attn.hook_pattern"], cache["pattern", 1][:, :, rows])
    assert torch.equal(store["blocks.0.hook_resid_post"], cache["resid_post", 0][:, inputs.image_positions])
    ablated = model.run_with_hooks(inputs, fwd_hooks=[("hook_image_embeds", zero_ablate(torch.arange(16)))])
    zeroed = model.run_with_hooks(inputs, fwd_hooks=[("hook_embed", zero_ablate(inputs.image_positions[:16]))])
    assert torch.allclose(ablated, zeroed, atol=1e-5)
    assert not torch.allclose(ablated, model(inputs))
