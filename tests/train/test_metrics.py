"""metrics.jsonl records and the two PNG plots."""

import json
import math

import numpy as np
import pytest
import torch

from latentmoe import CausalLM, ModelConfig
from latentmoe.train.metrics import (
    MetricsWriter,
    expert_load_max_over_mean,
    plot_expert_load,
    plot_loss,
    read_metrics,
)
from latentmoe.train.trainer import TrainConfig, train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REQUIRED_KEYS = {
    "step",
    "loss",
    "mtp_loss",
    "lr",
    "tokens_per_s",
    "expert_load_max_over_mean",
    "expert_load_max_over_mean_mean",
    "skipped_steps",
}


def is_png(path):
    return path.read_bytes()[:8] == PNG_SIGNATURE


def test_training_writes_metrics_lines_and_both_plots(tmp_path):
    config = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = CausalLM(config)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, config.vocab_size, (6, 4, 32), generator=gen)
    seen = []
    cfg = TrainConfig(
        out_dir=tmp_path, steps=12, batch_size=4, seq_len=32, warmup_steps=2, log_every=4, eval_every=6, keep_last=None
    )
    step_loads = []  # per training forward: the load of every MoE layer, read off the layers themselves
    layers = model.moe_layers()

    def record_load(module, inputs, output):
        if module.training:
            if module is layers[0]:
                step_loads.append([])
            step_loads[-1].append(output.load_E.double())

    hooks = [m.register_forward_hook(record_load) for m in layers]
    result = train(
        cfg, model=model, batch_fn=lambda step: data[step % 4], val_fn=lambda: [data[4], data[5]], on_log=seen.append
    )
    for h in hooks:
        h.remove()

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is strict JSON
    assert records == seen
    assert [r["step"] for r in records] == [4, 6, 8, 12]  # log_every=4, plus the eval at step 6
    assert len(step_loads) == 12
    previous = 0
    for r in records:
        assert REQUIRED_KEYS <= r.keys()
        # max/mean of each layer's load summed over the steps since the previous record
        window = torch.stack([torch.stack(loads) for loads in step_loads[previous : r["step"]]]).sum(0)
        expected = (window.amax(-1) / window.mean(-1)).tolist()
        assert r["expert_load_max_over_mean"] == pytest.approx(expected, rel=1e-6)
        assert max(expected) > 1.0  # the check is not trivially 1: the load is uneven
        assert r["tokens_seen"] == r["step"] * 4 * 32 and r["skipped_steps"] == 0
        assert math.isfinite(r["loss"]) and math.isfinite(r["mtp_loss"])
        previous = r["step"]
    assert [r.get("val_loss") is not None for r in records] == [False, True, False, True]
    assert result.final_val_loss == records[-1]["val_loss"]

    assert result.loss_plot == tmp_path / "loss.png" and is_png(result.loss_plot)
    assert result.expert_load_plot == tmp_path / "expert_load.png" and is_png(result.expert_load_plot)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".latentmoe-tmp")], "no temp files left"


def test_writer_keeps_records_up_to_the_resumed_step_and_writes_nan_as_null(tmp_path):
    with MetricsWriter(tmp_path) as w:
        for step in (10, 20, 30):
            w.write({"step": step, "loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "lo')  # torn last line of a killed run
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [10, 20, 30]
    with MetricsWriter(tmp_path, resume_step=20) as w:
        clean = w.write({"step": 30, "loss": float("nan"), "lr": torch.tensor(0.5), "v": np.float32(2.0)})
    assert clean == {"step": 30, "loss": None, "lr": 0.5, "v": 2.0}
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30] and records[-1]["loss"] is None
    MetricsWriter(tmp_path).close()  # a fresh run starts an empty file
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_expert_load_max_over_mean_golden():
    load = torch.tensor([[2.0, 2.0, 2.0, 2.0], [8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 6.0]])
    assert expert_load_max_over_mean(load) == pytest.approx([1.0, 4.0, 1.0, 2.0])
    assert expert_load_max_over_mean(np.zeros((0, 8))) == []
    with pytest.raises(ValueError):
        expert_load_max_over_mean(torch.ones(4))


def test_plots_are_pngs_even_with_sparse_inputs(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        '{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0, "val_loss": 4.5}\n{"step": 3, "loss": null}\n'
    )
    assert is_png(plot_loss(tmp_path / "m.jsonl", tmp_path / "loss.png"))
    assert is_png(plot_loss(tmp_path / "missing.jsonl", tmp_path / "empty.png"))
    load = np.array([[10.0, 30.0, 20.0, 20.0], [0.0, 0.0, 0.0, 0.0]])
    assert is_png(plot_expert_load(load, tmp_path / "load.png", layer_labels=["layer 1", "MTP 1"]))
    assert is_png(plot_expert_load(torch.ones(3, 64), tmp_path / "flat.png"))
    with pytest.raises(ValueError, match="labels"):
        plot_expert_load(load, tmp_path / "bad.png", layer_labels=["only one"])
