"""The wire format of a prefill handoff: point-to-point ``torch.distributed`` send/recv between one prefill
rank and the decode rank, over the process group of that pair (gloo on CPU, NCCL on GPU).

One message, sent in this order on the pair's group:

    1. header  int64[HEADER_LEN]   [kind, meta_bytes, num_tensors, nbytes_0 .. nbytes_{MAX_TENSORS-1}]
    2. meta    uint8[meta_bytes]   UTF-8 JSON: request id, prompt ids, sampling params, speculative, the first
                                   token and its log-probability, prompt log-probabilities, and for each
                                   tensor its name, dtype and shape
    3. tensors uint8[nbytes_i]     the raw bytes of kv (latent rows), kv_scale (FP8 only), hidden (speculative
                                   only), generator (seeded sampling only), in that order

Tensors travel as bytes so that every dtype (bf16, FP8 E4M3, fp64) crosses gloo, whose send/recv knows few
dtypes; the receiver views them back. JSON floats are written with ``repr``, so log-probabilities arrive
bit-exact. A ``HEARTBEAT`` message is a header alone: an idle prefill worker sends one every
``HEARTBEAT_S`` seconds so that the decode rank's blocking ``recv`` never waits as long as the group's
timeout (gloo would report a timeout as a broken pair).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
import torch.distributed as dist

from latentmoe.dtypes import DTYPES, dtype_name
from latentmoe.infer.handoff import PrefillHandoff
from latentmoe.infer.logprobs import TokenLogprob
from latentmoe.infer.sampling import SamplingParams

KIND_HANDOFF = 1
KIND_HEARTBEAT = 2
MAX_TENSORS = 4
HEADER_LEN = 3 + MAX_TENSORS
HEARTBEAT_S = 30.0
TENSOR_ORDER = ("kv", "kv_scale", "hidden", "generator")
STORAGE_DTYPES = {**DTYPES, "uint8": torch.uint8}


@dataclass(frozen=True)
class Received:
    """A handoff as the decode rank gets it, with what the request needs to be queued there."""

    request_id: int
    params: SamplingParams
    speculative: bool
    handoff: PrefillHandoff
    kv_bytes: int
    hidden_bytes: int


@dataclass(frozen=True)
class Sent:
    """What a handoff cost on the wire: latent rows (``kv_bytes``: prompt tokens × cache bytes per token),
    hidden states (speculative requests) and everything including header, meta and generator state."""

    kv_bytes: int
    hidden_bytes: int
    total_bytes: int


def _logprob_json(lp: TokenLogprob | None):
    return None if lp is None else [lp.token_id, lp.logprob, [list(t) for t in lp.top]]


def _logprob_from(value) -> TokenLogprob | None:
    if value is None:
        return None
    token_id, logprob, top = value
    return TokenLogprob(int(token_id), float(logprob), tuple((int(t), float(v)) for t, v in top))


def params_to_json(params: SamplingParams) -> dict:
    out = dataclasses.asdict(params)
    out["stop"], out["stop_token_ids"] = list(params.stop), list(params.stop_token_ids)
    return out


def params_from_json(value: dict) -> SamplingParams:
    return SamplingParams(**{**value, "stop": tuple(value["stop"]), "stop_token_ids": tuple(value["stop_token_ids"])})


def _as_bytes(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8).flatten().to(device)


def send_handoff(
    handoff: PrefillHandoff,
    *,
    request_id: int,
    params: SamplingParams,
    speculative: bool,
    dst: int,
    group,
    device: torch.device,
) -> Sent:
    """Send one handoff to rank ``dst`` (blocking until the bytes are handed to the transport)."""
    tensors = {"kv": handoff.kv_LnX, "kv_scale": handoff.scale_Ln, "hidden": handoff.hidden_nD,
               "generator": handoff.generator_state}
    present = [(name, t) for name in TENSOR_ORDER if (t := tensors[name]) is not None]
    meta = {
        "request_id": request_id,
        "prompt_ids": handoff.prompt_ids,
        "params": params_to_json(params),
        "speculative": speculative,
        "first_token": handoff.first_token,
        "first_logprob": _logprob_json(handoff.first_logprob),
        "prompt_logprobs": None if handoff.prompt_logprobs is None else [_logprob_json(x)
                                                                         for x in handoff.prompt_logprobs],
        "tensors": [{"name": n, "dtype": dtype_name(t.dtype),
                     "shape": list(t.shape)} for n, t in present],
    }
    meta_bytes = torch.frombuffer(bytearray(json.dumps(meta).encode("utf-8")), dtype=torch.uint8).to(device)
    payloads = [_as_bytes(t, device) for _, t in present]
    header = [KIND_HANDOFF, meta_bytes.numel(), len(payloads)] + [p.numel() for p in payloads]
    header += [0] * (HEADER_LEN - len(header))
    dist.send(torch.tensor(header, dtype=torch.int64, device=device), dst=dst, group=group)
    dist.send(meta_bytes, dst=dst, group=group)
    for payload in payloads:
        dist.send(payload, dst=dst, group=group)
    sizes = {n: p.numel() for (n, _), p in zip(present, payloads, strict=True)}
    return Sent(kv_bytes=sizes["kv"] + sizes.get("kv_scale", 0), hidden_bytes=sizes.get("hidden", 0),
                total_bytes=HEADER_LEN * 8 + meta_bytes.numel() + sum(sizes.values()))


def send_heartbeat(*, dst: int, group, device: torch.device) -> None:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=device)
    header[0] = KIND_HEARTBEAT
    dist.send(header, dst=dst, group=group)


def recv_message(*, src: int, group, device: torch.device) -> Received | None:
    """The next message from rank ``src``: a handoff, or None for a heartbeat. Raises whatever the transport
    raises when the peer is gone (gloo: a RuntimeError naming the broken connection)."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=device)
    dist.recv(header, src=src, group=group)
    kind, meta_len, count, *sizes = header.tolist()
    if kind == KIND_HEARTBEAT:
        return None
    if kind != KIND_HANDOFF or not 0 <= count <= MAX_TENSORS:
        raise RuntimeError(f"transfer: a message of unknown kind {kind} from rank {src}")
    meta_buf = torch.empty(meta_len, dtype=torch.uint8, device=device)
    dist.recv(meta_buf, src=src, group=group)
    meta = json.loads(bytes(meta_buf.cpu().numpy()).decode("utf-8"))
    tensors = {}
    for spec, nbytes in zip(meta["tensors"], sizes[:count], strict=True):
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dist.recv(buf, src=src, group=group)
        tensors[spec["name"]] = buf.view(STORAGE_DTYPES[spec["dtype"]]).view(spec["shape"])
    generator = tensors.get("generator")
    handoff = PrefillHandoff(
        prompt_ids=[int(t) for t in meta["prompt_ids"]],
        first_token=int(meta["first_token"]),
        kv_LnX=tensors["kv"],
        scale_Ln=tensors.get("kv_scale"),
        hidden_nD=tensors.get("hidden"),
        generator_state=generator.cpu() if generator is not None else None,
        first_logprob=_logprob_from(meta["first_logprob"]),
        prompt_logprobs=None if meta["prompt_logprobs"] is None else [_logprob_from(x)
                                                                      for x in meta["prompt_logprobs"]],
    )
    kv_bytes = handoff.kv_bytes
    hidden = tensors.get("hidden")
    return Received(request_id=int(meta["request_id"]), params=params_from_json(meta["params"]),
                    speculative=bool(meta["speculative"]), handoff=handoff, kv_bytes=kv_bytes,
                    hidden_bytes=0 if hidden is None else hidden.numel() * hidden.element_size())
