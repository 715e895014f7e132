"""Pipeline-parallel training = single-process training (tiny preset, MTP on, gloo ranks on this machine).

* PP 2 on two ranks, every schedule (1F1B, interleaved, ZB1P, DualPipeV): every step's loss equals the
  single-process run's (1e-5 relative), and so does every parameter's gradient after one step; the chunk order
  each schedule ran, replayed with the formulas' costs, has the idle fraction the planner's formula gives and is
  ordered as the formulas order the schedules.
* PP 2 x EP 2 on four ranks (DualPipeV with its overlapped chunk pairs, ZeRO-1): the same losses and the same
  router biases as one process; its checkpoint resumes bit-exactly at the same layout, and at EP 4 and in one
  process with the next losses of the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from latentmoe import CausalLM, ModelConfig
from latentmoe.model.mtp import causal_lm_loss
from latentmoe.plan.pipeline import ChunkTimes, bubble_fraction
from latentmoe.train import SingleProcess, StepLoss
from latentmoe.train.trainer import TrainConfig, train
from tests.parallel.launch import run_ranks

GLOBAL_BATCH, SEQ, STEPS, MICROBATCHES = 8, 16, 3, 4
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5
ALPHA, LAMBDA = 1e-4, 0.3
SCHEDULES = {"1f1b": (1, 1), "zb": (1, 1), "interleaved": (1, 0, 1, 0), "dualpipev": (1, 1, 0, 0)}
PLANNER = {"1f1b": ("1f1b", 2), "zb": ("zb1p", 2), "interleaved": ("interleaved", 4), "dualpipev": ("dualpipev", 4)}
UNIT = ChunkTimes(forward=1.0, backward=2.0, weight=1.0)


def config() -> ModelConfig:
    return ModelConfig.from_preset("tiny")


def batch_fn(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2_000 + step)
    return torch.randint(0, config().vocab_size, (GLOBAL_BATCH, SEQ), generator=gen)


def val_fn():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, config().vocab_size, (GLOBAL_BATCH, SEQ), generator=gen)]


def train_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(out_dir=out, steps=STEPS, batch_size=GLOBAL_BATCH, seq_len=SEQ, warmup_steps=1, log_every=1,
                eval_every=0, eval_batches=1, save_every=0, keep_last=None, lr=3e-3, mtp_lambda=LAMBDA,
                balance_alpha=ALPHA)
    return TrainConfig(**(base | kw))


def loss_fn(out, ids_bS: torch.Tensor, loss_mask_bS: torch.Tensor | None = None) -> StepLoss:
    losses = causal_lm_loss(out, ids_bS, mtp_lambda=LAMBDA)
    return StepLoss(losses.total + ALPHA * out.balance_loss, losses.main, losses.mtp, out.balance_loss)


def pipeline_strategy(rank: int, world: int, *, schedule: str, ep: int = 1, layers=None, overlap: bool = False,
                      zero: bool = True):
    from latentmoe.parallel.pp.strategy import PipelineConfig, PipelineStrategy
    from latentmoe.parallel.strategy import ParallelConfig
    from latentmoe.parallel.topology import build_groups

    pipeline = PipelineConfig(pp=2, schedule=schedule, layers=layers, microbatches=MICROBATCHES, seq_len=SEQ,
                              overlap_f_b=overlap, zero=zero)
    parallel = ParallelConfig(ep=ep, gpus_per_node=2, pipeline=pipeline)
    return PipelineStrategy(build_groups(parallel.topology(rank, world), ep_backward=overlap), parallel, pipeline)


def fresh_model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(config())


def read(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- PP 2
def _every_schedule(rank: int, world: int, root: str) -> None:
    root = Path(root)
    for schedule, layers in SCHEDULES.items():
        strategy = pipeline_strategy(rank, world, schedule=schedule, layers=layers, zero=False)
        model = strategy.prepare_model(fresh_model())
        ids = strategy.shard_batch(batch_fn(0))
        strategy.forward_backward(model, ids, loss_fn, forward_context=contextlib.nullcontext, stop=False)
        strategy.reduce_and_clip(model, max_norm=1e9)  # reduced, not clipped
        torch.save({n: p.grad for n, p in model.named_parameters()}, root / f"grads-{schedule}-{rank}.pt")

        strategy = pipeline_strategy(rank, world, schedule=schedule, layers=layers)
        model = strategy.prepare_model(fresh_model())
        train(train_cfg(root / schedule, eval_every=STEPS), batch_fn=batch_fn, val_fn=val_fn, model=model,
              handle_signals=False, strategy=strategy)
        torch.save(_biases(model), root / f"bias-{schedule}-{rank}.pt")


def _biases(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.endswith("e_score_correction_bias")}


@pytest.fixture(scope="module")
def pp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp2")
    run_ranks(_every_schedule, 2, str(root), deadline_s=400)
    trained = fresh_model()
    train(train_cfg(root / "single", eval_every=STEPS), batch_fn=batch_fn, val_fn=val_fn, model=trained,
          handle_signals=False)
    model = fresh_model()
    SingleProcess().forward_backward(model, batch_fn(0), loss_fn, forward_context=contextlib.nullcontext, stop=False)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return root, _biases(trained), grads


@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_step_loss_equals_the_single_process_run(pp2, schedule):
    root, _, _ = pp2
    ours, ref = read(root / schedule), read(root / "single")
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(ours, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), a["step"]
        assert a["mtp_loss"] == pytest.approx(b["mtp_loss"], rel=LOSS_RTOL)
        assert a["balance_loss"] == pytest.approx(b["balance_loss"], rel=LOSS_RTOL)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=LOSS_RTOL)
        assert a["expert_load_max_over_mean"] == b["expert_load_max_over_mean"]  # the whole batch's load
        assert a["tokens_seen"] == b["tokens_seen"]
    assert ours[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=LOSS_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_router_biases_after_training_equal_the_single_process_ones(pp2, schedule):
    root, want, _ = pp2
    got = {}
    for rank in range(2):
        got.update(torch.load(root / f"bias-{schedule}-{rank}.pt", weights_only=True))
    assert set(got) == set(want)
    for name, bias in want.items():
        assert bias.abs().sum() > 0
        torch.testing.assert_close(got[name], bias, rtol=0, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_gradients_equal_the_single_process_ones_per_parameter(pp2, schedule):
    root, _, ref = pp2
    seen = set()
    for rank in range(2):
        grads = torch.load(root / f"grads-{schedule}-{rank}.pt", weights_only=True)
        for name, g in grads.items():
            err = float((g - ref[name]).norm() / ref[name].norm())
            assert err <= GRAD_RTOL, f"{schedule} rank {rank}: {name} relative error {err:.2e}"
            seen.add(name)
    assert seen == set(ref)  # every parameter lives on some stage


@pytest.mark.slow
def test_replayed_idle_fraction_is_ordered_as_the_formulas_order_the_schedules(pp2):
    root, _, _ = pp2
    replayed, formula = {}, {}
    for schedule, (name, stages) in PLANNER.items():
        last = read(root / schedule)[-1]
        assert len(last["pp_idle_fraction"]) == 2 and all(0 <= x <= 1 for x in last["pp_idle_fraction"])
        replayed[schedule] = max(last["pp_replayed_idle_fraction"])
        formula[schedule] = bubble_fraction(name, stages, MICROBATCHES, UNIT)
    # 1F1B 3/15, interleaved 3/27, ZB1P 1/13: torch's schedules run exactly the formulas' bubble
    for schedule in ("1f1b", "interleaved", "zb"):
        assert replayed[schedule] == pytest.approx(formula[schedule], abs=1e-4), schedule
    assert replayed["dualpipev"] <= formula["dualpipev"] + 1e-4  # the formula bounds DualPipe's bubble
    assert formula["1f1b"] > formula["interleaved"] > formula["zb"] == pytest.approx(formula["dualpipev"])
    assert replayed["1f1b"] > replayed["interleaved"] > max(replayed["zb"], replayed["dualpipev"])


# ---------------------------------------------------------------------------------------------- PP 2 x EP 2
def _composed(rank: int, world: int, root: str) -> None:
    from latentmoe.parallel.strategy import ExpertParallelStrategy, ParallelConfig
    from latentmoe.parallel.topology import build_groups

    root = Path(root)
    steps = dict(steps=4, save_every=2, eval_every=4)
    strategy = pipeline_strategy(rank, world, schedule="dualpipev", ep=2, overlap=True)
    model = strategy.prepare_model(fresh_model())
    train(train_cfg(root / "pp", **steps), batch_fn=batch_fn, val_fn=val_fn, model=model, handle_signals=False,
          strategy=strategy)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(_biases(model), root / f"bias-{rank}.pt")
    # ZeRO-1: the stage's two ranks hold disjoint halves of the dense AdamW state
    optimizer = strategy.make_optimizer(model, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    dense = optimizer.families[0]
    params = [p for g in dense.optimizer.param_groups for p in g["params"]]  # the order of dense.names
    mine = [n for n, p in zip(dense.names, params, strict=True) if p in dense.optimizer.optim.state]
    (root / f"zero-{rank}.json").write_text(json.dumps({"mine": mine, "all": dense.names}))
    for name in ("resumed", "ep4"):
        if rank == 0:
            shutil.copytree(root / "pp" / "checkpoint-000002", root / name / "checkpoint-000002")
    dist.barrier()

    # the same layout resumes bit-exactly (ZeRO shards, router biases, RNG and all)
    strategy = pipeline_strategy(rank, world, schedule="dualpipev", ep=2, overlap=True)
    model = strategy.prepare_model(fresh_model())
    train(train_cfg(root / "resumed", **steps), batch_fn=batch_fn, val_fn=val_fn, model=model, resume=True,
          handle_signals=False, strategy=strategy)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, final[name]), f"rank {rank}: {name} differs after resume"

    # EP 4 without a pipeline resumes from the PP2 x EP2 checkpoint
    parallel = ParallelConfig(ep=4, gpus_per_node=2)
    ep4 = ExpertParallelStrategy(build_groups(parallel.topology(rank, world)), parallel)
    train(train_cfg(root / "ep4", **steps), batch_fn=batch_fn, val_fn=val_fn,
          model=ep4.prepare_model(fresh_model()), resume=True, handle_signals=False, strategy=ep4)


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp2ep2")
    run_ranks(_composed, 4, str(root), deadline_s=500)
    steps = dict(steps=4, save_every=2, eval_every=4)
    model = fresh_model()
    train(train_cfg(root / "single", **steps), batch_fn=batch_fn, val_fn=val_fn, model=model, handle_signals=False)
    shutil.copytree(root / "pp" / "checkpoint-000002", root / "one" / "checkpoint-000002")
    train(train_cfg(root / "one", **steps), batch_fn=batch_fn, val_fn=val_fn, model=fresh_model(), resume=True,
          handle_signals=False)
    return root, model


@pytest.mark.slow
def test_pp2_ep2_losses_and_router_biases_equal_one_process(composed):
    root, single = composed
    ours, ref = read(root / "pp"), read(root / "single")
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    for a, b in zip(ours, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), a["step"]
        assert a["mtp_loss"] == pytest.approx(b["mtp_loss"], rel=LOSS_RTOL)
    assert ours[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=LOSS_RTOL)
    want = {k: v for k, v in single.state_dict().items() if k.endswith("e_score_correction_bias")}
    got = {}
    for rank in range(4):
        got.update(torch.load(root / f"bias-{rank}.pt", weights_only=True))
    assert set(got) == set(want) and len(want) == 2  # layer 1 and the MTP block
    for name, bias in want.items():
        assert bias.abs().sum() > 0  # the biases moved
        torch.testing.assert_close(got[name], bias, rtol=0, atol=1e-7)


@pytest.mark.slow
def test_zero1_shards_the_dense_adamw_state_over_the_stage(composed):
    root, _ = composed
    for stage_ranks in ((0, 1), (2, 3)):
        parts = [json.loads((root / f"zero-{r}.json").read_text()) for r in stage_ranks]
        a, b = (set(p["mine"]) for p in parts)
        assert a and b and not a & b  # each parameter's moments on exactly one rank of the stage
        assert a | b == set(parts[0]["all"]) == set(parts[1]["all"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ep4", "one", "resumed"])
def test_a_pp2_ep2_checkpoint_resumes_at_another_layout_with_the_same_next_losses(composed, layout):
    root, _ = composed
    resumed, ref = read(root / layout), read(root / "single")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(resumed, ref[2:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), (layout, a["step"])
    assert resumed[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=LOSS_RTOL)


@pytest.mark.slow
def test_a_pp2_ep2_checkpoint_converts_to_the_hf_layout_with_every_tensor(composed, tmp_path):
    from latentmoe.checkpoint import load_model
    from latentmoe.hf import convert
    from latentmoe.hf.load import load_pretrained

    root, _ = composed
    ckpt = root / "pp" / "checkpoint-000004"
    convert(ckpt, tmp_path / "hf", to="hf")
    ours, _ = load_model(ckpt)
    hf = load_pretrained(tmp_path / "hf").state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(hf[name], tensor), name  # experts merged from both EP shards, both stages' layers
