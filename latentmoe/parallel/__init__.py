"""Expert and pipeline parallelism on torch.distributed: topology, dispatch/combine, traffic accounting, EPLB,
overlap, pipeline stages and schedules.

docs/expert-parallel.md explains the design. The pieces:

* ``runtime``   — process lifecycle: :func:`init_distributed` (gloo on CPU, NCCL on CUDA), barrier, shutdown,
  collective timeouts and :class:`CollectiveError`;
* ``topology``  — :class:`Topology` (nodes × ranks per node, EP and expert-DP groups), :func:`build_groups`;
* ``comm``      — differentiable uneven all-to-all of rows, sync or async, with payload codecs (``payload``);
* ``ep``        — :class:`ExpertParallel`, the ``MoE.expert_parallel`` hook, and :func:`enable_expert_parallel`;
* ``traffic``   — :class:`TrafficCounters`: bytes per rank by link class (local / intra-node / inter-node),
  dispatch / combine / backward, the DeepEP-style two-hop count;
* ``eplb``      — :func:`rebalance_experts` (DeepSeek's EPLB as a pure function) and placements;
* ``strategy``  — :class:`ExpertParallelStrategy`, the trainer's Strategy for EP + DP runs (batch sharding,
  gradient reduction, global grad norm, metrics), and :func:`start_strategy`;
* ``checkpoint`` — the collective steps of sharded checkpoints (the format is ``latentmoe.checkpoint``'s);
* ``report``    — ``latentmoe ep-report RUN_DIR``;
* ``grads``     — dense / routed-expert gradient reductions shared by the strategies;
* ``pp``        — pipeline parallelism on torch.distributed.pipelining (stages, schedules incl. DualPipeV, the
  PP × EP × DP strategy with ZeRO-1, resharding checkpoints, the measured schedule): docs/dualpipe.md.

Nothing here runs at import time; torch.distributed is started only by :func:`init_distributed`.
"""

from latentmoe.parallel.comm import CommClock, PendingExchange, exchange, exchange_counts, exchange_start
from latentmoe.parallel.ep import (
    DispatchPlan,
    ExpertParallel,
    ExpertPlacement,
    apply_placement,
    choose_slots,
    enable_expert_parallel,
    local_experts_forward,
    plan_dispatch,
    total_traffic,
)
from latentmoe.parallel.eplb import EplbResult, rank_loads, rebalance_experts
from latentmoe.parallel.payload import Codec
from latentmoe.parallel.runtime import CollectiveError, collective_errors, init_distributed
from latentmoe.parallel.strategy import ExpertParallelStrategy, ParallelConfig, start_strategy
from latentmoe.parallel.topology import (
    ProcessGroups,
    Topology,
    TopologyError,
    build_groups,
    experts_per_rank,
)
from latentmoe.parallel.traffic import (
    LinkBytes,
    TrafficCounters,
    TrafficSummary,
    link_bytes,
    node_fanout,
    node_limit,
    summarize_over_ranks,
)

__all__ = [
    "Codec",
    "CollectiveError",
    "CommClock",
    "DispatchPlan",
    "EplbResult",
    "ExpertParallelStrategy",
    "ExpertParallel",
    "ExpertPlacement",
    "LinkBytes",
    "ParallelConfig",
    "PendingExchange",
    "ProcessGroups",
    "Topology",
    "TopologyError",
    "TrafficCounters",
    "TrafficSummary",
    "apply_placement",
    "build_groups",
    "choose_slots",
    "collective_errors",
    "enable_expert_parallel",
    "exchange",
    "exchange_counts",
    "exchange_start",
    "experts_per_rank",
    "init_distributed",
    "link_bytes",
    "local_experts_forward",
    "node_fanout",
    "node_limit",
    "plan_dispatch",
    "rank_loads",
    "rebalance_experts",
    "start_strategy",
    "summarize_over_ranks",
    "total_traffic",
]
