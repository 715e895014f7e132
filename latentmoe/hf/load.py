"""Load a Hugging Face DeepSeek-V3/V2 checkpoint directory into a :class:`CausalLM`.

Three steps, so that nothing is half-loaded when a file is bad:

1. :func:`inspect_checkpoint` reads config.json and every safetensors *header* (no tensor data);
2. :func:`plan_load` matches the headers against the name table (latentmoe/hf/names.py): every tensor the
   model needs is present with the right shape and a usable dtype, FP8 weights have scales of the right
   grid, nothing unexplained is left over — else one :class:`HFCheckpointError` naming file and tensor;
3. the model is allocated once, empty, in the target dtype (router biases stay fp32), and each tensor is
   read, dequantised/permuted if needed, and copied into place, file by file (see files.py for why that
   keeps peak memory near the model's own size).

MTP modules are loaded when the files hold them (transformers' own ``save_pretrained`` drops them, so a
config may declare ``num_nextn_predict_layers: 1`` with no such weights: the model then has no MTP module).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentmoe.config import ModelConfig
from latentmoe.hf.config import FP8Quantization, HFConfig, config_from_hf
from latentmoe.hf.errors import HFCheckpointError
from latentmoe.hf.files import (
    CONFIG_NAME,
    FLOAT_CODES,
    FP8_CODE,
    INDEX_NAME,
    WEIGHTS_NAME,
    TensorHeader,
    iter_windows,
    read_headers,
    read_tensor,
    window_bytes_for,
)
from latentmoe.hf.fp8 import FP8_DTYPE, dequantize_blocks, scale_grid
from latentmoe.hf.names import NameTable, TensorMap, build_name_table, layer_of, rope_rows_permutation, scale_name
from latentmoe.io import read_json
from latentmoe.model.transformer import CausalLM, empty_model

MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_READ_THREADS = 4  # page-fault-bound copies: more threads than this only contend
CODE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               FP8_CODE: FP8_DTYPE}


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint directory described from config.json and the safetensors headers alone (no tensor data).

    config: the model to build — ``num_nextn_predict_layers`` counts the MTP layers actually in the files.
    stored_dtype: dtype of the embedding (bf16 for DeepSeek's FP8 release, whose FP8 tensors are the linears).
    """

    path: Path
    hf: HFConfig
    config: ModelConfig
    headers: dict[str, TensorHeader]
    mtp_layers: int
    fp8_tensors: int
    stored_dtype: torch.dtype
    total_bytes: int


@dataclass(frozen=True)
class Source:
    """Where one HF tensor goes: ``map`` (our tensor), ``expert`` (its slice of a stacked tensor, or None),
    ``scale`` (HF key of its FP8 block scales, or None), ``rows`` (RoPE row permutation, or None)."""

    map: TensorMap
    expert: int | None
    scale: str | None = None
    rows: list[int] | None = None


@dataclass(frozen=True)
class LoadPlan:
    """Every HF tensor to read (``sources``, in file order) and the HF copies of a shared tensor to verify
    (``copies``: their ``map`` is the tensor they must equal)."""

    config: ModelConfig
    table: NameTable
    sources: dict[str, Source]
    copies: dict[str, Source] = field(default_factory=dict)
    block: tuple[int, int] | None = None


@dataclass
class HFStateDict:
    """Tensors in our names (:func:`load_state_dict`). With FP8 kept, a quantised tensor is float8_e4m3fn and
    ``scales`` holds its fp32 ``weight_scale_inv`` grid (stacked experts: ``[E, rows, cols]``) under the same name."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    block: tuple[int, int] | None = None


# --------------------------------------------------------------------------------------------- inspecting


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Read config.json and all headers of a Hugging Face checkpoint directory; no tensor data is read."""
    path = Path(path)
    if not path.is_dir():
        raise HFCheckpointError(f"{path}: no such checkpoint directory")
    config_path = path / CONFIG_NAME
    data = read_json(config_path, error=HFCheckpointError)
    hf = config_from_hf(data, source=str(config_path))
    headers = read_headers(path)
    L = hf.config.num_hidden_layers
    layers = {layer_of(k) for k in headers}
    mtp = 0
    while mtp < hf.config.num_nextn_predict_layers and L + mtp in layers:
        mtp += 1
    embed = headers.get("model.embed_tokens.weight")
    stored = CODE_DTYPES.get(embed.dtype, torch.float32) if embed is not None else torch.float32
    return CheckpointInfo(
        path=path,
        hf=hf,
        config=hf.config.replace(num_nextn_predict_layers=mtp),
        headers=headers,
        mtp_layers=mtp,
        fp8_tensors=sum(h.dtype == FP8_CODE for h in headers.values()),
        stored_dtype=torch.float32 if stored == FP8_DTYPE else stored,
        total_bytes=sum(h.nbytes for h in headers.values()),
    )


def model_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict names and shapes for ``config`` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = CausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def plan_load(info: CheckpointInfo, *, num_layers: int | None = None) -> LoadPlan:
    """Match the headers against the name table; raise :class:`HFCheckpointError` on the first problem."""
    config = info.config
    if num_layers is not None:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise HFCheckpointError(
                f"{info.path}: num_layers must be in 1..{config.num_hidden_layers}, got {num_layers}"
            )
        if num_layers < config.num_hidden_layers:  # MTP reads the last layer's output: meaningless without it
            config = config.replace(num_hidden_layers=num_layers, num_nextn_predict_layers=0)
    table = build_name_table(model_shapes(config), config)
    fp8 = info.hf.fp8
    wanted = table.by_hf()
    headers = info.headers
    where = info.path / (INDEX_NAME if (info.path / INDEX_NAME).is_file() else WEIGHTS_NAME)
    scales = {scale_name(k) for k in wanted} | {scale_name(k) for k in table.copies}
    sources: dict[str, Source] = {}
    copies: dict[str, Source] = {}
    by_ours = table.by_ours()
    file_layers = info.config.num_hidden_layers + info.mtp_layers
    for key, header in headers.items():
        if key in wanted:
            target, expert = wanted[key]
            scale = _check_tensor(key, header, target.hf_shape(), headers, fp8)
            rows = None if info.hf.rope_interleave else rope_rows_permutation(key, config)
            sources[key] = Source(target, expert, scale, rows)
        elif key in table.copies:
            target = by_ours[table.copies[key]]
            copies[key] = Source(target, None, _check_tensor(key, header, target.shape, headers, fp8))
        elif key in scales:
            continue  # checked with its weight
        elif (layer := layer_of(key)) is not None and config.num_hidden_layers <= layer < file_layers:
            continue  # a layer left out on purpose (num_layers)
        else:
            raise HFCheckpointError(f"{header.file}: unexpected tensor {key}")
    for key in wanted:
        if key not in headers:
            raise HFCheckpointError(f"{where}: tensor {key} is missing (needed for {wanted[key][0].ours})")
    return LoadPlan(config, table, sources, copies, fp8.block if fp8 else None)


def _check_tensor(
    key: str,
    header: TensorHeader,
    shape: tuple[int, ...],
    headers: dict[str, TensorHeader],
    fp8: FP8Quantization | None,
) -> str | None:
    """Shape and dtype of one tensor; returns the key of its FP8 scales (None if not quantised)."""
    if header.shape != shape:
        raise HFCheckpointError(f"{header.file}: tensor {key} has shape {list(header.shape)}, expected {list(shape)}")
    scale = scale_name(key)
    if header.dtype in FLOAT_CODES:
        if scale in headers:
            raise HFCheckpointError(f"{headers[scale].file}: tensor {scale} scales {key}, which is not FP8")
        return None
    if header.dtype != FP8_CODE:
        raise HFCheckpointError(
            f"{header.file}: tensor {key} has dtype {header.dtype}, expected one of {', '.join(FLOAT_CODES)} "
            f"or {FP8_CODE} with {scale}"
        )
    if fp8 is None:
        raise HFCheckpointError(f"{header.file}: tensor {key} is {FP8_CODE} but config.json has no quantization_config")
    if scale not in headers:
        raise HFCheckpointError(f"{header.file}: tensor {key} is {FP8_CODE} but its {scale} is missing")
    s = headers[scale]
    grid = scale_grid(shape, fp8.block) if len(shape) == 2 else None
    if grid is None or s.shape != grid:
        raise HFCheckpointError(
            f"{s.file}: tensor {scale} has shape {list(s.shape)}, expected "
            f"{list(grid) if grid else 'a 2-D weight'} for {list(shape)} in {fp8.block[0]}x{fp8.block[1]} blocks"
        )
    if s.dtype not in FLOAT_CODES:
        raise HFCheckpointError(f"{s.file}: tensor {scale} has dtype {s.dtype}, expected a floating-point dtype")
    return scale


# ----------------------------------------------------------------------------------------------- loading


def read_into(
    info: CheckpointInfo,
    plan: LoadPlan,
    keys: list[str],
    place: Callable[[str, torch.Tensor], None],
    *,
    dequantize: bool = True,
) -> None:
    """Read each of ``keys`` (of ``plan.sources`` / ``plan.copies``), convert it — FP8 dequantised to fp32 unless
    ``dequantize`` is False, RoPE rows permuted — and hand it to ``place(key, tensor)``.

    One window of the files is mapped at a time; its tensors are converted and placed by a few threads (torch
    releases the GIL). Copying out of a fresh mapping into fresh memory is page-fault bound: on a busy 2-core
    machine a 1 GB checkpoint took ~1 s this way against 3-8 s as one loop of (intra-op parallel) copies.
    ``place`` must be safe to call from several threads for different keys.
    """
    targets = {k: plan.sources.get(k) or plan.copies[k] for k in keys}
    scales = {t.scale: read_tensor(info.headers[t.scale], t.scale) for t in targets.values() if t.scale}

    def job(item: tuple[str, torch.Tensor]) -> None:
        key, tensor = item
        target = targets[key]
        if target.scale is not None and dequantize:
            tensor = dequantize_blocks(tensor, scales[target.scale], plan.block)
        if target.rows is not None:
            tensor = tensor[target.rows]
        place(key, tensor)

    with ThreadPoolExecutor(max_workers=min(MAX_READ_THREADS, os.cpu_count() or 1)) as pool:
        for window in iter_windows(info.headers, keys, window_bytes=window_bytes_for(info.total_bytes)):
            for _ in pool.map(job, window):  # all done (or the first error raised) before the window closes
                pass


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    num_layers: int | None = None,
    device: torch.device | str | None = None,
) -> CausalLM:
    """A :class:`CausalLM` (eval mode) from a Hugging Face DeepSeek-V3/V2 checkpoint directory.

    dtype: parameter dtype (FP8 weights are dequantised to it; router biases stay fp32).
    num_layers: load only the first N transformer layers (and no MTP module) for a quick look.
    device: where the model is allocated and each tensor copied to (default the host); nothing is built twice.
    MTP modules are loaded when the files hold them. Raises :class:`HFCheckpointError` naming file and tensor.
    """
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, MODEL_DTYPES))}, got {dtype}")
    info = inspect_checkpoint(path)
    plan = plan_load(info, num_layers=num_layers)
    model = empty_model(plan.config, dtype=dtype, device=device)
    state = model.state_dict()

    def place(key: str, tensor: torch.Tensor) -> None:
        source = plan.sources[key]
        dest = state[source.map.ours]
        (dest if source.expert is None else dest[source.expert]).copy_(tensor)

    read_into(info, plan, list(plan.sources), place)
    _verify_copies(info, plan, state)
    return model.eval()


def load_pretrained_into(model: CausalLM, path: str | os.PathLike, *, ep_rank: int = 0) -> CheckpointInfo:
    """Read a Hugging Face checkpoint into an allocated ``model`` (e.g. :func:`~latentmoe.model.transformer.
    materialize` d on its device), in place, and return what was found.

    ``model.config`` must be the checkpoint's, except that it may have *more* MTP modules than the files hold
    (``CheckpointInfo.mtp_layers`` of them are loaded; the caller initialises the rest). Its routed experts may
    be an expert-parallel rank's contiguous slice (``[E/P, ...]`` per tensor, EP rank ``ep_rank``): only those
    experts' tensors are read. FP8 blocks are dequantised to the model's dtype. Raises
    :class:`HFCheckpointError` naming file and tensor.
    """
    info = inspect_checkpoint(path)
    plan = plan_load(info)
    mine = model.config.to_dict() | {"num_nextn_predict_layers": info.mtp_layers}
    if mine != info.config.to_dict() or model.config.num_nextn_predict_layers < info.mtp_layers:
        raise HFCheckpointError(f"{info.path}: the model to load into is not the checkpoint's ({CONFIG_NAME} differs)")
    state = model.state_dict()
    first: dict[str, int] = {}  # stacked expert tensor -> first expert this rank holds
    for source in plan.sources.values():
        if source.expert is not None and source.map.ours not in first:
            held = state[source.map.ours].shape[0]
            total = len(source.map.hf)
            if held != total and (held < 1 or total % held or (ep_rank + 1) * held > total):
                raise HFCheckpointError(f"{info.path}: {total} experts do not split into slices of {held}")
            first[source.map.ours] = ep_rank * held if held != total else 0
    keys = [
        key for key, source in plan.sources.items()
        if source.expert is None
        or 0 <= source.expert - first[source.map.ours] < state[source.map.ours].shape[0]
    ]

    def place(key: str, tensor: torch.Tensor) -> None:
        source = plan.sources[key]
        dest = state[source.map.ours]
        (dest if source.expert is None else dest[source.expert - first[source.map.ours]]).copy_(tensor)

    read_into(info, plan, keys, place)
    _verify_copies(info, plan, state)
    return info


def load_state_dict(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    dequantize: bool = True,
    num_layers: int | None = None,
) -> HFStateDict:
    """The checkpoint's tensors in our names (experts stacked, MTP under ``mtp.K``) without building a model.

    With ``dequantize=False`` FP8 weights stay float8_e4m3fn and their scales come back in ``scales`` (for an
    FP8 compute path); everything else is converted to ``dtype`` (router biases to fp32).
    """
    info = inspect_checkpoint(path)
    plan = plan_load(info, num_layers=num_layers)
    if not dequantize and not info.hf.rope_interleave and any(s.scale and s.rows for s in plan.sources.values()):
        raise HFCheckpointError(f"{info.path}: FP8 RoPE rows stored as halves (rope_interleave false) need dequantize")
    kept = {k: src for k, src in plan.sources.items() if src.scale is not None and not dequantize}
    tensors: dict[str, torch.Tensor] = {}
    for key, source in plan.sources.items():
        ours, fp8 = source.map.ours, key in kept
        if ours not in tensors:
            to = torch.float32 if ours.endswith("e_score_correction_bias") else FP8_DTYPE if fp8 else dtype
            tensors[ours] = torch.empty(source.map.shape, dtype=to)
        elif (tensors[ours].dtype == FP8_DTYPE) != fp8:
            raise HFCheckpointError(f"{info.headers[key].file}: tensor {key} is not quantised like its other experts")

    def place(key: str, tensor: torch.Tensor) -> None:
        source = plan.sources[key]
        dest = tensors[source.map.ours]
        (dest if source.expert is None else dest[source.expert]).copy_(tensor)

    read_into(info, plan, list(plan.sources), place, dequantize=dequantize)
    scales: dict[str, torch.Tensor] = {}
    for source in kept.values():
        scale = read_tensor(info.headers[source.scale], source.scale).float()
        if source.expert is None:
            scales[source.map.ours] = scale
        else:
            scales.setdefault(source.map.ours, torch.empty(len(source.map.hf), *scale.shape))[source.expert] = scale
    return HFStateDict(plan.config, tensors, scales, plan.block)


def _verify_copies(info: CheckpointInfo, plan: LoadPlan, state: dict[str, torch.Tensor]) -> None:
    """The MTP layers' copies of the head / embedding must equal the main model's: we keep one of each."""

    def check(key: str, tensor: torch.Tensor) -> None:
        ours = plan.copies[key].map.ours
        if not torch.equal(tensor.to(state[ours].dtype), state[ours]):
            raise HFCheckpointError(
                f"{info.headers[key].file}: tensor {key} differs from {ours} (latentmoe shares it with the main model)"
            )

    read_into(info, plan, list(plan.copies), check)
