"""``hooked-vlm`` command line: ``hooked-vlm demo --out DIR [--model NAME_OR_PATH]``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hooked-vlm", description="Mechanistic interpretability for LLaVA models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="answer shapes questions, run every analysis, write DIR/report.html")
    demo.add_argument("--out", default="report", help="output directory (default: report)")
    demo.add_argument("--model", default="shapes-llava", help="shipped model name, checkpoint dir or hub name")
    demo.add_argument("--records", type=int, default=60, help="records for the aggregated figures")
    demo.add_argument("--answers", type=int, default=8, help="questions shown with their images")
    demo.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from hooked_vlm.demo import run_demo

        run_demo(args.out, model_name=args.model, n_answers=args.answers, n_records=args.records, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
