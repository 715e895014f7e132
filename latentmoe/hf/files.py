"""The files of a Hugging Face checkpoint directory: headers, tensor-by-tensor reads, sharded writes.

Reading never unpickles and never holds more than a window of the files mapped: safetensors' reader maps a
file and hands out tensors that live in that mapping; pages once touched count towards the process's
resident memory until the mapping closes. So :func:`iter_windows` reads in file-offset order and re-opens
the file every ``window_bytes``, which unmaps what was already copied out — loading then peaks at about the
model's own size plus one window (measured in tests/hf/test_memory.py and benchmarks/load.py).

Headers are read (and checked against ``model.safetensors.index.json``) before any tensor data, so a
missing shard, a tensor in the wrong file or a truncated file is reported before anything is loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from latentmoe.checkpoint.tensors import write_safetensors
from latentmoe.hf.errors import HFCheckpointError
from latentmoe.io import one_line, read_json

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SHARD_NAME = "model-{index:05d}-of-{total:05d}.safetensors"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
FP8_CODE = "F8_E4M3"
TORCH_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.float8_e4m3fn: "F8_E4M3"}
MIN_WINDOW_BYTES = 1 << 20
MAX_WINDOW_BYTES = 256 << 20
WINDOWS_PER_FILE = 16


@dataclass(frozen=True)
class TensorHeader:
    """What a safetensors header says about one tensor: its file, dtype code ("BF16", "F8_E4M3", ...), shape."""

    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES.get(self.dtype, 0)
        for d in self.shape:
            n *= d
        return n


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """A directory with ``config.json`` and ``model.safetensors`` or its sharded index, and no latentmoe
    trainer state (our own checkpoints also hold a config.json and a model.safetensors, in our names)."""
    path = Path(path)
    return (
        (path / CONFIG_NAME).is_file()
        and ((path / WEIGHTS_NAME).is_file() or (path / INDEX_NAME).is_file())
        and not (path / "trainer_state.json").exists()
    )


def read_headers(directory: str | os.PathLike) -> dict[str, TensorHeader]:
    """Every tensor's header, in file order then offset order; checked against the shard index if there is one."""
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        weight_map = _read_index(index_path)
        files = sorted(set(weight_map.values()))
    elif (directory / WEIGHTS_NAME).is_file():
        weight_map, files = None, [WEIGHTS_NAME]
    else:
        raise HFCheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME} (not a Hugging Face checkpoint)")
    headers: dict[str, TensorHeader] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            listed = next(k for k, v in (weight_map or {}).items() if v == name)
            raise HFCheckpointError(f"{path}: missing shard (listed in {INDEX_NAME} for tensor {listed})")
        for key, header in _file_headers(path).items():
            if key in headers:
                raise HFCheckpointError(f"{path}: tensor {key} is also in {headers[key].file.name}")
            if weight_map is not None and weight_map.get(key) != name:
                where = f"the index puts it in {weight_map[key]}" if key in weight_map else f"not in {INDEX_NAME}"
                raise HFCheckpointError(f"{path}: unexpected tensor {key} ({where})")
            headers[key] = header
    for key, name in (weight_map or {}).items():
        if key not in headers:
            raise HFCheckpointError(f"{directory / name}: tensor {key} is missing (listed in {INDEX_NAME})")
    return headers


def _read_index(path: Path) -> dict[str, str]:
    index = read_json(path, error=HFCheckpointError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise HFCheckpointError(f"{path}: no weight_map object of tensor name -> file name")
    for name in set(weight_map.values()):
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise HFCheckpointError(f"{path}: shard name {name!r} is not a .safetensors file in this directory")
    return weight_map


def _file_headers(path: Path) -> dict[str, TensorHeader]:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()
            out = {}
            for key in keys:
                s = f.get_slice(key)
                out[key] = TensorHeader(path, s.get_dtype(), tuple(s.get_shape()))
            return out
    except (SafetensorError, OSError) as exc:
        raise HFCheckpointError(f"{path}: not a readable safetensors file ({one_line(exc)})") from None


def window_bytes_for(total_bytes: int) -> int:
    """How many bytes to read through one mapping before re-opening (a 1/16 of the data, 1–256 MiB)."""
    return max(MIN_WINDOW_BYTES, min(MAX_WINDOW_BYTES, total_bytes // WINDOWS_PER_FILE))


def iter_windows(
    headers: dict[str, TensorHeader], keys: list[str], *, window_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield ``keys`` as lists of ``(key, tensor)``, file by file in offset order, one mapping per list of about
    ``window_bytes``. The tensors may live in the mapping: copy them out before asking for the next list."""
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(headers[key].file, []).append(key)
    for path, file_keys in by_file.items():
        windows: list[list[str]] = [[]]
        filled = 0
        for key in file_keys:
            if filled >= window_bytes:
                windows.append([])
                filled = 0
            windows[-1].append(key)
            filled += headers[key].nbytes
        for window in windows:
            yield from _read_window(path, window)


def _read_window(path: Path, keys: list[str]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    key = keys[0]
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = []
            for key in keys:
                tensors.append((key, f.get_tensor(key)))
            yield tensors
            del tensors
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise HFCheckpointError(f"{path}: cannot read tensor {key} ({one_line(exc)})") from None


def read_tensor(header: TensorHeader, key: str) -> torch.Tensor:
    """One tensor, copied out of the file (for small side tensors: FP8 scales, copies to compare)."""
    for [(_, tensor)] in _read_window(header.file, [key]):
        return tensor.clone()
    raise AssertionError("unreachable")  # pragma: no cover


# ------------------------------------------------------------------------------------------------ writing


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split keys (in order) into shards of at most ``max_shard_bytes``; a bigger tensor gets a shard of its own."""
    shards: list[list[str]] = [[]]
    filled = 0
    for key, nbytes in sizes.items():
        if shards[-1] and filled + nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += nbytes
    return shards


def write_shards(
    directory: Path, tensors: dict[str, torch.Tensor], *, max_shard_bytes: int
) -> list[Path]:
    """Write ``tensors`` as ``model.safetensors`` or as shards + ``model.safetensors.index.json``; return the files.

    Tensors that are views into a larger tensor (one expert of a stacked weight) or repeated (the MTP head
    copy) are copied one shard at a time, so writing needs at most one shard of extra memory.
    """
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        SHARD_NAME.format(index=i + 1, total=len(shards)) for i in range(len(shards))
    ]
    written = []
    for name, keys in zip(names, shards, strict=True):
        seen: set[int] = set()
        shard = {}
        for key in keys:
            t = tensors[key].detach()
            whole = t.untyped_storage().nbytes() == sizes[key] and t.is_contiguous()
            if not whole or t.data_ptr() in seen:
                t = t.contiguous().clone()
            seen.add(t.data_ptr())
            shard[key] = t
        write_safetensors(shard, directory / name, metadata={"format": "pt"})
        written.append(directory / name)
        del shard
    if len(shards) > 1:
        weight_map = {key: name for name, keys in zip(names, shards, strict=True) for key in keys}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        written.append(directory / INDEX_NAME)
    return written
