"""A dataset of 256 MiB of tokens is read window by window with resident memory far below its size.

The dataset is generated here, fast, straight as token shards: the tokens of a slice of the shipped
corpus, repeated with every repeat perturbed (its body ids shifted, specials kept) and written by the
library's :class:`ShardWriter` + manifest — the same files prepare-data writes. Then the shards' pages
are dropped from the page cache (``posix_fadvise(DONTNEED)``), so reading them is reading from disk,
as for a dataset larger than memory; without that, the kernel maps whole cached folios and RSS says
nothing about what was read.

A child process (RSS read from ``/proc/self/status``) opens the dataset and reads 200 random batches
of 8 x 256 tokens. **Bound:** its VmRSS grows by less than 32 MiB (1/8 of the dataset; 1,600 windows
touch at most two 4 kB pages each, ~13 MiB). **Control:** touching every token afterwards grows its
file-backed RSS by more than 3/4 of the dataset, so the measurement does see shard pages when they are
paged in.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from latentmoe.data import encode_documents
from latentmoe.data.prepare import ResolvedTokenizer
from latentmoe.data.shards import TOKENIZER_NAME, ShardWriter, make_manifest, write_manifest
from latentmoe.data.tokenizer import BOS_ID, BOS_TOKEN, EOS_ID, EOS_TOKEN

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
SHARDS = 8
SHARD_TOKENS = 16 * MIB  # uint16: 32 MiB a shard, 256 MiB in all
RSS_GROWTH_BOUND = 32 * MIB
SPECIALS = 3

CHILD = textwrap.dedent(
    """
    import json, sys
    from latentmoe.data.dataset import TokenDataset

    def status():
        fields = {}
        for line in open("/proc/self/status"):
            key, value = line.split(":", 1)
            if key in ("VmRSS", "RssFile", "RssAnon"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    data = TokenDataset.open(sys.argv[1])
    before = status()
    for step in range(200):
        data.batch(step, batch_size=8, seq_len=256, seed=0)
    after = status()
    chunk = 1 << 22
    for start in range(0, data.train_tokens, chunk):
        data.read("train", start, min(start + chunk, data.train_tokens))
    touched = status()
    print(json.dumps({"before": before, "after": after, "touched": touched}))
    """
)


def generate(out: Path, tokenizer, texts) -> int:
    out.mkdir()
    base = encode_documents(tokenizer, texts).numpy().astype(np.uint16)
    base_starts = np.flatnonzero(base == BOS_ID)
    vocab = tokenizer.get_vocab_size()
    repeats = SHARD_TOKENS // base.size
    body = np.tile(base >= SPECIALS, repeats)
    shift = np.repeat(np.arange(repeats, dtype=np.int64) * 7, base.size)
    starts = (base_starts[None, :] + base.size * np.arange(repeats)[:, None]).ravel()
    records = []
    for index in range(SHARDS):
        tokens = np.tile(base, repeats).astype(np.int64)
        tokens[body] = (tokens[body] - SPECIALS + shift[body] + index) % (vocab - SPECIALS) + SPECIALS
        with ShardWriter(out, index, dtype="uint16", bos_id=BOS_ID, eos_id=EOS_ID) as writer:
            writer.add_framed(tokens.astype(np.uint16), starts, split="train")
            if index == SHARDS - 1:
                writer.add_framed(base, base_starts, split="val")
            records.append(writer.commit())
    tokenizer.save(str(out / TOKENIZER_NAME))
    resolved = ResolvedTokenizer(tokenizer, BOS_TOKEN, EOS_TOKEN, BOS_ID, EOS_ID, {"kind": "given"})
    units = [{"index": i, "bytes": 0, "parts": []} for i in range(SHARDS)]
    settings = {"split": "document", "val_fraction": 0.0}
    write_manifest(out, make_manifest(settings=settings, units=units, shards=records, tokenizer=resolved.record(),
                                      complete=True))
    for record in records:
        fd = os.open(out / record.file, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return sum(r.bytes for r in records)


@pytest.mark.slow
def test_random_windows_of_a_256_mib_dataset_stay_far_below_its_size(small_tokenizer, small_splits, tmp_path):
    size = generate(tmp_path / "big", small_tokenizer, small_splits.train_parts)
    assert size >= 256 * MIB - SHARDS * 64 * 1024
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "big")],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    rss = json.loads(proc.stdout)
    growth = rss["after"]["VmRSS"] - rss["before"]["VmRSS"]
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / MIB:.1f} MiB reading 1,600 windows"
    touched = rss["touched"]["RssFile"] - rss["before"]["RssFile"]
    assert touched > 0.75 * size, f"control: touching every token mapped only {touched / MIB:.1f} MiB"
