"""Memory per device for a training layout and what fits, checked on a model small enough to do by hand."""

import pytest

from latentmoe.plan.arch import arch_from_hf_dict, load_arch
from latentmoe.plan.errors import PlanError
from latentmoe.plan.memory import (
    ParallelLayout,
    Precision,
    max_micro_batch,
    max_seq_len,
    memory_per_device,
    serving_capacity,
    stage_memory,
)
from tests.plan.helpers import tiny_llama_config

# tiny-llama (tests/plan/helpers.py): hidden 64, 2 layers, 4 heads x 16, 2 KV heads, FFN 128, vocab 100.
LAYER_PARAMS = (64 * 64 + 2 * 64 * 32 + 64 * 64) + 3 * 64 * 128 + 2 * 64  # attention + SwiGLU + 2 norms
TOTAL_PARAMS = 2 * LAYER_PARAMS + 100 * 64 + 100 * 64 + 64  # + embedding, head, final norm
# Kept for backward per token per layer: attention 2h + q 64 + k 32 + v 32 + out 64; FFN 2h + 3 x 128.
LAYER_ACT_BYTES = (128 + 64 + 32 + 32 + 64 + 128 + 3 * 128) * 2 + 4 * 4  # bf16 + FP32 LSE per head
SEQ = 8


def test_static_and_activation_bytes_by_hand(tiny_llama):
    assert LAYER_PARAMS == 36_992 and TOTAL_PARAMS == 86_848
    mem = memory_per_device(tiny_llama, ParallelLayout(dp=2, zero_stage=1), seq_len=SEQ, micro_batch=1)
    assert mem.params == TOTAL_PARAMS
    assert mem.weights_bytes == 2 * TOTAL_PARAMS  # bf16, replicated
    assert mem.grads_bytes == 4 * TOTAL_PARAMS  # fp32, replicated under ZeRO-1
    assert mem.master_bytes == 4 * TOTAL_PARAMS // 2  # fp32, sharded over dp=2
    assert mem.optimizer_bytes == 2 * 2 * TOTAL_PARAMS // 2  # two bf16 moments, sharded
    assert mem.activations_bytes == 2 * LAYER_ACT_BYTES * SEQ
    assert mem.total_bytes == 895_360


def test_zero_stages_shard_more_state(tiny_llama):
    z1, z2, z3 = (
        memory_per_device(tiny_llama, ParallelLayout(dp=2, zero_stage=z), seq_len=SEQ) for z in (1, 2, 3)
    )
    assert z2.grads_bytes == z1.grads_bytes // 2
    assert z3.weights_bytes == z1.weights_bytes // 2


def test_pipeline_stages_split_layers_and_hold_pp_minus_s_micro_batches(tiny_llama):
    layout = ParallelLayout(pp=2)
    first = stage_memory(tiny_llama, layout, Precision(), stage=0, seq_len=SEQ, micro_batch=1)
    last = stage_memory(tiny_llama, layout, Precision(), stage=1, seq_len=SEQ, micro_batch=1)
    assert first.params == LAYER_PARAMS + 100 * 64  # layer 0 + embedding
    assert last.params == LAYER_PARAMS + 100 * 64 + 64  # layer 1 + head + final norm
    assert (first.micro_batches_in_flight, last.micro_batches_in_flight) == (2, 1)
    assert first.activations_bytes == LAYER_ACT_BYTES * SEQ * 2


def test_full_recompute_keeps_layer_inputs_plus_one_working_layer(tiny_llama):
    mem = memory_per_device(tiny_llama, ParallelLayout(), seq_len=SEQ, recompute="full")
    assert mem.activations_bytes == (2 * 64 * 2 + LAYER_ACT_BYTES) * SEQ
    selective = memory_per_device(tiny_llama, ParallelLayout(), seq_len=SEQ, recompute="selective")
    assert selective.activations_bytes == 2 * (LAYER_ACT_BYTES - 2 * 64 * 2) * SEQ  # no normed copies


def test_largest_micro_batch_and_sequence_that_fit(tiny_llama):
    layout = ParallelLayout()
    static = memory_per_device(tiny_llama, layout, seq_len=SEQ, micro_batch=0).total_bytes
    per_sequence = 2 * LAYER_ACT_BYTES * SEQ
    memory = static + 3.5 * per_sequence
    assert max_micro_batch(tiny_llama, layout, seq_len=SEQ, device_memory_bytes=memory) == 3
    assert max_seq_len(tiny_llama, layout, device_memory_bytes=memory) == int(3.5 * SEQ)
    assert max_micro_batch(tiny_llama, layout, seq_len=SEQ, device_memory_bytes=static / 2) == 0


def test_expert_parallel_splits_routed_experts():
    v3 = load_arch("deepseek-v3")
    one = stage_memory(
        v3, ParallelLayout(dp=64, pp=16, ep=1), Precision(), stage=1, seq_len=4096, micro_batch=1
    )
    ep = stage_memory(
        v3, ParallelLayout(dp=64, pp=16, ep=64), Precision(), stage=1, seq_len=4096, micro_batch=1
    )
    routed = 4 * 256 * 3 * 7168 * 2048  # stage 1 holds layers 3..6, all MoE
    assert one.params - ep.params == routed - routed // 64


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (ParallelLayout(dp=8, ep=7), "--ep 7 does not divide the 256 routed experts"),
        (ParallelLayout(dp=2, ep=4), "--ep 4 must divide dp x tp = 2"),
        (ParallelLayout(pp=100), "--pp 100 exceeds the 61 layers"),
        (ParallelLayout(dp=0), "--dp must be a positive integer"),
        (ParallelLayout(zero_stage=5), "--zero must be one of"),
    ],
)
def test_impossible_layouts_are_named(layout, message):
    with pytest.raises(PlanError, match=message):
        memory_per_device(load_arch("deepseek-v3"), layout)


def test_serving_capacity_counts_kv_tokens_after_the_weights():
    qwen = load_arch("qwen2.5-72b")
    cap = serving_capacity(qwen, devices=8, device_memory_bytes=80e9)
    weights = 72_706_203_648 * 2 // 8
    assert cap.weights_bytes_per_device == weights
    assert cap.max_kv_tokens == 8 * ((80_000_000_000 - weights) // 327_680)
    tp8 = serving_capacity(qwen, devices=8, device_memory_bytes=80e9, attention_tp=8)
    assert tp8.max_kv_tokens == (80_000_000_000 - weights) // (327_680 // 8)  # heads split 8 ways
    assert not serving_capacity(load_arch("deepseek-v3"), devices=8, device_memory_bytes=80e9).fits


# tiny-mixtral: hidden 64, 2 layers, 4 heads x 16, 2 KV heads, 4 experts of width 32, top-2, vocab 100.
MIXTRAL_ATTN = 2 * 64 + (4 + 2 * 2) * 16 + 4 * 16  # block input + normed input, q/k/v, kernel output = 320
MIXTRAL_MOE = 2 * 64 + 4 + 2 * (2 * 64 + 3 * 32)  # input + normed, router logits, per routed choice = 580
MIXTRAL_LAYER_BYTES = (MIXTRAL_ATTN + MIXTRAL_MOE) * 2 + 4 * 4  # bf16 + FP32 LSE per head


def test_moe_layer_activations_by_hand_mixtral():
    """Per token and MoE layer: input and normed input (2h), the router logits (E), and for each of the
    top-k routed experts the dispatched input and its output (2h) plus gate, up, gate*up (3 x width)."""
    assert (MIXTRAL_ATTN, MIXTRAL_MOE, MIXTRAL_LAYER_BYTES) == (320, 580, 1816)
    arch = arch_from_hf_dict(tiny_llama_config(model_type="mixtral", intermediate_size=32, num_local_experts=4,
                                               num_experts_per_tok=2), "tiny-mixtral")
    mem = memory_per_device(arch, ParallelLayout(), seq_len=SEQ, micro_batch=1)
    assert mem.activations_bytes == 2 * MIXTRAL_LAYER_BYTES * SEQ
    selective = memory_per_device(arch, ParallelLayout(), seq_len=SEQ, micro_batch=1, recompute="selective")
    no_normed_copies = (MIXTRAL_ATTN - 64 + MIXTRAL_MOE - 64) * 2 + 16
    assert selective.activations_bytes == 2 * no_normed_copies * SEQ


TINY_V3 = {
    "model_type": "deepseek_v3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "intermediate_size": 128, "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "first_k_dense_replace": 1, "vocab_size": 100, "num_nextn_predict_layers": 0,
    "topk_method": "noaux_tc",
}


def test_moe_layer_activations_by_hand_deepseek_mla_with_shared_expert():
    """A dense layer 0 and an MoE layer 1 with one shared expert, both with MLA attention.

    MLA: 2h (input, normed) + c_Q 32 + c_KV 16 + k_R 8 + normed c_Q, c_KV (48) + q, k (4 heads x 24 each)
    + v (4 x 16) + kernel output (4 x 16) = 128 + 104 + 256 + 64 = 552.
    Dense FFN: 2h + 3 x 128 = 512. MoE FFN: 2h + 8 router logits + 2 x (2h + 3 x 32) + shared 3 x 32 = 680.
    """
    arch = arch_from_hf_dict(TINY_V3, "tiny-v3")
    layer0 = (552 + 512) * 2 + 4 * 4
    layer1 = (552 + 680) * 2 + 4 * 4
    mem = memory_per_device(arch, ParallelLayout(), seq_len=SEQ, micro_batch=1)
    assert (layer0, layer1) == (2144, 2480)
    assert mem.activations_bytes == (layer0 + layer1) * SEQ
    # selective recompute (TR §3.2.3): no normed copies, no per-head q, k, v: MLA 64 + 56 + 64 = 184,
    # dense FFN 64 + 384 = 448, MoE FFN 64 + 8 + 448 + 96 = 616
    selective = memory_per_device(arch, ParallelLayout(), seq_len=SEQ, micro_batch=1, recompute="selective")
    assert selective.activations_bytes == ((184 + 448) * 2 + 16 + (184 + 616) * 2 + 16) * SEQ
    # expert parallelism does not shard activations: the dispatched rows of a token are counted on its rank
    ep = memory_per_device(arch, ParallelLayout(dp=2, ep=2), seq_len=SEQ, micro_batch=1)
    assert ep.activations_bytes == mem.activations_bytes
