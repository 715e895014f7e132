"""latentmoe.plan: the DeepSeek-V3 papers' co-design analysis as pure functions (no torch).

What it computes, and where each formula comes from, is in docs/planner.md. The modules:

* :mod:`~latentmoe.plan.arch` -- ArchSpec, a light description of any supported HF config (MLA/GQA, MoE);
* :mod:`~latentmoe.plan.arith` -- parameters, KV cache per token, training FLOPs per token, training cost;
* :mod:`~latentmoe.plan.memory` -- memory per device for a DP/TP/PP/EP layout, what fits;
* :mod:`~latentmoe.plan.decode` -- the expert-parallel decode speed limit (ISCA §2.3.2);
* :mod:`~latentmoe.plan.network` -- topology sizes and costs (ISCA Table 3), cited link latencies;
* :mod:`~latentmoe.plan.flowsim` / :mod:`~latentmoe.plan.fabric` -- a max-min fair flow simulator and the
  multi-rail / multi-plane fat-tree clusters it runs all-to-all on;
* :mod:`~latentmoe.plan.hardware` -- accelerator presets (``hardware/*.json``) and clusters;
* :mod:`~latentmoe.plan.report` -- tables, JSON and plots; :mod:`~latentmoe.plan.command` -- the CLI.

Importing this package imports neither torch nor matplotlib.
"""

from latentmoe.plan.arch import ArchSpec, FFNSpec, load_arch, model_names
from latentmoe.plan.arith import (
    ParamCount,
    TrainFlops,
    kv_bytes_per_token,
    kv_cache_kb,
    materialised_kv_bytes_per_token,
    param_count,
    train_flops_per_token,
    train_gflops_per_token,
)
from latentmoe.plan.errors import PlanError

__all__ = [
    "ArchSpec",
    "FFNSpec",
    "ParamCount",
    "PlanError",
    "TrainFlops",
    "kv_bytes_per_token",
    "kv_cache_kb",
    "load_arch",
    "materialised_kv_bytes_per_token",
    "model_names",
    "param_count",
    "train_flops_per_token",
    "train_gflops_per_token",
]
