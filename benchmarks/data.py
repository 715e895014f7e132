"""prepare-data throughput against two peers doing the same job, and the data loader's cost per training step.

    python benchmarks/data.py [--mb 32] [--workers 1 2] [--steps 5] [--loader-calls 200]

The input is the shipped corpus cut into documents of about 4 kB, repeated until ``--mb`` MiB of text,
each repeat perturbed (a ``[copy r]`` line prepended to every document, so no two documents are
equal), as one JSON Lines file. Every contender tokenises it with the same ``tokenizers`` byte-level
BPE (vocabulary 4,096, the ``small`` preset's), each document framed ``BOS ids EOS``, and writes the
ids to disk; the token counts must agree, or the benchmark stops.

- **ours**: :func:`latentmoe.data.prepare_data` with ``workers`` processes and ``--shard-mb`` shards
  (shards + manifest, fsync, SHA-256, document index: all included).
- **datasets.map**: Hugging Face ``Dataset.from_json`` (JSONL -> Arrow) then ``map(batched=True,
  num_proc=workers)`` with the same tokenizer, writing an Arrow cache file.
- **nanoGPT-style**: one process reads the lines, ``json.loads``, ``encode_batch_fast`` in batches,
  ``numpy`` concatenation, one ``np.memmap`` ``.bin`` file (as nanoGPT's ``prepare.py`` scripts do).

Throughput is MiB of document text (UTF-8) per second of wall time, best of ``--repeats`` runs;
``ratio`` = ours / peer (higher is better). The loader case times :meth:`TokenDataset.batch` (16 x 128
random windows read from the memory-mapped shards, the ``small`` preset's demo shape) against one
full training step of the ``small`` preset (forward, backward, AdamW) measured in the same run;
``ratio`` = step time / loader time, so the goal "< 2 % of the step" is ratio >= 50.

Run it on an otherwise idle machine; absolute rates move with the neighbours, ratios less so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from latentmoe.data import load_corpus, prepare_data, train_tokenizer
from latentmoe.data.tokenizer import BOS_ID, EOS_ID

# torch, the model and benchmarks/common.py are imported inside main(): prepare_data's workers are spawned
# processes that import this script again, and should not pay for torch.
MIB = 1 << 20
DOCUMENT_CHARS = 4096
VOCAB = 4096
ENCODE_BATCH_DOCS = 256
LOADER_GOAL_SHARE = 0.02


def write_input(path: Path, megabytes: float) -> tuple[int, int]:
    """The JSONL input (module docstring); returns (documents, text bytes)."""
    pieces = []
    for text in load_corpus().train_parts:
        pieces += [text[i : i + DOCUMENT_CHARS] for i in range(0, len(text), DOCUMENT_CHARS)]
    target = int(megabytes * MIB)
    documents = text_bytes = 0
    with open(path, "w", encoding="utf-8") as f:
        copy = 0
        while text_bytes < target:
            for piece in pieces:
                text = f"[copy {copy}]\n{piece}"
                f.write(json.dumps({"text": text}) + "\n")
                documents += 1
                text_bytes += len(text.encode("utf-8"))
                if text_bytes >= target:
                    break
            copy += 1
    return documents, text_bytes


def best_time(fn, repeats: int):
    """(best seconds, last result) of ``fn()`` over ``repeats`` runs."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def run_ours(jsonl: Path, tokenizer_file: Path, work: Path, workers: int, shard_bytes: int) -> int:
    out = work / f"ours-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    result = prepare_data([jsonl], out, tokenizer=tokenizer_file, workers=workers, val_fraction=0.0,
                          shard_bytes=shard_bytes)
    return result.train_tokens + result.val_tokens


def run_datasets_map(jsonl: Path, tokenizer_file: Path, work: Path, workers: int) -> int:
    import datasets
    from tokenizers import Tokenizer

    datasets.disable_progress_bars()
    cache = work / f"hf-{workers}"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir()
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    ds = datasets.Dataset.from_json(str(jsonl), cache_dir=str(cache / "json"))

    def tokenize(batch):
        encodings = tokenizer.encode_batch_fast(batch["text"], add_special_tokens=False)
        return {"ids": [[BOS_ID, *e.ids, EOS_ID] for e in encodings]}

    out = ds.map(tokenize, batched=True, batch_size=1000, remove_columns=ds.column_names, num_proc=workers,
                 cache_file_name=str(cache / "tokens.arrow"))
    return sum(len(ids) for ids in out.data.column("ids").to_pylist())


def run_nanogpt_style(jsonl: Path, tokenizer_file: Path, work: Path) -> int:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    with open(jsonl, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    arrays = []
    for i in range(0, len(texts), ENCODE_BATCH_DOCS):
        for e in tokenizer.encode_batch_fast(texts[i : i + ENCODE_BATCH_DOCS], add_special_tokens=False):
            arrays.append(np.array([BOS_ID, *e.ids, EOS_ID], dtype=np.uint16))
    ids = np.concatenate(arrays)
    out = np.memmap(work / "nanogpt-train.bin", dtype=np.uint16, mode="w+", shape=ids.shape)
    out[:] = ids
    out.flush()
    return int(ids.size)


def loader_case(dataset_dir: Path, *, steps: int, calls: int) -> dict:
    import torch
    from common import median_time

    from latentmoe import CausalLM, ModelConfig
    from latentmoe.data import TokenDataset, random_windows
    from latentmoe.model.mtp import causal_lm_loss
    from latentmoe.train.optim import build_optimizer

    config = ModelConfig.from_preset("small")
    batch_size, seq_len = 16, 128
    data = TokenDataset.open(dataset_dir)
    data.check_model(config.vocab_size)
    step = iter(range(10**9))
    loader_s = median_time(lambda: data.batch(next(step), batch_size=batch_size, seq_len=seq_len, seed=0),
                           repeats=calls, warmup=5)
    stream = data.ids("train")
    in_memory_s = median_time(
        lambda: random_windows(stream, batch_size=batch_size, seq_len=seq_len, seed=0, step=next(step)),
        repeats=calls, warmup=5,
    )
    torch.manual_seed(0)
    model = CausalLM(config)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    ids = data.batch(0, batch_size=batch_size, seq_len=seq_len, seed=0)

    def train_step():
        out = model(ids)
        causal_lm_loss(out, ids).total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = median_time(train_step, repeats=steps, warmup=1)
    share = loader_s / step_s
    return {
        "case": f"loader: batch {batch_size}x{seq_len} random windows from shards, small preset fp32",
        "metric": "data loader ms per step (lower is better); peer = one small-preset training step",
        "ours": round(loader_s * 1e3, 4),
        "peer": round(step_s * 1e3, 2),
        "peer_name": "CausalLM(small) forward + backward + AdamW step, same batch, same run",
        "ratio": round(step_s / loader_s, 1),
        "share_of_step": round(share, 5),
        "in_memory_random_windows_ms": round(in_memory_s * 1e3, 4),
        "goal": f"< {LOADER_GOAL_SHARE:.0%} of the step (ratio >= {1 / LOADER_GOAL_SHARE:.0f})",
        "met": share < LOADER_GOAL_SHARE,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=32.0, help="MiB of document text (default %(default)s)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-mb", type=float, default=4.0,
                        help="MiB of text per shard, so that several workers have shards to share")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each contender (best is kept)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps for the loader case")
    parser.add_argument("--loader-calls", type=int, default=200)
    parser.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import write_results

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="latentmoe-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    jsonl = work / "input.jsonl"
    documents, text_bytes = write_input(jsonl, args.mb)
    tokenizer_file = work / "tokenizer.json"
    train_tokenizer(load_corpus().train_parts, VOCAB).save(str(tokenizer_file))
    text_mib = text_bytes / MIB
    shard_bytes = max(1, int(args.shard_mb * MIB))
    print(f"input: {documents:,} documents, {text_mib:.1f} MiB of text in {work}")

    import datasets

    cases = []
    timings = {}
    for workers in args.workers:
        ours_s, ours_tokens = best_time(lambda w=workers: run_ours(jsonl, tokenizer_file, work, w, shard_bytes),
                                        args.repeats)
        peer_s, peer_tokens = best_time(lambda w=workers: run_datasets_map(jsonl, tokenizer_file, work, w),
                                        args.repeats)
        if ours_tokens != peer_tokens:
            raise SystemExit(f"token counts differ: ours {ours_tokens}, datasets.map {peer_tokens}")
        timings[workers] = ours_s
        case = {
            "case": f"prepare-data workers={workers}, {text_mib:.0f} MiB JSONL",
            "metric": "MiB/s of text (higher is better)",
            "ours": round(text_mib / ours_s, 3),
            "peer": round(text_mib / peer_s, 3),
            "peer_name": f"datasets {datasets.__version__} from_json + map(num_proc={workers}) -> Arrow",
            "ratio": round(peer_s / ours_s, 3),
            "ours_tokens_per_s": round(ours_tokens / ours_s),
            "peer_tokens_per_s": round(peer_tokens / peer_s),
            "goal": ">= 1x",
            "met": peer_s >= ours_s,
        }
        if 1 in timings and workers != 1:
            case["speedup_over_1_worker"] = round(timings[1] / ours_s, 3)
        cases.append(case)
        print(f"{case['case']}: ours {case['ours']} MiB/s, datasets.map {case['peer']} MiB/s, ratio {case['ratio']}")
    if 1 in timings:
        ours_s = timings[1]
    else:
        ours_s, ours_tokens = best_time(lambda: run_ours(jsonl, tokenizer_file, work, 1, shard_bytes), args.repeats)
    nano_s, nano_tokens = best_time(lambda: run_nanogpt_style(jsonl, tokenizer_file, work), args.repeats)
    if nano_tokens != ours_tokens:
        raise SystemExit(f"token counts differ: ours {ours_tokens}, nanoGPT-style {nano_tokens}")
    cases.append({
        "case": f"prepare-data workers=1, {text_mib:.0f} MiB JSONL",
        "metric": "MiB/s of text (higher is better)",
        "ours": round(text_mib / ours_s, 3),
        "peer": round(text_mib / nano_s, 3),
        "peer_name": "nanoGPT-style: one process, json.loads + encode_batch_fast + numpy + np.memmap .bin",
        "ratio": round(nano_s / ours_s, 3),
        "ours_tokens_per_s": round(ours_tokens / ours_s),
        "peer_tokens_per_s": round(nano_tokens / nano_s),
        "goal": ">= 1x",
        "met": nano_s >= ours_s,
    })
    print(f"{cases[-1]['case']}: ours {cases[-1]['ours']} MiB/s, nanoGPT-style {cases[-1]['peer']} MiB/s")
    loader = loader_case(work / f"ours-{args.workers[0]}", steps=args.steps, calls=args.loader_calls)
    cases.append(loader)
    print(f"loader {loader['ours']} ms/step vs step {loader['peer']} ms: {loader['share_of_step']:.3%} of the step "
          f"(in-memory random_windows {loader['in_memory_random_windows_ms']} ms)")
    path = write_results("data", cases)
    print(f"wrote {path}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
