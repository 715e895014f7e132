"""Distributed training = single-process training: per-step losses, traffic metrics, sharded checkpoints.

Four gloo ranks simulate 2 nodes × 2 ranks, in two layouts: EP 4 (experts over all ranks) and EP 2 × DP 2
(expert gradients reduced over the expert-DP pairs). The global batch is the same as the single-process
run's, so every step's loss must agree within 1e-5 relative.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from latentmoe import CausalLM, ModelConfig
from latentmoe.checkpoint import load_checkpoint, load_model
from latentmoe.train.trainer import TrainConfig, train
from tests.parallel.launch import run_ranks

GLOBAL_BATCH, SEQ = 4, 16
STEPS = 4
LOSS_RTOL = 1e-5
A2A_KEYS = ("a2a_intra_node_bytes", "a2a_inter_node_bytes", "a2a_max_rank_bytes")


def config() -> ModelConfig:
    return ModelConfig.from_preset("tiny")


def batch_fn(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1_000 + step)
    return torch.randint(0, config().vocab_size, (GLOBAL_BATCH, SEQ), generator=gen)


def val_fn():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, config().vocab_size, (GLOBAL_BATCH, SEQ), generator=gen)]


def train_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(out_dir=out, steps=STEPS, batch_size=GLOBAL_BATCH, seq_len=SEQ, warmup_steps=1, log_every=1,
                eval_every=0, eval_batches=1, save_every=0, keep_last=None, lr=3e-3)
    return TrainConfig(**(base | kw))


def run_distributed(rank: int, world: int, out: Path, *, ep: int, resume: bool = False, **kw):
    from latentmoe.parallel.strategy import ExpertParallelStrategy, ParallelConfig
    from latentmoe.parallel.topology import build_groups

    parallel = ParallelConfig(ep=ep, gpus_per_node=2)
    strategy = ExpertParallelStrategy(build_groups(parallel.topology(rank, world)), parallel)
    torch.manual_seed(0)
    model = strategy.prepare_model(CausalLM(config()))
    result = train(train_cfg(out, **kw), batch_fn=batch_fn, model=model, val_fn=val_fn, resume=resume,
                   handle_signals=False, strategy=strategy)
    return model, result


def _layouts(rank: int, world: int, root: str) -> None:
    root = Path(root)
    run_distributed(rank, world, root / "ep4", ep=4)
    model, _ = run_distributed(rank, world, root / "ep2dp2", ep=2, save_every=2)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    # Resume with the same world size from step 2: bit-exact on every rank's tensors.
    if rank == 0:
        (root / "resumed").mkdir()
        shutil.copytree(root / "ep2dp2" / "checkpoint-000002", root / "resumed" / "checkpoint-000002")
    dist.barrier()
    resumed, result = run_distributed(rank, world, root / "resumed", ep=2, resume=True, save_every=2)
    assert result.resumed_from is not None and result.resumed_from.name == "checkpoint-000002"
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, final[name]), f"rank {rank}: {name} differs after resume"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep_train")
    run_ranks(_layouts, 4, str(root), deadline_s=240)
    torch.manual_seed(0)
    single = train(train_cfg(root / "single"), batch_fn=batch_fn, model=CausalLM(config()), val_fn=val_fn,
                   handle_signals=False)
    return root, single


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ep4", "ep2dp2"])
def test_every_step_loss_equals_the_single_process_run(runs, layout):
    root, _ = runs
    ours, ref = read(root / layout), read(root / "single")
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(ours, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), a["step"]
        assert a["mtp_loss"] == pytest.approx(b["mtp_loss"], rel=LOSS_RTOL)
        assert a["tokens_seen"] == b["tokens_seen"]  # global batch semantics
    assert ours[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=LOSS_RTOL)


@pytest.mark.slow
def test_metrics_carry_traffic_split_by_link_class(runs):
    root, _ = runs
    last = read(root / "ep4")[-1]
    assert all(last[k] > 0 for k in A2A_KEYS)  # EP4 over 2 nodes: both link classes used
    assert last["a2a_max_rank_bytes"] <= last["a2a_intra_node_bytes"] + last["a2a_inter_node_bytes"]
    assert last["a2a_max_rank_bytes"] * 4 >= last["a2a_intra_node_bytes"] + last["a2a_inter_node_bytes"]
    ep2 = read(root / "ep2dp2")[-1]
    assert ep2["a2a_inter_node_bytes"] == 0 and ep2["a2a_intra_node_bytes"] > 0  # EP groups inside one node


@pytest.mark.slow
def test_ep_checkpoint_loads_into_one_process_resharded_by_expert_index(runs):
    root, single = runs
    ep_model, _ = load_model(root / "ep4")
    ref_model, _ = load_model(single.checkpoint)
    ref = ref_model.state_dict()
    for name, tensor in ep_model.state_dict().items():
        assert tensor.shape == ref[name].shape
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=1e-4)
    # a single process can also resume the EP run's optimizer state
    model = CausalLM(config())
    from latentmoe.train.optim import build_optimizer

    opt = build_optimizer(model, lr=1e-3)
    state = load_checkpoint(root / "ep4" / "checkpoint-000004", model, opt)
    assert state["step"] == STEPS and state["expert_parallel"]["ep_size"] == 4
    exp_avg = opt.state[model.model.layers[1].mlp.experts.gate_proj]["exp_avg"]
    assert exp_avg.shape == model.model.layers[1].mlp.experts.gate_proj.shape
