"""``hooked-vlm`` command line: ``hooked-vlm demo --out DIR``, ``hooked-vlm run STUDY --model M --data PATH --out
RUN_DIR`` (a resumable study run, see docs/studies.md) and ``hooked-vlm report RUN_DIR``.

Only the standard library and :mod:`hooked_vlm.errors` are imported until a command runs, so ``--help`` and
``--version`` answer at once. User errors (a bad option, an unusable ``--out``, any :class:`HookedVLMError`)
print one line ``hooked-vlm: error: ...`` and exit with status 2; Ctrl-C exits with status 130. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

import hooked_vlm
from hooked_vlm.errors import HookedVLMError

PROG = "hooked-vlm"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Mechanistic interpretability for LLaVA-family vision-language models, on TransformerLens.",
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {hooked_vlm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="answer shapes questions, run every analysis, write DIR/report.html",
        description="Load a model, answer fresh questions of the synthetic shapes world, run every analysis "
        "(logit lens, attention knockout, norm-based attention, truncation, contextualization, verbalization) "
        "and write a self-contained OUT/report.html. The report is rewritten after each section, so an "
        "interrupted run (Ctrl-C) leaves the sections finished so far, marked incomplete.",
        formatter_class=formatter,
    )
    demo.add_argument("--out", default="report", metavar="DIR",
                      help="output directory, created if needed; an existing report.html in it is replaced")
    demo.add_argument("--model", default="shapes-llava", metavar="NAME_OR_PATH",
                      help="shipped model name, checkpoint directory or hub name")
    demo.add_argument("--records", type=positive_int, default=60, metavar="N",
                      help="records for the aggregated figures")
    demo.add_argument("--answers", type=positive_int, default=8, metavar="N",
                      help="questions shown with their images")
    demo.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    _add_run_parser(sub, formatter)
    report = sub.add_parser(
        "report", help="write RUN_DIR/report.html with the study's figures from a run's stored rows",
        description="Draw the paper figures of a study run from its stored rows (a partial run gives a report "
        "marked incomplete).", formatter_class=formatter)
    report.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by 'hooked-vlm run'")
    report.add_argument("--out", default=None, metavar="FILE", help="the HTML file (default RUN_DIR/report.html)")
    return parser


# Study names and options, kept here so that --help does not import the studies (pandas, torch).
PROMPT_KINDS = ("question", "normal", "noisy", "empty")
STUDY_NAMES = ("information-flow", "answer-emergence", "verbalization", "truncation", "masking",
               "contextualization", "norm-attention")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/1, got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"expected 0 <= I < N, got {text!r}")
    return i, n


def _add_run_parser(sub, formatter) -> None:
    run = sub.add_parser(
        "run", help="run a study over a data set into a resumable run directory",
        description="Run one of the papers' studies over a data set, writing RUN_DIR/manifest.json and Parquet row "
        "chunks. Running the same command again resumes where it stopped; a directory of another run is refused. "
        "Studies: " + ", ".join(STUDY_NAMES) + " (see docs/studies/).", formatter_class=argparse.HelpFormatter)
    run.add_argument("study", choices=STUDY_NAMES, metavar="STUDY", help="one of: " + ", ".join(STUDY_NAMES))
    run.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                     help="shipped model name, checkpoint directory or hub name")
    run.add_argument("--data", required=True, metavar="PATH",
                     help="'shapes' (the synthetic world, seeded by --seed) or a local data set file")
    run.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory (created; resumed if there)")
    run.add_argument("--limit", type=positive_int, default=None, metavar="N",
                     help="the first N records (shapes: default 100)")
    run.add_argument("--format", default=None, help="data set format, when the file name does not tell: gqa, "
                     "coco-karpathy, coco2017, winoground, winoground-hf (see docs/datasets.md)")
    run.add_argument("--images-dir", default=None, metavar="DIR", help="folder of the data set's images")
    run.add_argument("--split", default=None, help="data set split, where the format has several")
    run.add_argument("--task", default=None, help="GQA: the task of a CSV whose file name is not one")
    run.add_argument("--seed", type=int, default=0,
                     help="seed of --data shapes and of the noisy prompts (default: 0)")
    run.add_argument("--dtype", default=None, help="weights dtype: float32, float16, bfloat16 (default: float32)")
    run.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)")
    run.add_argument("--batch-size", type=positive_int, default=None, metavar="B",
                     help="sequences per forward pass: knockout (flow, centre layer, record) settings (default 16), "
                     "truncation/masking settings (32/8), records x prompts of the other studies (8)")
    run.add_argument("--chunk-size", type=positive_int, default=8, metavar="K",
                     help="records per stored chunk; a killed run loses at most one chunk (default: 8)")
    run.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                     help="process the chunks whose index is I modulo N, into the same RUN_DIR as the other shards "
                     "(default: taken from SLURM_ARRAY_TASK_ID, _MIN and _COUNT or _MAX in a SLURM job array, else "
                     "0/1)")
    run.add_argument("--backend", choices=("local", "ray"), default="local",
                     help="local: this process computes the chunks; ray: Ray actors do, one model copy each "
                     "(needs pip install 'hooked-vlm[ray]'; RUN_DIR on a filesystem every node sees) "
                     "(default: local)")
    run.add_argument("--workers", type=positive_int, default=None, metavar="N",
                     help="--backend ray: actors; without --address a local Ray instance with N CPUs is started "
                     "(default: the CPU count; with --address: the cluster's GPUs for --device cuda, else its nodes)")
    run.add_argument("--address", default=None, metavar="ADDR",
                     help="--backend ray: an existing Ray cluster (auto, HOST:PORT, ray://HOST:10001)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (the per-chunk lines stay)")
    opts = run.add_argument_group("study options (each study takes some of them; default: the study's own)")
    opts.add_argument("--window", type=positive_int, default=None,
                      help="information-flow: layers blocked around each centre layer (paper: 9)")
    opts.add_argument("--only-correct", type=_bool, default=None, metavar="BOOL",
                      help="information-flow, answer-emergence: rows only for correctly answered records")
    opts.add_argument("--vqa-suffix", type=_bool, default=None, metavar="BOOL",
                      help="append 'Answer the question using a single word or phrase.' to questions")
    opts.add_argument("--apply-ln", type=_bool, default=None, metavar="BOOL",
                      help="answer-emergence, verbalization: read layers through the final norm")
    opts.add_argument("--prompts", default=None, metavar="KIND[,KIND]",
                      help="verbalization, truncation, masking, contextualization: prompt kinds, any of "
                      + ", ".join(PROMPT_KINDS) + " (normal: the five paraphrased caption instructions; noisy: "
                      "random vocabulary tokens seeded by --seed and the record; empty: no instruction)")
    opts.add_argument("--instruction", dest="instructions", action="append", default=None, metavar="TEXT",
                      help="verbalization, truncation, masking, contextualization: a caption instruction of prompt "
                      "kind 'normal' in place of the five paraphrases (repeat for several)")
    opts.add_argument("--counts", type=_int_list, default=None, metavar="N[,N]",
                      help="truncation: image-token counts kept (default 1..all)")
    opts.add_argument("--block", type=positive_int, default=None, metavar="N",
                      help="masking: image tokens removed per setting (default one patch-grid row)")


STUDY_OPTIONS = ("window", "only_correct", "vqa_suffix", "apply_ln", "prompts", "instructions", "counts", "block")


def _error(message: str) -> int:
    message = " ".join(line.strip() for line in message.splitlines())
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _run_demo(args: argparse.Namespace) -> int:
    from hooked_vlm.report import check_out_dir

    try:
        check_out_dir(args.out)
    except OSError as err:
        return _error(f"--out: {err.strerror or err}")

    import torch

    try:
        torch.device(args.device)
    except RuntimeError as err:
        return _error(f"--device {args.device}: {err}")

    from hooked_vlm.demo import DemoInterrupted, run_demo

    try:
        run_demo(args.out, model_name=args.model, n_answers=args.answers, n_records=args.records, device=args.device)
    except DemoInterrupted as err:
        if err.report_path is None:
            print(f"\n{PROG}: interrupted before the first section was finished; no report written",
                  file=sys.stderr, flush=True)
        else:
            print(f"\n{PROG}: interrupted; partial report ({err.done} of {err.total} sections) in {err.report_path}",
                  file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0


def _run_study(args: argparse.Namespace, argv: list[str] | None) -> int:
    from pathlib import Path

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _error(f"--out: {out} is an existing file, not a directory")
    if args.data != "shapes" and not Path(args.data).exists():
        return _error(f"--data: {args.data} does not exist (give 'shapes' or a data set file)")

    import torch

    try:
        torch.device(args.device)
    except RuntimeError as err:
        return _error(f"--device {args.device}: {err}")

    from hooked_vlm.studies import STUDIES, DataSpec, RunArgs, execute

    study = STUDIES[args.study]
    given = {k: getattr(args, k) for k in STUDY_OPTIONS if getattr(args, k) is not None}
    if "prompts" in given:
        given["prompts"] = [p.strip() for p in given["prompts"].split(",") if p.strip()]
    unused = sorted(set(given) - set(study.options))
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        return _error(f"{args.study} takes no {flags}; its options: "
                      + (", ".join("--" + k.replace("_", "-") for k in study.options) or "none"))
    if args.backend != "ray" and (args.workers is not None or args.address is not None):
        return _error("--workers and --address go with --backend ray")
    shard = args.shard
    if shard is None:
        from hooked_vlm.studies.runs import slurm_shard

        shard = slurm_shard()
        if shard is not None:
            import os

            print(f"{PROG}: shard {shard[0]}/{shard[1]} taken from SLURM (SLURM_ARRAY_TASK_ID="
                  f"{os.environ['SLURM_ARRAY_TASK_ID']})", file=sys.stderr, flush=True)
    spec = DataSpec(args.data, format=args.format, images_dir=args.images_dir, split=args.split, limit=args.limit,
                    seed=args.seed, task=args.task)
    run_args = RunArgs(args.study, args.model, spec, given, dtype=args.dtype, device=args.device,
                       batch_size=args.batch_size, chunk_size=args.chunk_size, shard=shard or (0, 1),
                       progress=not args.no_progress)
    try:
        execute(out, run_args, argv=list(sys.argv[1:] if argv is None else argv), backend=args.backend,
                workers=args.workers, address=args.address)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; {out} keeps the chunks written so far: run the same command again to resume",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    from hooked_vlm.studies.runs import chunk_files, read_manifest

    manifest = read_manifest(out)
    left = -(-int(manifest["n_records"]) // int(manifest["chunk_size"])) - len(chunk_files(out))
    if left:
        print(f"{PROG}: shard {run_args.shard[0]}/{run_args.shard[1]} complete in {out}; {left} chunk(s) of other "
              f"shards to go, then 'hooked-vlm report {out}'", file=sys.stderr, flush=True)
    else:
        print(f"{PROG}: run complete in {out}; 'hooked-vlm report {out}' draws its figures", file=sys.stderr,
              flush=True)
    return 0


def _report(args: argparse.Namespace) -> int:
    from hooked_vlm.studies.report import write_report

    path = write_report(args.run_dir, args.out)
    print(f"wrote {path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hooked-vlm``; returns the exit status (argparse exits itself on bad options: 2)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "run":
            return _run_study(args, argv)
        if args.command == "report":
            return _report(args)
        raise AssertionError(f"unhandled command {args.command!r}")
    except HookedVLMError as err:
        notes = "; ".join(getattr(err, "__notes__", []))
        return _error(f"{err}" + (f" ({notes})" if notes else ""))
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
