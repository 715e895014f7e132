"""prepare-data killed (SIGKILL) in the middle of a shard, then run again, gives the shards of one clean run."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from latentmoe.data import TokenDataset, prepare_data
from latentmoe.data.shards import is_our_temp_file, read_manifest

from .formats import write_jsonl
from .test_prepare import shard_digests

REPO = Path(__file__).resolve().parents[2]
SETTINGS = dict(val_fraction=0.2, shard_bytes=8_000, encode_batch_bytes=2_000)

# The child prepares the dataset and kills itself from its progress callback: with one worker in the
# middle of the third shard (its temporary file is on disk, two shards are recorded); with two workers,
# the whole process group (pool and manager included) after the first recorded shard.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from latentmoe.data import prepare_data

    source, out, tokenizer, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    seen = {}

    def progress(p):
        if workers == 1 and p.shards_done == 2:
            # The first call with two shards done is their record; the next one is the third shard's first batch.
            if seen.setdefault("run_bytes", p.run_bytes) < p.run_bytes:
                os.kill(os.getpid(), signal.SIGKILL)
        if workers > 1 and p.shards_done >= 1:
            os.killpg(os.getpgrp(), signal.SIGKILL)

    prepare_data([source], out, tokenizer=tokenizer, workers=workers, progress=progress, **{settings})
    sys.exit("not killed")
    """
).replace("{settings}", repr(SETTINGS))


def run_and_kill(source, out, tokenizer_file, workers):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), str(out), str(tokenizer_file), str(workers)],
        env=env, capture_output=True, text=True, timeout=120, start_new_session=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_run_then_rerun_equals_one_clean_run(documents, tokenizer_file, tmp_path, workers):
    source = write_jsonl(documents, tmp_path / "d.jsonl")
    clean = prepare_data([source], tmp_path / "clean", tokenizer=tokenizer_file, **SETTINGS)
    out = tmp_path / "killed"
    run_and_kill(source, out, tokenizer_file, workers)

    manifest = read_manifest(out)
    assert not manifest["complete"] and 1 <= len(manifest["shards"]) < clean.shards_total
    if workers == 1:
        assert len(manifest["shards"]) == 2
        assert any(is_our_temp_file(p.name) for p in out.iterdir()), "killed in the middle of a shard"
    with pytest.raises(ValueError, match="has not finished"):
        TokenDataset.open(out)

    again = prepare_data([source], out, tokenizer=tokenizer_file, workers=workers, **SETTINGS)
    assert again.shards_skipped >= 1 and again.shards_skipped + again.shards_written == clean.shards_total
    assert not any(is_our_temp_file(p.name) for p in out.iterdir())
    assert shard_digests(out) == shard_digests(tmp_path / "clean")
    assert read_manifest(out)["shards"] == read_manifest(tmp_path / "clean")["shards"]
    TokenDataset.open(out, verify_hashes=True)
