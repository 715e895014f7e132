"""Hugging Face interop: DeepSeek-V3/V2 checkpoints (BF16 or FP8 block-quantised, MTP included) ⇄ CausalLM.

    model = load_pretrained("path/to/DeepSeek-V3-dir", dtype=torch.bfloat16)   # MTP loaded when present
    save_pretrained(model, "out/", tokenizer=tok, max_shard_size="5GB")          # transformers loads it
    tok = load_tokenizer("path/to/dir"); tok.apply_chat_template([{"role": "user", "content": "Hi"}])

Modules: names.py (the one name table, used both ways), config.py (both config.json dialects),
fp8.py (block dequantisation), files.py (headers, windowed reads, shards), load.py, save.py,
tokenizer.py (tokenizer.json + chat template), convert.py (``latentmoe convert``). docs/hf.md has the details.
This package never imports transformers; the tests use it as the independent reference.
"""

from latentmoe.hf.config import FP8Quantization, HFConfig, config_from_hf, config_to_hf
from latentmoe.hf.convert import ConvertResult, checkpoint_kind, convert
from latentmoe.hf.errors import HFCheckpointError
from latentmoe.hf.files import is_hf_checkpoint
from latentmoe.hf.fp8 import dequantize_blocks
from latentmoe.hf.load import (
    CheckpointInfo,
    HFStateDict,
    inspect_checkpoint,
    load_pretrained,
    load_pretrained_into,
    load_state_dict,
)
from latentmoe.hf.names import NameTable, TensorMap, build_name_table
from latentmoe.hf.save import SaveResult, save_pretrained
from latentmoe.hf.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    HFTokenizer,
    chat_template_of,
    load_tokenizer,
    render_chat_template,
    save_tokenizer,
)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "CheckpointInfo",
    "ConvertResult",
    "FP8Quantization",
    "HFCheckpointError",
    "HFConfig",
    "HFStateDict",
    "HFTokenizer",
    "NameTable",
    "SaveResult",
    "TensorMap",
    "build_name_table",
    "chat_template_of",
    "checkpoint_kind",
    "config_from_hf",
    "config_to_hf",
    "convert",
    "dequantize_blocks",
    "inspect_checkpoint",
    "is_hf_checkpoint",
    "load_pretrained",
    "load_pretrained_into",
    "load_state_dict",
    "load_tokenizer",
    "render_chat_template",
    "save_pretrained",
    "save_tokenizer",
]
