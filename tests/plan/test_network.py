"""Topology sizes and costs against ISCA Table 3 (paper.md §10.2, §16 check 20) and Table 5 data."""

import pytest

from latentmoe.plan import paper
from latentmoe.plan.errors import PlanError
from latentmoe.plan.network import (
    dragonfly,
    fat_tree,
    multi_plane_fat_tree,
    paper_unit_prices,
    slim_fly,
    topologies,
    topology_cost,
)


def _sizes(t):
    return (t.endpoints, t.switches, t.links)


def test_fat_tree_rows_of_table3_are_exact():
    assert _sizes(fat_tree(64, layers=2)) == (2048, 96, 2048)  # k^2/2, 3k/2, k^2/2
    assert _sizes(multi_plane_fat_tree(64, planes=8)) == (16384, 768, 16384)
    assert _sizes(fat_tree(64, layers=3)) == (65536, 5120, 131072)  # k^3/4, 5k^2/4, 2 x endpoints


def test_slim_fly_row_is_q_28():
    sf = slim_fly(64)
    # q = 28 (delta 0): 2q^2 = 1568 routers, k' = 42, p = 21 endpoints each, 1568 x 42 / 2 links.
    assert _sizes(sf) == (1568 * 21, 1568, 1568 * 42 // 2) == (32928, 1568, 32928)
    # 28 is not a prime power; the MMS construction proper stops at q = 27 (k' = 41, p = 21).
    assert _sizes(slim_fly(64, prime_power_only=True)) == (2 * 27**2 * 21, 2 * 27**2, 27**2 * 41)


def test_dragonfly_maximum_and_the_papers_511_groups():
    # a = 32, p = h = 16 uses 63 of 64 ports; at most a x h + 1 = 513 groups.
    assert _sizes(dragonfly(64)) == (16 * 32 * 513, 32 * 513, 513 * 32 * 31 // 2 + 513 * 32 * 16 // 2)
    # ISCA Table 3's DF row is exactly this dragonfly with 511 groups.
    assert _sizes(dragonfly(64, groups=511)) == (261632, 16352, 384272)


def test_cost_per_endpoint_is_cost_over_endpoints():
    rows = paper.ISCA_TABLE3
    quoted_cost = {name: row.cost_musd * 1e6 for name, row in rows.items()}
    ours = {t.name: t for t in topologies(64, dragonfly_groups=511)}
    per_endpoint = {name: round(quoted_cost[name] / ours[name].endpoints / 1e3, 2) for name in ours}
    assert per_endpoint == {"FT2": 4.39, "MPFT": 4.39, "FT3": 7.49, "SF": 4.43, "DF": 5.82}


def test_unit_prices_implied_by_ft2_and_ft3_reproduce_those_rows():
    prices = paper_unit_prices()
    assert round(prices.switch_usd / 1e3, 1) == 83.0  # paper.md §10.2: ~$83.0k per switch
    assert round(prices.link_usd) == 504  # ~$503.5 per link
    costs = {t.name: topology_cost(t, prices) for t in topologies(64, dragonfly_groups=511)}
    assert costs["FT2"].cost_usd == pytest.approx(9e6, rel=1e-12)
    assert costs["FT3"].cost_usd == pytest.approx(491e6, rel=1e-12)
    assert costs["MPFT"].cost_usd == pytest.approx(72e6, rel=1e-12)
    assert costs["SF"].cost_usd == pytest.approx(146.7e6, rel=1e-3)  # paper.md: predicts 146.7 (table 146)
    assert costs["DF"].cost_usd == pytest.approx(1551e6, rel=1e-3)  # predicts 1551 (table 1522)
    assert costs["FT2"].quoted == paper.ISCA_TABLE3["FT2"]
    assert topology_cost(fat_tree(32), prices).quoted is None  # the paper's row is for 64 ports only


def test_mpft_is_as_cheap_per_endpoint_as_ft2_and_cheaper_than_ft3():
    prices = paper_unit_prices()
    ft2, mpft, ft3 = (topology_cost(t, prices).cost_per_endpoint_usd for t in topologies(64)[:3])
    assert mpft == pytest.approx(ft2) and mpft < ft3


def test_latency_table_is_cited_data():
    latency = {row.link: row for row in paper.ISCA_TABLE5_LATENCY}
    assert (latency["InfiniBand"].same_leaf_us, latency["InfiniBand"].cross_leaf_us) == (2.8, 3.7)
    assert (latency["RoCE"].same_leaf_us, latency["RoCE"].cross_leaf_us) == (3.6, 5.6)
    assert latency["NVLink"].cross_leaf_us is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: fat_tree(63), "even integer"),
        (lambda: fat_tree(64, layers=0), "layers must be a positive integer"),
        (lambda: multi_plane_fat_tree(64, planes=0), "planes must be a positive integer"),
        (lambda: dragonfly(64, groups=600), r"groups must be an integer in \[2, 513\]"),
        (lambda: slim_fly(3), "no Slim Fly fits radix 3"),
    ],
)
def test_bad_topology_inputs_are_named(call, message):
    with pytest.raises(PlanError, match=message):
        call()
