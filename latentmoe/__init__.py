"""latentmoe: DeepSeek-V3-style models (MLA, DeepSeekMoE, MTP) to train, serve and plan on modest hardware.

``ModelConfig`` imports without torch; ``CausalLM`` and ``load`` (which need torch) are imported on first use::

    from latentmoe import load
    model, tokenizer = load("runs/demo")      # our run or checkpoint directory, or a Hugging Face directory
"""

from typing import TYPE_CHECKING, Any

from latentmoe.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from latentmoe.model.transformer import CausalLM, CausalLMOutput

__all__ = ["CausalLM", "CausalLMOutput", "ConfigError", "ModelConfig", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("CausalLM", "CausalLMOutput"):
        from latentmoe.model import transformer

        return getattr(transformer, name)
    if name == "load":
        from latentmoe.pretrained import load

        return load
    raise AttributeError(f"module 'latentmoe' has no attribute {name!r}")
