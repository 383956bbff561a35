"""Ray backend of study runs: the chunks of a run computed by Ray actors, each loading the model once.

Needs the optional extra ``pip install 'hooked-vlm[ray]'``; this module is imported only when a run asks for
``backend="ray"`` (``hooked-vlm run ... --backend ray``). See docs/scale.md.

The driver checks the arguments, the data and the run directory (:func:`~hooked_vlm.studies.runs.plan_run`, no
model), starts the actors, writes the manifest with the first actor's weights fingerprint (or checks it against
an existing manifest) and checks every other actor's weights against it. Then it hands out chunk indices one at
a time; each actor writes its chunk files into the run directory itself, atomically and with the names of a local
run, so the run directory must be on a filesystem that the driver and every actor see (a shared filesystem on a
cluster). An actor that dies (its process killed, its node lost) has its chunk re-queued and run by an idle actor
or by a fresh one; a chunk file written before the death is kept. A run directory written by Ray can be resumed by
a local run and the other way round.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import deque
from collections.abc import Collection
from pathlib import Path

from hooked_vlm.errors import HookedVLMError, OptionalDependencyError, RunError
from hooked_vlm.studies.runs import (
    RunArgs,
    check_model,
    chunk_line,
    chunk_name,
    commit_manifest,
    compute_chunk,
    model_facts,
    pending_chunks,
    plan_run,
)

INSTALL = "pip install 'hooked-vlm[ray]'"


def import_ray():
    """The ``ray`` module.

    Raises:
        OptionalDependencyError: Ray is not installed (the message says ``pip install 'hooked-vlm[ray]'``).
    """
    try:
        import ray
    except ImportError as err:
        raise OptionalDependencyError(f"The Ray backend needs Ray, which is not installed: {INSTALL}") from err
    return ray


class ChunkWorker:
    """A Ray actor: loads ``args.model`` once, then computes and writes the chunks the driver hands it."""

    def __init__(self, run_dir: str, args: RunArgs):
        from hooked_vlm import HookedVLM

        self.run_dir, self.args, self.plan, self.ctx = Path(run_dir), args, None, None
        self.where = f"{socket.gethostname()}:{os.getpid()}"
        self.model = HookedVLM.from_pretrained(args.model, dtype=args.dtype, device=args.device, progress=False)

    def facts(self) -> dict:
        """The model's manifest entries (:func:`~hooked_vlm.studies.runs.model_facts`) and where it runs."""
        import hooked_vlm

        return {**model_facts(self.model), "where": self.where, "hooked_vlm": hooked_vlm.__version__}

    def run_chunk(self, chunk: int, die: bool = False) -> tuple[int, int, float, str, str]:
        """Compute and write ``chunk``; returns ``(chunk, n_rows, seconds, file name, where)``. ``die`` ends the
        process after the chunk's first record (the tests' stand-in for a lost worker)."""
        if self.plan is None:
            plan = plan_run(self.run_dir, self.args)  # the identity checks of the driver, seen from this node
            if plan.old is None:
                raise RunError(f"The run directory {self.run_dir} has no manifest on the worker {self.where}, "
                               "though the driver wrote one: it must be on a filesystem shared by every node.")
            self.plan, self.ctx = plan, plan.context()
        t0 = time.perf_counter()
        path, n_rows = compute_chunk(self.plan, self.model, chunk, self.ctx,
                                     on_record=(lambda: os._exit(1)) if die else None)
        return chunk, n_rows, time.perf_counter() - t0, path.name, self.where


def run_ray(run_dir: str | Path, args: RunArgs, *, workers: int | None = None, address: str | None = None,
            argv: list[str] | None = None, max_restarts: int | None = None,
            _die_once: Collection[int] = ()) -> Path:
    """Run (or resume) ``args`` into ``run_dir`` on Ray actors; returns ``run_dir``. Rows and files equal those
    of :func:`~hooked_vlm.studies.runs.execute` with the local backend.

    Args:
        run_dir: the run directory, on a filesystem shared by the driver and every Ray node.
        args: the run; its chunks of ``args.shard`` are computed (all of them by default).
        workers: actors, one model copy each (capped at the chunks to do). Without ``address``: a local Ray
            instance is started with ``workers`` CPUs (default: the machine's CPU count). With ``address``: default
            the cluster's GPUs when ``args.device`` is CUDA, else its nodes. Each actor asks for one CPU, and
            one GPU when ``args.device`` starts with ``cuda`` (give ``cuda``: Ray shows each actor its own GPU).
            When Ray is already initialised in this process, that instance is used.
        address: an existing Ray cluster (``ray.init(address=...)``, e.g. ``auto`` or ``ray://host:10001``).
        argv: the command line, stored in a new manifest.
        max_restarts: actors started in place of dead ones (default: ``workers``).

    Raises:
        OptionalDependencyError: Ray is not installed.
        RunError: as :func:`~hooked_vlm.studies.runs.execute`; an actor whose weights differ from the run's; a run
            directory that an actor cannot see; every actor dead with chunks left (the chunks written stay: run
            the same command again to resume).
    """
    ray = import_ray()
    from tqdm.auto import tqdm

    import hooked_vlm

    if workers is not None and workers < 1:
        raise RunError(f"workers must be at least 1, got {workers}.")
    plan = plan_run(run_dir, args)  # arguments, data, run directory: checked before Ray starts
    mine, todo = pending_chunks(plan)
    started = False
    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False)
        else:
            ray.init(address=address)
        started = True
    try:
        cuda = str(args.device or "cpu").startswith("cuda")
        if workers is None:
            if address is None and started:
                workers = os.cpu_count() or 1
            else:
                resources = ray.cluster_resources()
                workers = int(resources.get("GPU", 0)) if cuda else sum(1 for n in ray.nodes() if n.get("Alive"))
                workers = max(1, workers)
        kind = "GPU" if cuda else "CPU"
        room = int(ray.cluster_resources().get(kind, 0))
        if room < 1:
            raise RunError(f"--device {args.device} asks one {kind} per Ray actor, but the Ray cluster has no {kind}.")
        if workers > room:
            tqdm.write(f"{workers} workers asked, the Ray cluster has {room} {kind}(s): {room} actor(s)",
                       file=sys.stderr)
        n_actors = max(1, min(workers, room, len(todo)))
        restarts_left = n_actors if max_restarts is None else max_restarts
        actor_class = ray.remote(ChunkWorker).options(num_cpus=1, num_gpus=1 if cuda else 0, max_restarts=0)
        actors: list = [None] * n_actors
        inflight: dict = {}  # object ref -> (slot, chunk or None for the model facts)
        queue, idle, died_once = deque(todo), [], set()
        manifest = plan.old

        def start(slot: int) -> None:
            actors[slot] = actor_class.remote(str(plan.run_dir), args)
            inflight[actors[slot].facts.remote()] = (slot, None)

        def give(slot: int) -> None:
            if not queue:
                idle.append(slot)
                return
            chunk = queue.popleft()
            die = chunk in _die_once and chunk not in died_once
            died_once.add(chunk)
            inflight[actors[slot].run_chunk.remote(chunk, die)] = (slot, chunk)

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="chunk", desc=f"{plan.study.name} (ray)",
                   disable=not args.progress, file=sys.stderr)
        tqdm.write(f"{plan.run_dir}: {len(todo)} of {len(mine)} chunks to do on {n_actors} Ray actor(s)",
                   file=sys.stderr)
        try:
            for slot in range(n_actors):
                start(slot)
            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                slot, chunk = inflight.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except ray.exceptions.RayActorError as err:
                    ray.kill(actors[slot], no_restart=True)
                    actors[slot] = None
                    if chunk is not None and (plan.run_dir / chunk_name(chunk, args.shard)).is_file():
                        bar.update(1)
                        tqdm.write(f"Ray actor {slot} died after writing chunk {chunk + 1} ({type(err).__name__})",
                                   file=sys.stderr)
                    elif chunk is not None:
                        queue.appendleft(chunk)
                        tqdm.write(f"Ray actor {slot} died on chunk {chunk + 1} ({type(err).__name__}); chunk "
                                   f"{chunk + 1} re-queued", file=sys.stderr)
                    else:
                        tqdm.write(f"Ray actor {slot} died loading the model ({type(err).__name__})", file=sys.stderr)
                    while queue and idle:
                        give(idle.pop())
                    if restarts_left > 0 and (queue or manifest is None):
                        restarts_left -= 1
                        start(slot)
                    elif not inflight and (queue or manifest is None):
                        raise RunError(f"Every Ray actor died with {len(queue)} chunk(s) of {plan.run_dir} left; the "
                                       "chunks written are kept: run the same command again to resume.") from err
                    continue
                except ray.exceptions.RayTaskError as err:
                    if isinstance(err.cause, HookedVLMError):
                        raise err.cause from None
                    raise
                if chunk is None:
                    who = f" (Ray actor on {result['where']})"
                    if result["hooked_vlm"] != hooked_vlm.__version__:
                        raise RunError(f"The Ray actor on {result['where']} has hooked_vlm {result['hooked_vlm']}, the "
                                       f"driver {hooked_vlm.__version__}: install the same version on every node.")
                    if manifest is None:
                        manifest = commit_manifest(plan, result, argv)
                    else:
                        check_model(plan.run_dir, manifest, result, who)
                    give(slot)
                else:
                    _, n_rows, seconds, name, where = result
                    bar.update(1)
                    line = chunk_line(plan, chunk, n_rows, seconds, plan.run_dir / name, f" [actor {slot}, {where}]")
                    tqdm.write(line, file=sys.stderr)
                    give(slot)
            if queue:  # unreachable: a death with chunks left restarts an actor or raises
                raise RunError(f"{len(queue)} chunk(s) of {plan.run_dir} were not run; run the same command again.")
        finally:
            bar.close()
            for actor in actors:
                if actor is not None:
                    ray.kill(actor, no_restart=True)
    finally:
        if started:
            ray.shutdown()
    return plan.run_dir

