"""Shared fixtures: tiny random models of every supported family (offline), real data paths."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPARSEWISE_SHARED_DATA", REPO.parent / "shared" / "data"))
C4_SAMPLE = SHARED_DATA / "c4-en-train-00000-first1000" / "c4-train.00000-of-01024.first1000.jsonl"
WIKITEXT_TEST = SHARED_DATA / "wikitext-2-raw-orig" / "wiki.test.raw"
WIKITEXT_VALID = SHARED_DATA / "wikitext-2-raw-orig" / "wiki.valid.raw"

# Every dimension a multiple of 8 so 2:4 and 4:8 apply to all prunable layers.
HIDDEN, FFN, VOCAB, LAYERS = 64, 128, 256, 2


def tiny_config(family: str):
    """A transformers config of the given family, small enough to run in milliseconds."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                              tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                sliding_window=64)
    if family == "qwen2":
        return tf.Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=256,
                             bos_token_id=0, eos_token_id=1)
    if family == "opt":
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS,
                            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=HIDDEN)
    if family == "phi3":
        return tf.Phi3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "bert":
        return tf.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                             num_attention_heads=4, max_position_embeddings=256)
    if family == "vit":
        return tf.ViTConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=4,
                            image_size=32, patch_size=8, num_channels=3)
    raise ValueError(family)


DECODER_FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "opt", "phi3"]
ENCODER_FAMILIES = ["bert", "vit"]
ALL_FAMILIES = DECODER_FAMILIES + ENCODER_FAMILIES


def build_tiny(family: str, seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(family)
    if family in DECODER_FAMILIES:
        model = tf.AutoModelForCausalLM.from_config(config)
    else:
        model = tf.AutoModel.from_config(config)
    return model.eval()


@pytest.fixture(params=ALL_FAMILIES)
def tiny_any(request):
    return request.param, build_tiny(request.param)


@pytest.fixture(params=DECODER_FAMILIES)
def tiny_decoder(request):
    return request.param, build_tiny(request.param)


@pytest.fixture
def tiny_llama():
    return build_tiny("llama")


@pytest.fixture
def tiny_gpt2():
    return build_tiny("gpt2")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32), loaded once per test session."""
    import sparsewise as sw

    try:
        return sw.load_model("smollm2-135m")
    except ImportError as exc:  # pragma: no cover - only when the model package is missing
        pytest.skip(f"SmolLM2 package not installed: {exc}")


@pytest.fixture(scope="session")
def minilm():
    import sparsewise as sw

    try:
        return sw.load_model("minilm-l6")
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"MiniLM package not installed: {exc}")


def requires_data(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"shared data not found at {path}")


@pytest.fixture
def free_port() -> int:
    """A TCP port nothing listens on now, for a torch.distributed rendezvous on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
