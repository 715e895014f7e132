"""The expert-parallel MoE layer equals the single-process MoE (forward and backward), on 2 and 4 gloo ranks.

Every rank builds the same full ``MoE`` (same seed) and the same global batch; the reference runs the
whole batch in one process, the EP layer runs each rank's slice with the experts sharded. Compared:
outputs, input gradients, router / shared-expert gradients (summed over ranks, as data parallelism
would) and each rank's expert-slice gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from latentmoe import ModelConfig
from latentmoe.model.moe import MoE
from tests.parallel.launch import run_ranks

FP32_TOL = 1e-5
SEQ_PER_RANK, SEQ_LEN = 2, 8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def moe_config(*, n_experts=8, top_k=2, n_group=4, topk_group=2, hidden=64) -> ModelConfig:
    return ModelConfig.from_preset("tiny").replace(
        hidden_size=hidden,
        moe_intermediate_size=32,
        n_routed_experts=n_experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
    )


def build(config: ModelConfig, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    return moe


def global_batch(world: int, config: ModelConfig, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * SEQ_PER_RANK, SEQ_LEN, config.hidden_size, generator=g)
    dy = torch.randn(x.shape, generator=g)
    return x, dy


def ep_errors(rank: int, world: int, config: ModelConfig, *, bias=None, gpus_per_node=None,
              dispatch="fp32", combine="fp32", dedup=True, overlap=False):
    """Run reference and EP on the same weights/batch; return (relative errors by quantity, this rank's hook).

    Every collective runs before anything is asserted, so a failing comparison cannot desynchronise ranks.
    """
    from latentmoe.parallel import Topology, build_groups, enable_expert_parallel

    topo = Topology(world_size=world, rank=rank, gpus_per_node=gpus_per_node or world, ep_size=world)
    groups = build_groups(topo)
    ref, ep = build(config), build(config)
    if bias is not None:
        for m in (ref, ep):
            m.gate.e_score_correction_bias.copy_(bias)
    x, dy = global_batch(world, config)
    rows = slice(rank * SEQ_PER_RANK, (rank + 1) * SEQ_PER_RANK)

    x_ref = x.clone().requires_grad_(True)
    y_ref = ref(x_ref).hidden_BSD
    (y_ref * dy).sum().backward()

    (hook,) = enable_expert_parallel(ep, groups, dispatch=dispatch, combine=combine, dedup=dedup, overlap=overlap)
    x_ep = x[rows].clone().requires_grad_(True)
    y_ep = ep(x_ep).hidden_BSD
    (y_ep * dy[rows]).sum().backward()

    errors = {"output": rel_err(y_ep, y_ref[rows]), "input grad": rel_err(x_ep.grad, x_ref.grad[rows])}
    for name in ("gate.weight", "shared_experts.gate_proj.weight", "shared_experts.down_proj.weight"):
        g = dict(ep.named_parameters())[name].grad.clone()
        dist.all_reduce(g)  # data-parallel sum over the ranks' tokens
        errors[name] = rel_err(g, dict(ref.named_parameters())[name].grad)
    n_local = config.n_routed_experts // world
    for name in ("gate_proj", "up_proj", "down_proj"):
        mine = getattr(ep.experts, name).grad
        full = getattr(ref.experts, name).grad[rank * n_local : (rank + 1) * n_local]
        if mine is None:  # no token reached this rank's experts: the reference slice must be zero too
            errors[f"experts.{name}"] = float(full.abs().max())
        elif full.norm() == 0:
            errors[f"experts.{name}"] = float(mine.abs().max())
        else:
            errors[f"experts.{name}"] = rel_err(mine, full)
    return errors, hook


def compare_with_reference(rank: int, world: int, config: ModelConfig, *, tol=FP32_TOL, **options):
    """:func:`ep_errors`, asserting each relative error ≤ ``tol``; returns this rank's EP hook."""
    errors, hook = ep_errors(rank, world, config, **options)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"rank {rank}: relative errors above {tol}: {bad}"
    return hook


def _two_ranks(rank: int, world: int) -> None:
    config = moe_config()
    compare_with_reference(rank, world, config)
    compare_with_reference(rank, world, config, dedup=False)  # one row per (token, expert)
    compare_with_reference(rank, world, config, overlap=True)  # dual micro-batch path, same numbers
    # Uneven: every token picks experts 0 and 1, both on rank 0; rank 1's experts receive nothing.
    bias = torch.zeros(config.n_routed_experts)
    bias[:2] = 10.0
    hook = compare_with_reference(rank, world, config, bias=bias)
    expected_rows = 0 if rank else world * SEQ_PER_RANK * SEQ_LEN
    assert hook.received_assignments == 2 * expected_rows


def test_ep_moe_matches_single_process_on_two_ranks_including_all_tokens_to_one_rank():
    run_ranks(_two_ranks, 2)


def _four_ranks(rank: int, world: int) -> None:
    config = moe_config(n_experts=8, top_k=3, n_group=4, topk_group=2)
    compare_with_reference(rank, world, config, gpus_per_node=2)
    # Uneven: experts 0 (rank 0) and 5 (rank 2) take everything; ranks 1 and 3 idle.
    bias = torch.zeros(8)
    bias[[0, 5]] = 10.0
    compare_with_reference(rank, world, moe_config(n_experts=8, top_k=2, n_group=1, topk_group=1),
                           bias=bias, gpus_per_node=2)


def test_ep_moe_matches_single_process_on_four_ranks_as_two_nodes():
    run_ranks(_four_ranks, 4)


# Stated tolerances of the lossy payloads (relative error of outputs and gradients vs the fp32 reference):
BF16_TOL = 2**-7  # BF16 rounds to 8 significant bits (≤ 2^-8 relative); forward and backward each round once
FP8_TOL = 2**-4  # E4M3 keeps 4 significant bits: ≤ 2^-4 relative rounding error per value, 1×128 scales
LOGFMT_TOL = 2.5e-2  # LogFMT-8: 126 log-spaced levels per 1×128 tile (measured 1.1e-2 on this data)


def _compressed(rank: int, world: int) -> None:
    config = moe_config()
    D = config.hidden_size
    hook = compare_with_reference(rank, world, config, dispatch="bf16", combine="bf16", tol=BF16_TOL)
    assert hook.traffic.dispatch.total == hook.traffic.combine.total == hook.traffic.rows * 2 * D

    errors, hook = ep_errors(rank, world, config, dispatch="fp8", combine="logfmt")
    assert max(errors.values()) <= FP8_TOL, errors
    assert hook.traffic.dispatch.total == hook.traffic.rows * (D + 4 * ((D + 127) // 128))
    assert hook.traffic.combine.total == hook.traffic.rows * (D + 8 * ((D + 127) // 128))

    errors, _ = ep_errors(rank, world, config, combine="logfmt")  # LogFMT alone on the combine
    assert errors["output"] <= LOGFMT_TOL, errors
    assert max(v for k, v in errors.items() if k != "output") <= BF16_TOL, errors  # gradients travel in BF16


def test_bf16_fp8_and_logfmt_payloads_stay_within_their_format_tolerance():
    run_ranks(_compressed, 2)
