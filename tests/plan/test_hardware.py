"""Hardware presets are data with a source per figure; fields are overridable; bad input is named."""

import dataclasses

import pytest

from latentmoe.plan.errors import PlanError
from latentmoe.plan.hardware import Cluster, Hardware, hardware_from_dict, hardware_names, load_hardware


def test_every_preset_loads_and_cites_every_figure():
    assert hardware_names() == ["b200", "gb200-nvl72", "h100", "h20", "h200", "h800"]
    figures = {f.name for f in dataclasses.fields(Hardware)} - {"name", "description", "sources"}
    for name in hardware_names():
        hw = load_hardware(name)
        assert set(hw.sources) == figures, name


def test_paper_figures_of_the_h800_and_nvl72():
    h800 = load_hardware("h800")
    assert h800.scale_out_bytes_per_s == 50e9  # ISCA: 400 Gbps = 50 GB/s
    assert h800.scale_up_gbytes_per_s == 200  # ISCA §4.3: NVLink 200 GB/s per direction
    assert load_hardware("gb200-nvl72").scale_up_bytes_per_s == 900e9  # ISCA §2.3.2
    assert Cluster(h800, nodes=256).gpus == 2048  # the paper's cluster


def test_overrides_replace_fields_and_are_marked():
    hw = load_hardware("h800", scale_out_gbps=800, memory_gb=96)
    assert hw.scale_out_bytes_per_s == 100e9 and hw.memory_bytes == 96e9
    assert hw.sources["scale_out_gbps"] == "overridden on the command line"


def test_bad_hardware_is_named(tmp_path):
    with pytest.raises(PlanError, match="unknown hardware preset 'tpu'"):
        load_hardware("tpu")
    with pytest.raises(PlanError, match="scale_out_gbps must be > 0"):
        load_hardware("h800", scale_out_gbps=-400)
    with pytest.raises(PlanError, match="'voltage' is not a hardware field"):
        load_hardware("h800", voltage=1)
    h100 = load_hardware("h100")
    data = {f.name: getattr(h100, f.name) for f in dataclasses.fields(Hardware)} | {"sources": {}}
    del data["memory_gb"]
    with pytest.raises(PlanError, match="missing field 'memory_gb'"):
        hardware_from_dict(data)
