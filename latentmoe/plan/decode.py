"""The expert-parallel decode speed limit of ISCA §2.3.2.

In large-scale expert-parallel decoding every MoE layer sends each token's hidden state to the devices that
hold its experts (dispatch) and brings the weighted expert outputs back (combine). With one expert per
device and computation hidden behind communication, communication alone bounds the speed:

    bytes per EP step   = (dispatch_bytes + combine_bytes) x tokens x fanout x hidden
    comm time per step  = bytes per EP step / scale-out bandwidth
    time per layer      = micro_batches x comm time      (two micro-batches, each dispatches and combines,
                                                          overlapped with the other's compute)
    time per output token (TPOT) = layers x time per layer
    tokens/s per request        = 1 / TPOT

The paper's case: 32 tokens per device, fan-out 9 (8 routed + 1 shared), hidden "7K" = 7000, FP8 dispatch
(1 B) and BF16 combine (2 B), 400 Gbps IB = 50 GB/s: 6,048,000 B / 50e9 B/s = 120.96 us per step, 241.92 us
per layer, 61 layers -> 14.75712 ms TPOT, 67 tokens/s. At GB200 NVL72's 900 GB/s: 6.72 us, 0.81984 ms,
1219.75 tokens/s. Network latency is ignored, as in the paper.

With multi-token prediction (one MTP module, acceptance rate p of the drafted token) a decode step yields
1 + p tokens on average, so the effective rate is (1 + p) / TPOT; verification cost is ignored (the paper
measures 1.8x at 80-90% acceptance).

Everything is computed in exact rational arithmetic (``fractions.Fraction``) and rounded once, so each
result is the double nearest the true value and the paper's decimals compare with ``==``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from latentmoe.io import BITS_PER_BYTE, GIGA, MS_PER_S
from latentmoe.plan.arch import ArchSpec
from latentmoe.plan.errors import PlanError

US_PER_S = 1_000_000
DUAL_MICRO_BATCH = 2  # ISCA §2.3.1: two micro-batches overlap compute with dispatch/combine


def gbps_to_bytes_per_s(gbps: float) -> float:
    """Gigabits per second (network convention) to bytes per second: 400 Gbps -> 50e9 B/s."""
    return gbps * GIGA / BITS_PER_BYTE


def _positive(name: str, value: float) -> Fraction:
    if not value > 0:
        raise PlanError(f"{name} must be > 0, got {value}")
    return Fraction(value)


def ep_step_bytes(
    *, hidden: int, tokens: int, fanout: int, dispatch_bytes: float, combine_bytes: float
) -> Fraction:
    """Bytes one device sends in one dispatch + combine: (dispatch + combine) x tokens x fanout x hidden."""
    for name, value in (("hidden", hidden), ("tokens", tokens), ("fanout", fanout)):
        _positive(name, value)
    for name, value in (("dispatch_bytes", dispatch_bytes), ("combine_bytes", combine_bytes)):
        if value < 0:
            raise PlanError(f"{name} must be >= 0, got {value}")
    return (Fraction(dispatch_bytes) + Fraction(combine_bytes)) * tokens * fanout * hidden


def ep_comm_time_us(
    *, hidden: int, tokens: int, fanout: int, dispatch_bytes: float, combine_bytes: float, bw: float
) -> float:
    """Communication time of one EP step in microseconds; ``bw`` in bytes/s (ISCA §2.3.2: 120.96 us)."""
    step = ep_step_bytes(
        hidden=hidden,
        tokens=tokens,
        fanout=fanout,
        dispatch_bytes=dispatch_bytes,
        combine_bytes=combine_bytes,
    )
    return float(step * US_PER_S / _positive("bandwidth", bw))


@dataclass(frozen=True)
class DecodeLimit:
    """The decode speed limit for one configuration, with its inputs (bandwidth in bytes/s)."""

    hidden: int
    tokens: int
    fanout: int
    dispatch_bytes: float
    combine_bytes: float
    bw_bytes_per_s: float
    layers: int
    micro_batches: int
    step_bytes: float
    comm_us_per_step: float
    layer_us: float
    tpot_ms: float
    tokens_per_s: float
    mtp_acceptance: float | None
    effective_tokens_per_s: float


def decode_limit(
    *,
    hidden: int,
    tokens: int,
    fanout: int,
    bw: float,
    layers: int,
    dispatch_bytes: float = 1,
    combine_bytes: float = 2,
    micro_batches: int = DUAL_MICRO_BATCH,
    mtp_acceptance: float | None = None,
) -> DecodeLimit:
    """Time per output token and tokens/s when EP communication is the bottleneck (see module docstring)."""
    bw_exact = _positive("bandwidth", bw)
    _positive("layers", layers)
    _positive("micro_batches", micro_batches)
    if mtp_acceptance is not None and not 0 <= mtp_acceptance <= 1:
        raise PlanError(f"mtp acceptance must lie in [0, 1], got {mtp_acceptance}")
    step = ep_step_bytes(
        hidden=hidden,
        tokens=tokens,
        fanout=fanout,
        dispatch_bytes=dispatch_bytes,
        combine_bytes=combine_bytes,
    )
    comm_s = step / bw_exact
    layer_s = micro_batches * comm_s
    tpot_s = layers * layer_s
    tokens_per_s = 1 / tpot_s
    accepted = Fraction(mtp_acceptance) if mtp_acceptance is not None else Fraction(0)
    return DecodeLimit(
        hidden=hidden,
        tokens=tokens,
        fanout=fanout,
        dispatch_bytes=dispatch_bytes,
        combine_bytes=combine_bytes,
        bw_bytes_per_s=bw,
        layers=layers,
        micro_batches=micro_batches,
        step_bytes=float(step),
        comm_us_per_step=float(comm_s * US_PER_S),
        layer_us=float(layer_s * US_PER_S),
        tpot_ms=float(tpot_s * MS_PER_S),
        tokens_per_s=float(tokens_per_s),
        mtp_acceptance=mtp_acceptance,
        effective_tokens_per_s=float(tokens_per_s * (1 + accepted)),
    )


def tpot_ms(
    *,
    hidden: int,
    tokens: int,
    fanout: int,
    dispatch_bytes: float,
    combine_bytes: float,
    bw: float,
    layers: int,
) -> float:
    """Time per output token in ms (ISCA §2.3.2: 14.76 ms at 50 GB/s, 0.82 ms at 900 GB/s)."""
    return decode_limit(
        hidden=hidden,
        tokens=tokens,
        fanout=fanout,
        dispatch_bytes=dispatch_bytes,
        combine_bytes=combine_bytes,
        bw=bw,
        layers=layers,
    ).tpot_ms


def decode_limit_for_arch(
    arch: ArchSpec,
    *,
    bw: float,
    tokens: int = 32,
    dispatch_bytes: float = 1,
    combine_bytes: float = 2,
    mtp_acceptance: float | None = None,
) -> DecodeLimit:
    """The speed limit of an MoE model: its hidden size, fan-out (top-k + shared) and layer count.

    Like the paper, every layer is charged one EP exchange (DeepSeek-V3's three dense layers included).
    """
    if not arch.is_moe:
        raise PlanError(
            f"model {arch.name!r} is dense: it has no expert-parallel all-to-all to bound decoding"
        )
    return decode_limit(
        hidden=arch.hidden_size,
        tokens=tokens,
        fanout=arch.fanout,
        bw=bw,
        layers=arch.num_layers,
        dispatch_bytes=dispatch_bytes,
        combine_bytes=combine_bytes,
        mtp_acceptance=mtp_acceptance,
    )
