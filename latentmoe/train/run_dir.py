"""The run directory: what a training run may write into, what it resumes from, and what it says about both.

Before a run writes anything, :func:`plan_run` decides (rank 0 alone; under torchrun the decision is broadcast):

* **Whose directory is it?** A run directory carries ``.latentmoe.json`` (``latentmoe.io``) listing what we wrote:
  checkpoints, ``metrics.jsonl``, the plots, ``tokenizer.json``. A directory holding anything else is refused
  unless ``overwrite`` — and even then those files are left alone (one that has the name of a file the run must
  write is still refused). A directory from latentmoe 0.1.0 (checkpoints with manifests, no marker) is adopted:
  its checkpoints and run files are recorded as ours.
* **Leftovers of a crash** (our ``.latentmoe-tmp-*`` temporaries) are removed and reported.
* **Resume is explicit.** ``resume="required"`` (the CLI's ``--resume``) needs a checkpoint; ``"auto"`` starts fresh
  when there is none and says so; ``"no"`` refuses a directory that already holds a run (``overwrite`` replaces
  our files of the old run, never anyone else's). The newest checkpoint is verified in full (sizes, sha256,
  config, trainer state); a damaged one is reported by name and reason, and resuming from an older one is
  announced. With no valid checkpoint, ``--resume`` fails and nothing is touched.

Messages go to the ``latentmoe`` logger (the CLI prints them on stderr as ``latentmoe: warning: ...``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from latentmoe.checkpoint import (
    OPTIMIZER_FILE,
    RUN_KIND,
    Skipped,
    checkpoint_dirs,
    find_resumable,
    is_complete,
    set_aside,
)
from latentmoe.io import (
    Ownership,
    check_destination,
    claim,
    read_ownership,
    remove_owned,
    remove_stale_temporaries,
)

log = logging.getLogger("latentmoe")

DEMO_KIND = "demo"
RESUME_MODES = ("no", "required", "auto")
# Files a run writes at its top level besides checkpoints (train.metrics, the tokenizer the caller saves, the EP
# layout): a directory from latentmoe 0.1.0 held the first six.
RUN_FILES = ("metrics.jsonl", "loss.png", "expert_load.png", "tokenizer.json", "ep_layout.json", "ep_traffic.png",
             "tokenizer_config.json")
STATE_KEYS = ("seed", "torch_rng_state")


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used as asked (holds another run, nothing to resume, ...); names the path."""


def resume_mode(resume: bool | str | None) -> str:
    """``True``/"required" → "required", ``False``/None/"no" → "no", "auto" → "auto"."""
    if resume is True:
        return "required"
    if resume is False or resume is None:
        return "no"
    if resume not in RESUME_MODES:
        raise ValueError(f"resume must be one of {RESUME_MODES} (or a bool), got {resume!r}")
    return resume


@dataclass(frozen=True)
class RunPlan:
    """What a run will do with its directory: ``checkpoint`` to resume from (None: a fresh start), the newer
    checkpoints passed over (``skipped``), and the temporaries removed."""

    out_dir: Path
    kind: str
    checkpoint: Path | None
    skipped: tuple[Skipped, ...] = ()
    removed_temporaries: tuple[Path, ...] = field(default=())

    @property
    def fresh(self) -> bool:
        return self.checkpoint is None


def compatible_kinds(kind: str) -> tuple[str, ...]:
    """Markers a run of ``kind`` may continue in: a training run resumes a demo run's directory too."""
    return (RUN_KIND, DEMO_KIND) if kind == RUN_KIND else (kind,)


def adopt_legacy_run(out_dir: Path, kind: str) -> Ownership | None:
    """A 0.1.0 run directory (our checkpoints, no marker): record its checkpoints and run files as ours."""
    if read_ownership(out_dir) is not None or not out_dir.is_dir():
        return None
    ours = [p.name for p in checkpoint_dirs(out_dir) if is_complete(p)]
    if not ours:
        return None
    ours += [name for name in RUN_FILES if (out_dir / name).is_file()]
    claim(out_dir, kind, ours)
    log.warning("%s: a latentmoe 0.1.0 run directory; recorded its %d files as this run's", out_dir, len(ours))
    return read_ownership(out_dir)


def plan_run(
    out_dir: str | os.PathLike,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    replace_own: bool = False,
    kind: str = RUN_KIND,
) -> RunPlan:
    """Check, clean and resolve ``out_dir`` for a run (see the module docstring). Only rank 0 calls this.

    ``replace_own``: a fresh start replaces a previous run of ours in ``out_dir`` without ``overwrite`` (what the
    demo does: ``make demo`` twice retrains); files we did not write still need ``overwrite`` and are kept."""
    out_dir = Path(out_dir)
    mode = resume_mode(resume)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirectoryError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and not os.access(out_dir, os.W_OK):
        raise RunDirectoryError(f"{out_dir}: is not writable (read-only filesystem or no permission)")
    adopt_legacy_run(out_dir, kind)
    destination = check_destination(
        out_dir, kinds=compatible_kinds(kind), overwrite=overwrite, writes=RUN_FILES, option="--overwrite"
    )
    found = find_resumable(out_dir, require=(OPTIMIZER_FILE,), require_state_keys=STATE_KEYS)
    existing = checkpoint_dirs(out_dir)
    if mode == "no":
        if existing and not (overwrite or replace_own):
            newest = existing[-1].name
            raise RunDirectoryError(
                f"{out_dir}: already holds a run (newest checkpoint {newest}); pass --resume to continue it, "
                "or --overwrite to start over (only latentmoe's own files are replaced)"
            )
        removed = _remove_stale(out_dir)
        if destination.ownership is not None and destination.ownership.entries:
            kept = remove_owned(out_dir, destination.ownership.entries)
            for name in kept:
                log.warning("%s: kept (it holds files latentmoe did not write)", out_dir / name)
            log.info("%s: removed the previous run's files", out_dir)
        return RunPlan(out_dir, kind, None, removed_temporaries=removed)
    if found.checkpoint is None:
        if found.skipped:
            raise RunDirectoryError(
                f"{out_dir}: no valid checkpoint to resume from, nothing was changed; newest: "
                f"{found.skipped[0].reason}"
            )
        if mode == "required":
            raise RunDirectoryError(
                f"{out_dir}: nothing to resume (no checkpoint); run without --resume, or with --resume auto"
            )
        log.warning("%s: no checkpoint to resume; starting from step 0", out_dir)
    else:
        for skipped in found.skipped:
            aside = set_aside(skipped.path)
            log.warning("%s: skipped: %s (kept as %s)", skipped.path.name, skipped.reason, aside.name)
        if found.skipped:
            log.warning("%s: resuming from the older %s instead", out_dir, found.checkpoint.name)
    removed = _remove_stale(out_dir)
    return RunPlan(out_dir, kind, found.checkpoint, found.skipped, removed)


def _remove_stale(out_dir: Path) -> tuple[Path, ...]:
    removed = tuple(remove_stale_temporaries(out_dir))
    for path in removed:
        log.warning("%s: removed a temporary left by an interrupted run", path)
    return removed


def claim_run_file(out_dir: str | os.PathLike, name: str, *, kind: str = RUN_KIND) -> None:
    """Record a file the run wrote at the top of its directory (metrics, plots, tokenizer) as ours."""
    claim(out_dir, kind, [name])
