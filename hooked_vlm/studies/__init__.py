"""The papers' experiments over data sets as named, resumable runs (see docs/studies.md).

- :data:`STUDIES`: name -> :class:`Study` (its options with defaults; ``STUDIES[name].__doc__`` names the paper
  figure it reproduces);
- :func:`run_study`: one study on records in memory, a long-form DataFrame;
- :func:`execute`: a run into a run directory (manifest + Parquet chunks), resumable, sharded (``RunArgs.shard``)
  or on Ray actors (``backend="ray"``, see docs/scale.md);
- :func:`load`: the rows of a run directory.
"""

from hooked_vlm.studies.recipes import STUDIES, Study, run_study
from hooked_vlm.studies.records import DataSpec, captions_of
from hooked_vlm.studies.runs import RunArgs, execute, load, read_manifest

__all__ = ["STUDIES", "DataSpec", "RunArgs", "Study", "captions_of", "execute", "load", "read_manifest", "run_study"]
