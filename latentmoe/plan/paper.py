"""Figures the DeepSeek-V3 papers print, kept as quoted constants with their source.

The planner never uses these to compute anything: it computes every number from a config and a hardware
description, and prints the paper's figure beside it so a reader can see where they agree and where the
paper's own table disagrees with its arithmetic (see docs/planner.md, "Where the paper disagrees with
itself"). Sources, as tagged in ../shared/paper.md §0:

* ISCA: Zhao et al., "Insights into DeepSeek-V3", ISCA '25, arXiv 2505.09343v2.
* TR: DeepSeek-V3 Technical Report, arXiv 2412.19437v2.

Conventions of the papers: "KB" is 1000 bytes, "GB/s" is 1e9 B/s, "400 Gbps" is 50 GB/s, "7K" hidden is 7000.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Quoted:
    """A figure as the paper prints it, where it is printed, and what to know about it."""

    value: float
    source: str
    note: str = ""


# The paper's "KB" (ISCA Table 1 prints 70.272 KB for 70,272 bytes).
BYTES_PER_PAPER_KB = 1000

# ISCA §2.1.2 Table 1: KV cache per token in BF16, and the multiplier against DeepSeek-V3.
ISCA_TABLE1_KV_KB = MappingProxyType(
    {
        "deepseek-v3": Quoted(70.272, "ISCA Table 1"),
        "qwen2.5-72b": Quoted(327.680, "ISCA Table 1"),
        "llama-3.1-405b": Quoted(516.096, "ISCA Table 1"),
    }
)
ISCA_TABLE1_MULTIPLIER = MappingProxyType(
    {
        "deepseek-v3": Quoted(1.0, "ISCA Table 1"),
        "qwen2.5-72b": Quoted(4.66, "ISCA Table 1"),
        "llama-3.1-405b": Quoted(
            7.28, "ISCA Table 1", "516.096 / 70.272 = 7.34; the printed 7.28x does not follow from the bytes"
        ),
    }
)

# ISCA §2.2.1 Table 2: training GFLOP per token at sequence length 4096 ("GFLOPS/Token" means GFLOP/token).
ISCA_TABLE2_GFLOPS = MappingProxyType(
    {
        "deepseek-v2": Quoted(155, "ISCA Table 2"),
        "deepseek-v3": Quoted(250, "ISCA Table 2", "printed as 'approximately 250'"),
        "qwen2.5-72b": Quoted(
            394, "ISCA Table 2 (row 'Qwen-72B Dense')", "6N + causal attention gives 444.9; not reproducible"
        ),
        "llama-3.1-405b": Quoted(
            2448, "ISCA Table 2 (row 'LLaMa-405B Dense')", "6N + causal attention gives 2473.2 (+1.0%)"
        ),
    }
)


@dataclass(frozen=True)
class DecodeCase:
    """ISCA §2.3.2's speed-limit assumptions: one expert per device, 32 tokens per device, 9-way fan-out."""

    name: str
    hidden: int
    tokens: int
    fanout: int
    dispatch_bytes: int
    combine_bytes: int
    bw_bytes_per_s: float
    layers: int
    quoted_comm_us: float
    quoted_tpot_ms: float
    quoted_tokens_per_s: float


# "7K" hidden is 7000 (7168 does not give 120.96 us); fan-out 8 routed + 1 shared; FP8 dispatch, BF16 combine.
ISCA_DECODE_HIDDEN = 7000
ISCA_DECODE_TOKENS_PER_DEVICE = 32
ISCA_DECODE_FANOUT = 9
ISCA_DECODE_LAYERS = 61
FP8_BYTES = 1
BF16_BYTES = 2
ISCA_DECODE_CASES = (
    DecodeCase(
        name="400 Gbps IB (CX7)",
        hidden=ISCA_DECODE_HIDDEN,
        tokens=ISCA_DECODE_TOKENS_PER_DEVICE,
        fanout=ISCA_DECODE_FANOUT,
        dispatch_bytes=FP8_BYTES,
        combine_bytes=BF16_BYTES,
        bw_bytes_per_s=50e9,
        layers=ISCA_DECODE_LAYERS,
        quoted_comm_us=120.96,
        quoted_tpot_ms=14.76,
        quoted_tokens_per_s=67,
    ),
    DecodeCase(
        name="GB200 NVL72 (900 GB/s)",
        hidden=ISCA_DECODE_HIDDEN,
        tokens=ISCA_DECODE_TOKENS_PER_DEVICE,
        fanout=ISCA_DECODE_FANOUT,
        dispatch_bytes=FP8_BYTES,
        combine_bytes=BF16_BYTES,
        bw_bytes_per_s=900e9,
        layers=ISCA_DECODE_LAYERS,
        quoted_comm_us=6.72,
        quoted_tpot_ms=0.82,
        quoted_tokens_per_s=1200,
    ),
)

# ISCA §2.3.3 and TR §5.4.3: acceptance of the second (MTP) token, and the measured speed-up.
ISCA_MTP_ACCEPTANCE = Quoted(
    0.85, "ISCA §2.3.3 (80-90%); TR §5.4.3 (85-90%)", "midpoint of the quoted ranges"
)
MTP_TPS_SPEEDUP = Quoted(1.8, "ISCA §2.3.3; TR §5.4.3")


@dataclass(frozen=True)
class TopologyRow:
    """One column of ISCA Table 3 (64-port switches; costs from the Slim Fly paper's method)."""

    name: str
    endpoints: int
    switches: int
    links: int
    cost_musd: float
    cost_per_endpoint_kusd: float


ISCA_TABLE3_RADIX = 64
ISCA_TABLE3 = MappingProxyType(
    {
        "FT2": TopologyRow("FT2", 2_048, 96, 2_048, 9, 4.39),
        "MPFT": TopologyRow("MPFT", 16_384, 768, 16_384, 72, 4.39),
        "FT3": TopologyRow("FT3", 65_536, 5_120, 131_072, 491, 7.5),
        "SF": TopologyRow("SF", 32_928, 1_568, 32_928, 146, 4.4),
        "DF": TopologyRow("DF", 261_632, 16_352, 384_272, 1_522, 5.8),
    }
)
ISCA_MPFT_PLANES = 8  # ISCA §5.1: eight GPU-NIC pairs per node, each pair in its own plane


@dataclass(frozen=True)
class LinkLatency:
    """ISCA Table 5: CPU-side end-to-end latency for a 64-byte message (None: not measured)."""

    link: str
    same_leaf_us: float
    cross_leaf_us: float | None


ISCA_TABLE5_LATENCY = (
    LinkLatency("RoCE", 3.6, 5.6),
    LinkLatency("InfiniBand", 2.8, 3.7),
    LinkLatency("NVLink", 3.33, None),
)
ISCA_TABLE5_SOURCE = "ISCA Table 5 (64 B, CPU side, end to end)"

# ISCA Table 4 (MPFT column): DeepSeek-V3 training on 2048 H800.
ISCA_TABLE4_GPUS = 2048
ISCA_TABLE4_TOKENS_PER_DAY = 272.80e9
ISCA_TABLE4_TFLOPS_CAUSAL = 385
ISCA_TABLE4_TFLOPS_NON_CAUSAL = 432

# TR Table 1: training cost of DeepSeek-V3 in H800 GPU-hours, at $2 per GPU-hour; 14.8T pre-training tokens.
TR_TABLE1_GPU_HOURS = MappingProxyType(
    {"pre-training": 2_664_000, "context extension": 119_000, "post-training": 5_000}
)
TR_USD_PER_GPU_HOUR = 2
TR_PRETRAINING_TOKENS = 14_800_000_000_000
