"""Pipeline parallelism on torch.distributed.pipelining: stages, schedules (1F1B, interleaved, ZB1P, DualPipeV),
the PP × EP × DP Strategy with ZeRO-1, resharding checkpoints, and the measured schedule — docs/dualpipe.md.

* ``stages``     — :class:`StageModel` / :class:`StageChunk`: a CausalLM cut by layer ranges (``--pp-layers`` or the
  planner's FLOP-balanced split), the shared embedding, what crosses a stage boundary;
* ``schedules``  — the schedule table, stage placement (loop / V), micro-batch rules, :class:`TimedStage`;
* ``overlap``    — DualPipe's overlapped forward/backward chunk pair (the EP all-to-all of one micro-batch in
  flight while another computes);
* ``zero``       — ZeRO-1 with torch's ZeroRedundancyOptimizer over each parameter's replica group;
* ``strategy``   — :class:`PipelineStrategy`, the trainer's Strategy for PP × EP × DP;
* ``checkpoint`` — collective save/load in the single-process format (any layout resumes any other);
* ``timeline``   — busy / idle per rank from the chunk events, the timeline plot.
"""

from latentmoe.parallel.pp.schedules import SCHEDULE_NAMES, TimedStage, schedule_kind, stage_to_rank
from latentmoe.parallel.pp.stages import StageChunk, StageModel, StageSpec, layer_split, stage_specs
from latentmoe.parallel.pp.strategy import PipelineConfig, PipelineStrategy

__all__ = [
    "SCHEDULE_NAMES",
    "PipelineConfig",
    "PipelineStrategy",
    "StageChunk",
    "StageModel",
    "StageSpec",
    "TimedStage",
    "layer_split",
    "schedule_kind",
    "stage_specs",
    "stage_to_rank",
]
