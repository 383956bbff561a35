"""The papers' analyses: each a hook factory, a runner returning a result with ``.to_frame()``/``.plot()``,
and an aggregation over records (see docs/analyses.md)."""

from hooked_vlm.analysis.base import Aggregate, AnalysisResult, aggregate, correct_only, record_inputs
from hooked_vlm.analysis.contextualization import (
    contextualization,
    contextualization_batch,
    contextualization_over,
    find_phases,
)
from hooked_vlm.analysis.knockout import aggregate_knockout, attention_knockout, knockout_flows, object_patches
from hooked_vlm.analysis.logit_lens import (
    answer_probability,
    answer_probability_batch,
    answer_probability_over,
    logit_lens,
    logit_lens_batch,
    visual_verbalization,
    visual_verbalization_batch,
    visual_verbalization_over,
)
from hooked_vlm.analysis.norm_attention import norm_attention, norm_attention_batch
from hooked_vlm.analysis.truncation import (
    aggregate_truncation,
    image_token_masking,
    image_token_truncation,
    plateau_point,
    tokens_for_fraction,
)

__all__ = [
    "Aggregate",
    "AnalysisResult",
    "aggregate",
    "aggregate_knockout",
    "aggregate_truncation",
    "answer_probability",
    "answer_probability_batch",
    "answer_probability_over",
    "attention_knockout",
    "contextualization",
    "contextualization_batch",
    "contextualization_over",
    "correct_only",
    "find_phases",
    "image_token_masking",
    "image_token_truncation",
    "knockout_flows",
    "logit_lens",
    "logit_lens_batch",
    "norm_attention",
    "norm_attention_batch",
    "object_patches",
    "plateau_point",
    "record_inputs",
    "tokens_for_fraction",
    "visual_verbalization",
    "visual_verbalization_batch",
    "visual_verbalization_over",
]
