"""Max-min fair flow simulation, and all-to-all on small fat-trees against hand-computed answers."""

import pytest

from latentmoe.plan.errors import PlanError
from latentmoe.plan.fabric import MULTI_PLANE, MULTI_RAIL, all_to_all, fat_tree_fabric, leaf, spine
from latentmoe.plan.flowsim import Flow, max_min_fair_rates, simulate_flows

NIC = 1e9  # bytes/s
NVLINK = 4e9
D = 1e6  # bytes each GPU sends each other GPU


def test_max_min_fairness_textbook_example():
    # Link A (capacity 1) carries f1 and f2; link B (capacity 2) carries f2 and f3.
    # A is the bottleneck: f1 = f2 = 1/2; f3 takes what B has left: 2 - 1/2.
    rates = max_min_fair_rates([["A"], ["A", "B"], ["B"]], {"A": 1.0, "B": 2.0})
    assert rates == pytest.approx((0.5, 0.5, 1.5))


def test_finished_flows_release_bandwidth():
    # Two flows share a 1 B/s link: both run at 1/2 until the 1-byte flow ends at t = 2,
    # then the other has 2 bytes left at 1 B/s: it ends at t = 4.
    result = simulate_flows([Flow(("L",), 1.0), Flow(("L",), 3.0)], {"L": 1.0})
    assert result.finish_s == pytest.approx((2.0, 4.0))
    assert result.makespan_s == pytest.approx(4.0) and result.events == 2


def _mpft(**failures):
    # 4 nodes x 4 GPUs, 4-port switches: each plane has 2 leaves (2 NICs + 2 uplinks each) and 2 spines.
    return fat_tree_fabric(
        MULTI_PLANE,
        nodes=4,
        gpus_per_node=4,
        radix=4,
        nic_bytes_per_s=NIC,
        nvlink_bytes_per_s=NVLINK,
        **failures,
    )


def test_healthy_multi_plane_all_to_all_is_nic_bound():
    # Every inter-node byte for plane q leaves node A through NIC q (PXN): 4 source GPUs x 3 other nodes x D.
    result = all_to_all(_mpft(), bytes_per_pair=D)
    assert result.time_s == pytest.approx(4 * 3 * D / NIC)  # 12 ms


def test_losing_one_plane_costs_g_over_g_minus_1():
    # Plane 3's share (4 x 3 x D per node) is spread over the 3 surviving NICs: 12D + 4D = 16D each.
    result = all_to_all(_mpft(failed_planes=[3]), bytes_per_pair=D)
    assert result.time_s == pytest.approx((4 * 3 * D + 4 * 3 * D / 3) / NIC)  # 16 ms = 12 x 4/3


def test_losing_one_uplink_makes_that_leaf_the_bottleneck():
    # Plane 0, leaf 0 (nodes 0 and 1) keeps one uplink. Each of its 2 NICs sends 12 flows of D, 8 of them to
    # the 2 nodes under the other leaf, so 16 flows share the surviving uplink (and, symmetrically, its
    # downlink): D / (NIC / 16) = 16 ms. The 4 flows staying under the leaf finish earlier, at 8 ms.
    result = all_to_all(_mpft(failed_links=[(leaf(0, 0), spine(0, 1))]), bytes_per_pair=D)
    assert result.time_s == pytest.approx(16 * D / NIC)


def test_multi_rail_and_multi_plane_have_equal_all_to_all_throughput():
    # 8 nodes x 4 GPUs, 8-port switches. NIC-bound: 4 GPUs x 7 other nodes x D per NIC = 28 ms, on both.
    common = dict(nodes=8, gpus_per_node=4, radix=8, nic_bytes_per_s=NIC, nvlink_bytes_per_s=NVLINK)
    mrft, mpft = fat_tree_fabric(MULTI_RAIL, **common), fat_tree_fabric(MULTI_PLANE, **common)
    expected = 4 * 7 * D / NIC
    assert all_to_all(mrft, bytes_per_pair=D, pxn=True).time_s == pytest.approx(expected)
    assert all_to_all(mrft, bytes_per_pair=D, pxn=False).time_s == pytest.approx(expected)
    assert all_to_all(mpft, bytes_per_pair=D).time_s == pytest.approx(expected)
    down = fat_tree_fabric(MULTI_PLANE, failed_planes=[1], **common)
    assert all_to_all(down, bytes_per_pair=D).time_s == pytest.approx(expected * 4 / 3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"failed_planes": [7]}, "failed plane 7 does not exist"),
        ({"failed_planes": [0, 1, 2, 3]}, "every plane has failed"),
        ({"failed_links": [(leaf(0, 0), spine(1, 0))]}, "is not a leaf-spine link"),
        ({"radix": 5}, "even integer"),
        ({"nic_bytes_per_s": -1.0}, "NIC bandwidth must be > 0"),
        ({"nodes": 40}, "more than radix 4"),
    ],
)
def test_bad_fabrics_are_named(changes, message):
    kwargs = {
        **dict(nodes=4, gpus_per_node=4, radix=4, nic_bytes_per_s=NIC, nvlink_bytes_per_s=NVLINK),
        **changes,
    }
    with pytest.raises(PlanError, match=message):
        fat_tree_fabric(MULTI_PLANE, **kwargs)


def test_simulator_rejects_unknown_links_and_bad_capacities():
    with pytest.raises(PlanError, match="not in the network"):
        simulate_flows([Flow(("X",), 1.0)], {"L": 1.0})
    with pytest.raises(PlanError, match="capacities must be > 0"):
        simulate_flows([Flow(("L",), 1.0)], {"L": 0.0})
