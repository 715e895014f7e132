"""Turn a model's GEMMs into FP8 ones, keeping what the DeepSeek-V3 report keeps in higher precision.

``convert_to_fp8(model)`` replaces, in place:

* every ``nn.Linear`` — attention projections (``q_a_proj``, ``q_b_proj``, ``kv_a_proj_with_mqa``,
  ``kv_b_proj``, ``o_proj``), dense FFNs and shared experts (``gate_proj``, ``up_proj``, ``down_proj``) —
  by an :class:`~latentmoe.fp8.linear.FP8Linear` sharing the same Parameter objects;
* the routed experts' matmul (``Experts.expert_linear``) by an :class:`~latentmoe.fp8.linear.FP8Matmul`.

What stays in BF16/FP32 (TR §3.3.1): the embedding (not a Linear), the output head ``lm_head``, the MoE
router (``Router`` computes its logits in FP32 itself), every RMSNorm, the attention core (softmax over
``q·k``, done by ``scaled_dot_product_attention`` under autocast), and by default the MTP projection
``eh_proj`` (drop it from ``keep`` to quantise it too). Master weights, gradients and optimizer state are
untouched: the parameters remain FP32 tensors, so ``state_dict()`` and checkpoints are exactly those of
the unconverted model and load anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from latentmoe.fp8.linear import FP8Linear, FP8Matmul, FP8Recipe
from latentmoe.model.moe import Experts

HIGH_PRECISION_MODULES = ("lm_head", "eh_proj")  # TR §3.3.1 output head; the MTP projection, by choice


@dataclass
class FP8Conversion:
    """What :func:`convert_to_fp8` did: module names quantised (Linear layers, routed experts) and kept."""

    linears: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def convert_to_fp8(
    model: nn.Module,
    recipe: FP8Recipe | None = None,
    *,
    keep: Iterable[str] = HIGH_PRECISION_MODULES,
) -> FP8Conversion:
    """Make ``model``'s Linear layers and routed experts compute in FP8 (in place); return what changed.

    ``keep``: module names (the last component, e.g. ``"lm_head"``) that stay high precision.
    Converting twice is harmless (already-converted layers are skipped).
    """
    recipe = recipe or FP8Recipe()
    keep = set(keep)
    report = FP8Conversion()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is nn.Linear:
                if child_name in keep:
                    report.kept.append(full)
                else:
                    setattr(parent, child_name, FP8Linear.from_linear(child, recipe))
                    report.linears.append(full)
    for name, module in model.named_modules():
        if isinstance(module, Experts) and not isinstance(module.expert_linear, FP8Matmul):
            module.expert_linear = FP8Matmul(recipe)
            report.experts.append(name)
    return report


def fp8_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose GEMMs run in FP8 (FP8Linear layers and converted routed experts)."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, FP8Linear) or (isinstance(m, Experts) and isinstance(m.expert_linear, FP8Matmul))
    ]
