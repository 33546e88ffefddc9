import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny():
    """A tiny random-init Qwen2 (the embedded model's architecture) and the real Qwen tokenizer when cached,
    else a minimal stand-in tokenizer object is NOT used: tests that need a tokenizer ask for `qwen_tok`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=255, pad_token_id=0)
    return Qwen2ForCausalLM(cfg).eval()
