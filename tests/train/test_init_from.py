"""``--init-from``: a transformers-saved DeepseekV3 directory (BF16/FP32 and FP8) or one of our runs; the first
training loss equals transformers' on the same batch, step-0 validation equals the source's, MTP modules the
files lack are initialised (the same on any EP layout), and an expert-parallel rank reads only its experts."""

from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch

from latentmoe.checkpoint import load_model
from latentmoe.config import ModelConfig
from latentmoe.data import TokenDataset
from latentmoe.io import read_json
from latentmoe.model.moe import Experts
from latentmoe.model.mtp import MTPModule
from latentmoe.model.transformer import Block, materialize, meta_model
from latentmoe.train.init_from import init_module_, load_pretrained_weights, open_pretrained
from latentmoe.train.metrics import read_metrics
from latentmoe.train.optim import lr_at
from latentmoe.train.run import train_on_corpus
from tests.hf.helpers import hf_v3, quantize_checkpoint
from tests.parallel.launch import run_ranks
from tests.train.conftest import VOCAB, tiny_cfg

LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    """A random DeepseekV3 model and its tokenizer, both saved by transformers (no MTP weights in the files)."""
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("hf") / "model"
    model = hf_v3(vocab_size=VOCAB)
    model.save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|eos|>",
                            pad_token="<|pad|>").save_pretrained(out)
    return out, model


@pytest.fixture
def messages(caplog):
    logger = logging.getLogger("latentmoe")
    logger.addHandler(caplog.handler)  # the CLI's set-up may have stopped propagation to the root logger
    caplog.handler.setLevel(logging.INFO)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(old)


def test_first_training_loss_from_a_transformers_checkpoint_equals_transformers_loss(tmp_path, hf_dir, dataset_dir,
                                                                                   messages):
    path, reference = hf_dir
    cfg = tiny_cfg(tmp_path / "run", steps=1)
    result, run = train_on_corpus(cfg, init_from=path, data=dataset_dir, progress=False)
    ids = TokenDataset.open(dataset_dir).batch(0, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
    with torch.no_grad():
        theirs = float(reference.eval()(ids, labels=ids).loss)
    first = read_metrics(result.metrics_path)[-1]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(theirs, rel=LOSS_RTOL)
    assert run.init.initialised_mtp == (1,)  # config.json asks for one MTP module; transformers saved none
    assert "holds no weights for MTP depth 1: initialised" in messages.text
    _, config = load_model(result.checkpoint)
    assert config.num_nextn_predict_layers == 1 and config.vocab_size == VOCAB


def test_an_fp8_checkpoint_is_dequantised_into_the_training_dtype(tmp_path, hf_dir):
    from latentmoe.hf import load_pretrained

    path, _ = hf_dir
    fp8 = tmp_path / "fp8"
    quantize_checkpoint(path, fp8)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(path / name, fp8 / name)
    source = open_pretrained(fp8)
    model = materialize(meta_model(source.config))
    load_pretrained_weights(source, model, seed=0)
    reference = load_pretrained(fp8).state_dict()  # tests/hf/test_fp8.py checks it against float64 tile maths
    state = model.state_dict()
    assert all(state[name].dtype in (torch.float32,) for name in state)
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name
    assert {n for n in state if n not in reference} == {n for n in state if n.startswith("mtp.")}


def test_init_from_our_run_starts_at_the_sources_validation_loss_with_a_fresh_schedule(tmp_path, source_run,
                                                                                       dataset_dir):
    source, _ = source_run
    cfg = tiny_cfg(tmp_path / "run", steps=2, eval_every=0, lr=1e-3)
    result, run = train_on_corpus(cfg, init_from=source.out_dir, data=dataset_dir, progress=False)
    records = read_metrics(result.metrics_path)
    assert records[0]["step"] == 0 and records[0]["val_loss"] == source.final_val_loss
    assert result.initial_val_loss == source.final_val_loss
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[1]["lr"] == lr_at(0, max_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup,
                                     total_steps=cfg.steps)
    state = read_json(result.checkpoint / "trainer_state.json")
    assert state["step"] == 2 and run.init.initialised_mtp == ()
    from safetensors import safe_open

    with safe_open(str(result.checkpoint / "optimizer.safetensors"), framework="pt") as f:
        steps = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".step")}  # noqa: SIM118
    assert steps == {2.0}  # AdamW started from nothing, not from the source's 12 steps


def test_missing_mtp_modules_draw_the_same_values_on_any_expert_layout():
    config = ModelConfig.from_preset("tiny")
    L, E = config.num_hidden_layers, config.n_routed_experts
    full = MTPModule(config, Block(config, L))
    init_module_(full, std=config.initializer_range, seed=3, prefix="mtp.0")
    half = MTPModule(config, Block(config, L))
    half.block.mlp.experts = Experts(E // 2, config.hidden_size, config.moe_intermediate_size)
    init_module_(half, std=config.initializer_range, seed=3, prefix="mtp.0", ep_rank=1)
    for name, tensor in half.state_dict().items():
        expected = full.state_dict()[name]
        if name.startswith("block.mlp.experts."):
            expected = expected[E // 2:]
        assert torch.equal(tensor, expected), name
    assert torch.equal(full.enorm.weight, torch.ones_like(full.enorm.weight))
    w = full.eh_proj.weight
    assert w.mean().abs() < 3 * config.initializer_range / math.sqrt(w.numel())
    assert w.std().item() == pytest.approx(config.initializer_range, rel=0.05)
    other = MTPModule(config, Block(config, L))
    init_module_(other, std=config.initializer_range, seed=4, prefix="mtp.0")
    assert not torch.equal(other.eh_proj.weight, w)


def sliced_model(config: ModelConfig, ep_size: int):
    """A model whose MoE layers hold 1/ep_size of the experts (as an EP rank's do), allocated."""
    model = meta_model(config)
    for moe in model.moe_layers():
        with torch.device("meta"):
            moe.experts = Experts(config.n_routed_experts // ep_size, config.hidden_size, config.moe_intermediate_size)
    return materialize(model)


def test_an_expert_parallel_rank_reads_only_its_experts_from_our_checkpoint(source_run, monkeypatch):
    import latentmoe.checkpoint.tensors as tensors_mod

    source, _ = source_run
    full, config = load_model(source.checkpoint)
    E = config.n_routed_experts
    reads = []
    real = tensors_mod.safe_open

    class Spy:
        def __init__(self, *args, **kw):
            self.file = real(*args, **kw)

        def __enter__(self):
            self.f = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            reads.append((key, None))
            return self.f.get_tensor(key)

        def get_slice(self, key):
            part = self.f.get_slice(key)

            class Rows:
                def get_shape(self):
                    return part.get_shape()

                def __getitem__(self, rows):
                    reads.append((key, (rows.start, rows.stop)))
                    return part[rows]

            return Rows()

    monkeypatch.setattr(tensors_mod, "safe_open", Spy)
    model = sliced_model(config, 2)
    src = open_pretrained(source.out_dir)
    load_pretrained_weights(src, model, seed=0)  # EP rank 0 of 2 (no hook: rank 0)
    expert_reads = [(k, r) for k, r in reads if ".experts." in k]
    assert expert_reads and all(r == (0, E // 2) for _, r in expert_reads)
    state, ref = model.state_dict(), full.state_dict()
    for name, tensor in state.items():
        assert torch.equal(tensor, ref[name][: E // 2] if ".experts." in name else ref[name]), name


def test_an_expert_parallel_rank_reads_only_its_experts_from_a_hf_directory(hf_dir, monkeypatch):
    import latentmoe.hf.load as hf_load
    from latentmoe.hf import load_pretrained, load_pretrained_into

    path, _ = hf_dir
    requested = []
    real = hf_load.read_into

    def spy(info, plan, keys, place, **kw):
        requested.extend(keys)
        return real(info, plan, keys, place, **kw)

    monkeypatch.setattr(hf_load, "read_into", spy)
    source = open_pretrained(path)
    config = source.config.replace(num_nextn_predict_layers=0)
    E = config.n_routed_experts
    model = sliced_model(config, 2)
    load_pretrained_into(model, path, ep_rank=1)
    expert_keys = [k for k in requested if ".mlp.experts." in k]
    assert expert_keys and all(E // 2 <= int(k.split(".mlp.experts.")[1].split(".")[0]) < E for k in expert_keys)
    ref = load_pretrained(path).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref[name][E // 2:] if ".experts." in name else ref[name]), name


def _ep_init(rank: int, world: int, root: str, source: str, dataset_dir: str) -> None:
    from pathlib import Path

    from latentmoe.parallel.strategy import ExpertParallelStrategy, ParallelConfig
    from latentmoe.parallel.topology import build_groups

    parallel = ParallelConfig(ep=2)
    strategy = ExpertParallelStrategy(build_groups(parallel.topology(rank, world)), parallel)
    train_on_corpus(tiny_cfg(Path(root) / "ep2", steps=3), init_from=source, data=dataset_dir, strategy=strategy,
                    progress=False)


@pytest.mark.slow
def test_init_from_under_expert_parallelism_trains_as_one_process(tmp_path, source_run, dataset_dir):
    source, _ = source_run
    single, _ = train_on_corpus(tiny_cfg(tmp_path / "single", steps=3), init_from=source.out_dir, data=dataset_dir,
                                progress=False)
    run_ranks(_ep_init, 2, str(tmp_path), str(source.out_dir), str(dataset_dir), deadline_s=300)
    ours, ref = read_metrics(tmp_path / "ep2" / "metrics.jsonl"), read_metrics(single.metrics_path)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == [0, 1, 2, 3]
    assert ours[0]["val_loss"] == pytest.approx(ref[0]["val_loss"], rel=LOSS_RTOL)
    for a, b in zip(ours[1:], ref[1:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), a["step"]
