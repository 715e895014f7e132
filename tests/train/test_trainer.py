"""The training loop: exact resume, Ctrl-C, non-finite steps, bias updates, and that it learns."""

import math
import shutil
import signal
import statistics

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from latentmoe import CausalLM, ModelConfig
from latentmoe.checkpoint import latest_checkpoint, load_checkpoint
from latentmoe.config import ConfigError
from latentmoe.train import trainer as trainer_mod
from latentmoe.train.metrics import read_metrics
from latentmoe.train.run_dir import RunDirectoryError
from latentmoe.train.trainer import (
    TrainConfig,
    Trainer,
    TrainingError,
    TrainingInterrupted,
    train,
)

B, S = 4, 32
REAL_LOSS = trainer_mod.causal_lm_loss


@pytest.fixture(scope="module")
def config():
    return ModelConfig.from_preset("tiny")


def make_model(config, seed=0):
    torch.manual_seed(seed)
    return CausalLM(config)


def random_batches(config, seed=0):
    """A batch that depends only on (seed, step), like the real data pipeline's random windows."""

    def batch_fn(step):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return torch.randint(0, config.vocab_size, (B, S), generator=gen)

    return batch_fn


def cfg_for(out_dir, **kw):
    base = dict(
        out_dir=out_dir,
        steps=20,
        batch_size=B,
        seq_len=S,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=5,
        log_every=5,
        eval_every=10,
        save_every=0,
        keep_last=None,
    )
    return TrainConfig(**{**base, **kw})


def val_fn_for(config):
    return lambda: [random_batches(config, seed=99)(i) for i in range(2)]


def assert_bit_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, config):
    """20 steps in one go (saving at step 10 on the way, which must not change anything)."""
    out = tmp_path_factory.mktemp("straight")
    model = make_model(config)
    result = train(cfg_for(out, save_every=10), model=model, batch_fn=random_batches(config), val_fn=val_fn_for(config))
    return out, model, result


def test_resume_after_save_is_bit_identical_to_a_straight_run(tmp_path, config, straight_run):
    out, straight_model, straight_result = straight_run
    shutil.copytree(out / "checkpoint-000010", tmp_path / "checkpoint-000010")
    resumed = make_model(config, seed=123)  # different init: everything must come from the checkpoint
    result = train(
        cfg_for(tmp_path), model=resumed, batch_fn=random_batches(config), val_fn=val_fn_for(config), resume=True
    )
    assert result.resumed_from == tmp_path / "checkpoint-000010"
    assert result.final_step == 20
    assert_bit_identical(straight_model, resumed)
    assert result.final_val_loss == straight_result.final_val_loss
    # The optimizer state in the two final checkpoints agrees too.
    opts = []
    for run_dir in (out, tmp_path):
        m = make_model(config)
        t = Trainer(cfg_for(run_dir), model=m, batch_fn=random_batches(config))
        load_checkpoint(latest_checkpoint(run_dir), m, t.optimizer)
        opts.append(t.optimizer.state_dict())
    for idx, st in opts[0]["state"].items():
        for key, value in st.items():
            assert torch.equal(value, opts[1]["state"][idx][key]), (idx, key)


def test_ctrl_c_saves_after_the_current_step_and_resume_is_exact(tmp_path, config, straight_run):
    _, straight_model, _ = straight_run
    inner = random_batches(config)

    def batch_fn(step):
        if step == 9:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during step 9
        return inner(step)

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when run in the background
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg_for(tmp_path), model=make_model(config), batch_fn=batch_fn, val_fn=val_fn_for(config))
    assert info.value.step == 10
    assert info.value.checkpoint == tmp_path / "checkpoint-000010"
    assert "interrupted at step 10" in str(info.value)
    assert signal.getsignal(signal.SIGINT) is before, "handler restored"

    resumed = make_model(config, seed=5)
    train(cfg_for(tmp_path), model=resumed, batch_fn=inner, val_fn=val_fn_for(config), resume=True)
    assert_bit_identical(straight_model, resumed)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5, 10, 15, 20]


def test_keyboard_interrupt_before_a_step_saves_the_last_completed_step(tmp_path, config):
    inner = random_batches(config)

    def batch_fn(step):
        if step == 3:
            raise KeyboardInterrupt
        return inner(step)

    with pytest.raises(TrainingInterrupted) as info:
        train(cfg_for(tmp_path), model=make_model(config), batch_fn=batch_fn)
    assert info.value.checkpoint == tmp_path / "checkpoint-000003"
    assert latest_checkpoint(tmp_path) == info.value.checkpoint


def nan_loss_at(monkeypatch, bad_steps):
    """Make causal_lm_loss return NaN for the given step indices (the step is read from the batch)."""
    current = {}

    def fake(out, ids, **kw):
        losses = REAL_LOSS(out, ids, **kw)
        if current["step"] in bad_steps:
            losses.total = losses.total * float("nan")
        return losses

    monkeypatch.setattr(trainer_mod, "causal_lm_loss", fake)
    return current


def test_non_finite_loss_skips_the_step_and_counts_it(tmp_path, config, monkeypatch):
    current = nan_loss_at(monkeypatch, bad_steps={2})
    inner = random_batches(config)

    def batch_fn(step):
        current["step"] = step
        return inner(step)

    model = make_model(config)
    trainer = Trainer(cfg_for(tmp_path, steps=6), model=model, batch_fn=batch_fn)
    for step in (0, 1):
        assert trainer.train_step(step) is not None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = {i: {k: v.clone() for k, v in s.items()} for i, s in trainer.optimizer.state.items()}
    assert trainer.train_step(2) is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a skipped step"
    for i, s in trainer.optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, opt_before[i][k])
    assert all(p.grad is None for p in model.parameters())

    out = tmp_path / "run"
    result = train(cfg_for(out, steps=6, log_every=1), model=make_model(config), batch_fn=batch_fn)
    assert result.skipped_steps == 1
    records = read_metrics(out / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert records[2]["loss"] is None  # the only step of that window was skipped
    assert all(r["loss"] is not None for i, r in enumerate(records) if i != 2)


def test_too_many_consecutive_non_finite_steps_stop_training(tmp_path, config, monkeypatch):
    current = nan_loss_at(monkeypatch, bad_steps=set(range(2, 100)))
    inner = random_batches(config)

    def batch_fn(step):
        current["step"] = step
        return inner(step)

    with pytest.raises(TrainingError, match="non-finite for 4 consecutive steps"):
        train(cfg_for(tmp_path, max_consecutive_nonfinite=3), model=make_model(config), batch_fn=batch_fn)
    # Up to the limit is tolerated: 3 NaN steps then recovery is fine.
    current_ok = nan_loss_at(monkeypatch, bad_steps={2, 3, 4})

    def batch_fn_ok(step):
        current_ok["step"] = step
        return inner(step)

    result = train(
        cfg_for(tmp_path / "ok", steps=8, max_consecutive_nonfinite=3), model=make_model(config), batch_fn=batch_fn_ok
    )
    assert result.skipped_steps == 3


def test_router_biases_move_by_gamma_after_each_step(tmp_path, config):
    model = make_model(config)
    trainer = Trainer(cfg_for(tmp_path, bias_gamma=1e-3), model=model, batch_fn=random_batches(config))
    result = trainer.train_step(0)
    load = result["load"]
    for row, moe in zip(load, model.moe_layers(), strict=True):
        expected = -1e-3 * torch.sign(row - row.mean())
        assert torch.allclose(moe.gate.e_score_correction_bias, expected.to(torch.float32))


SHORT_TEXT = (
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
    "The slings and arrows of outrageous fortune, Or to take arms against a sea of troubles"
)


def test_tiny_model_overfits_a_short_text(tmp_path, config):
    # A short text as byte ids (< 256 <= vocab), 4 windows x 32 tokens, repeated every step:
    # ln(512) = 6.24 nats at the start; measured about 0.02 after 100 steps on random ids of the
    # same shape. The bound leaves a wide margin.
    data = torch.tensor(list(SHORT_TEXT.encode()[:128]), dtype=torch.long)
    batch = data.view(4, 32)
    result = train(
        cfg_for(tmp_path, steps=100, eval_every=0, log_every=10),
        model=make_model(config),
        batch_fn=lambda step: batch,
        val_fn=lambda: [batch],
    )
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0]["loss"] > 5.0
    assert result.final_val_loss < 0.5
    assert result.final_loss < 0.5
    # throughput is wall-clock; what is checkable is its bookkeeping: tokens counted, the median reported
    assert [r["tokens_seen"] for r in records] == [r["step"] * 4 * 32 for r in records]
    assert result.tokens_per_s == statistics.median(r["tokens_per_s"] for r in records)


def cross_entropy_reference(logits_BSV, ids_BS, ahead):
    """Mean of −log softmax(logits_i)[t_{i+ahead}] over the positions with a target, in float64 (differentiable)."""
    lp = torch.log_softmax(logits_BSV.double(), dim=-1)
    S = ids_BS.shape[1]
    return -lp[:, : S - ahead].gather(-1, ids_BS[:, ahead:, None]).mean()


def test_bf16_precision_runs_the_layers_in_bf16_while_weights_stay_fp32(tmp_path, config):
    """Every Linear layer's output is BF16 in the training step and in validation, the first step's loss is the
    BF16 forward's (not the FP32 one's), and the master weights come out FP32."""
    model = make_model(config)
    reference = make_model(config).train()
    seen = {True: set(), False: set()}  # module.training -> output dtypes

    def record(module, inputs, output):
        seen[module.training].add(output.dtype)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    records = []
    result = train(cfg_for(tmp_path, steps=1, precision="bf16", log_every=1), model=model,
                   batch_fn=random_batches(config), val_fn=val_fn_for(config), on_log=records.append)
    for h in hooks:
        h.remove()
    assert seen == {True: {torch.bfloat16}, False: {torch.bfloat16}}
    ids = random_batches(config)(0)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = float(cross_entropy_reference(reference(ids).logits, ids, 1))
        fp32 = float(cross_entropy_reference(reference(ids).logits, ids, 1))
    # at init the logits are small, so BF16 moves the loss by only ~4e-5; the step's loss sits ~100x closer
    # to the BF16 forward (their difference is FP32 vs float64 cross-entropy)
    assert abs(bf16 - fp32) > 1e-5
    assert abs(records[0]["loss"] - bf16) < 0.1 * abs(bf16 - fp32)
    assert result.skipped_steps == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("grad_clip", [0.5, 100.0])
def test_the_optimizer_gets_the_gradient_of_the_full_loss_clipped_to_grad_clip(tmp_path, config, grad_clip):
    """The gradients AdamW receives are those of L = L_main + λ/D Σ_k L_MTP^k + α L_Bal (D = 2 MTP modules,
    cross-entropies in float64 here), scaled by min(1, grad_clip / ‖g‖) with ‖g‖ the global norm over all
    parameters. In the tiny run ‖g‖ ≈ 1.5, so a clip of 0.5 is active and one of 100 is not."""
    cfg2 = config.replace(num_nextn_predict_layers=2)
    model = make_model(cfg2)
    reference = make_model(cfg2).train()
    ids = random_batches(cfg2)(0)
    lam, alpha = 0.3, 0.5  # α far above the TR's 1e-4, so the balance term shows in the router's gradient
    out = reference(ids)
    loss = cross_entropy_reference(out.logits, ids, 1)
    loss = loss + lam / 2 * sum(cross_entropy_reference(m, ids, k + 1) for k, m in enumerate(out.mtp_logits, 1))
    loss = loss + alpha * out.balance_loss.double()
    loss.backward()
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {n: p.grad.double() for n, p in reference.named_parameters() if p.grad is not None}
    norm = math.sqrt(sum(float((g * g).sum()) for g in expected.values()))
    assert norm > 2 * 0.5
    scale = min(1.0, grad_clip / norm)
    received = {}

    def capture(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    received[names[id(p)]] = p.grad.double().clone()

    handle = register_optimizer_step_pre_hook(capture)
    try:
        train(cfg_for(tmp_path, steps=1, grad_clip=grad_clip, mtp_lambda=lam, balance_alpha=alpha), model=model,
              batch_fn=random_batches(cfg2))
    finally:
        handle.remove()
    assert received.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(received[name], g * scale, rtol=1e-4, atol=1e-8, msg=name)


def test_fresh_run_refuses_a_directory_holding_checkpoints_and_bad_settings_name_the_field(tmp_path, config):
    train(cfg_for(tmp_path, steps=2), model=make_model(config), batch_fn=random_batches(config))
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        train(cfg_for(tmp_path, steps=2), model=make_model(config), batch_fn=random_batches(config))
    with pytest.raises(TrainingError, match="seed"):
        train(
            cfg_for(tmp_path, steps=4, seed=1), model=make_model(config), batch_fn=random_batches(config), resume=True
        )
    with pytest.raises(ConfigError, match="precision"):
        cfg_for(tmp_path, precision="fp16").validate()
    with pytest.raises(ConfigError, match="seq_len"):
        cfg_for(tmp_path, seq_len=1).validate()


def test_train_builds_the_model_from_the_preset_or_the_checkpoint(tmp_path, config):
    first = train(cfg_for(tmp_path, steps=2, preset="tiny"), batch_fn=random_batches(config))
    assert first.final_step == 2
    again = train(cfg_for(tmp_path, steps=3, preset="small"), batch_fn=random_batches(config), resume=True)
    assert again.final_step == 3 and again.resumed_from == first.checkpoint  # config came from the checkpoint
