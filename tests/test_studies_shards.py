"""Sharded runs: three shards (the last two from SLURM array variables) into one run directory give the rows of an
unsharded run; bad SLURM variables are named; Ray is never imported unless asked for."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hooked_vlm import HookedVLM, OptionalDependencyError, RunError
from hooked_vlm.cli import main
from hooked_vlm.studies import DataSpec, RunArgs, execute, load
from hooked_vlm.studies.runs import MANIFEST, SLURM_VARS, chunk_files, commit_manifest, plan_run, slurm_shard

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 5


def _argv(out, *extra):
    return ["run", "norm-attention", "--model", "shapes-llava", "--data", "shapes", "--limit", str(LIMIT),
            "--seed", "2", "--chunk-size", "1", "--out", str(out), "--no-progress", *extra]


@pytest.fixture
def no_slurm(monkeypatch):
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_three_shards_equal_one_run(tmp_path, capsys, no_slurm):
    reference = tmp_path / "one"
    model = HookedVLM.from_pretrained("shapes-llava", device="cpu", progress=False)
    execute(reference, RunArgs("norm-attention", "shapes-llava", DataSpec("shapes", limit=LIMIT, seed=2), {},
                               chunk_size=1, progress=False), model=model)
    expected = load(reference)

    out = tmp_path / "sharded"
    assert main(_argv(out, "--shard", "0/3")) == 0
    assert "3 chunk(s) of other shards to go" in capsys.readouterr().err
    # --array=1-3: task ids 1..3 are shards 0..2; SLURM_ARRAY_TASK_COUNT unset, derived from MIN and MAX
    no_slurm.setenv("SLURM_ARRAY_TASK_MIN", "1")
    no_slurm.setenv("SLURM_ARRAY_TASK_MAX", "3")
    no_slurm.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert main(_argv(out)) == 0
    err = capsys.readouterr().err
    assert "shard 2/3 taken from SLURM (SLURM_ARRAY_TASK_ID=3)" in err and "chunk 3/5" in err
    partial = load(out)
    assert not partial.attrs["complete"] and list(partial.attrs["records"]["record"]) == [0, 2, 3]
    assert main(["report", str(out)]) == 0
    assert "id='incomplete'" in (out / "report.html").read_text(encoding="utf-8")

    no_slurm.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert main(_argv(out)) == 0
    err = capsys.readouterr().err
    assert "shard 1/3 taken from SLURM" in err and "run complete" in err
    names = sorted(p.name for p in chunk_files(out).values())
    assert names == ["rows-000000-shard-0of3.parquet", "rows-000001-shard-1of3.parquet",
                     "rows-000002-shard-2of3.parquet", "rows-000003-shard-0of3.parquet",
                     "rows-000004-shard-1of3.parquet"]
    rows = load(out)
    assert rows.attrs["complete"] and len(rows) > 0
    pd.testing.assert_frame_equal(rows, expected, check_exact=False, rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(rows.attrs["records"], expected.attrs["records"])
    assert rows.attrs["manifest"]["weights"] == expected.attrs["manifest"]["weights"]

    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "plotly" in page and "id='incomplete'" not in page

    assert main(_argv(out, "--shard", "1/3")) == 0  # --shard wins over SLURM; all written: a no-op
    err = capsys.readouterr().err
    assert "taken from SLURM" not in err and "resuming, 2 of 2 chunks already written" in err and "chunk 2/5" not in err
    pd.testing.assert_frame_equal(load(out), rows)


@pytest.mark.parametrize("env, shard", [
    ({}, None),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4"}, (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "6",
      "SLURM_ARRAY_TASK_STEP": "2"}, (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
      "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": " 0 ", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "",
      "SLURM_JOB_ID": "77"}, (0, 1)),
])
def test_slurm_shard(env, shard):
    assert slurm_shard(env) == shard


@pytest.mark.parametrize("env, culprit", [
    ({"SLURM_ARRAY_TASK_ID": "two", "SLURM_ARRAY_TASK_COUNT": "4"}, "SLURM_ARRAY_TASK_ID='two'"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4.0"}, "SLURM_ARRAY_TASK_COUNT='4.0'"),
    ({"SLURM_ARRAY_TASK_ID": "1"}, "neither SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX"),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"}, "SLURM_ARRAY_TASK_ID=4 gives shard 4"),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"},
     "SLURM_ARRAY_TASK_ID=0 is not in the array"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2",
      "SLURM_ARRAY_TASK_COUNT": "4"}, "SLURM_ARRAY_TASK_ID=3 is not in the array"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_STEP": "0", "SLURM_ARRAY_TASK_COUNT": "4"},
     "SLURM_ARRAY_TASK_STEP=0"),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4"},
     "SLURM_ARRAY_TASK_MAX=4 does not fit"),
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
      "SLURM_ARRAY_TASK_COUNT": "3"}, "SLURM_ARRAY_TASK_COUNT=3 but .* spans 7 tasks"),  # --array=1,2,7
])
def test_bad_slurm_variables_are_named(env, culprit):
    with pytest.raises(RunError, match=culprit):
        slurm_shard(env)


@settings(max_examples=30, deadline=None)
@given(low=st.integers(0, 50), step=st.integers(1, 5), count=st.integers(1, 12), with_count=st.booleans())
def test_slurm_tasks_cover_every_shard_once(low, step, count, with_count):
    high = low + (count - 1) * step
    shards = []
    for task in range(low, high + 1, step):
        env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(low), "SLURM_ARRAY_TASK_MAX": str(high),
               "SLURM_ARRAY_TASK_STEP": str(step)}
        if with_count:
            env["SLURM_ARRAY_TASK_COUNT"] = str(count)
        shards.append(slurm_shard(env))
    assert shards == [(i, count) for i in range(count)]


def test_bad_slurm_variables_on_the_command_line(tmp_path, capsys, no_slurm):
    no_slurm.setenv("SLURM_ARRAY_TASK_ID", "9")
    no_slurm.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    out = tmp_path / "x"
    assert main(_argv(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "SLURM_ARRAY_TASK_ID=9 gives shard 9" in err
    assert not out.exists()


def test_backend_arguments(tmp_path, capsys, monkeypatch):
    out = tmp_path / "x"
    assert main(_argv(out, "--workers", "2")) == 2
    assert "--workers and --address go with --backend ray" in capsys.readouterr().err
    args = RunArgs("norm-attention", "shapes-llava", DataSpec("shapes", limit=1), {}, progress=False)
    with pytest.raises(RunError, match="Unknown backend 'dask'"):
        execute(out, args, backend="dask")
    with pytest.raises(RunError, match="pass no model"):
        execute(out, args, backend="ray", model=object())
    with pytest.raises(RunError, match="backend='ray' only"):
        execute(out, args, address="auto", model=object())
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(OptionalDependencyError, match=r"pip install 'hooked-vlm\[ray\]'"):
        execute(out, args, backend="ray", workers=2)
    assert main(_argv(out, "--backend", "ray")) == 2
    assert "pip install 'hooked-vlm[ray]'" in capsys.readouterr().err
    assert not out.exists()


def test_ray_is_imported_only_when_asked_for(tmp_path):
    code = ("import sys\nimport hooked_vlm, hooked_vlm.cli\nassert 'ray' not in sys.modules\n"
            "from hooked_vlm.cli import main\n"
            f"assert main({_argv(tmp_path / 'run')!r}) == 0\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert (tmp_path / "run" / MANIFEST).is_file()


def test_shards_starting_together_never_overwrite_the_manifest(tmp_path):
    """Two shards plan a new run before either wrote the manifest (the model loads in between): the second
    joins the first's run, or is refused if its arguments or weights differ; the manifest stays the first's."""
    out = tmp_path / "run"
    facts = {"weights": "w1", "dtype": "torch.float32", "model_config": {}, "device": "cpu"}

    def args(limit=2, shard=(0, 2)):
        return RunArgs("norm-attention", "shapes-llava", DataSpec("shapes", limit=limit), {}, chunk_size=1,
                       shard=shard)

    first, same, other_data, other_weights = (plan_run(out, args()), plan_run(out, args(shard=(1, 2))),
                                              plan_run(out, args(limit=3)), plan_run(out, args(shard=(1, 2))))
    assert first.old is None and same.old is None and other_data.old is None
    written = commit_manifest(first, facts, ["first"])
    text = (out / MANIFEST).read_text()
    assert commit_manifest(same, facts, ["second"]) == written
    with pytest.raises(RunError, match="n_records: 2 in the run directory, 3 now"):
        commit_manifest(other_data, facts, ["third"])
    with pytest.raises(RunError, match="other model weights; it differs in weights: \"w1\" in the run directory"):
        commit_manifest(other_weights, {**facts, "weights": "w2"}, ["fourth"])
    assert (out / MANIFEST).read_text() == text and sorted(p.name for p in out.iterdir()) == [MANIFEST]
