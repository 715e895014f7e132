"""Run under ``torchrun --max-restarts 1``: a 2-rank EP training whose rank 1 dies at step 3 on the first attempt.

usage: torchrun --standalone --nproc-per-node 2 --max-restarts 1 tests/parallel/restart_worker.py OUT_DIR

Every attempt resumes from the newest checkpoint in OUT_DIR (``resume="auto"``: an empty directory starts
fresh), so the restarted job continues from step 2 and finishes at step 4. Rank 1 drops a marker file just
before it kills itself, so the test can tell that the failure really happened; rank 0 of the attempt that
finishes writes the checkpoint it resumed from.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

KILL_AT_STEP = 2  # 0-based: the third optimizer step, after checkpoint-000002
KILLED_MARKER = "rank1-killed"
RESUMED_FROM = "resumed-from.txt"  # rank 0 of the attempt that finishes writes where it resumed from


def main(out_dir: Path) -> None:
    from latentmoe import CausalLM
    from latentmoe.parallel.runtime import shutdown
    from latentmoe.parallel.strategy import ParallelConfig, start_strategy
    from latentmoe.train.trainer import train
    from tests.parallel.test_training import batch_fn, config, train_cfg

    torch.set_num_threads(1)
    parallel = ParallelConfig(ep=2, gpus_per_node=1, timeout_s=30)
    strategy = start_strategy(parallel)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    def dying_batch_fn(step: int) -> torch.Tensor:
        if first_attempt and strategy.topology.rank == 1 and step == KILL_AT_STEP:
            (out_dir.parent / KILLED_MARKER).write_text("killed\n")  # beside the run: nothing foreign in it
            os._exit(17)
        return batch_fn(step)

    torch.manual_seed(0)
    model = strategy.prepare_model(CausalLM(config()))
    with strategy.errors():
        result = train(train_cfg(out_dir, save_every=2), batch_fn=dying_batch_fn, model=model, resume="auto",
                       handle_signals=False, strategy=strategy)
    if strategy.topology.rank == 0:  # beside the run: nothing foreign in it
        (out_dir.parent / RESUMED_FROM).write_text(result.resumed_from.name if result.resumed_from else "")
    shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(Path(sys.argv[1]))
