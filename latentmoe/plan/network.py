"""Scale-out topologies for a switch radix: endpoints, switches, links and cost (ISCA Table 3).

Counting rules ("links" are switch-to-switch links only, as in the paper's table; endpoint cables are not
counted):

* Fat-tree with L layers of radix-k switches (a folded Clos, full bisection): each switch below the top
  uses k/2 ports down and k/2 up, so endpoints = 2 (k/2)^L, switches = (2L - 1) (k/2)^(L-1) and
  links = (L - 1) x endpoints. FT2 at k = 64: 2,048 / 96 / 2,048; FT3: 65,536 / 5,120 / 131,072.
* Multi-plane fat-tree (MPFT, ISCA §5.1): ``planes`` independent FT2s, each NIC (GPU) in one plane; every
  count is ``planes`` x FT2 (8 planes: 16,384 / 768 / 16,384).
* Slim Fly (Besta & Hoefler, SC'14): an MMS graph of 2q^2 routers with network radix k' = (3q - delta)/2,
  where q = 4w + delta, delta in {-1, 0, 1}, and p = ceil(k'/2) endpoints per router; the largest q with
  k' + p <= radix is used. The MMS construction needs q to be a prime power; the paper's row (q = 28 for
  64 ports) is not, so prime powers are only enforced on request.
* Dragonfly, canonical balanced form (Kim et al., ISCA'08): a = 2p = 2h routers per group, each router with
  p endpoints, h global and a - 1 local ports, so 4h - 1 <= radix; at most g = a h + 1 groups (one global
  link between each pair of groups). Local links g a(a-1)/2, global links g a h / 2.

Cost. The paper derives costs "from the methodology in the Slim Fly paper" but prints no unit prices. We
model cost = switches x switch price + links x link price and, by default, take the two prices that make
the model reproduce the paper's own FT2 and FT3 costs exactly ($9M and $491M): about $83.0k per switch and
$504 per link. MPFT then reproduces exactly too ($72M); SF and DF come out within a few percent of the
paper, and the paper's figures are always shown beside ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from latentmoe.plan.errors import PlanError
from latentmoe.plan.paper import ISCA_MPFT_PLANES, ISCA_TABLE3, ISCA_TABLE3_RADIX, TopologyRow

USD_PER_MUSD = 1_000_000
USD_PER_KUSD = 1_000
TOPOLOGY_NAMES = ("FT2", "MPFT", "FT3", "SF", "DF")
SF_DELTAS = (-1, 0, 1)  # q = 4w + delta in the MMS construction


@dataclass(frozen=True)
class Topology:
    """Sizes of one network built from radix-``radix`` switches."""

    name: str
    description: str
    radix: int
    endpoints: int
    switches: int
    links: int


def _check_radix(radix: int, *, even: bool = True) -> None:
    if isinstance(radix, bool) or not isinstance(radix, int) or radix < 2 or (even and radix % 2):
        raise PlanError(f"switch radix must be an even integer >= 2, got {radix!r}")


def fat_tree(radix: int, layers: int = 2, planes: int = 1) -> Topology:
    """A ``layers``-layer full-bisection fat-tree of radix-``radix`` switches, times ``planes`` planes."""
    _check_radix(radix)
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise PlanError(f"fat-tree layers must be a positive integer, got {layers!r}")
    if isinstance(planes, bool) or not isinstance(planes, int) or planes < 1:
        raise PlanError(f"planes must be a positive integer, got {planes!r}")
    half = radix // 2
    endpoints = 2 * half**layers
    switches = (2 * layers - 1) * half ** (layers - 1)
    links = (layers - 1) * endpoints
    name = f"FT{layers}" if planes == 1 else ("MPFT" if layers == 2 else f"MP-FT{layers}")
    plane_note = f", {planes} planes" if planes > 1 else ""
    return Topology(
        name=name,
        description=f"{layers}-layer fat-tree{plane_note}",
        radix=radix,
        endpoints=planes * endpoints,
        switches=planes * switches,
        links=planes * links,
    )


def multi_plane_fat_tree(radix: int, planes: int = ISCA_MPFT_PLANES) -> Topology:
    """MPFT: ``planes`` independent two-layer fat-trees (ISCA §5.1: 8 planes, 16,384 GPUs at 64 ports)."""
    return fat_tree(radix, layers=2, planes=planes)


def _is_prime_power(n: int) -> bool:
    if n < 2:
        return False
    p = next(d for d in range(2, n + 1) if n % d == 0)
    while n % p == 0:
        n //= p
    return n == 1


def slim_fly(radix: int, *, prime_power_only: bool = False) -> Topology:
    """The largest Slim Fly (MMS graph) whose routers fit in ``radix`` ports (see module docstring)."""
    _check_radix(radix, even=False)
    best = None
    for q in range(3, radix + 1):
        delta = next((d for d in SF_DELTAS if (q - d) % 4 == 0), None)
        if delta is None or (prime_power_only and not _is_prime_power(q)):
            continue
        net_radix = (3 * q - delta) // 2
        per_router = math.ceil(net_radix / 2)
        if net_radix + per_router <= radix:
            best = (q, net_radix, per_router)
    if best is None:
        raise PlanError(f"no Slim Fly fits radix {radix}")
    q, net_radix, per_router = best
    routers = 2 * q * q
    return Topology(
        name="SF",
        description=f"Slim Fly, q={q}, k'={net_radix}, p={per_router}",
        radix=radix,
        endpoints=routers * per_router,
        switches=routers,
        links=routers * net_radix // 2,
    )


def dragonfly(radix: int, groups: int | None = None) -> Topology:
    """A balanced dragonfly (a = 2p = 2h) of radix-``radix`` routers with ``groups`` groups (default max)."""
    _check_radix(radix, even=False)
    h = (radix + 1) // 4
    if h < 1:
        raise PlanError(f"no dragonfly fits radix {radix}")
    p, a = h, 2 * h
    max_groups = a * h + 1
    groups = max_groups if groups is None else groups
    if isinstance(groups, bool) or not isinstance(groups, int) or not 2 <= groups <= max_groups:
        raise PlanError(
            f"dragonfly groups must be an integer in [2, {max_groups}] for radix {radix}, got {groups!r}"
        )
    if (groups * a * h) % 2:
        raise PlanError(f"dragonfly with {groups} groups leaves an odd number of global ports")
    return Topology(
        name="DF",
        description=f"canonical dragonfly, a={a}, p={p}, h={h}, g={groups}",
        radix=radix,
        endpoints=p * a * groups,
        switches=a * groups,
        links=groups * a * (a - 1) // 2 + groups * a * h // 2,
    )


def topologies(
    radix: int, *, planes: int = ISCA_MPFT_PLANES, dragonfly_groups: int | None = None
) -> tuple[Topology, ...]:
    """The five columns of ISCA Table 3 for one switch radix."""
    return (
        fat_tree(radix, layers=2),
        multi_plane_fat_tree(radix, planes),
        fat_tree(radix, layers=3),
        slim_fly(radix),
        dragonfly(radix, dragonfly_groups),
    )


# ---------------------------------------------------------------------------------------------- cost
@dataclass(frozen=True)
class UnitPrices:
    """Price of one switch and one switch-to-switch link, with where the numbers come from."""

    switch_usd: float
    link_usd: float
    source: str


def solve_unit_prices(a: TopologyRow, b: TopologyRow) -> UnitPrices:
    """The switch and link prices that reproduce two quoted (switches, links, cost) rows exactly."""
    det = Fraction(a.switches * b.links - b.switches * a.links)
    if det == 0:
        raise PlanError(f"rows {a.name} and {b.name} do not determine unit prices")
    cost_a, cost_b = Fraction(a.cost_musd) * USD_PER_MUSD, Fraction(b.cost_musd) * USD_PER_MUSD
    switch = (cost_a * b.links - cost_b * a.links) / det
    link = (a.switches * cost_b - b.switches * cost_a) / det
    return UnitPrices(float(switch), float(link), f"solved from ISCA Table 3 {a.name} and {b.name} costs")


def paper_unit_prices() -> UnitPrices:
    """Unit prices implied by ISCA Table 3's FT2 ($9M) and FT3 ($491M) rows."""
    return solve_unit_prices(ISCA_TABLE3["FT2"], ISCA_TABLE3["FT3"])


@dataclass(frozen=True)
class TopologyCost:
    """A topology with its modelled cost and, for the paper's radix, the paper's row beside it."""

    topology: Topology
    cost_usd: float
    quoted: TopologyRow | None

    @property
    def cost_per_endpoint_usd(self) -> float:
        return self.cost_usd / self.topology.endpoints


def topology_cost(topology: Topology, prices: UnitPrices) -> TopologyCost:
    """Cost = switches x switch price + links x link price; the paper's row attached when it applies."""
    if prices.switch_usd < 0 or prices.link_usd < 0:
        raise PlanError(
            f"unit prices must be >= 0, got switch {prices.switch_usd} and link {prices.link_usd}"
        )
    quoted = ISCA_TABLE3.get(topology.name) if topology.radix == ISCA_TABLE3_RADIX else None
    cost = topology.switches * prices.switch_usd + topology.links * prices.link_usd
    return TopologyCost(topology=topology, cost_usd=cost, quoted=quoted)
