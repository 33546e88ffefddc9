"""Tokens/s of hintsd's hand-written batched KV-cache generator against transformers' model.generate.

    python bench/generate.py [--model embedded] [--batches 1 4 8] [--prompt-len 48] [--new 48]

Greedy decoding, same prompts, same model, in one run, the two sides alternating (best of --reps). Rows are forced to run the full --new tokens
(no EOS) so both sides do the same work; tokens/s counts new tokens over wall time including prefill.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hintsd  # noqa: E402


def make_prompts(tok, batch, length):
    text = "def quicksort(arr):\n    # sort a list of integers and explain every step in a comment\n" * 20
    ids = tok(text, add_special_tokens=False).input_ids
    return [ids[i: i + length] for i in range(batch)]  # same length, different content


def time_ours(model, tok, prompts, new):
    t = time.perf_counter()
    state = hintsd.new_state(model, len(prompts))
    logits = hintsd.prefill(model, state, prompts, tok.pad_token_id)
    out = hintsd.decode(model, tok, state, logits, new, temperature=0.0, stop_ids=())
    dt = time.perf_counter() - t
    assert all(len(c.tokens) == new for c in out)
    return len(prompts) * new / dt, [c.tokens for c in out]


@torch.no_grad()
def time_hf(model, tok, prompts, new):
    ids = torch.tensor(prompts, device=model.device)
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    dt = time.perf_counter() - t
    return len(prompts) * new / dt, out[:, ids.shape[1]:].tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=hintsd.DEFAULT_MODEL, help="HF id, local dir, or 'embedded'")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3, help="alternate the two generators this many times; keep the best")
    args = ap.parse_args()
    model, tok = hintsd.load_model(args.model, args.device)
    time_ours(model, tok, make_prompts(tok, 1, 8), 4)  # warm-up both paths
    time_hf(model, tok, make_prompts(tok, 1, 8), 4)
    rows = []
    for b in args.batches:
        prompts = make_prompts(tok, b, args.prompt_len)
        ours = hf = 0.0
        for _ in range(args.reps):  # interleaved, so background load hits both sides alike
            o, a = time_ours(model, tok, prompts, args.new)
            g, h = time_hf(model, tok, prompts, args.new)
            ours, hf = max(ours, o), max(hf, g)
        same = sum(x == y for x, y in zip(a, h))
        rows.append((b, ours, hf, same))
        print(f"batch {b}: hintsd {ours:6.1f} tok/s   model.generate {hf:6.1f} tok/s   ratio {ours / hf:4.2f}x   "
              f"identical rows {same}/{b}", flush=True)
    base = rows[0][1]
    print("\n| batch | hintsd tok/s | generate tok/s | hintsd / generate | hintsd vs its batch-1 |")
    print("|---|---|---|---|---|")
    for b, ours, hf, _ in rows:
        print(f"| {b} | {ours:.1f} | {hf:.1f} | {ours / hf:.2f}x | {ours / base:.2f}x |")


if __name__ == "__main__":
    main()
