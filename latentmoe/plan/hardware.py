"""Accelerator presets (``latentmoe/plan/hardware/NAME.json``) and clusters built from them.

A preset is data: one JSON object per accelerator with the figures the planner uses and, in ``sources``,
where each figure comes from. Units are in the field names: ``memory_gb`` (10^9 bytes, as vendors print
it), ``memory_bandwidth_gbytes_per_s``, dense (non-sparse) ``*_tflops``, ``scale_up_gbytes_per_s`` (NVLink,
one direction, per GPU), ``scale_out_gbps`` (the GPU's own NIC, gigabits per second), ``scale_up_domain``
(GPUs that share the scale-up fabric) and ``gpus_per_node``.

Any field can be overridden (:func:`load_hardware` keyword arguments, or the ``--memory-gb``,
``--scale-up-gbps``, ``--scale-out-gbps``, ``--gpus-per-node`` flags), and a :class:`Cluster` is a preset
times a node count.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any

from latentmoe.io import BITS_PER_BYTE, GIGA
from latentmoe.plan.errors import PlanError

PLAN_PACKAGE = "latentmoe.plan"
HARDWARE_DIR = "hardware"
DEFAULT_HARDWARE = "h800"  # the paper's cluster (ISCA abstract: 2,048 H800)


@dataclass(frozen=True)
class Hardware:
    """One accelerator and its links (see the module docstring for units)."""

    name: str
    description: str
    memory_gb: float
    memory_bandwidth_gbytes_per_s: float
    bf16_tflops: float
    fp8_tflops: float
    scale_up_gbytes_per_s: float
    scale_up_domain: int
    scale_out_gbps: float
    gpus_per_node: int
    sources: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * GIGA

    @property
    def scale_up_bytes_per_s(self) -> float:
        return self.scale_up_gbytes_per_s * GIGA

    @property
    def scale_out_bytes_per_s(self) -> float:
        """The NIC's rate in bytes/s: 400 Gbps -> 50e9 (the paper's "400 Gbps = 50 GB/s")."""
        return self.scale_out_gbps * GIGA / BITS_PER_BYTE

    def validate(self) -> Hardware:
        for field in (
            "memory_gb",
            "memory_bandwidth_gbytes_per_s",
            "bf16_tflops",
            "fp8_tflops",
            "scale_up_gbytes_per_s",
            "scale_out_gbps",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise PlanError(f"hardware {self.name!r}: {field} must be > 0, got {value!r}")
        for field in ("scale_up_domain", "gpus_per_node"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"hardware {self.name!r}: {field} must be a positive integer, got {value!r}")
        return self


@dataclass(frozen=True)
class Cluster:
    """``nodes`` nodes of ``hardware.gpus_per_node`` accelerators each."""

    hardware: Hardware
    nodes: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.hardware.gpus_per_node


def hardware_names() -> list[str]:
    """Names of the shipped hardware presets."""
    root = resources.files(PLAN_PACKAGE).joinpath(HARDWARE_DIR)
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def hardware_from_dict(data: Mapping[str, Any]) -> Hardware:
    """Build and validate a Hardware from a preset-shaped dict; a missing field is named in the error."""
    name = data.get("name", "<unnamed>")
    fields = [f.name for f in dataclasses.fields(Hardware)]
    for field in fields:
        if field != "sources" and field not in data:
            raise PlanError(f"hardware {name!r}: missing field {field!r}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PlanError(f"hardware {name!r}: unknown field {unknown[0]!r}")
    values = dict(data)
    values["sources"] = MappingProxyType(dict(data.get("sources", {})))
    return Hardware(**values).validate()


def load_hardware(name: str, **overrides: Any) -> Hardware:
    """A shipped preset by name, with any field replaced by a non-None keyword argument."""
    names = hardware_names()
    if name not in names:
        raise PlanError(f"unknown hardware preset {name!r}; choose one of {', '.join(names)}")
    text = resources.files(PLAN_PACKAGE).joinpath(HARDWARE_DIR).joinpath(f"{name}.json").read_text()
    data = json.loads(text)
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(Hardware)})
    if unknown:
        raise PlanError(f"hardware override {unknown[0]!r} is not a hardware field")
    data.update(changes)
    if changes:
        data["sources"] = {
            **data.get("sources", {}),
            **{k: "overridden on the command line" for k in changes},
        }
    return hardware_from_dict(data)
