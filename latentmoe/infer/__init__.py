"""Inference: sampling and KV-cached generation (the full engine is a later issue)."""

from latentmoe.infer.generate import SamplingParams, filter_logits, generate, generate_text, sample_next

__all__ = ["SamplingParams", "filter_logits", "generate", "generate_text", "sample_next"]
