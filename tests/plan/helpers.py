"""Small hand-checkable model configs for the planner tests."""


def tiny_llama_config(**changes):
    """A 2-layer Llama: hidden 64, 4 heads of 16, 2 KV heads, FFN 128, vocab 100 (numbers easy by hand)."""
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
    }
    config.update(changes)
    return config
