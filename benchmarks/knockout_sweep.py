"""Time a full Image→Question knockout sweep (every centre layer, window 9) two ways on the same input.

- reference (the method of "Cross-modal Information Flow in Multimodal Large Language Models"): one full
  transformers forward per centre layer, with a 4D additive
  -inf mask replacing the attention mask of the window's layers;
- hooked_vlm: ``attention_knockout`` (one recording forward, then each centre layer from its first blocked
  layer on, only the rows from the first question token, earlier keys/values from a frozen cache).

Both compute the unablated probability too. Prints both times, the ratio and the largest disagreement in
percentage points. Usage::

    python benchmarks/knockout_sweep.py [--layers 12] [--hidden 256] [--image-size 336] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from hooked_vlm import HookedVLM
from hooked_vlm.analysis.knockout import attention_knockout, blocked_edges, window_layers
from hooked_vlm.testing import build_tiny

QUESTION = "What color is the circle on the left of the blue square ?"


def masked_probs(hf, inputs, mask: torch.Tensor | None, block: set[int]) -> torch.Tensor:
    """Last-position probabilities of one transformers forward (vision tower included) whose layers in ``block``
    get the 4D additive attention ``mask`` in place of their own."""
    layers = hf.model.language_model.layers
    handles = [
        layer.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "attention_mask": mask}), with_kwargs=True)
        for i, layer in enumerate(layers) if i in block
    ]
    try:
        with torch.no_grad():
            out = hf(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                     pixel_values=inputs.pixel_values, image_sizes=inputs.image_sizes, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return out.logits[0, -1].float().softmax(-1)


def knocked_mask(hf, blocked: torch.Tensor) -> torch.Tensor:
    """The causal 4D additive mask with ``blocked[0]`` edges set to -inf: ``[1, 1, query, key]``."""
    n = blocked.shape[-1]
    causal = torch.full((n, n), float("-inf")).triu(1)
    return causal.masked_fill(blocked[0], float("-inf"))[None, None].to(hf.dtype)


def reference_sweep(hf, inputs, blocked, window: int) -> torch.Tensor:
    """Relative change (%) per centre layer, one transformers forward each (plus one unablated)."""
    n_layers = hf.config.text_config.num_hidden_layers
    knocked = knocked_mask(hf, blocked)
    base = masked_probs(hf, inputs, None, set())
    token = base.argmax()
    return torch.stack([
        (masked_probs(hf, inputs, knocked, set(window_layers(c, window, n_layers)))[token] / base[token] - 1) * 100
        for c in range(n_layers)
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava", choices=["llava", "llava_next", "llama3_next"])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=336, help="vision tower input side (patch 14)")
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="reference attention kernel")
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    hf, proc = build_tiny(args.family, hidden=args.hidden, layers=args.layers, image_size=args.image_size,
                          patch_size=14)
    with torch.no_grad():  # sharper attention so the knockout effects are not just rounding noise
        for layer in hf.model.language_model.layers:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, proj).weight.mul_(4)
    hf.set_attn_implementation(args.attn)
    model = HookedVLM.from_pretrained(args.family, hf_model=hf, processor=proc, device="cpu", n_ctx=2048)
    image = Image.fromarray((np.random.RandomState(0).rand(480, 640, 3) * 255).astype("uint8"))
    inputs = model.prepare(QUESTION, image)
    blocked = blocked_edges(inputs, "image", "question")
    print(f"{args.family}: {args.layers} layers, d_model {args.hidden}, {inputs.seq_len} positions "
          f"({len(inputs.image_positions)} image, {len(inputs.question_positions)} question), window {args.window}, "
          f"{args.threads} thread(s)")

    def best(fn):
        times, out = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return min(times), out

    t_ref, ref = best(lambda: reference_sweep(hf, inputs, blocked, args.window))
    t_ours, ours = best(lambda: attention_knockout(model, inputs, "image", "question", window=args.window))
    gap = (ours.relative_change - ref).abs().max().item()
    print(f"reference (transformers {args.attn}, {args.layers + 1} full forwards): {t_ref:.3f} s")
    print(f"hooked_vlm attention_knockout:                          {t_ours:.3f} s")
    print(f"speed-up: {t_ref / t_ours:.1f}x   max |difference|: {gap:.2e} percentage points")
    print("relative change (%):", [round(v, 3) for v in ours.relative_change.tolist()])
    if gap > 1e-2:
        raise SystemExit(f"The two methods disagree by {gap:.3g} percentage points.")


if __name__ == "__main__":
    main()
