"""The Ray backend on a local Ray instance with two CPU workers: its rows equal a local run's, row for row, also
when it resumes a local run's directory and when a worker process dies in the middle of a chunk."""

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="the Ray backend needs ray (pip install 'hooked-vlm[ray]'; in the dev extra)")

from hooked_vlm import HookedVLM, RunError  # noqa: E402
from hooked_vlm.studies import DataSpec, RunArgs, execute, load  # noqa: E402
from hooked_vlm.studies.ray_backend import run_ray  # noqa: E402
from hooked_vlm.studies.runs import MANIFEST, chunk_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 4


def _args(shard=(0, 1)):
    return RunArgs("norm-attention", "shapes-llava", DataSpec("shapes", limit=LIMIT, seed=5), {}, chunk_size=1,
                   shard=shard, progress=False)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance (two CPUs) for the module; its workers import this checkout's hooked_vlm."""
    patch = pytest.MonkeyPatch()
    patch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    patch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
    patch.undo()


@pytest.fixture(scope="module")
def model():
    return HookedVLM.from_pretrained("shapes-llava", device="cpu", progress=False)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, model):
    out = tmp_path_factory.mktemp("local") / "run"
    execute(out, _args(), model=model)
    return out


@pytest.fixture(scope="module")
def reference(reference_dir):
    return load(reference_dir)


def _same(rows, reference):
    assert rows.attrs["complete"] and len(rows) > 0
    pd.testing.assert_frame_equal(rows, reference, check_exact=False, rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(rows.attrs["records"], reference.attrs["records"])
    assert rows.attrs["manifest"]["weights"] == reference.attrs["manifest"]["weights"]


def test_ray_run_equals_local_run(local_ray, reference, tmp_path, capsys):
    fresh = tmp_path / "ray"
    execute(fresh, _args(), backend="ray", workers=2)
    err = capsys.readouterr().err
    assert "4 of 4 chunks to do on 2 Ray actor(s)" in err and "chunk 4/4" in err
    _same(load(fresh), reference)
    assert sorted(p.name for p in chunk_files(fresh).values()) == [f"rows-{c:06d}-shard-0of1.parquet"
                                                                   for c in range(LIMIT)]


def test_ray_resumes_a_local_run(local_ray, reference, model, tmp_path, capsys):
    resumed = tmp_path / "resumed"  # half written locally (shard 0/2), finished by Ray
    execute(resumed, _args(shard=(0, 2)), model=model)
    capsys.readouterr()
    run_ray(resumed, _args(), workers=1)
    err = capsys.readouterr().err
    assert "2 of 4 chunks to do on 1 Ray actor(s)" in err and "chunk 2/4" in err and "chunk 1/4" not in err
    _same(load(resumed), reference)


def test_a_dead_worker_s_chunk_is_run_again(local_ray, reference, tmp_path, capsys):
    out = tmp_path / "ray"
    run_ray(out, _args(), workers=2, _die_once={1})  # the actor given chunk index 1 exits after its first record
    err = capsys.readouterr().err
    assert "died on chunk 2" in err and "chunk 2 re-queued" in err
    assert err.count("chunk 2/4: records 1-1") == 1
    _same(load(out), reference)
    assert not list(out.glob(".rows-*"))  # no temporary file left behind


def test_ray_refuses_a_directory_of_other_weights_or_data(local_ray, reference_dir, tmp_path):
    out = Path(shutil.copytree(reference_dir, tmp_path / "other"))
    for path in list(chunk_files(out).values())[2:]:
        path.unlink()
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["weights"] = "0" * 64
    (out / MANIFEST).write_text(json.dumps(manifest))
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(RunError, match=r"other model weights \(Ray actor on .*differs in weights: \"0000"):
        run_ray(out, _args(), workers=1)
    other = RunArgs("norm-attention", "shapes-llava", DataSpec("shapes", limit=LIMIT, seed=6), {}, chunk_size=1,
                    progress=False)
    with pytest.raises(RunError, match="data_fingerprint"):  # checked before any actor starts
        run_ray(out, other, workers=2)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
