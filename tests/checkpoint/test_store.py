"""Checkpoints: exact round trip, crash-safe writes, and clear errors for bad files."""

import json
import shutil

import pytest
import torch

from latentmoe import CausalLM, ModelConfig
from latentmoe.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from latentmoe.checkpoint import tensors as ckpt_mod
from latentmoe.model.mtp import causal_lm_loss
from latentmoe.train.optim import build_optimizer


def trained(config, seed=0, steps=2):
    """A tiny model + AdamW after a few real steps (so moments, step counts and router biases are non-trivial)."""
    torch.manual_seed(seed)
    model = CausalLM(config)
    opt = build_optimizer(model, lr=1e-3)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        out = model(ids)
        causal_lm_loss(out, ids).total.backward()
        opt.step()
        opt.zero_grad()
        model.update_router_biases(out.expert_load, 1e-3)
    return model, opt


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_same_optimizer(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for idx in sa["state"]:
        for key, value in sa["state"][idx].items():
            assert torch.equal(value, sb["state"][idx][key]), (idx, key)
    for ga, gb in zip(sa["param_groups"], sb["param_groups"], strict=True):
        assert ga == gb


@pytest.fixture(scope="module")
def config():
    return ModelConfig.from_preset("tiny")


def test_round_trip_restores_weights_buffers_and_optimizer_exactly(tmp_path, config):
    model, opt = trained(config, seed=0)
    biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert biases and any(b.abs().sum() > 0 for b in biases), "router biases moved during training"
    path = save_checkpoint(tmp_path, 7, model, opt, {"note": "hello", "nested": {"x": [1, 2]}}, config)
    assert path == tmp_path / "checkpoint-000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ]

    other, other_opt = trained(config, seed=1, steps=1)
    state = load_checkpoint(path, other, other_opt)
    assert_same_state(model, other)
    assert_same_optimizer(opt, other_opt)
    assert state["step"] == 7 and state["note"] == "hello" and state["nested"] == {"x": [1, 2]}
    assert "checkpoint_files" not in state

    loaded, loaded_config = load_model(tmp_path)  # a run directory resolves to its newest checkpoint
    assert loaded_config.to_dict() == config.to_dict()
    assert not loaded.training
    assert_same_state(model, loaded)
    ids = torch.randint(0, config.vocab_size, (1, 12))
    model.eval()
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_resumed_optimizer_takes_the_same_next_step(tmp_path, config):
    model, opt = trained(config, seed=0)
    path = save_checkpoint(tmp_path, 2, model, opt, {}, config)
    twin, twin_opt = trained(config, seed=3, steps=1)
    load_checkpoint(path, twin, twin_opt)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    for m, o in ((model, opt), (twin, twin_opt)):
        causal_lm_loss(m(ids), ids).total.backward()
        o.step()
    assert_same_state(model, twin)


def test_tied_embeddings_are_saved_and_restored(tmp_path, config):
    tied = config.replace(tie_word_embeddings=True)
    model, opt = trained(tied)
    path = save_checkpoint(tmp_path, 1, model, opt, {}, tied)
    loaded, _ = load_model(path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert_same_state(model, loaded)


def test_interrupted_save_leaves_previous_checkpoint_latest(tmp_path, config, monkeypatch):
    model, opt = trained(config)
    first = save_checkpoint(tmp_path, 10, model, opt, {}, config)
    real_save = ckpt_mod.save_file

    def failing_save(tensors, filename, metadata=None):
        if filename.endswith("optimizer.safetensors"):
            real_save(tensors, filename, metadata=metadata)  # a full file exists, then the "kill" hits
            raise KeyboardInterrupt
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 20, model, opt, {}, config)
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".latentmoe.json", "checkpoint-000010"], "temp dir cleaned up"


def test_leftover_temp_dirs_and_incomplete_checkpoints_are_ignored(tmp_path, config):
    model, opt = trained(config)
    first = save_checkpoint(tmp_path, 10, model, opt, {}, config)
    # A save killed before the rename (SIGKILL: no cleanup) leaves a complete-looking temp dir.
    shutil.copytree(first, tmp_path / ".checkpoint-000030.tmp-abcd")
    # A directory with the final name but a missing file (copied half-way, or deleted by hand).
    half = tmp_path / "checkpoint-000020"
    shutil.copytree(first, half)
    (half / "optimizer.safetensors").unlink()
    # One with no manifest at all.
    (tmp_path / "checkpoint-000040").mkdir()
    (tmp_path / "checkpoint-000040" / "model.safetensors").write_bytes(b"x")
    assert list_checkpoints(tmp_path) == [first]
    assert latest_checkpoint(tmp_path) == first
    with pytest.raises(CheckpointError, match=r"checkpoint-000020/optimizer\.safetensors"):
        load_checkpoint(half, model, opt)


def test_keep_last_prunes_oldest_checkpoints(tmp_path, config):
    model, opt = trained(config, steps=1)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, opt, {}, config, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000003", "checkpoint-000004"]
    # Saving the same step again replaces it in place.
    save_checkpoint(tmp_path, 4, model, opt, {"again": True}, config, keep_last=2)
    assert json.loads((tmp_path / "checkpoint-000004" / "trainer_state.json").read_text())["again"] is True


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupt_model_file_raises_checkpoint_error_naming_it(tmp_path, config, damage):
    model, opt = trained(config, steps=1)
    path = save_checkpoint(tmp_path, 1, model, opt, {}, config)
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"not a safetensors file" * 10)
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors") as info:
        load_checkpoint(path, model, opt)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(path)


def test_missing_checkpoint_and_wrong_model_raise_checkpoint_error(tmp_path, config):
    with pytest.raises(CheckpointError, match="no such"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model(tmp_path)
    model, opt = trained(config, steps=1)
    path = save_checkpoint(tmp_path, 1, model, opt, {}, config)
    bigger = CausalLM(config.replace(hidden_size=2 * config.hidden_size))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not fit the model"):
        load_checkpoint(path, bigger)
    (path / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"trainer_state\.json"):
        load_checkpoint(path, model, opt)


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path, config, monkeypatch):
    model, opt = trained(config, steps=1)
    path = save_checkpoint(tmp_path, 1, model, opt, {}, config)

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    load_checkpoint(path, model, opt)
    load_model(path)
    head = (path / "optimizer.safetensors").read_bytes()[:8]
    header = json.loads((path / "optimizer.safetensors").read_bytes()[8 : 8 + int.from_bytes(head, "little")])
    assert "state.0.exp_avg" in header and "state.0.exp_avg_sq" in header and "state.0.step" in header
    groups = json.loads(header["__metadata__"]["param_groups"])
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
