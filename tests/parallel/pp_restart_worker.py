"""Run under ``torchrun --max-restarts 1``: a PP 2 DualPipeV training whose rank 1 dies at step 3 on the first
attempt.

usage: torchrun --standalone --nproc-per-node 2 --max-restarts 1 tests/parallel/pp_restart_worker.py OUT_DIR

Every attempt resumes from the newest checkpoint in OUT_DIR (``resume="auto"``), so the restarted job continues
from step 2 and finishes at step 4. Rank 1 drops a marker file beside the run just before it kills itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

KILL_AT_STEP = 2  # 0-based: the third optimizer step, after checkpoint-000002
KILLED_MARKER = "pp-rank1-killed"


def main(out_dir: Path) -> None:
    from latentmoe.parallel.pp.strategy import PipelineConfig
    from latentmoe.parallel.runtime import shutdown
    from latentmoe.parallel.strategy import ParallelConfig, start_strategy
    from latentmoe.train.trainer import train
    from tests.parallel.test_pipeline import batch_fn, fresh_model, train_cfg

    torch.set_num_threads(1)
    pipeline = PipelineConfig(pp=2, schedule="dualpipev", microbatches=4, seq_len=16)
    strategy = start_strategy(ParallelConfig(gpus_per_node=1, timeout_s=30, pipeline=pipeline))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    def dying_batch_fn(step: int) -> torch.Tensor:
        if first_attempt and strategy.topology.rank == 1 and step == KILL_AT_STEP:
            (out_dir.parent / KILLED_MARKER).write_text("killed\n")
            os._exit(17)
        return batch_fn(step)

    model = strategy.prepare_model(fresh_model())
    with strategy.errors():
        train(train_cfg(out_dir, steps=4, save_every=2), batch_fn=dying_batch_fn, model=model, resume="auto",
              handle_signals=False, strategy=strategy)
    shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(Path(sys.argv[1]))
