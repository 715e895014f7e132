"""The ``plan`` command line end to end: exact figures in the JSON, plots written, one-line errors."""

import argparse
import json
import subprocess
import sys

import pytest

from latentmoe.cli.plan import add_plan_subcommand, main, run_network
from tests.plan.helpers import tiny_llama_config


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_model_json_holds_the_papers_table1_and_table2_figures(capsys):
    status, out, _ = run(
        capsys, "--model", "deepseek-v3", "--model", "qwen2.5-72b", "--model", "llama-3.1-405b", "--json"
    )
    assert status == 0
    rows = {row["name"]: row for row in json.loads(out)}
    for row in rows.values():
        assert {
            "name",
            "total_params",
            "active_params",
            "kv_cache_bytes_per_token",
            "train_gflops_per_token",
        } <= set(row)
    assert rows["deepseek-v3"]["total_params"] == 671_026_419_200
    assert [rows[n]["kv_cache_bytes_per_token"] for n in rows] == [70_272, 327_680, 516_096]
    assert round(rows["llama-3.1-405b"]["kv_cache_ratio"], 2) == 7.34
    assert rows["llama-3.1-405b"]["paper"]["kv_cache_ratio"] == 7.28
    assert 247.5 <= rows["deepseek-v3"]["train_gflops_per_token"] <= 252.5
    assert rows["qwen2.5-72b"]["paper"]["train_gflops_per_token"] == 394
    assert rows["qwen2.5-72b"]["decode"] is None


def test_default_table_compares_the_papers_three_models(capsys):
    status, out, _ = run(capsys)
    assert status == 0
    for text in (
        "deepseek-v3",
        "qwen2.5-72b",
        "llama-3.1-405b",
        "70.272 KB",
        "327.680 KB",
        "516.096 KB",
        "4.66x",
        "7.34x",
        "7.28x",
        "671,026,419,200",
        "250.4",
    ):
        assert text in out


def test_decode_limit_json_reproduces_the_paper_exactly(capsys):
    status, out, _ = run(capsys, "decode-limit", "--json")
    limit = json.loads(out)
    assert status == 0
    assert limit["comm_us_per_step"] == 120.96
    assert limit["tpot_ms"] == 14.75712
    assert int(limit["tokens_per_s"]) == 67
    _, out, _ = run(capsys, "decode-limit", "--gbytes-per-s", "900", "--json")
    limit = json.loads(out)
    assert (limit["comm_us_per_step"], limit["tpot_ms"], round(limit["tokens_per_s"], 2)) == (
        6.72,
        0.81984,
        1219.75,
    )
    _, out, _ = run(capsys, "decode-limit", "--hardware", "gb200-nvl72", "--over", "scale-up", "--json")
    assert json.loads(out)["comm_us_per_step"] == 6.72


def test_network_json_has_one_row_per_topology(capsys):
    status, out, _ = run(capsys, "network", "--radix", "64", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    assert status == 0 and list(rows) == ["FT2", "MPFT", "FT3", "SF", "DF"]
    assert {"endpoints", "switches", "links", "cost_per_endpoint"} <= set(rows["FT2"])
    assert [
        (rows[n]["endpoints"], rows[n]["switches"], rows[n]["links"]) for n in ("FT2", "MPFT", "FT3")
    ] == [
        (2048, 96, 2048),
        (16384, 768, 16384),
        (65536, 5120, 131072),
    ]
    assert round(rows["FT2"]["cost_per_endpoint"], 2) == 4.39 == round(rows["MPFT"]["cost_per_endpoint"], 2)
    assert round(rows["FT3"]["cost_per_endpoint"], 2) == 7.49


def test_all_to_all_shows_equal_rail_and_plane_throughput(capsys):
    status, out, _ = run(capsys, "all-to-all", "--json")
    rows = {row["scenario"]: row for row in json.loads(out)}
    assert status == 0
    assert rows["MRFT, PXN"]["time_s"] == pytest.approx(rows["MPFT"]["time_s"])
    assert rows["MPFT, plane 0 down"]["time_s"] == pytest.approx(rows["MPFT"]["time_s"] * 4 / 3)


def test_plots_are_written(capsys, tmp_path):
    status, _, _ = run(capsys, "--plot", str(tmp_path))
    assert status == 0
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != ".latentmoe.json")
    assert names == ["cost_per_endpoint.png", "kv_cache_per_token.png", "tpot_vs_bandwidth.png"]
    assert all((tmp_path / n).read_bytes()[:4] == b"\x89PNG" for n in names)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nope"], "unknown model preset 'nope'"),
        (["decode-limit", "--gbps", "-5"], "argument --gbps: must be in (0, "),
        (["decode-limit", "--gbps", "nan"], "argument --gbps: must be in (0, "),
        (["--scale-out-gbps", "-400"], "argument --scale-out-gbps: must be in (0, "),
        (["--pp", "0"], "argument --pp: must be an integer in [1, "),
        (["--hardware", "tpu"], "unknown hardware preset 'tpu'"),
        (["--ep", "7"], "--ep 7 does not divide the 256 routed experts"),
        (["decode-limit", "--model", "qwen2.5-72b"], "is dense"),
        (["network", "--radix", "63"], "even integer"),
        (["all-to-all", "--fail-link", "x"], "PLANE:LEAF:SPINE"),
    ],
)
def test_bad_input_is_a_one_line_error_with_status_2(capsys, argv, message):
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert err.startswith(("error: ", "latentmoe plan")) and "error: " in err and message in err
    assert err.count("\n") == 1


def test_config_missing_a_field_is_named(capsys, tmp_path):
    config = tiny_llama_config()
    del config["vocab_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    status, _, err = run(capsys, "--model", str(path))
    assert status == 2 and "'vocab_size'" in err


def test_plan_registers_on_a_foreign_cli():
    parser = argparse.ArgumentParser(prog="latentmoe")
    subparsers = parser.add_subparsers(dest="command")
    subparsers.add_parser("train")
    add_plan_subcommand(subparsers)
    args = parser.parse_args(["plan", "network", "--radix", "32"])
    assert args.func is run_network and args.radix == 32
    assert parser.parse_args(["plan", "--model", "deepseek-v3"]).model == ["deepseek-v3"]


def test_module_entry_point_runs_without_torch():
    code = (
        "import sys, runpy; sys.argv = ['latentmoe.plan', 'decode-limit', '--json']; "
        "import latentmoe.cli.plan; "
        "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules; "
        "runpy.run_module('latentmoe.plan', run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["comm_us_per_step"] == 120.96
    failed = subprocess.run(
        [sys.executable, "-m", "latentmoe.plan", "--model", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 2 and failed.stderr.startswith("error: unknown model preset 'nope'")
