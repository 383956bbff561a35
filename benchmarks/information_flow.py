"""Time the information-flow sweep of "Cross-modal Information Flow in Multimodal Large Language Models"
(Zhang et al.): the six flows x every centre layer (window 9) over several records, two ways in the same run.

- seed method (the paper's): per record one unablated transformers ``LlavaForConditionalGeneration`` forward,
  then one full forward per flow x centre layer, batch 1, vision tower included (``pixel_values`` every time),
  the flow's blocked edges (:func:`hooked_vlm.positions.blocked_edges`, the record's boxes for Related/Other) as a
  4D additive ``-inf`` mask replacing the attention mask of the window's layers;
- hooked_vlm: ``knockout_flows`` on left-padded batches of records (one recording forward per batch, then the
  knocked rows only, flows with the same first row sharing forwards).

The model is the 32-layer LLaVA-1.5 geometry (CLIP tower at 336 px, patch 14: 576 image tokens) at reduced width,
built as ``benchmarks/knockout_sweep.py`` builds it (random weights, attention sharpened so the effects are not
rounding noise). Neither side runs the correctness check (generation), and inputs are prepared before timing.
Both sides run on one thread (``--threads``); the ratio is of CPU time (``time.process_time``), which other
processes on a shared machine do not inflate as they do wall time (both are printed). Prints both times, the
ratio, and the largest disagreement of the relative changes in percentage points; exits
non-zero when the ratio is below 10 or the disagreement above 1e-3. Usage::

    python benchmarks/information_flow.py [--records 8] [--layers 32] [--hidden 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from knockout_sweep import knocked_mask, masked_probs  # the seed method's forward, shared with that benchmark
from PIL import Image

from hooked_vlm import HookedVLM
from hooked_vlm.analysis.knockout import FLOWS, knockout_flows, window_layers
from hooked_vlm.positions import blocked_edges
from hooked_vlm.testing import build_tiny

QUESTIONS = [
    "What color is the circle ?",
    "Is the circle left or right of the square ?",
    "Which shape is red ?",
    "What color is the square on the left of the blue triangle ?",
    "Is there a dog in the image ? Answer using a single word",
    "What shape is on the right of the red circle in this picture ?",
    "Are the circle and the square the same color ?",
    "Describe the color of the triangle on the left of the green square and the yellow circle",
]
SIZES = [(640, 480), (500, 375), (336, 336), (480, 640), (800, 600), (420, 300), (600, 450), (375, 500)]


def make_records(n: int) -> list[dict]:
    """``n`` synthetic records: noise images of differing sizes, questions of differing lengths, one or two
    object boxes (original-image pixels)."""
    rng = np.random.RandomState(0)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        image = Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))
        objects = []
        for _ in range(1 + i % 2):
            bw, bh = int(w * rng.uniform(0.15, 0.35)), int(h * rng.uniform(0.15, 0.35))
            objects.append({"x": int(rng.randint(0, w - bw)), "y": int(rng.randint(0, h - bh)), "w": bw, "h": bh})
        out.append({"question": QUESTIONS[i % len(QUESTIONS)], "image": image, "objects": objects, "answer": ""})
    return out


def seed_flows(hf, inputs, blocked: dict[str, torch.Tensor], window: int) -> tuple[dict[str, torch.Tensor], int]:
    """Relative change (%) per flow and centre layer of one record: one unablated transformers forward, then one
    full forward per flow x centre layer (the 4D mask of knockout_sweep.reference_sweep)."""
    n_layers = hf.config.text_config.num_hidden_layers
    base = masked_probs(hf, inputs, None, set())
    token = base.argmax()
    out = {}
    for label, edges in blocked.items():
        knocked = knocked_mask(hf, edges)
        out[label] = torch.stack([
            (masked_probs(hf, inputs, knocked, set(window_layers(c, window, n_layers)))[token] / base[token] - 1) * 100
            for c in range(n_layers)
        ])
    return out, int(token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=8)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128, help="decoder width (the seed side's cost grows with it)")
    parser.add_argument("--image-size", type=int, default=336, help="vision tower input side (patch 14)")
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--group", type=int, default=8, help="records per hooked_vlm batch")
    parser.add_argument("--batch-size", type=int, default=48, help="hooked_vlm sequences per knocked forward")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="seed-side attention kernel")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    hf, proc = build_tiny("llava", hidden=args.hidden, layers=args.layers, image_size=args.image_size, patch_size=14)
    with torch.no_grad():  # sharper attention so the knockout effects are not just rounding noise
        for layer in hf.model.language_model.layers:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, proj).weight.mul_(4)
    hf.set_attn_implementation(args.attn)
    model = HookedVLM.from_pretrained("llava", hf_model=hf, processor=proc, device="cpu", n_ctx=2048,
                                      progress=False)
    records = make_records(args.records)
    singles = [model.prepare(r["question"], r["image"]) for r in records]
    groups = [list(range(lo, min(len(records), lo + args.group))) for lo in range(0, len(records), args.group)]
    batches = [model.prepare([records[i]["question"] for i in g], [records[i]["image"] for i in g]) for g in groups]
    lengths = sorted(x.seq_len for x in singles)
    n_forwards = args.records * (1 + len(FLOWS) * args.layers)
    print(f"llava: {args.layers} layers, d_model {args.hidden}, {len(singles[0].image_positions)} image tokens, "
          f"{args.records} records of {lengths[0]}..{lengths[-1]} positions, {len(FLOWS)} flows, window "
          f"{args.window}, {args.threads} thread(s)")

    start, cpu = time.perf_counter(), time.process_time()
    ours = []
    for g, inputs in zip(groups, batches):
        flows = knockout_flows(model, inputs, [records[i] for i in g], window=args.window, batch_size=args.batch_size)
        for b in range(len(g)):
            one = len(g) == 1
            ours.append(({label: res.relative_change if one else res.relative_change[b]
                          for label, res in flows.flows.items()},
                         int(flows[next(iter(flows.flows))].token if one else flows[next(iter(flows.flows))].token[b])))
    t_ours, c_ours = time.perf_counter() - start, time.process_time() - cpu
    assert all(set(o) == set(FLOWS) for o, _ in ours)

    start, cpu = time.perf_counter(), time.process_time()
    seed = []
    for record, inputs in zip(records, singles):
        blocked = {label: blocked_edges(inputs, s, t, box=record["objects"]) for label, (s, t) in FLOWS.items()}
        seed.append(seed_flows(hf, inputs, blocked, args.window))
    t_seed, c_seed = time.perf_counter() - start, time.process_time() - cpu

    tokens_differ = [i for i, ((_, a), (_, b)) in enumerate(zip(ours, seed)) if a != b]
    gap = max((o[label] - s[label]).abs().max().item() for (o, _), (s, _) in zip(ours, seed) for label in FLOWS)
    effect = max(s[label].abs().max().item() for s, _ in seed for label in FLOWS)
    ratio = c_seed / c_ours
    print(f"seed method (transformers {args.attn}, {n_forwards} full forwards, batch 1): CPU {c_seed:.1f} s, "
          f"wall {t_seed:.1f} s")
    print(f"hooked_vlm knockout_flows ({len(groups)} batch(es) of <= {args.group} records, batch_size "
          f"{args.batch_size}): CPU {c_ours:.1f} s, wall {t_ours:.1f} s")
    print(f"speed-up: {ratio:.1f}x CPU time ({t_seed / t_ours:.1f}x wall)   max |difference|: {gap:.2e} percentage "
          f"points (largest effect {effect:.1f}%)")
    for label in FLOWS:
        mean = torch.stack([s[label] for s, _ in seed]).mean(0)
        print(f"  {label:17s} mean relative change (%):", [round(v, 2) for v in mean.tolist()])
    failures = []
    if tokens_differ:
        failures.append(f"the unablated answer token differs for records {tokens_differ}")
    if gap > 1e-3:
        failures.append(f"the two methods disagree by {gap:.3g} percentage points (limit 1e-3)")
    if ratio < 10:
        failures.append(f"the speed-up {ratio:.1f}x (CPU time) is below 10x")
    if failures:
        raise SystemExit("FAILED: " + "; ".join(failures) + ".")


if __name__ == "__main__":
    main()
