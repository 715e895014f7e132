"""Fixtures for the server tests: a small byte-level BPE tokenizer trained here on the shipped corpus, a tiny
random model whose vocabulary is that tokenizer's (float64, so batched and alone decoding agree token for
token), a checkpoint of it on disk, and a server started on 127.0.0.1 for the test and stopped after it."""

import contextlib
import threading

import pytest
import torch

from latentmoe import CausalLM, ModelConfig
from latentmoe.checkpoint import save_checkpoint
from latentmoe.data.tokenizer import train_tokenizer
from latentmoe.infer import Engine
from latentmoe.infer.runner import ModelRunner
from latentmoe.serve import BackgroundServer, LocalBackend, create_app

CORPUS = "latentmoe/data/corpus/romeo_and_juliet.txt"
CORPUS_CHARS = 20_000
TOKENIZER_VOCAB = 512
GATE_TIMEOUT_S = 240  # generous: the machine may be busy; a test that fails opens the gate on its way out


@pytest.fixture(scope="session")
def tokenizer():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / CORPUS).read_text(encoding="utf-8")[:CORPUS_CHARS]
    return train_tokenizer(text, vocab_size=TOKENIZER_VOCAB)


def tiny_config(tokenizer, **overrides) -> ModelConfig:
    return ModelConfig.from_preset("tiny").replace(vocab_size=tokenizer.get_vocab_size(), **overrides)


@pytest.fixture(scope="session")
def model(tokenizer) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(tiny_config(tokenizer)).double().eval()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer):
    """A run directory holding a tiny checkpoint with a 4096-token context and its tokenizer."""
    root = tmp_path_factory.mktemp("serve-ckpt")
    torch.manual_seed(0)
    config = tiny_config(tokenizer, max_position_embeddings=4096)
    save_checkpoint(root, 1, CausalLM(config), None, {}, config)
    tokenizer.save(str(root / "tokenizer.json"))
    return root


@contextlib.contextmanager
def serving(backend, **app_options):
    """The backend behind a real HTTP server on a free port of 127.0.0.1; both stopped afterwards."""
    try:
        with BackgroundServer(create_app(backend, **app_options)) as server:
            yield server
    finally:
        backend.close(abort=True)


def local_backend(model, tokenizer, *, name="tiny", max_queued=64, speculative=True, **engine_options):
    options = {"block_size": 8, "max_batch": 8, **engine_options}
    return LocalBackend(Engine(model, tokenizer, **options), name=name, max_queued=max_queued,
                        speculative=speculative)


class Gate:
    """A decode (or speculative verify) call that waits until the test opens the gate, from the
    ``hold_from_step``-th call on: the test decides when the engine moves on, so what a test checks does not
    depend on how fast the machine is."""

    def __init__(self, *, hold_from_step: int = 1):
        self.open = threading.Event()
        self.entered = threading.Event()
        self.calls = 0
        gate = self

        def hold() -> None:
            gate.calls += 1
            if gate.calls >= hold_from_step:
                gate.entered.set()
                if not gate.open.wait(GATE_TIMEOUT_S):
                    raise TimeoutError("the test never opened the gate")

        class GatedRunner(ModelRunner):
            def decode(self, batch):
                hold()
                return super().decode(batch)

            def verify(self, batch, plan):
                hold()
                return super().verify(batch, plan)

        self.runner_cls = GatedRunner

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.open.set()  # a failing test must not leave the engine waiting
