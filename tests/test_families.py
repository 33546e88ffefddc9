"""Model families beyond the embedded Qwen2: tiny random-init models of each architecture (2 layers, hidden 64, the
Qwen vocabulary and tokenizer, since other families' tokenizers are not available offline; Qwen3 with its own chat
template). Each family runs four checks:
  (a) greedy output of hintsd's generator equal to model.generate;
  (b) the generator's log-probs equal to a fresh forward;
  (c) packed forwards equal to separate ones: logits without grad, and LoRA gradients with and without activation
      checkpointing (sliding windows shorter than the sequences, Gemma-2's softcapped attention);
  (d) one CLI training step (oracle feedback, a real BFCL task).
References run the model's own attention (transformers' SDPA or eager), never hintsd's."""
import contextlib
import json
import shutil

import pytest
import torch
import transformers

import envs
import hintsd
import prompts
from conftest import SHARED_QWEN3, build_qwen3_tokenizer

WINDOW = 12  # sliding windows, shorter than every test sequence
BASE = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32768, eos_token_id=151645, pad_token_id=151643,
            bos_token_id=151643, tie_word_embeddings=False)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=WINDOW)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, sliding_window=WINDOW,
                                                             query_pre_attn_scalar=16, sliding_window_pattern=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                                moe_intermediate_size=32, decoder_sparse_step=1)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}


@contextlib.contextmanager
def own_attention(model):
    """The model's own attention implementation (the reference), whatever hintsd set."""
    old = model.config._attn_implementation
    model.config._attn_implementation = model.hintsd_own_attention
    try:
        yield
    finally:
        model.config._attn_implementation = old


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, qwen_tok, qwen3_dir, tmp_path_factory):
    """(name, model, tokenizer, model dir) of one family, float32, saved as a model dir the CLI loads."""
    name = request.param
    cfg_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **extra}, initializer_range=0.2)
    # the reference attention: eager where the logits are softcapped (Gemma-2: transformers 5.x refuses SDPA for it,
    # 4.57 runs SDPA without the softcap), else SDPA
    for attn in ("eager",) if getattr(cfg, "attn_logit_softcapping", None) else ("sdpa", "eager"):
        try:
            model = getattr(transformers, model_cls)._from_config(cfg, attn_implementation=attn).eval()
            break
        except ValueError:
            continue
    model.hintsd_own_attention = model.config._attn_implementation
    d = tmp_path_factory.mktemp(name)
    model.save_pretrained(d)
    if name == "qwen3":
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(qwen3_dir / f, d)
    else:
        qwen_tok.save_pretrained(d)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    yield name, model, tok, d
    del model


def test_a_greedy_equals_model_generate(family):
    name, model, tok, _ = family
    chats = [[{"role": "user", "content": "List the files in the current directory, then sort them by size."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]]
    ids = [prompts.prompt_ids(tok, c, None)[0] for c in chats]
    got = hintsd.generate(model, tok, ids, max_new_tokens=16)
    with own_attention(model):
        for p, c in zip(ids, got):
            ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=16, do_sample=False, eos_token_id=hintsd.eos_ids(tok, model),
                                 pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
            assert c.tokens == ref, name


def test_b_logprobs_equal_a_fresh_forward(family):
    name, model, tok, _ = family
    p = prompts.prompt_ids(tok, [{"role": "user", "content": "Make a directory named docs."}], None)[0]
    c = hintsd.generate(model, tok, [p], max_new_tokens=12, temperature=1.0, seed=3)[0]
    with own_attention(model), torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + c.tokens])).logits[0].float(), -1)
    ref = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(c.tokens)]
    assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(ref), atol=1e-4), name


def sequences():
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 150000, (30,), generator=g).tolist()
    seqs = [prefix + torch.randint(0, 150000, (n,), generator=g).tolist() for n in (14, 9, 20)] + [prefix[:18]]
    return seqs, [list(range(8, len(s) - 1)) for s in seqs]


def test_c_packed_forward_equals_separate_forwards(family, monkeypatch):
    name, model, _, _ = family
    monkeypatch.setitem(hintsd.PACK_QUERY_CHUNK, "cpu", 7)  # attention in pieces of 7 queries (tree_blocks)
    seqs, rows = sequences()
    with torch.no_grad():
        got = hintsd.packed_logits(model, seqs, rows, 1 << 20)
        with own_attention(model):
            for s, r, g in zip(seqs, rows, got):
                ref = model(torch.tensor([s]), logits_to_keep=torch.tensor(r)).logits[0].float()
                assert torch.allclose(g, ref, atol=1e-4, rtol=1e-4), name


@pytest.mark.parametrize("ckpt", ["off", "on"])
def test_c_packed_lora_gradient_equals_separate_passes(family, ckpt, monkeypatch):
    name, base, _, _ = family
    monkeypatch.setitem(hintsd.PACK_QUERY_CHUNK, "cpu", 7)
    model = __import__("copy").deepcopy(base)
    params = hintsd.trainable_params(model, 4, 8, 0.0, list(hintsd.LORA_ALL))
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    seqs, rows = sequences()
    target = torch.randn(sum(map(len, rows)), 151936, generator=torch.Generator().manual_seed(2))
    model.train()

    def grads(max_tokens):
        for p in params:
            p.grad = None
        logits = torch.cat(hintsd.packed_logits(model, seqs, rows, max_tokens, ckpt=ckpt))
        (logits * target).sum().backward()
        return [p.grad.clone() for p in params]
    packed = grads(1 << 20)
    with own_attention(model):
        separate = grads(0)
    model.eval()
    assert any(a.abs().sum() > 0 for a in packed), name
    assert all((a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-6 for a, b in zip(packed, separate)), name


@pytest.mark.parametrize("protocol", envs.ACTION_PROTOCOLS)
def test_d_one_cli_step(family, protocol, tmp_path, capsys):
    name, _, _, d = family
    if protocol == "authors" and name != "qwen3":
        pytest.skip("the authors' protocol runs on the paper's family (qwen3); the others check the friendly one")
    hintsd.main(["--model", str(d), "--preset", "cpu", "--feedback", "oracle", "--tasks", "multi_turn_base_105",
                 "--turns", "1", "--rollouts", "1", "--max-new-tokens", "6", "--max-env-steps", "2", "--steps", "1",
                 "--action-protocol", protocol, "--lora-targets", "q_proj", "v_proj", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["step"] == 1 and row["rollouts"] == 1 and row["targets"] >= 1 and row["kl"] >= 0
    header = capsys.readouterr().err
    assert "LoRA on " in header, name
    if name == "phi3":  # q and v live in the fused qkv_proj
        assert "qkv_proj (fused: for q_proj, v_proj)" in header


def test_qwen3_rollout_ids_are_what_the_template_renders(family):
    """Under the Qwen3 template (which re-renders an answered assistant message without its empty <think> block),
    the ids before each action decode to the template's render of the chat so far with the generation prompt."""
    name, model, tok, _ = family
    if name != "qwen3":
        pytest.skip("qwen3 only")
    task = envs.load_tasks("bfcl", "train", 2, ["multi_turn_base_105"])[0]
    cfg = hintsd.SamplingConfig(max_new_tokens=10, temperature=1.0, max_len=16384)
    for protocol in envs.ACTION_PROTOCOLS:
        env = envs.make_env(task, max_steps=4, protocol=protocol)
        [t] = hintsd.rollout(model, tok, [env], cfg, [0], forced=[[envs.make_env(task).ground_truth_action(0)]])
        assistant = [i for i, m in enumerate(t.messages) if m["role"] == "assistant"]
        assert len(t.steps) >= 3
        for j, s in enumerate(t.steps):
            want = tok.apply_chat_template(t.messages[:assistant[j]], tools=env.tools or None, tokenize=False,
                                           add_generation_prompt=True)
            assert tok.decode(t.tokens[:s.start]) == want, (protocol, j)


def test_paper_preset_runs_end_to_end_on_a_tiny_qwen3(family, tmp_path):
    name, _, _, d = family
    if name != "qwen3":
        pytest.skip("qwen3 only")
    hintsd.main(["--model", str(d), "--preset", "paper", "--device", "cpu", "--feedback", "oracle", "--steps", "1",
                 "--rollouts", "2", "--max-new-tokens", "6", "--max-env-steps", "2", "--turns", "1",
                 "--out", str(tmp_path)])
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["step"] == 1 and row["rollouts"] == 4 and len(row["tasks"]) == 2  # 2 tasks x 2 rollouts


def test_the_rebuilt_qwen3_tokenizer_is_the_shared_one(embedded_dir, tmp_path):
    """Without ../shared/gpu/qwen3-4b the tests rebuild the Qwen3 tokenizer; it must equal the real one."""
    if not SHARED_QWEN3.is_dir():
        pytest.skip("../shared/gpu/qwen3-4b is not beside this checkout")
    real = transformers.AutoTokenizer.from_pretrained(SHARED_QWEN3)
    ours = transformers.AutoTokenizer.from_pretrained(build_qwen3_tokenizer(embedded_dir, tmp_path))
    task = envs.load_tasks("bfcl", "train")[0]
    env = envs.make_env(task)
    chat = env.reset() + [{"role": "assistant", "content": "<think>\n</think> Café ﬁ e\u0301 <tool_call>{}</tool_call>"},
                          {"role": "tool", "content": "<tool_response>ok</tool_response> 中文 12345"}]
    for tok in (real, ours):
        tok.rendered = tok.apply_chat_template(chat, tools=env.tools, tokenize=False, add_generation_prompt=True)
    assert ours.rendered == real.rendered and ours(real.rendered).input_ids == real(real.rendered).input_ids
    assert [ours.convert_ids_to_tokens(i) for i in range(151643, 151669)] == \
        [real.convert_ids_to_tokens(i) for i in range(151643, 151669)]
