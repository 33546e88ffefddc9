"""Tokens/s of hintsd's generator (static KV cache, per-row lengths, CUDA graphs on a GPU) against transformers'
model.generate, beside the memory-bandwidth bound, in each dtype.

    python bench/generate.py [--model embedded] [--dtypes float32 bfloat16] [--batches 1 8] [--prompt-len 48]
                             [--new 48] [--prefill-len 2048] [--static]

Greedy decoding, same prompts, same model, in one run, the sides alternating (best of --reps). Rows run the full
--new tokens (no EOS) so every side does the same work; tokens/s counts new tokens over wall time, prefill
included. model.generate runs the model's own attention (SDPA), hintsd its kv_attention. The bound is the batch-1
decode rate if every step read every weight once at the measured copy bandwidth (parameter bytes / (read + write
bytes per second of a large tensor copy)); at batch B it is B times that, an upper limit of its own. Per dtype also:
one prefill of --prefill-len tokens (hintsd's prefill against one forward of the model), and how many rows the
dtype's greedy output shares with the first dtype's (bf16 rounding flips near-tied argmaxes). --static adds
model.generate with cache_implementation="static" (transformers compiles its decode step; the first call is slow).
Default dtypes: float32 and bfloat16 on a CPU, bfloat16 on a GPU.
"""
import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hintsd  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large tensor copy (the memory system's practical rate)."""
    n = (2 << 30) if device.type == "cuda" else (256 << 20)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(2):
        y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync(device)
    return 2 * n * 5 / (time.perf_counter() - t)


def make_prompts(tok, batch, length):
    text = "def quicksort(arr):\n    # sort a list of integers and explain every step in a comment\n" * 40
    ids = tok(text, add_special_tokens=False).input_ids
    return [ids[i: i + length] for i in range(batch)]  # same length, different content


def time_ours(model, prompts, new, graphs=True):
    sync(model.device)
    t = time.perf_counter()
    cache, logits = hintsd.start(model, prompts, new)
    out = hintsd.decode_n_tokens(model, cache, logits, [0] * len(prompts), new, cuda_graphs=graphs)
    sync(model.device)
    dt = time.perf_counter() - t
    assert all(len(c.tokens) == new for c in out)
    return len(prompts) * new / dt, [c.tokens for c in out]


@contextmanager
def own_attention(model):
    """The model's own attention implementation (what model.generate uses outside hintsd)."""
    hintsd.use_kv_attention(model)
    model.config._attn_implementation = model.hintsd_own_attention
    try:
        yield
    finally:
        model.config._attn_implementation = "hintsd"


@torch.no_grad()
def time_prefill(model, prompt) -> tuple[float, float]:
    """Seconds of hintsd's prefill of one prompt, and of one plain forward of the model over it (best of 2)."""
    best = [float("inf"), float("inf")]
    for _ in range(2):
        sync(model.device)
        t = time.perf_counter()
        hintsd.start(model, [prompt], 1)
        sync(model.device)
        best[0] = min(best[0], time.perf_counter() - t)
        with own_attention(model):
            t = time.perf_counter()
            model(torch.tensor([prompt], device=model.device), logits_to_keep=1)
            sync(model.device)
        best[1] = min(best[1], time.perf_counter() - t)
    return best[0], best[1]


@torch.no_grad()
def time_hf(model, tok, prompts, new, static=False):
    ids = torch.tensor(prompts, device=model.device)
    kw = {"cache_implementation": "static"} if static else {}
    sync(model.device)
    t = time.perf_counter()
    with own_attention(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=tok.pad_token_id, **kw)
    sync(model.device)
    return len(prompts) * new / (time.perf_counter() - t), out[:, ids.shape[1]:].tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=hintsd.DEFAULT_MODEL, help="HF id, local dir, random:DIR or 'embedded'")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                    help="default: float32 bfloat16 on a CPU, bfloat16 on a GPU")
    ap.add_argument("--batches", type=hintsd.positive_int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=hintsd.positive_int, default=48)
    ap.add_argument("--new", type=hintsd.positive_int, default=48)
    ap.add_argument("--prefill-len", type=hintsd.nonneg_int, default=2048, help="0: no prefill timing")
    ap.add_argument("--reps", type=hintsd.positive_int, default=3, help="alternate the sides this many times")
    ap.add_argument("--static", action="store_true", help="add model.generate with a static cache")
    a = ap.parse_args()
    hintsd.check_device(ap, a.device)
    hintsd.check_model_name(ap, a.model)
    dtypes = a.dtypes or (["bfloat16"] if a.device.startswith("cuda") else ["float32", "bfloat16"])
    rows, first = [], {}
    for dtype in dtypes:
        model, tok = hintsd.load_model(a.model, a.device, getattr(torch, dtype))
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        bw = copy_bandwidth(model.device)
        bound = bw / nbytes
        print(f"{dtype}: parameters {nbytes / 1e9:.2f} GB, copy bandwidth {bw / 1e9:.1f} GB/s, batch-1 bound "
              f"{bound:.1f} tok/s ({1e3 / bound:.2f} ms a step)", flush=True)
        time_ours(model, make_prompts(tok, 1, 8), 4)  # warm-up both paths
        time_hf(model, tok, make_prompts(tok, 1, 8), 4)
        if a.prefill_len:
            ours, plain = time_prefill(model, make_prompts(tok, 1, a.prefill_len)[0])
            print(f"{dtype}: prefill of {a.prefill_len} tokens: hintsd {ours:.2f} s, one forward {plain:.2f} s",
                  flush=True)
            rows.append((dtype, "prefill", ours, plain))
        for b in a.batches:
            prompts = make_prompts(tok, b, a.prompt_len)
            best = {"hintsd": 0.0, "generate": 0.0, "static": 0.0}
            for _ in range(a.reps):  # interleaved, so background load hits every side alike
                o, mine = time_ours(model, prompts, a.new)
                g, ref = time_hf(model, tok, prompts, a.new)
                best["hintsd"], best["generate"] = max(best["hintsd"], o), max(best["generate"], g)
                if a.static:
                    best["static"] = max(best["static"], time_hf(model, tok, prompts, a.new, static=True)[0])
            same = sum(x == y for x, y in zip(mine, ref))
            agree = sum(x == y for x, y in zip(mine, first.setdefault(b, mine)))
            rows.append((dtype, b, best, same, agree, bound))
            print(f"{dtype} batch {b}: hintsd {best['hintsd']:.1f} tok/s, model.generate {best['generate']:.1f}"
                  + (f", static {best['static']:.1f}" if a.static else "") + f", identical rows {same}/{b}, "
                  f"rows equal to {dtypes[0]}'s {agree}/{b}", flush=True)
        del model
    print("\n| dtype | batch | hintsd tok/s | generate tok/s | hintsd / generate |"
          + (" static tok/s | hintsd / static |" if a.static else "") + " hintsd / bound | rows = generate's |"
          f" rows = {dtypes[0]}'s |")
    print("|---|---|---|---|---|" + ("---|---|" if a.static else "") + "---|---|---|")
    for dtype, b, *r in rows:
        if b == "prefill":
            print(f"| {dtype} | prefill {a.prefill_len} | {a.prefill_len / r[0]:.0f} | {a.prefill_len / r[1]:.0f} "
                  f"(one forward) | {r[1] / r[0]:.2f}x |" + (" | |" if a.static else "") + " | | |")
            continue
        best, same, agree, bound = r
        print(f"| {dtype} | {b} | {best['hintsd']:.1f} | {best['generate']:.1f} | "
              f"{best['hintsd'] / best['generate']:.2f}x |"
              + (f" {best['static']:.1f} | {best['hintsd'] / best['static']:.2f}x |" if a.static else "")
              + f" {100 * best['hintsd'] / (b * bound):.0f}% | {same}/{b} | {agree}/{b} |")


if __name__ == "__main__":
    main()
