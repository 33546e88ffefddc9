import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def tiny():
    """A tiny random-init Qwen2 (the embedded model's architecture) with a 256-id vocabulary, no tokenizer.
    Tests that need the real Qwen tokenizer and chat template use `tiny_qwen` instead."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=255, pad_token_id=0)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def embedded_dir():
    """The embedded Qwen2.5-Coder-0.5B as a cached safetensors dir, built from the PyPI GGUF on first use in a
    process of its own (the build's memory peak then never adds to the test process's)."""
    import subprocess
    import hintsd
    subprocess.run([sys.executable, "-c", "import hintsd; hintsd.embedded_model(hintsd.CACHE_DIR)"], check=True,
                   cwd=Path(__file__).resolve().parents[1])
    return hintsd.embedded_model(hintsd.CACHE_DIR)


@pytest.fixture(scope="session")
def qwen_tok(embedded_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="session")
def tiny_qwen(qwen_tok, tmp_path_factory):
    """A random-init Qwen2 with the real Qwen vocabulary and chat template, saved as a model dir."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(qwen_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                      tie_word_embeddings=False, eos_token_id=qwen_tok.eos_token_id, pad_token_id=qwen_tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny_qwen")
    model.save_pretrained(d)
    qwen_tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def policy(tiny_qwen):
    """(model, tokenizer) of tiny_qwen, loaded the way hintsd.py loads any model dir."""
    import hintsd
    return hintsd.load_model(str(tiny_qwen), dtype=torch.float32)  # (float32 references throughout)


@pytest.fixture(scope="session")
def trajs(policy):
    """Two real BFCL rollouts of the tiny policy (friendly protocol; reward 0, up to 4 steps each)."""
    import envs
    import hintsd
    model, tok = policy
    task = envs.load_tasks("bfcl", "train")[0]
    cfg = hintsd.SamplingConfig(max_new_tokens=12, temperature=1.0, max_len=16384)
    return hintsd.rollout(model, tok, [envs.make_env(task, max_steps=4) for _ in range(2)], cfg, [0, 1])


def lora_copy(model, std: float, r: int = 4, alpha: float = 8):
    """A copy of the model with LoRA adapters drawn from N(0, std) (B = 0 would make every adapter inert):
    (the copy, its trainable params)."""
    import copy
    import hintsd
    model = copy.deepcopy(model)
    params = hintsd.trainable_params(model, r, alpha)
    with torch.no_grad():
        for p in params:
            p.normal_(0, std)
    return model, params


SHARED_QWEN3 = Path(__file__).resolve().parents[2] / "shared" / "gpu" / "qwen3-4b"
QWEN3_ADDED = {151665: "<tool_response>", 151666: "</tool_response>", 151667: "<think>", 151668: "</think>"}


def build_qwen3_tokenizer(embedded_dir, d: Path) -> Path:
    """The Qwen3-4B-Instruct-2507 tokenizer rebuilt from the embedded Qwen2.5 one (the same BPE; Qwen3 names ids
    151665-151668 and normalises to NFC), with the Qwen3 chat template kept in tests/data/qwen3."""
    import json
    spec = json.loads((Path(embedded_dir) / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for i, text in QWEN3_ADDED.items():
        vocab[text] = vocab.pop(f"[PAD{i}]")
        spec["added_tokens"].append({"id": i, "content": text, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": False})
    spec["normalizer"] = {"type": "NFC"}
    (d / "tokenizer.json").write_text(json.dumps(spec))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 1 << 20}))
    (d / "chat_template.jinja").write_text((Path(__file__).parent / "data/qwen3/chat_template.jinja").read_text())
    return d


@pytest.fixture(scope="session")
def qwen3_dir(embedded_dir, tmp_path_factory):
    """Tokenizer files of Qwen3-4B-Instruct-2507: ../shared/gpu/qwen3-4b when this checkout has it beside it, else
    rebuilt from the embedded tokenizer (test_families checks that the two agree)."""
    return SHARED_QWEN3 if SHARED_QWEN3.is_dir() else build_qwen3_tokenizer(embedded_dir,
                                                                            tmp_path_factory.mktemp("qwen3_tok"))
