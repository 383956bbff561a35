"""Time an image-token truncation curve (N = 1..all image tokens, one record) two ways in the same run.

- reference (the method of "Investigating Multimodal Interaction in Vision Large Language Models" (Wei 2025)):
  one full transformers forward per N, the language model on the truncated merged ``inputs_embeds`` (prompt
  with the first N image tokens, then the caption), logits only for the rows that predict the caption. The
  merged embeddings are computed once before the clock starts, so the vision tower is NOT in the reference
  time (the conservative baseline);
- hooked_vlm: ``image_token_truncation`` (its time includes its own vision tower call): one recording forward,
  then per N only the positions after the image (text after the image and the caption), with the keys and
  values of the kept prefix read from a frozen cache.

Model: a random LLaVA-1.5 geometry (CLIP 336 px, patch 14: 576 image tokens; Llama decoder, ``--layers``
layers of width ``--hidden``), fp32 on CPU. Prints both times, the ratio and the largest loss disagreement;
exits non-zero if the ratio is under ``--min-ratio`` or the losses differ by more than 1e-4. Usage::

    python benchmarks/truncation.py [--layers 32] [--hidden 256] [--threads 1] [--counts 1,288,576]
"""

from __future__ import annotations

import argparse
import inspect
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hooked_vlm import HookedVLM
from hooked_vlm.analysis.truncation import image_token_truncation, target_ids
from hooked_vlm.testing import build_tiny, hf_merged_embeds

QUESTION = "Describe this picture"
CAPTION = "a red circle left of a blue square and a green triangle on the right"


def reference_curve(hf, embeds: torch.Tensor, image: torch.Tensor, ids: torch.Tensor, counts) -> torch.Tensor:
    """Mean caption cross-entropy per N, one full transformers forward each."""
    out = []
    for n in counts:
        keep = torch.ones(len(embeds), dtype=torch.bool)
        keep[image[n:]] = False
        with torch.no_grad():
            logits = hf(inputs_embeds=embeds[keep][None], logits_to_keep=len(ids) + 1).logits[0]
        out.append(F.cross_entropy(logits[:-1].float(), ids).item())
    return torch.tensor(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava", choices=["llava", "llava_next", "llama3_next"])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=336, help="vision tower input side (patch 14)")
    parser.add_argument("--counts", default=None, help="comma-separated N (default 1..all image tokens)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="hooked_vlm settings per forward (default: image_token_truncation's)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="reference attention kernel")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-ratio", type=float, default=10.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    hf, proc = build_tiny(args.family, hidden=args.hidden, layers=args.layers, image_size=args.image_size,
                          patch_size=14)
    hf.set_attn_implementation(args.attn)
    hf.config.text_config.max_position_embeddings = 4096  # default RoPE: the table does not depend on it
    model = HookedVLM.from_pretrained(args.family, hf_model=hf, processor=proc, device="cpu", n_ctx=4096,
                                      progress=False)
    image = Image.fromarray((np.random.RandomState(0).rand(480, 640, 3) * 255).astype("uint8"))
    inputs = model.prepare(QUESTION, image)
    ids = target_ids(model, CAPTION)
    positions = inputs.image_positions
    n_image = len(positions)
    counts = list(range(1, n_image + 1)) if args.counts is None else [int(c) for c in args.counts.split(",")]
    after = inputs.seq_len - int(positions[-1]) - 1
    print(f"{args.family}: {args.layers} layers, d_model {args.hidden}, {inputs.seq_len} prompt positions "
          f"({n_image} image, {after} after the image), caption of {len(ids)} tokens, {len(counts)} settings "
          f"(N = {counts[0]}..{counts[-1]}), {args.threads} thread(s)")

    embeds = hf_merged_embeds(hf, inputs, ids)
    start = time.perf_counter()
    ref = reference_curve(hf, embeds, positions, ids, counts)
    t_ref = time.perf_counter() - start
    start = time.perf_counter()
    batch = {} if args.batch_size is None else {"batch_size": args.batch_size}
    ours = image_token_truncation(model, inputs, ids, counts=counts, **batch)
    t_ours = time.perf_counter() - start
    gap = (ours.loss.double() - ref.double()).abs().max().item()
    ratio = t_ref / t_ours
    print(f"reference (transformers {args.attn}, {len(counts)} full forwards): {t_ref:.3f} s")
    size = args.batch_size or inspect.signature(image_token_truncation).parameters["batch_size"].default
    print(f"hooked_vlm image_token_truncation (batch {size}):       {t_ours:.3f} s")
    print(f"speed-up: {ratio:.1f}x   max |loss difference|: {gap:.2e}")
    if gap > 1e-4:
        raise SystemExit(f"The two methods disagree by {gap:.3g} nats.")
    if ratio < args.min_ratio:
        raise SystemExit(f"The speed-up {ratio:.1f}x is under {args.min_ratio:g}x.")


if __name__ == "__main__":
    main()
