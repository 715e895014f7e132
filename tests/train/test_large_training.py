"""Training on a dataset of 256 MiB of tokens keeps resident memory far below the dataset's size.

The dataset is made as in tests/data/test_large.py (the shipped corpus's tokens, repeated and perturbed, written
as shards by the library's ShardWriter, then dropped from the page cache so that reading a window means reading
it from disk). A child process trains the tiny model on it through ``train_on_corpus`` (``verify_data=False``:
hashing would read every shard once at start) for 40 steps of 8 random windows of 128 tokens, and reads
``/proc/self/status`` after the first step and after the last (before the final checkpoint and plots).

**Bound:** between the two, file-backed resident memory (RssFile, where mapped shard pages are counted) grows by
less than 32 MiB (1/8 of the dataset; 320 windows touch at most two 4 kB pages each, ~2.5 MiB), and so does the
whole VmRSS (anonymous memory too: activations, optimizer). Measured on the development machine: +1.4 MiB
file-backed, +5.2 MiB in all, with the process at ~366 MiB (torch itself). **Control:** touching every
token afterwards grows RssFile by more than 3/4 of the dataset, so the measurement does see shard pages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.data.test_large import MIB, generate
from tests.train.conftest import corpus_texts

REPO = Path(__file__).resolve().parents[2]
FILE_GROWTH_BOUND = 32 * MIB
RSS_GROWTH_BOUND = 32 * MIB

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from latentmoe.data.dataset import TokenDataset
    from latentmoe.train import TrainConfig
    from latentmoe.train.run import train_on_corpus

    def status():
        fields = {}
        for line in open("/proc/self/status"):
            key, value = line.split(":", 1)
            if key in ("VmRSS", "RssFile", "RssAnon"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    marks = {}

    def on_log(record):
        if record["step"] in (1, 40):
            marks["first" if record["step"] == 1 else "last"] = status()

    cfg = TrainConfig(out_dir=sys.argv[2], preset="tiny", steps=40, batch_size=8, seq_len=128, warmup_steps=1,
                      log_every=1, eval_every=0, eval_batches=1, save_every=0, keep_last=1)
    result, _ = train_on_corpus(cfg, data=sys.argv[1], verify_data=False, progress=False, on_log=on_log)
    marks["after"] = status()  # the final checkpoint and plots are written: touching the shards starts here
    data = TokenDataset.open(sys.argv[1])
    chunk = 1 << 22
    for start in range(0, data.train_tokens, chunk):
        data.read("train", start, min(start + chunk, data.train_tokens))
    marks["touched"] = status()
    marks["tokens_seen"] = result.tokens_seen
    print(json.dumps(marks))
    """
)


@pytest.mark.slow
def test_training_on_a_256_mib_dataset_keeps_rss_far_below_its_size(tmp_path, tokenizer):
    size = generate(tmp_path / "big", tokenizer, list(corpus_texts().values()))
    assert size >= 200_000_000  # at least 200 MB of tokens (~255 MiB)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "big"), str(tmp_path / "run")],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    marks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert marks["tokens_seen"] == 40 * 8 * 128
    first, last, touched = marks["first"], marks["last"], marks["touched"]
    file_growth = last["RssFile"] - first["RssFile"]
    rss_growth = last["VmRSS"] - first["VmRSS"]
    assert file_growth < FILE_GROWTH_BOUND, f"file-backed RSS grew by {file_growth / MIB:.1f} MiB in 39 steps"
    assert rss_growth < RSS_GROWTH_BOUND, f"RSS grew by {rss_growth / MIB:.1f} MiB in 39 steps"
    control = touched["RssFile"] - marks["after"]["RssFile"]
    assert control > 0.75 * size, f"control: touching every token mapped only {control / MIB:.1f} MiB"
