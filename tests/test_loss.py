"""reverse_kl_loss against a float64 brute force; LoRA step-0 identity; EMA direction."""
import math

import pytest
import torch

import hintsd


def brute_kl(s_logits, t_logits, mask):
    """KL(student || teacher) token by token with Python loops over the vocab, in float64."""
    total, n = 0.0, 0
    for s_row, t_row, m in zip(s_logits.detach().double(), t_logits.detach().double(), mask):
        if not m:
            continue
        ps, pt = torch.softmax(s_row, -1), torch.softmax(t_row, -1)
        total += sum(float(ps[v]) * (math.log(float(ps[v])) - math.log(float(pt[v]))) for v in range(len(ps)))
        n += 1
    return total / max(n, 1)


def brute_topk_kl(s_logits, t_logits, mask, k):
    total, n = 0.0, 0
    for s_row, t_row, m in zip(s_logits.detach().double(), t_logits.detach().double(), mask):
        if not m:
            continue
        ps, pt = torch.softmax(s_row, -1), torch.softmax(t_row, -1)
        idx = ps.topk(k).indices.tolist()
        kl = sum(float(ps[v]) * (math.log(float(ps[v])) - math.log(float(pt[v]))) for v in idx)
        s_tail, t_tail = 1 - sum(float(ps[v]) for v in idx), 1 - sum(float(pt[v]) for v in idx)
        total += kl + s_tail * (math.log(s_tail) - math.log(t_tail))
        n += 1
    return total / max(n, 1)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(6, 50, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = (torch.randn(6, 50, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    return s, t, mask


def test_exact_kl_value_and_gradient_match_float64_brute_force(logits):
    s, t, mask = logits
    loss = hintsd.reverse_kl_loss(s, t, mask)
    assert loss.item() == pytest.approx(brute_kl(s, t, mask), rel=1e-5)
    loss.backward()
    # reference gradient: autograd through an independent float64 formula
    s2 = s.detach().clone().requires_grad_(True)
    ls, lt = torch.log_softmax(s2, -1), torch.log_softmax(t.detach(), -1)
    ref = ((ls.exp() * (ls - lt)).sum(-1) * mask).sum() / mask.sum()
    ref.backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-6)
    assert s.grad[~mask].abs().max() == 0  # unmasked positions get no gradient
    assert t.grad is None  # stop-gradient on the teacher


def test_topk_with_tail_bucket_matches_brute_force(logits):
    s, t, mask = logits
    for k in (1, 5, 49):
        assert hintsd.reverse_kl_loss(s, t, mask, topk=k).item() == pytest.approx(brute_topk_kl(s, t, mask, k), rel=1e-5)
    # with k covering the whole vocab the tail is empty and the value is the exact KL
    assert hintsd.reverse_kl_loss(s, t, mask, topk=50).item() == pytest.approx(brute_kl(s, t, mask), rel=1e-5)


def test_per_token_reduction_for_pasting_into_other_trainers(logits):
    """reduction="none" gives the per-token KL (0 where masked); its masked mean is the "mean" reduction, and a
    per-sequence mean (TRL's SDPO) or a per-micro-batch mean (verl) is built from it."""
    s, t, mask = logits
    per_token = hintsd.reverse_kl_loss(s, t, mask, reduction="none")
    assert per_token.shape == (6,) and torch.all(per_token[~mask] == 0) and torch.all(per_token[mask] > 0)
    assert torch.allclose(per_token.sum() / mask.sum(), hintsd.reverse_kl_loss(s, t, mask))
    rows = [brute_kl(s[i:i + 1], t[i:i + 1], mask[i:i + 1]) for i in range(6)]
    assert torch.allclose(per_token, torch.tensor(rows, dtype=per_token.dtype), rtol=1e-5)
    k5 = hintsd.reverse_kl_loss(s, t, mask, topk=5, reduction="none")
    assert torch.allclose(k5.sum() / mask.sum(), hintsd.reverse_kl_loss(s, t, mask, topk=5))
    assert torch.allclose(hintsd.reverse_kl_loss(s, t), hintsd.reverse_kl_loss(s, t, torch.ones(6)))  # mask=None


def test_identical_distributions_give_zero_and_kl_is_not_symmetric(logits):
    s, t, mask = logits
    assert hintsd.reverse_kl_loss(s, s, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert hintsd.reverse_kl_loss(s, t, mask).item() != pytest.approx(hintsd.reverse_kl_loss(t, s, mask).item())


def test_empty_mask_gives_zero_without_nan(logits):
    s, t, _ = logits
    loss = hintsd.reverse_kl_loss(s, t, torch.zeros(6, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(s.grad).any()


def test_float32_large_vocab_is_finite_with_extreme_and_masked_logits():
    s = torch.full((2, 1000), -1e4)
    s[:, -10:] = float("-inf")  # padded vocab entries, as some models mask them
    s[:, 0] = 30.0
    t = torch.randn(2, 1000) * 50
    t[:, -10:] = float("-inf")
    assert torch.isfinite(hintsd.reverse_kl_loss(s, t, torch.ones(2))).item()
    assert torch.isfinite(hintsd.reverse_kl_loss(s, t, torch.ones(2), topk=10)).item()
    s.requires_grad_(True)
    hintsd.reverse_kl_loss(s, t, torch.ones(2), topk=995).backward()
    assert torch.isfinite(s.grad).all()


def test_lora_step0_equals_base_and_ema_moves_towards_student(tiny):
    import copy
    model = copy.deepcopy(tiny)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = model(ids).logits
    params = hintsd.trainable_params(model, 8, 16)
    assert len(params) == 2 * 7 * 2  # A and B for 7 projections in 2 layers (the default: every projection)
    assert torch.equal(model(ids).logits, before)  # B = 0: step 0 is the base model
    ema = hintsd.Shadow(params)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    old = [v.clone() for v in ema.values]
    ema.ema_update(0.9)
    for p, v, o in zip(params, ema.values, old):  # teacher <- 0.9 teacher + 0.1 student
        assert torch.allclose(v, 0.9 * o + 0.1 * p.detach())
    with ema:  # swapped in: the model runs on the teacher values, and back afterwards
        assert all(torch.allclose(p, o + 0.1) for p, o in zip(params, old))
    assert not torch.equal(model(ids).logits, before)


def test_merge_folds_lora_into_plain_linears(tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    from conftest import lora_copy
    model, _ = lora_copy(tiny, 0.05)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    want = model(ids).logits
    hintsd.merge_and_save(model, tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.allclose(again(ids).logits, want, atol=1e-4)
