"""The ISCA §2.3.2 decode speed limit: paper.md §8 and §16 checks 6-7, exact where the paper is exact."""

import pytest

from latentmoe.plan.arch import load_arch
from latentmoe.plan.decode import (
    decode_limit,
    decode_limit_for_arch,
    ep_comm_time_us,
    gbps_to_bytes_per_s,
    tpot_ms,
)
from latentmoe.plan.errors import PlanError

PAPER_CASE = dict(hidden=7000, tokens=32, fanout=9, dispatch_bytes=1, combine_bytes=2)


def test_400_gbps_infiniband_case_is_exact():
    assert ep_comm_time_us(**PAPER_CASE, bw=50e9) == 120.96  # 6,048,000 B / 50e9 B/s
    limit = decode_limit(**PAPER_CASE, bw=50e9, layers=61)
    assert limit.step_bytes == (1 + 2) * 32 * 9 * 7000 == 6_048_000
    assert limit.layer_us == 2 * 120.96 == 241.92
    assert limit.tpot_ms == 14.75712
    assert round(limit.tpot_ms, 2) == 14.76
    assert int(1000 / limit.tpot_ms) == 67 == int(limit.tokens_per_s)
    assert tpot_ms(**PAPER_CASE, bw=50e9, layers=61) == 14.75712


def test_gb200_nvl72_case_is_exact():
    assert ep_comm_time_us(**PAPER_CASE, bw=900e9) == 6.72
    limit = decode_limit(**PAPER_CASE, bw=900e9, layers=61)
    assert limit.tpot_ms == 0.81984
    assert round(limit.tpot_ms, 2) == 0.82
    assert round(limit.tokens_per_s, 2) == 1219.75


def test_400_gbps_is_50_gbytes_per_s():
    assert gbps_to_bytes_per_s(400) == 50e9


def test_sensitivity_rows_of_paper_section_8():
    # paper.md §8: hidden 7168 -> 123.86 us / 15.11 ms / 66.2 tok/s; 40 GB/s effective -> 151.2 us / 18.45 ms.
    real_hidden = decode_limit(**{**PAPER_CASE, "hidden": 7168}, bw=50e9, layers=61)
    assert round(real_hidden.comm_us_per_step, 2) == 123.86
    assert round(real_hidden.tpot_ms, 2) == 15.11
    assert round(real_hidden.tokens_per_s, 1) == 66.2
    effective = decode_limit(**PAPER_CASE, bw=40e9, layers=61)
    assert effective.comm_us_per_step == 151.2
    assert round(effective.tpot_ms, 2) == 18.45


def test_mtp_acceptance_multiplies_tokens_per_step():
    plain = decode_limit(**PAPER_CASE, bw=50e9, layers=61)
    mtp = decode_limit(**PAPER_CASE, bw=50e9, layers=61, mtp_acceptance=0.8)
    assert mtp.effective_tokens_per_s == pytest.approx(1.8 * plain.tokens_per_s)
    assert mtp.tpot_ms == plain.tpot_ms


def test_model_based_limit_uses_hidden_fanout_and_layers():
    limit = decode_limit_for_arch(load_arch("deepseek-v3"), bw=50e9)
    assert (limit.hidden, limit.fanout, limit.layers) == (7168, 9, 61)
    with pytest.raises(PlanError, match="dense"):
        decode_limit_for_arch(load_arch("qwen2.5-72b"), bw=50e9)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bw": -50e9}, "bandwidth must be > 0"),
        ({"bw": 0}, "bandwidth must be > 0"),
        ({"hidden": 0}, "hidden must be > 0"),
        ({"dispatch_bytes": -1}, "dispatch_bytes must be >= 0"),
        ({"mtp_acceptance": 1.5}, r"acceptance must lie in \[0, 1\]"),
    ],
)
def test_bad_inputs_are_named(changes, message):
    kwargs = {**PAPER_CASE, "bw": 50e9, "layers": 61, **changes}
    with pytest.raises(PlanError, match=message):
        decode_limit(**kwargs)
