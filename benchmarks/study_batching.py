"""Time one study on shapes-llava two ways on the same records, in the same run:

- per record: the study's ``rows`` recipe, one forward per (record, prompt) input;
- batched: its ``batch_rows`` (what ``run_study`` uses), the chunk's inputs in left-padded batches of
  ``--batch-size``.

Prints both times (best of ``--repeats``), the ratio per-record / batched and the largest difference of ``value``.
Usage::

    python benchmarks/study_batching.py [--study contextualization] [--records 8] [--batch-size 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings

import torch

from hooked_vlm import HookedVLM
from hooked_vlm.datasets import shapes
from hooked_vlm.studies import STUDIES
from hooked_vlm.studies.recipes import Context, study_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="contextualization",
                        choices=sorted(name for name, s in STUDIES.items() if s.batch_rows is not None))
    parser.add_argument("--records", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompts", nargs="*", default=None, help="prompt kinds (studies that take them)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    model = HookedVLM.from_pretrained("shapes-llava", device="cpu", progress=False)
    records = list(shapes.generate(args.records, seed=7))
    batched = STUDIES[args.study]
    single = dataclasses.replace(batched, batch_rows=None)
    options = batched.check_options({} if args.prompts is None else {"prompts": args.prompts})

    def timed(study, batch_size):
        best, frame = float("inf"), None
        for _ in range(args.repeats):
            start = time.perf_counter()
            frame, _ = study_rows(study, model, records, Context(dict(options), batch_size=batch_size))
            best = min(best, time.perf_counter() - start)
        return best, frame

    timed(batched, args.batch_size)  # warm-up
    t_single, rows_single = timed(single, None)
    t_batched, rows_batched = timed(batched, args.batch_size)
    diff = (rows_single["value"] - rows_batched["value"]).abs().max()
    print(f"study {args.study}, {args.records} shapes records, options {options}, {len(rows_single)} rows, "
          f"{args.threads} thread(s)")
    print(f"per record:        {t_single:.3f} s")
    print(f"batched (B={args.batch_size}):    {t_batched:.3f} s")
    print(f"ratio per-record / batched: {t_single / t_batched:.2f}x; largest |value| difference {diff:.2e}")


if __name__ == "__main__":
    main()
