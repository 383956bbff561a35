"""Peak resident memory of each study's per-record work on a ~2,900-position anyres input, over a plain forward's.

Builds a tiny LLaVA-NeXT (anyres) model whose activations dominate (hidden 512, 4 layers, 4 heads, a 32,064-token
vocabulary like Vicuna's, CLIP geometry of LLaVA-v1.6: 336-px crops of 14-px patches) and a 672x672 image, which
gives 2,928 image tokens (576 base + 2 x 2 tiles of 576 + 48 row ends) and 2,968 positions with the question.
Then, each in a fresh process so peaks do not mix, it measures the peak RSS increase (``VmHWM`` after resetting
it through ``/proc/self/clear_refs``, as benchmarks/load_memory.py does) of

- ``plain``: ``model(inputs)`` (logits over every position included), the baseline;
- each study's per-record work via ``run_study(name, model, [record])``: information-flow (default window, all
  six flows: the record has object boxes), answer-emergence, verbalization, truncation (a few counts), masking
  (four blocks), contextualization, norm-attention; the caption studies on one instruction;
- ``answer-filter``: ``model.answer(inputs)``, the correctness filter of information-flow / answer-emergence
  (``only_correct=False`` above: a random model rarely answers right, and the knockout itself is what we weigh).

It prints ``study | peak MiB | ratio`` and exits non-zero when a ratio exceeds 1.5.
Run: ``python benchmarks/study_memory.py`` (``--quick`` for a 1,200-position input while developing).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

LIMIT = 1.5

CHILD = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import numpy as np, torch
from PIL import Image
torch.set_num_threads(2)
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
from hooked_vlm import HookedVLM
from hooked_vlm.datasets.records import Record
from hooked_vlm.studies import run_study
from hooked_vlm.testing import build_tiny
which, side = sys.argv[1], int(sys.argv[2])
hf, proc = build_tiny("llava_next", hidden=512, layers=4, image_size=336, patch_size=14)
hf.resize_token_embeddings(32064)
hf.config.text_config.max_position_embeddings = 4096
model = HookedVLM.from_pretrained("bench", hf_model=hf, processor=proc, device="cpu", progress=False)
del hf
image = Image.fromarray((np.random.RandomState(0).rand(side, side, 3) * 255).astype("uint8"))
s = side / 672
box = lambda name, x: {"name": name, "x": int(x * s), "y": int(200 * s), "w": int(150 * s), "h": int(150 * s)}
record = Record(id="bench", source="bench", image_data=image, question="what color is the circle ?", answer="red",
                false_option="blue", captions=["a red circle left of a blue square"],
                objects=[box("circle", 100), box("square", 400)])
inputs = model.prepare(record.question, image)
one = ("describe this picture",)
options = {
    "information-flow": dict(only_correct=False),
    "answer-emergence": dict(only_correct=False),
    "verbalization": dict(instructions=one),
    "truncation": dict(instructions=one, counts=(1, 732, 1464, 2928) if side == 672 else (1, 100, 200)),
    "masking": dict(instructions=one, block=732 if side == 672 else 300),
    "contextualization": {},
    "norm-attention": {},
}
with torch.no_grad():  # warm-up: thread pools, the processor, first-call allocations
    model(model.prepare("what", image.resize((336, 336))))
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
if which == "plain":
    with torch.no_grad():
        out = model(inputs)
    del out
elif which == "answer-filter":
    model.answer(inputs)
else:
    frame = run_study(which, model, [record], **options[which])
    assert len(frame), which
peak = status("VmHWM")
print(json.dumps({"peak": peak - before, "positions": inputs.seq_len, "image_tokens": len(inputs.image_positions)}))
"""

STUDIES = ["information-flow", "answer-emergence", "verbalization", "truncation", "masking", "contextualization",
           "norm-attention", "answer-filter"]


def measure(which: str, side: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(side)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{which} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 336-px image (about 1,200 positions)")
    parser.add_argument("--only", nargs="*", default=None, help="measure these studies only")
    args = parser.parse_args()
    side = 336 if args.quick else 672
    mib = 2**20
    base = measure("plain", side)
    print(f"input: {base['positions']} positions ({base['image_tokens']} image tokens); hidden 512, 4 layers, "
          f"vocab 32064, float32, CPU")
    print(f"{'study':<20} {'peak MiB':>9} {'ratio':>6}")
    print(f"{'plain forward':<20} {base['peak'] / mib:9.1f} {1.0:6.2f}")
    worst = 0.0
    for name in args.only or STUDIES:
        m = measure(name, side)
        ratio = m["peak"] / base["peak"]
        worst = max(worst, ratio)
        flag = "" if ratio <= LIMIT else f"  > {LIMIT}"
        print(f"{name:<20} {m['peak'] / mib:9.1f} {ratio:6.2f}{flag}", flush=True)
    print(f"worst ratio {worst:.2f} (limit {LIMIT})")
    return 0 if worst <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
