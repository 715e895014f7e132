"""The pipeline Strategy: PP × EP × DP on one torchrun world, with ZeRO-1 over each stage's replicas.

One optimizer step on a rank of stage group ``q`` (``D·P`` ranks holding the same layers), given the global
batch ``ids [B, S]`` (the same pure function of (seed, step) on every rank)::

    ids_b    = ids[i·B/(D·P) : (i+1)·B/(D·P)]       i = the rank's place in its stage; its pipeline's rows
    schedule.step(ids_b)                             torch.distributed.pipelining: n micro-batches of ids_b through
                                                     the Q ranks of the pipeline, forward + backward interleaved by
                                                     the schedule (1F1B, interleaved, ZB1P, DualPipeV); the last
                                                     stage computes each micro-batch's loss; grads ÷ n by torch
    losses, stop     all-reduced over the world      (only last-stage ranks hold losses) → global means
    expert load      all-reduced over the world      each rank adds the rows of its own MoE layers
    embedding grad   summed over {first, last}       only when the two sit on different pipeline ranks
    dense grads      all-reduce(SUM) over the stage ÷ D·P       = grad of the global mean loss
    expert grads     all-reduce(SUM) over expert-DP ÷ D·P
    grad norm²       Σ stage (dense² + Σ EP expert²) over the pipeline    every rank clips by the same factor
    ZeRO-1 step      each parameter's AdamW state lives on one rank of its replica group
                     (torch's ZeroRedundancyOptimizer), which steps it and broadcasts the new weights
    router biases    every rank updates its own MoE layers from the global load

With fp32 payloads every step's loss equals the single-process run's within float rounding (tests: 1e-5
relative), for every schedule. Checkpoints are the single-process format (``latentmoe.parallel.pp.checkpoint``),
so a run saved at one layout resumes at any other. The schedule's chunk events give the measured bubble
(``pp_*`` metrics, ``pp_timeline.json``; ``latentmoe.parallel.pp.timeline``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from latentmoe.config import ConfigError, ModelConfig
from latentmoe.io import write_json_atomic
from latentmoe.model.mtp import next_token_loss
from latentmoe.parallel.ep import enable_expert_parallel, exposed_comm_seconds, moe_layers, reset_traffic
from latentmoe.parallel.grads import all_reduce_grads, split_named_params, sum_sq
from latentmoe.parallel.pp.schedules import (
    ForwardOnlySchedule,
    StepRecorder,
    TimedStage,
    check_microbatches,
    default_microbatches,
    meta_like,
    schedule_kind,
    stage_to_rank,
)
from latentmoe.parallel.pp.stages import EMBEDDING, StageModel, layer_split, stage_specs
from latentmoe.parallel.pp.timeline import TimelineWindow, replay_idle
from latentmoe.parallel.runtime import collective_errors, comm_device
from latentmoe.parallel.topology import ProcessGroups, build_pair_groups, experts_per_rank
from latentmoe.train import LossStats, StepLoss, StepStats, build_optimizer, claim_run_file

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s epsilon, so the clip factor matches the single process
LAYOUT_FILE = "pp_layout.json"


@dataclass(frozen=True)
class PipelineConfig:
    """The pipeline half of a layout (the CLI's ``--pp``, ``--pp-schedule``, ``--microbatches``, ``--pp-layers``).

    schedule: 1f1b | interleaved | zb | dualpipev; microbatches: per pipeline per step (None: the fewest that keep
    every stage busy); layers: decoder layers per virtual stage (None: balanced by the planner's FLOPs);
    seq_len: the window length the split is balanced for; zero: ZeRO-1 (optimizer state sharded over each
    parameter's replicas); overlap_f_b: run DualPipeV's paired forward/backward chunks overlapped.
    """

    pp: int = 1
    schedule: str = "1f1b"
    microbatches: int | None = None
    layers: tuple[int, ...] | None = None
    seq_len: int = 128
    zero: bool = True
    overlap_f_b: bool = False

    def validate(self) -> PipelineConfig:
        schedule_kind(self.schedule)
        if self.overlap_f_b and self.schedule != "dualpipev":
            raise ConfigError("the forward/backward chunk overlap exists only in --pp-schedule dualpipev")
        return self


@dataclass
class _Built:
    """A schedule built for one micro-batch shape (torch needs the shapes at construction)."""

    schedule: Any
    stages: list[TimedStage]
    n_microbatches: int


@dataclass
class _Window:
    """Per-logging-window sums of this rank's pipeline timing."""

    timeline: TimelineWindow = field(default_factory=TimelineWindow)
    exposed_s: float = 0.0


class PipelineStrategy:
    """The :class:`~latentmoe.train.strategy.Strategy` of a PP × EP × DP run (see the module docstring).

    groups: this rank's groups (``build_groups`` of a topology with ``pp_size > 1``); parallel: the EP half
    (``latentmoe.parallel.strategy.ParallelConfig``); pipeline: the PP half.
    """

    def __init__(self, groups: ProcessGroups, parallel, pipeline: PipelineConfig) -> None:
        self.groups = groups
        self.parallel = parallel
        self.pipeline = pipeline.validate()
        self.topology = groups.topology
        self.world_size = self.topology.world_size
        self.is_main = self.topology.rank == 0
        self.kind = schedule_kind(pipeline.schedule)
        self.n_stages = self.kind.per_rank * self.topology.pp_size
        self.placement = stage_to_rank(self.n_stages, self.topology.pp_size, self.kind.style)
        self.device = comm_device()
        self.recorder = StepRecorder()
        self._built: dict[tuple, _Built] = {}
        self._window = _Window()
        self.tie_group = None
        self.counts: list[int] = []
        self.last_events: list = []
        self.last_step_s = 0.0
        self._n_microbatches = 1

    # ------------------------------------------------------------------ model and data
    def prepare_model(self, model: nn.Module) -> StageModel:
        """Cut ``model`` (the full CausalLM, identical on every rank) to this rank's stages; shard its experts."""
        config: ModelConfig = model.config
        self.counts = layer_split(config, self.n_stages, self.pipeline.layers, seq_len=self.pipeline.seq_len)
        specs = stage_specs(self.counts)
        mine = [s for s in specs if self.placement[s.index] == self.topology.pp_rank]
        first_rank, last_rank = self.placement[0], self.placement[-1]
        shares = bool(config.num_nextn_predict_layers) or config.tie_word_embeddings
        replicate = shares and first_rank != last_rank
        if replicate:  # collective on every rank, in the same order
            self.tie_group = build_pair_groups(self.topology, (first_rank, last_rank))
        stage_model = StageModel(model, mine, replicate_embedding=replicate)
        self.replicated_embedding = replicate and stage_model.holds_last and not stage_model.holds_first
        self.holds_shared_embedding = replicate and (stage_model.holds_first or stage_model.holds_last)
        if self.topology.ep_size > 1:
            for moe in moe_layers(stage_model):
                experts_per_rank(moe.config.n_routed_experts, self.topology.ep_size)
            enable_expert_parallel(
                stage_model, self.groups, dispatch=self.parallel.dispatch, combine=self.parallel.combine,
                overlap=self.parallel.overlap,
            )
        self.recorder.clock = lambda: exposed_comm_seconds(stage_model)
        return stage_model

    def make_optimizer(self, model: nn.Module, **kw: Any) -> torch.optim.Optimizer:
        if not self.pipeline.zero:
            return build_optimizer(model, **kw)
        from latentmoe.parallel.pp.zero import zero_optimizer

        return zero_optimizer(model, self.groups, **kw)

    def shard_batch(self, ids_BS: torch.Tensor) -> torch.Tensor:
        """This rank's pipeline's rows of the global batch."""
        B, n = ids_BS.shape[0], self.topology.stage_size
        if B % n:
            raise ConfigError(
                f"batch_size ({B}) must be a multiple of the data-parallel ranks of a stage ({n}): it is the "
                "global batch, split evenly over the pipelines"
            )
        b = B // n
        i = self.topology.stage_rank
        return ids_BS[i * b : (i + 1) * b]

    def batch_rows(self) -> tuple[int, int]:
        """This rank's pipeline reads its share of the global batch (the split :meth:`shard_batch` makes): every
        stage of one pipeline reads the same rows."""
        return self.topology.stage_rank, self.topology.stage_size

    def begin_step(self, model: nn.Module) -> None:
        reset_traffic(model)

    def end_step(self, model: nn.Module) -> None:
        self._window.exposed_s += exposed_comm_seconds(model)

    # ------------------------------------------------------------------ the schedule
    def _schedule(self, model: StageModel, ids_bS: torch.Tensor, *, train: bool) -> _Built:
        rows, S = ids_bS.shape
        n_mb = self.pipeline.microbatches or default_microbatches(rows, self.kind, self.topology.pp_size)
        check_microbatches(n_mb, rows, self.kind, self.topology.pp_size)
        key = (rows, S, train)
        if key in self._built:
            return self._built[key]
        mb, D = rows // n_mb, model.config.hidden_size
        hidden = tuple(meta_like(shape, torch.float32, requires_grad=train) for shape in ((mb, S, D), (1,)))
        stages = []
        for chunk in model.chunks:
            spec = chunk.spec
            inputs = (meta_like((mb, S), ids_bS.dtype),) if spec.first else hidden
            outputs = meta_like((), torch.float32, requires_grad=train) if spec.last else hidden
            stages.append(TimedStage(
                chunk, spec.index, self.n_stages, ids_bS.device, input_args=inputs, output_args=outputs,
                group=self.groups.pp, recorder=self.recorder,
            ))
        if not train:
            schedule = ForwardOnlySchedule(stages, n_mb, placement=self.placement, loss_fn=_loss_of_output)
        else:
            cls = self.kind.torch_class
            arg = stages if self.kind.takes_list else stages[0]
            # Gradients are summed over the micro-batches and divided once, in reduce_and_clip: torch's scaling
            # divides a parameter once per stage that holds it (twice for the V's shared embedding).
            schedule = cls(arg, n_microbatches=n_mb, loss_fn=_loss_of_output, scale_grads=False)
        if self.pipeline.overlap_f_b and train:
            from latentmoe.parallel.pp.overlap import register_overlap

            register_overlap(schedule, model)
        built = _Built(schedule, stages, n_mb)
        self._built[key] = built
        return built

    def forward_backward(self, model: StageModel, ids_bS: torch.Tensor, loss_fn, *, forward_context,
                         stop: bool, loss_mask_bS: torch.Tensor | None = None) -> StepStats:
        """Run the schedule over this pipeline's rows; reduce the losses and the load over the world."""
        if loss_mask_bS is not None:
            raise ConfigError("a loss mask (--sft) is not supported with --pp yet; fine-tune without --pp")
        built = self._schedule(model, ids_bS, train=True)
        self._n_microbatches = built.n_microbatches
        model.reset_step()
        model.loss_fn, model.forward_context, model.compute_mtp = loss_fn, forward_context, True
        self.recorder.begin()
        built.schedule.step(ids_bS, target=ids_bS, losses=[], return_outputs=False, ids_bS=ids_bS)
        self.last_step_s = time.perf_counter() - self.recorder.t0
        self.last_events = list(self.recorder.events)
        self._window.timeline.add(self.last_events, self.last_step_s)
        stats, stop = self._reduce_losses(model, stop)
        load = model.step_load.to(self.device)
        dist.all_reduce(load, group=self.groups.world)
        return StepStats(stats, load.to(ids_bS.device), stop)

    def _reduce_losses(self, model: StageModel, stop: bool) -> tuple[LossStats, bool]:
        n_mtp = model.config.num_nextn_predict_layers
        width = 3 + n_mtp  # total, main, mtp..., balance
        local = torch.zeros(width + 1, dtype=torch.float64)
        if model.holds_last:
            parts = torch.tensor([[float(x) for x in mb] for mb in model.step_losses], dtype=torch.float64)
            local[:width] = parts.mean(dim=0)
        local[width] = float(stop)
        vec = local.to(self.device)
        dist.all_reduce(vec, group=self.groups.world)
        means = (vec[:width] / self.topology.stage_size).tolist()  # one contribution per pipeline
        stats = LossStats(total=means[0], main=means[1], mtp=means[2 : 2 + n_mtp], balance=means[2 + n_mtp])
        return stats, bool(vec[width] > 0)

    # ------------------------------------------------------------------ gradients
    def reduce_and_clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        dense, expert = split_named_params(model)
        if self.tie_group is not None and self.holds_shared_embedding:
            emb = model.get_parameter(EMBEDDING)
            dist.all_reduce(emb.grad, group=self.tie_group)  # first + last stage's parts of one gradient
        # Σ over micro-batches and pipelines of each micro-batch's mean-loss gradient ÷ their number
        divide_by = self.topology.stage_size * self._n_microbatches
        all_reduce_grads([p for _, p in dense if p.grad is not None], self.groups.stage, divide_by)
        for _, p in expert:  # an expert slice no token reached still steps, as in the single process
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_grads([p for _, p in expert], self.groups.expert_dp, divide_by)
        once = self.replicated_embedding  # the last stage's replica of the embedding is counted on the first
        counted = [p.grad for n, p in dense if p.grad is not None and not (once and n == EMBEDDING)]
        dense_sq = sum_sq(counted, self.device)
        expert_sq = sum_sq((p.grad for _, p in expert), self.device)
        if self.groups.ep is not None:
            dist.all_reduce(expert_sq, group=self.groups.ep)
        total_sq = dense_sq + expert_sq
        dist.all_reduce(total_sq, group=self.groups.pp)  # one value per stage: its dense (identical) + experts
        total = total_sq.sqrt()
        clip = (max_norm / (total + CLIP_EPS)).clamp(max=1.0)
        if math.isfinite(float(total)):
            for _, p in (*dense, *expert):
                if p.grad is not None:
                    p.grad.mul_(clip.to(p.grad.dtype))
        return total

    def all_finite(self, flag: bool) -> bool:
        vec = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(vec, op=dist.ReduceOp.MIN, group=self.groups.world)
        return bool(vec[0] > 0)

    # ------------------------------------------------------------------ evaluation and metrics
    def evaluate(self, model: StageModel, batches: Iterable[torch.Tensor], *, max_batches: int | None,
                 precision: str) -> float:
        """Validation loss (main head) through the pipeline, forward only; averaged over the pipelines."""
        from latentmoe.train.evaluate import autocast

        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        device = next(model.parameters()).device
        try:
            for i, ids in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                ids_b = self.shard_batch(ids.to(device))
                built = self._schedule(model, ids_b, train=False)
                model.reset_step()
                model.loss_fn = _main_loss
                model.forward_context = lambda: autocast(device, precision)
                model.compute_mtp = False
                self.recorder.begin()
                with torch.no_grad():
                    built.schedule.step(ids_b, target=ids_b, losses=[], return_outputs=False, ids_bS=ids_b)
                if model.holds_last:
                    total += float(torch.stack([mb[1] for mb in model.step_losses]).double().mean())
                count += 1
        finally:
            model.train(was_training)
        if count == 0:
            raise ValueError("evaluate() got no validation batches")
        vec = torch.tensor([total / count], dtype=torch.float64, device=self.device)
        dist.all_reduce(vec, group=self.groups.world)
        return float(vec) / self.topology.stage_size

    def window_metrics(self, steps: int) -> dict[str, Any]:
        """``pp_*`` metrics of the window: per rank (lists indexed by global rank) and per step — collective."""
        summary = self._window.timeline.summary()
        mine = torch.tensor([summary["idle_fraction"], summary["busy_s"], summary["step_s"], summary["f_s"],
                             summary["b_s"], summary["w_s"], self._window.exposed_s], dtype=torch.float64,
                            device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine, group=self.groups.world)
        rows = torch.stack(every).cpu()
        # the chunk order of the last step on every rank of pipeline 0, replayed with the formulas' costs
        events = [None] * self.world_size
        dist.all_gather_object(events, [e.to_dict() for e in self.last_events], group=self.groups.world)
        pipeline0 = [events[r] for r in self.topology.pp_group_ranks(0)]
        replayed = replay_idle(pipeline0, self.n_stages) if all(pipeline0) else []
        self._window = _Window()
        n = max(steps, 1)
        return {
            "pp_idle_fraction": [round(x, 5) for x in rows[:, 0].tolist()],
            "pp_idle_fraction_max": float(rows[:, 0].max()),
            "pp_microbatches": self._n_microbatches,
            "pp_replayed_idle_fraction": [round(x, 5) for x in replayed],
            "pp_step_s": float(rows[:, 2].max()) / n,
            "pp_busy_s": [round(x / n, 6) for x in rows[:, 1].tolist()],
            "pp_forward_chunk_s": [round(x, 6) for x in rows[:, 3].tolist()],
            "pp_backward_chunk_s": [round(x, 6) for x in rows[:, 4].tolist()],
            "pp_weight_chunk_s": [round(x, 6) for x in rows[:, 5].tolist()],
            "a2a_exposed_comm_s": float(rows[:, 6].max()) / n,
        }

    # ------------------------------------------------------------------ checkpoints and control
    def save_checkpoint(self, out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        trainer_state: dict[str, Any], config: ModelConfig, *, keep_last: int | None,
                        owner_kind: str) -> Path:
        from latentmoe.parallel.pp.checkpoint import save_pipeline_checkpoint

        return save_pipeline_checkpoint(out_dir, step, model, optimizer, trainer_state, config, strategy=self,
                                        keep_last=keep_last, owner_kind=owner_kind)

    def load_checkpoint(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                        check_hashes: bool) -> dict[str, Any]:
        from latentmoe.parallel.pp.checkpoint import load_pipeline_checkpoint

        return load_pipeline_checkpoint(path, model, optimizer, strategy=self, check_hashes=check_hashes)

    def barrier(self) -> None:
        dist.barrier(group=self.groups.world)

    def broadcast_object(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.groups.world)
        return box[0]

    def errors(self):
        return collective_errors(self.topology.rank, self.world_size, self.parallel.timeout_s)

    def record_layout(self, out_dir: str | Path, config: ModelConfig, *, kind: str) -> None:
        """``pp_layout.json``: the layout, the split and where every virtual stage runs (``plan pipeline``)."""
        topo = self.topology
        data = {
            "world_size": topo.world_size,
            "gpus_per_node": topo.gpus_per_node,
            "pp_size": topo.pp_size,
            "ep_size": topo.ep_size,
            "dp_size": topo.dp_size,
            "schedule": self.pipeline.schedule,
            "virtual_stages": self.n_stages,
            "layers_per_stage": self.counts,
            "stage_to_rank": self.placement,
            "microbatches": self.pipeline.microbatches,
            "zero": self.pipeline.zero,
            "overlap_f_b": self.pipeline.overlap_f_b,
            "ep_overlap": self.parallel.overlap,
            "ep_groups_intra_node": topo.intra_node(topo.ep_group_ranks()),
            "pp_groups_intra_node": topo.intra_node(topo.pp_group_ranks()),
            "preset_layers": config.num_hidden_layers,
            "backend": dist.get_backend(),
        }
        write_json_atomic(Path(out_dir) / LAYOUT_FILE, data)
        claim_run_file(out_dir, LAYOUT_FILE, kind=kind)


def _loss_of_output(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The last stage already returns the micro-batch's loss (it needs the token ids for MTP anyway)."""
    return output


def _main_loss(out, ids_bS: torch.Tensor, loss_mask_bS: torch.Tensor | None = None) -> StepLoss:
    main = next_token_loss(out.logits, ids_bS)
    return StepLoss(main, main, [], None)
