"""The DeepSeek-V3 model, module by module in the paper's order: rope, MLA, MoE, MTP, transformer."""
