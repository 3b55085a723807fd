"""Tiny random mixture-of-experts and encoder-decoder models (offline), for test_moe and test_coverage."""

from __future__ import annotations

import torch
from conftest import FFN, HIDDEN, LAYERS, VOCAB

EXPERTS = 4
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"]
# multi-head latent attention (MLA) of DeepSeek-V2/V3, at the smallest head sizes it accepts
_MLA = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4)
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def tiny_moe_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                  max_position_embeddings=256, num_experts_per_tok=2)
    if not family.startswith("deepseek"):  # MLA keeps one key/value head per query head
        common["num_key_value_heads"] = 2
    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=FFN, num_local_experts=EXPERTS, **common)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=FFN, moe_intermediate_size=FFN // 2,
                                 shared_expert_intermediate_size=FFN, num_experts=EXPERTS, **common)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=FFN, moe_intermediate_size=FFN // 2, num_experts=EXPERTS,
                                 head_dim=16, **common)
    if family == "deepseek_v2":  # shared + routed experts, MLA without a query low-rank
        return tf.DeepseekV2Config(intermediate_size=FFN, moe_intermediate_size=48, n_routed_experts=EXPERTS,
                                   n_shared_experts=1, q_lora_rank=None, first_k_dense_replace=0,
                                   rope_parameters=_ROPE, **_MLA, **common)
    if family == "deepseek_v3":  # sigmoid router with a correction bias, one expert group
        return tf.DeepseekV3Config(intermediate_size=FFN, moe_intermediate_size=48, n_routed_experts=EXPERTS,
                                   n_shared_experts=1, q_lora_rank=32, first_k_dense_replace=0, n_group=1,
                                   topk_group=1, rope_parameters=_ROPE, **_MLA, **common)
    if family == "gpt_oss":  # [experts, in, out] storage, expert biases, interleaved gate/up
        return tf.GptOssConfig(intermediate_size=48, num_local_experts=EXPERTS, head_dim=16, sliding_window=64,
                               rope_parameters=_ROPE, **common)
    raise ValueError(family)


def build_tiny_moe(family: str, seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(tiny_moe_config(family)).eval()


def build_tiny_t5(seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=FFN, num_layers=LAYERS, num_heads=4)
    return tf.T5ForConditionalGeneration(config).eval()
