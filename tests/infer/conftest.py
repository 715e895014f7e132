"""Fixtures for the inference tests: random tiny models, and a tiny model trained for a second on a
synthetic rule so that its MTP modules draft well enough for speculative decoding to accept some drafts
and reject others."""

import pytest
import torch

from latentmoe import CausalLM, ModelConfig
from latentmoe.model.mtp import causal_lm_loss

RULE_VOCAB = 32  # tokens the synthetic rule uses (the tiny preset's vocabulary is larger)


def rule_batches(n_steps: int, batch_size: int, seq_len: int, seed: int):
    """Sequences where t_i = perm[(t_{i-1} + t_{i-2}) mod 32], with 10% random tokens: the main head can
    learn it exactly, the MTP heads (two and three tokens ahead) only approximately."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(RULE_VOCAB, generator=g)
    for _ in range(n_steps):
        x = torch.empty(batch_size, seq_len, dtype=torch.long)
        x[:, :2] = torch.randint(2, RULE_VOCAB, (batch_size, 2), generator=g)
        for i in range(2, seq_len):
            noise = torch.rand(batch_size, generator=g) < 0.1
            rule = perm[(x[:, i - 1] + x[:, i - 2]) % RULE_VOCAB]
            x[:, i] = torch.where(noise, torch.randint(0, RULE_VOCAB, (batch_size,), generator=g), rule)
        yield x


def train_tiny(num_mtp: int, *, steps: int = 20, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_preset("tiny").replace(num_nextn_predict_layers=num_mtp))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x in rule_batches(steps, 8, 24, seed):
        loss = causal_lm_loss(model(x), x).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained_tiny_mtp2() -> CausalLM:
    """Tiny model with two MTP modules, trained briefly; float64 so that batched and one-at-a-time
    forwards agree far below any argmax margin (token-for-token comparisons)."""
    return train_tiny(2).double()


@pytest.fixture
def random_tiny() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig.from_preset("tiny")).eval()
