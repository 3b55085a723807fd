"""Tiny random mixture-of-experts and encoder-decoder models (offline), for test_moe and test_coverage."""

from __future__ import annotations

import torch
from conftest import FFN, HIDDEN, LAYERS, VOCAB

EXPERTS = 4
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]


def tiny_moe_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2)
    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=FFN, num_local_experts=EXPERTS, **common)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=FFN, moe_intermediate_size=FFN // 2,
                                 shared_expert_intermediate_size=FFN, num_experts=EXPERTS, **common)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=FFN, moe_intermediate_size=FFN // 2, num_experts=EXPERTS,
                                 head_dim=16, **common)
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
