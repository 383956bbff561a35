"""Run directories: a manifest and Parquet row chunks, written atomically, resumable after any interruption.

A run directory holds

- ``manifest.json``: the study, the model and a fingerprint of its weights, the data and its fingerprint, the
  study's options, the chunk size, package versions; written once when the run starts;
- ``rows-{chunk:06d}-shard-{i}of{n}.parquet``: the rows of records ``chunk*K .. chunk*K+K-1`` (K = chunk size),
  with the per-record facts (``record, record_id, task, n_rows, correct``) in the file's metadata.

Each chunk is written to a temporary file in the same directory and renamed into place, so a chunk file is
either complete or absent. A restarted run skips the chunks present and computes the others. Shard ``i`` of ``n``
(``--shard``, or a SLURM array task: :func:`slurm_shard`) computes the chunks ``c`` with ``c % n == i``; the
Ray backend (:mod:`hooked_vlm.studies.ray_backend`) shares :func:`plan_run`, :func:`commit_manifest` and
:func:`compute_chunk` with the local one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from hooked_vlm.errors import RunError
from hooked_vlm.studies.recipes import Context, get_study, study_rows
from hooked_vlm.studies.records import DataSpec, data_fingerprint, load_records

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
CHUNK_RE = re.compile(r"^rows-(\d{6})-shard-(\d+)of(\d+)\.parquet$")
RECORDS_KEY = b"hooked_vlm.records"
# Manifest entries that must match to resume; device and batch size may change between sessions.
IDENTITY = ("study", "options", "data", "data_fingerprint", "n_records", "chunk_size", "model")
MODEL_IDENTITY = ("weights", "dtype")


def chunk_name(chunk: int, shard: tuple[int, int] = (0, 1)) -> str:
    return f"rows-{chunk:06d}-shard-{shard[0]}of{shard[1]}.parquet"


def weights_fingerprint(model, samples: int = 64) -> str:
    """sha256 over every parameter and buffer's name, shape, dtype and ``samples`` values at a fixed stride
    (cheap even at 7B: a few kilobytes leave the device)."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
            flat = tensor.reshape(-1)
            if flat.numel():
                step = max(1, flat.numel() // samples)
                h.update(flat[::step][:samples].detach().to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    import hooked_vlm

    out: dict[str, str | None] = {"hooked_vlm": hooked_vlm.__version__}
    for dist in ("torch", "transformers", "transformer_lens", "pandas", "pyarrow"):
        try:
            out[dist] = version(dist.replace("_", "-"))
        except PackageNotFoundError:
            out[dist] = None
    return out


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def read_manifest(run_dir: str | Path) -> dict:
    """The run directory's manifest.

    Raises:
        RunError: no manifest, or one that is not valid JSON.
    """
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run directory: it has no {MANIFEST}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{path} cannot be read as a run manifest: {err}") from err


def chunk_files(run_dir: str | Path) -> dict[int, Path]:
    """Chunk index -> file, over every shard tag.

    Raises:
        RunError: one chunk written twice (under two shard tags).
    """
    found: dict[int, Path] = {}
    for path in sorted(Path(run_dir).iterdir()):
        m = CHUNK_RE.match(path.name)
        if not m:
            continue
        chunk = int(m.group(1))
        if chunk in found:
            raise RunError(f"Chunk {chunk} is in {run_dir} twice: {found[chunk].name} and {path.name}.")
        found[chunk] = path
    return found


def _differences(old: dict, new: dict, keys) -> list[str]:
    return [f"{k}: {_short(old.get(k))} in the run directory, {_short(new.get(k))} now"
            for k in keys if _json(old.get(k)) != _json(new.get(k))]


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=list)
    return text if len(text) <= 120 else text[:117] + "..."


@dataclass
class RunArgs:
    """A run's arguments (what ``hooked-vlm run`` takes)."""

    study: str
    model: str
    data: DataSpec
    options: dict
    dtype: str | None = None
    device: str | None = None
    batch_size: int | None = None
    chunk_size: int = 8
    shard: tuple[int, int] = (0, 1)
    progress: bool = True


def _check_dir(run_dir: Path) -> dict | None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"--out {run_dir} is an existing file, not a directory.")
    if (run_dir / MANIFEST).exists():
        return read_manifest(run_dir)
    if run_dir.is_dir():
        others = [p.name for p in run_dir.iterdir() if not p.name.startswith(".")]
        if others:
            raise RunError(f"{run_dir} is not empty ({', '.join(sorted(others)[:3])}...) and has no {MANIFEST}: "
                           "give a new or empty directory for a new run.")
    return None


SLURM_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX",
              "SLURM_ARRAY_TASK_STEP")


def slurm_shard(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard ``(i, n)`` of a SLURM array task, or None outside a job array (no ``SLURM_ARRAY_TASK_ID``).

    ``i = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP`` (MIN 0 and STEP 1 when unset),
    ``n = SLURM_ARRAY_TASK_COUNT``, or ``(MAX - MIN) / STEP + 1`` when COUNT is unset. So ``--array=0-3``,
    ``--array=1-4`` and ``--array=0-6:2`` each give the shards 0/4 .. 3/4.

    Raises:
        RunError: a variable that is not an integer, or values that do not form an evenly spaced array
            containing the task (e.g. ``--array=1,2,7``: give ``--shard`` explicitly); the message names the
            variable.
    """
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_TASK_ID", "").strip() == "":
        return None
    values: dict[str, int] = {}
    for name in SLURM_VARS:
        text = env.get(name, "").strip()
        if text == "":
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise RunError(f"{name}={text!r} is not an integer (a SLURM job array sets it to one).") from None
    task, low, step = values["SLURM_ARRAY_TASK_ID"], values.get("SLURM_ARRAY_TASK_MIN", 0), \
        values.get("SLURM_ARRAY_TASK_STEP", 1)
    if step < 1:
        raise RunError(f"SLURM_ARRAY_TASK_STEP={step} must be at least 1.")
    if task < low or (task - low) % step:
        raise RunError(f"SLURM_ARRAY_TASK_ID={task} is not in the array SLURM_ARRAY_TASK_MIN={low}, "
                       f"SLURM_ARRAY_TASK_STEP={step}; give --shard I/N explicitly.")
    spaced = None
    if "SLURM_ARRAY_TASK_MAX" in values:
        high = values["SLURM_ARRAY_TASK_MAX"]
        if high < task or (high - low) % step:
            raise RunError(f"SLURM_ARRAY_TASK_MAX={high} does not fit SLURM_ARRAY_TASK_ID={task}, "
                           f"SLURM_ARRAY_TASK_MIN={low}, SLURM_ARRAY_TASK_STEP={step}; give --shard I/N explicitly.")
        spaced = (high - low) // step + 1
    count = values.get("SLURM_ARRAY_TASK_COUNT", spaced)
    if count is None:
        raise RunError("SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX is: "
                       "the number of shards is unknown; give --shard I/N explicitly.")
    if spaced is not None and count != spaced:
        raise RunError(f"SLURM_ARRAY_TASK_COUNT={count} but SLURM_ARRAY_TASK_MIN={low}..SLURM_ARRAY_TASK_MAX="
                       f"{values['SLURM_ARRAY_TASK_MAX']} step {step} spans {spaced} tasks: the array is not evenly "
                       "spaced (e.g. --array=1,2,7); use --array=0-(N-1) or give --shard I/N explicitly.")
    i = (task - low) // step
    if not 0 <= i < count:
        raise RunError(f"SLURM_ARRAY_TASK_ID={task} gives shard {i} but SLURM_ARRAY_TASK_COUNT={count}.")
    return i, count


@dataclass
class Plan:
    """A run checked against its directory before any model loads (see :func:`plan_run`)."""

    run_dir: Path
    args: RunArgs
    study: Any
    options: dict
    records: list
    manifest: dict  # the identity entries; the model's are added by :func:`commit_manifest`
    old: dict | None  # the directory's manifest, None for a new run

    @property
    def n_chunks(self) -> int:
        return -(-len(self.records) // self.args.chunk_size)

    def chunk_records(self, chunk: int) -> list:
        k = self.args.chunk_size
        return self.records[chunk * k : (chunk + 1) * k]

    def context(self) -> Context:
        return Context(self.options, batch_size=self.args.batch_size, seed=self.args.data.seed)


def plan_run(run_dir: str | Path, args: RunArgs) -> Plan:
    """Check ``args``, the data and ``run_dir`` (the identity entries of an existing manifest); loads no model.

    Raises:
        RunError: an unknown study or option, a bad chunk size or shard, a non-empty directory without a manifest,
            no records, a directory of another run (the message says what differs).
    """
    run_dir = Path(run_dir)
    study = get_study(args.study)
    options = study.check_options(args.options)
    if args.chunk_size < 1:
        raise RunError(f"The chunk size must be at least 1, got {args.chunk_size}.")
    i, n = args.shard
    if not (n >= 1 and 0 <= i < n):
        raise RunError(f"Shard {i}/{n} does not exist: need 0 <= i < n.")
    old = _check_dir(run_dir)
    records = load_records(args.data)
    if not records:
        raise RunError(f"The data {args.data.data} gives no records.")
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "study": study.name,
        "papers": study.papers,
        "figure": study.figure,
        "options": _json(options),
        "data": args.data.describe(),
        "data_fingerprint": data_fingerprint(args.data, records),
        "n_records": len(records),
        "chunk_size": args.chunk_size,
        "model": args.model,
    }
    if old is not None:
        _check_identity(run_dir, old, manifest)
    return Plan(run_dir, args, study, options, records, manifest, old)


def _check_identity(run_dir: Path, old: dict, manifest: dict) -> None:
    diff = _differences(old, manifest, IDENTITY)
    if diff:
        raise RunError(f"{run_dir} holds another run; it differs in " + "; ".join(diff)
                       + ". Use a new --out directory (or the original arguments to resume).")


def model_facts(model) -> dict:
    """The manifest entries taken from a loaded model: weights fingerprint, dtype, shape, device."""
    cfg = model.cfg
    return {"weights": weights_fingerprint(model), "dtype": str(cfg.dtype),
            "model_config": {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
                             "d_vocab": cfg.d_vocab},
            "device": str(cfg.device)}


def check_model(run_dir: Path, manifest: dict, facts: dict, who: str = "") -> None:
    """Raises RunError when ``facts`` (of :func:`model_facts`) differ from ``manifest`` in weights or dtype."""
    diff = _differences(manifest, facts, MODEL_IDENTITY)
    if diff:
        raise RunError(f"{run_dir} was run with other model weights{who}; it differs in " + "; ".join(diff) + ".")


def commit_manifest(plan: Plan, facts: dict, argv: list[str] | None = None) -> dict:
    """Check the loaded model's ``facts`` against an existing manifest, or write the manifest of a new run;
    returns the manifest in force.

    Raises:
        RunError: other weights or dtype than the directory's run.
    """
    if plan.old is not None:
        check_model(plan.run_dir, plan.old, facts)
        return plan.old
    manifest = dict(plan.manifest)
    manifest.update({
        "weights": facts["weights"], "dtype": facts["dtype"], "model_config": facts["model_config"],
        "versions": versions(),
        "execution": {"device": facts["device"], "batch_size": plan.args.batch_size},
        "command": argv,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    if not _create_exclusive(plan.run_dir / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"):
        # another shard started this run while the model loaded: join it, or refuse as a resume would
        plan.old = read_manifest(plan.run_dir)
        _check_identity(plan.run_dir, plan.old, plan.manifest)
        check_model(plan.run_dir, plan.old, facts)
        return plan.old
    plan.old = manifest
    return manifest


def _create_exclusive(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` atomically unless ``path`` exists; False when it does (hard link of a temporary
    file: atomic on local and NFS filesystems; a filesystem without hard links gets exists-then-rename)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def pending_chunks(plan: Plan) -> tuple[list[int], list[int]]:
    """``(mine, todo)``: the chunks of this shard, and those of them not written yet. Removes the temporary files
    that an interrupted session of this shard left."""
    i, n = plan.args.shard
    mine = [c for c in range(plan.n_chunks) if c % n == i]
    if not plan.run_dir.is_dir():
        return mine, list(mine)
    tag = f"-shard-{i}of{n}.parquet."
    for stale in plan.run_dir.glob(".rows-*.tmp"):
        if tag in stale.name:
            stale.unlink(missing_ok=True)
    present = chunk_files(plan.run_dir)
    return mine, [c for c in mine if c not in present]


def compute_chunk(plan: Plan, model, chunk: int, ctx: Context | None = None, on_record=None) -> tuple[Path, int]:
    """Compute and write chunk ``chunk`` (atomically); returns its file and its number of rows."""
    k = plan.args.chunk_size
    rows, facts = study_rows(plan.study, model, plan.chunk_records(chunk), ctx or plan.context(), start=chunk * k,
                             on_record=on_record)
    return write_chunk(plan.run_dir / chunk_name(chunk, plan.args.shard), rows, facts), len(rows)


def chunk_line(plan: Plan, chunk: int, n_rows: int, seconds: float, path: Path, where: str = "") -> str:
    k = plan.args.chunk_size
    last = min(len(plan.records), (chunk + 1) * k) - 1
    return (f"chunk {chunk + 1}/{plan.n_chunks}: records {chunk * k}-{last}, {n_rows} rows, {seconds:.1f}s -> "
            f"{path.name}{where}")


BACKENDS = ("local", "ray")


def execute(run_dir: str | Path, args: RunArgs, *, model=None, argv: list[str] | None = None,
            backend: str = "local", workers: int | None = None, address: str | None = None) -> Path:
    """Run (or resume) ``args`` into ``run_dir``; returns ``run_dir``.

    Arguments, data and options are checked against an existing manifest before the model loads, the weights
    right after. ``model`` is an already loaded model (else ``args.model`` is loaded).

    ``backend="ray"`` runs the chunks of ``args.shard`` on Ray actors, each loading ``args.model`` once (see
    :func:`hooked_vlm.studies.ray_backend.run_ray`): ``workers`` actors on a local Ray instance started with
    ``workers`` CPUs, or on the cluster at ``address``; Ray is imported only then.

    Raises:
        RunError: an unknown study or option, a directory of another run (the message says what differs), an
            unknown backend, ``workers``/``address`` without ``backend="ray"``.
        OptionalDependencyError: ``backend="ray"`` without Ray installed.
    """
    if backend not in BACKENDS:
        raise RunError(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend == "ray":
        if model is not None:
            raise RunError("backend='ray' loads the model in each worker: pass no model.")
        from hooked_vlm.studies.ray_backend import run_ray

        return run_ray(run_dir, args, workers=workers, address=address, argv=argv)
    if workers is not None or address is not None:
        raise RunError("workers and address apply to backend='ray' only.")
    plan = plan_run(run_dir, args)
    if model is None:
        from hooked_vlm import HookedVLM

        model = HookedVLM.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    commit_manifest(plan, model_facts(model), argv)
    _run_chunks(plan, model)
    return plan.run_dir


def _run_chunks(plan: Plan, model) -> None:
    from tqdm.auto import tqdm

    mine, todo = pending_chunks(plan)
    size = lambda c: len(plan.chunk_records(c))  # noqa: E731
    total = sum(size(c) for c in mine)
    done = total - sum(size(c) for c in todo)
    if done:
        tqdm.write(f"{plan.run_dir}: resuming, {len(mine) - len(todo)} of {len(mine)} chunks already written",
                   file=sys.stderr)
    bar = tqdm(total=total, initial=done, unit="rec", desc=plan.study.name, disable=not plan.args.progress,
               file=sys.stderr)
    ctx = plan.context()
    try:
        for c in todo:
            t0 = time.perf_counter()
            path, n_rows = compute_chunk(plan, model, c, ctx, on_record=lambda: bar.update(1))
            tqdm.write(chunk_line(plan, c, n_rows, time.perf_counter() - t0, path), file=sys.stderr)
    finally:
        bar.close()


def write_chunk(path: Path, rows: pd.DataFrame, facts: pd.DataFrame) -> Path:
    """Write ``rows`` with ``facts`` in the metadata to ``path`` atomically (temp file, fsync, rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(rows.reset_index(drop=True), preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[RECORDS_KEY] = facts.to_json(orient="records").encode()
    table = table.replace_schema_metadata(meta)
    from hooked_vlm.report import write_atomic

    return write_atomic(path, lambda f: pq.write_table(table, f), fsync=True)


def load(run_dir: str | Path) -> pd.DataFrame:
    """The rows of a run directory, in record order.

    ``frame.attrs``: ``manifest`` (the manifest), ``records`` (one row per processed record: ``record,
    record_id, task, n_rows, correct``), ``complete`` (every chunk written).

    Raises:
        RunError: not a run directory, a chunk written twice, or a chunk file that cannot be read.
    """
    import pyarrow.parquet as pq

    manifest = read_manifest(run_dir)
    frames, facts = [], []
    for _, path in sorted(chunk_files(run_dir).items()):
        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for damaged files
            raise RunError(f"Chunk file {path} cannot be read: {err}. Delete it and run the command again.") from err
        raw = (table.schema.metadata or {}).get(RECORDS_KEY)
        if raw is None:
            raise RunError(f"Chunk file {path} has no record metadata: it was not written by hooked-vlm run.")
        facts.append(pd.read_json(_StringIO(raw.decode()), orient="records", dtype=False))
        if table.num_rows:
            frames.append(table.to_pandas())
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(frame):
        frame = frame.sort_values(["record"], kind="stable").reset_index(drop=True)
    records = pd.concat(facts, ignore_index=True) if facts else pd.DataFrame(
        columns=["record", "record_id", "task", "n_rows", "correct"])
    n_chunks = -(-int(manifest["n_records"]) // int(manifest["chunk_size"]))
    frame.attrs["manifest"] = manifest
    frame.attrs["records"] = records
    frame.attrs["complete"] = len(chunk_files(run_dir)) == n_chunks
    return frame


def _StringIO(text: str):
    import io

    return io.StringIO(text)
