"""stages.student.sampled_losses: unbiasedness against a dense float64 reference, top-k's bias, edge cases."""

import math

import pytest
import torch

from stages.buckets import bucket_logprobs, position_terms
from stages.student.losses import atkd_position_weights, kd_loss
from stages.student.sampled_losses import (
    counts_from_draws,
    draw_teacher_samples,
    sampled_atkd_loss,
    sampled_kd_loss,
    sampled_position_terms,
)

F64 = torch.float64
VOCAB, N_DRAWS, REPEATS = 30, 16, 2000


# ----------------------------------------------------------------- reference
def dense_terms(p, logits):
    """Float64 per-row KL(p||q), H(p, q), TKD, DKD, DKD's cross-entropy and their gradients in the logits."""
    z = logits.detach().double().requires_grad_(True)
    lq = z.log_softmax(-1)
    lp = p.log()
    out = {"kl": (p * (lp - lq)).sum(1), "ce": -(p * lq).sum(1)}
    return z, lq, lp, out


def dense_reference(p, logits, gold):
    z, lq, lp, out = dense_terms(p, logits)
    rows = torch.arange(len(gold))
    ng = torch.ones_like(p, dtype=torch.bool)
    ng[rows, gold] = False
    p_g, q_g = p[rows, gold], lq[rows, gold].exp()
    out["tkd"] = p_g * (p_g.log() - q_g.log()) + (1 - p_g) * ((1 - p_g).log() - (1 - q_g).log())
    lq_hat = torch.where(ng, lq - torch.logsumexp(torch.where(ng, lq, -math.inf), 1, keepdim=True), 0.0)
    p_hat = torch.where(ng, p / (1 - p_g)[:, None], 0.0)
    lp_hat = torch.where(ng, lp - (1 - p_g).log()[:, None], 0.0)
    out["dkd"] = (p_hat * (lp_hat - lq_hat)).sum(1)
    out["dkd_ce"] = -(p_hat * lq_hat).sum(1)
    grads = {k: torch.autograd.grad(v.sum(), z, retain_graph=True)[0] for k, v in out.items()}
    return {k: v.detach() for k, v in out.items()}, grads


# ---------------------------------------------------------------- fixtures
def teacher_batch(n=6, seed=0):
    """A high-entropy teacher on V=30 with gold mass p_g from 0.03 to 0.9, and a student."""
    gen = torch.Generator().manual_seed(seed)
    p_hat = (torch.randn(n, VOCAB, generator=gen, dtype=F64) * 0.5).softmax(-1)
    gold = torch.randint(0, VOCAB, (n,), generator=gen)
    p_g = torch.linspace(0.03, 0.9, n, dtype=F64)
    rows = torch.arange(n)
    p_hat[rows, gold] = 0.0
    p = p_hat / p_hat.sum(1, keepdim=True) * (1 - p_g)[:, None]
    p[rows, gold] = p_g
    logits = torch.randn(n, VOCAB, generator=gen) * 1.5
    return p, logits, gold


def replicate(p, logits, gold, repeats=REPEATS, n_draws=N_DRAWS, seed=1):
    """REPEATS independent samplings of every position, as rows [repeats * N] (replicate-major)."""
    # Every token's expected count over all draws is >= 10, so the empirical standard error is meaningful.
    assert float(p.min()) * repeats * n_draws >= 10
    gen = torch.Generator().manual_seed(seed)
    ids, counts = draw_teacher_samples(p.log().repeat(repeats, 1), n_draws, generator=gen)
    lp_all = p.log().repeat(repeats, 1)
    gold_r = gold.repeat(repeats)
    args = dict(
        sample_ids=ids,
        sample_counts=counts,
        target_ids=gold_r,
        target_logprobs=lp_all.gather(1, gold_r[:, None])[:, 0].float(),
        sample_logprobs=torch.where(counts > 0, lp_all.gather(1, ids), math.nan).float(),  # padding: garbage
    )
    leaf = logits.detach().repeat(repeats, 1).requires_grad_(True)
    return leaf, args


def term_samples(leaf, args, names, n, **kwargs):
    """Per-replicate values [R, N] and logit gradients [R, N, V] of sampled_position_terms fields."""
    terms = sampled_position_terms(leaf, **args, **kwargs)
    out = {}
    for name in names:
        value = getattr(terms, name)
        (grad,) = torch.autograd.grad(value.sum(), leaf, retain_graph=True)  # rows are independent
        out[name] = (value.detach().double().view(-1, n), grad.double().view(-1, n, VOCAB))
    return out


def interval(samples, expected):
    """(|mean - expected|, 4 * standard error), elementwise over the replicate axis 0."""
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(samples.shape[0])
    return (mean - expected).abs(), 4 * se + 1e-5  # 1e-5: float32 rounding of the terms


def assert_unbiased(samples, expected):
    err, bound = interval(samples, expected)
    assert (err <= bound).all(), f"max excess {float((err - bound).max())}"


# ------------------------------------------------------------- unbiasedness
def test_sampled_kd_is_unbiased_for_kl_and_its_gradient():
    p, logits, gold = teacher_batch()
    ref, ref_grad = dense_reference(p, logits, gold)
    leaf, args = replicate(p, logits, gold)
    with_lp = term_samples(leaf, args, ["kl"], len(gold))["kl"]
    args_no_lp = dict(args, sample_logprobs=None)
    without_lp = term_samples(leaf, args_no_lp, ["kl"], len(gold))["kl"]
    assert_unbiased(with_lp[0], ref["kl"])  # value: KL(p||q)
    assert_unbiased(without_lp[0], ref["ce"])  # value: H(p, q) = KL + H(p)
    for _, grad in (with_lp, without_lp):
        assert_unbiased(grad, ref_grad["kl"])  # gradient: q - p either way
    torch.testing.assert_close(with_lp[1], without_lp[1])


@pytest.mark.parametrize("with_lp", [True, False])
def test_sampled_dkd_is_unbiased_and_tkd_exact(with_lp):
    p, logits, gold = teacher_batch(seed=2)
    ref, ref_grad = dense_reference(p, logits, gold)
    leaf, args = replicate(p, logits, gold, seed=3)
    if not with_lp:
        args["sample_logprobs"] = None
    got = term_samples(leaf, args, ["tkd", "dkd"], len(gold))
    assert_unbiased(got["dkd"][0], ref["dkd" if with_lp else "dkd_ce"])
    assert_unbiased(got["dkd"][1], ref_grad["dkd"])
    torch.testing.assert_close(got["tkd"][0], ref["tkd"].expand_as(got["tkd"][0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["tkd"][1], ref_grad["tkd"].expand_as(got["tkd"][1]), atol=1e-5, rtol=1e-5)


def test_conditional_dkd_is_biased_by_the_all_gold_probability():
    """unbiased_dkd=False: E = (1 - p_g^n) DKD, visibly off where p_g ~ 0.9 (0.9^16 ~ 0.19)."""
    p, logits, gold = teacher_batch(seed=2)
    ref, _ = dense_reference(p, logits, gold)
    leaf, args = replicate(p, logits, gold, seed=3)
    values = term_samples(leaf, args, ["dkd"], len(gold), unbiased_dkd=False)["dkd"][0]
    p_g = p[torch.arange(len(gold)), gold]
    assert_unbiased(values, (1 - p_g**N_DRAWS) * ref["dkd"])
    err, bound = interval(values, ref["dkd"])
    assert (err > bound)[-1]  # the most confident position


def test_unbiased_dkd_gradient_error_explodes_on_confident_positions():
    """Why training defaults to unbiased_dkd=False: at p_g = 0.9 / 0.99 / 0.999 (n = 16) the rare
    non-gold draw is scaled by 1 / (1 - p_g^n) (1.2x, 6.7x, 63x here; up to 1e6x at the floor), so the
    unbiased DKD gradient's RMS error against the dense float64 one grows with that factor, while
    the conditional estimate's stays about the size of the dense gradient (its bias)."""
    p, logits, gold = teacher_batch(n=3, seed=8)
    rows = torch.arange(3)
    p_g = torch.tensor([0.9, 0.99, 0.999], dtype=F64)
    p_hat = p.clone()
    p_hat[rows, gold] = 0.0
    p = p_hat / p_hat.sum(1, keepdim=True) * (1 - p_g)[:, None]
    p[rows, gold] = p_g
    _, ref_grad = dense_reference(p, logits, gold)
    repeats = 4000
    ids, counts = draw_teacher_samples(p.log().repeat(repeats, 1), N_DRAWS, generator=torch.Generator().manual_seed(9))
    leaf = logits.detach().repeat(repeats, 1).requires_grad_(True)
    args = dict(sample_ids=ids, sample_counts=counts, target_ids=gold.repeat(repeats),
                target_logprobs=p_g.log().float().repeat(repeats))
    rms = {}
    for unbiased in (True, False):
        grad = term_samples(leaf, args, ["dkd"], 3, unbiased_dkd=unbiased)["dkd"][1]  # [R, 3, V]
        rms[unbiased] = ((grad - ref_grad["dkd"]) ** 2).sum(-1).mean(0).sqrt() / ref_grad["dkd"].norm(dim=-1)
    assert (rms[False] < 2.0).all(), rms[False]  # draw noise at 0.9, then the bias: ~ the dense gradient
    ratio = rms[True] / rms[False]
    assert ratio[2] > 10 and ratio[2] > ratio[1] > ratio[0], ratio  # measured 1.2, 5.0, 25


def test_sampled_atkd_mean_over_samplings_matches_dense_atkd():
    """Replicates as groups: the "mean" loss is the mean over samplings; each one's loss has the dense mean."""
    p, logits, gold = teacher_batch(seed=4)
    ref, ref_grad = dense_reference(p, logits, gold)
    leaf, args = replicate(p, logits, gold, seed=5)
    n = len(gold)
    valid = torch.ones(n * REPEATS, dtype=torch.bool)
    groups = torch.arange(REPEATS).repeat_interleave(n)
    w = atkd_position_weights(args["target_logprobs"][:n], valid[:n], hard_ratio=0.5, easy_weight=0.3)
    per_rep = w.tkd.double() * ref["tkd"] + w.dkd.double() * ref["dkd"]
    dense_loss = float(per_rep.sum())
    dense_grad = w.tkd.double()[:, None] * ref_grad["tkd"] + w.dkd.double()[:, None] * ref_grad["dkd"]
    loss = sampled_atkd_loss(leaf, args["sample_ids"], args["sample_counts"], args["target_ids"],
                             args["target_logprobs"], valid, sample_logprobs=args["sample_logprobs"],
                             group_ids=groups, hard_ratio=0.5, easy_weight=0.3)
    (grad,) = torch.autograd.grad(loss, leaf)
    terms = term_samples(leaf, args, ["tkd", "dkd"], n)
    rep_loss = (w.tkd.double() * terms["tkd"][0] + w.dkd.double() * terms["dkd"][0]).sum(1)
    assert float(loss.detach()) == pytest.approx(float(rep_loss.mean()), rel=1e-5)
    assert_unbiased(rep_loss, torch.tensor(dense_loss, dtype=F64))
    rep_grad = grad.double().view(REPEATS, n, VOCAB) * REPEATS  # "mean" over REPEATS groups
    assert_unbiased(rep_grad, dense_grad)


def test_topk_bias_is_far_outside_the_sampled_interval():
    p, logits, gold = teacher_batch(seed=6)
    ref, ref_grad = dense_reference(p, logits, gold)
    leaf, args = replicate(p, logits, gold, seed=7)
    value, grad = term_samples(leaf, args, ["kl"], len(gold))["kl"]
    err_v, bound_v = interval(value.sum(1), ref["kl"].sum())
    err_g, bound_g = interval(grad, ref_grad["kl"])
    assert err_v <= bound_v and (err_g <= bound_g).all()

    topk = p.topk(3, dim=1).indices
    top_logits = logits.detach().clone().requires_grad_(True)
    topk_loss = kd_loss(top_logits, topk, p.gather(1, topk).log().float(), gold,
                        p.gather(1, gold[:, None])[:, 0].log().float(), torch.ones(len(gold), dtype=torch.bool),
                        reduction="sum")
    (topk_grad,) = torch.autograd.grad(topk_loss, top_logits)
    assert abs(float(topk_loss.detach()) - float(ref["kl"].sum())) > 10 * float(bound_v)
    assert (topk_grad.double() - ref_grad["kl"]).abs().max() > 5 * bound_g.max()


# ---------------------------------------------------------------- chunking
def random_batch(n=40, seed=8):
    gen = torch.Generator().manual_seed(seed)
    p, logits, gold = teacher_batch(n=n, seed=seed)
    ids, counts = draw_teacher_samples(p.log(), 8, generator=gen)
    valid = torch.rand(n, generator=gen) < 0.8
    valid[0] = True
    groups = torch.randint(0, 4, (n,), generator=gen) * 3 + 5
    lp = torch.where(counts > 0, p.log().gather(1, ids), math.nan).float()
    target_lp = p.gather(1, gold[:, None])[:, 0].log().float()
    return logits.requires_grad_(True), ids, counts, gold, target_lp, valid, lp, groups


def test_chunked_terms_sum_to_whole_batch_loss():
    logits, ids, counts, gold, target_lp, valid, lp, groups = random_batch()
    args = (logits, ids, counts, gold, target_lp, valid)
    full_atkd = sampled_atkd_loss(*args, sample_logprobs=lp, group_ids=groups, ce_weight=0.3, reduction="sum")
    full_kd = sampled_kd_loss(*args, sample_logprobs=lp, ce_weight=0.3, reduction="sum")
    w = atkd_position_weights(target_lp, valid, groups, ce_weight=0.3)
    atkd_total = kd_total = 0.0
    for chunk in torch.arange(len(gold)).split(7):
        t = sampled_position_terms(*(a[chunk] for a in args[:5]), lp[chunk], valid[chunk])
        atkd_total = atkd_total + (w.tkd[chunk] * t.tkd + w.dkd[chunk] * t.dkd + w.ce[chunk] * t.nll).sum()
        kd_total = kd_total + (t.kl + 0.3 * t.nll).sum()  # invalid rows' terms are 0
    for chunked, full in ((atkd_total, full_atkd), (kd_total, full_kd)):
        torch.testing.assert_close(chunked, full)
        grads = [torch.autograd.grad(x, logits, retain_graph=True)[0] for x in (chunked, full)]
        torch.testing.assert_close(*grads)
    n_groups = len(groups[valid].unique())
    torch.testing.assert_close(sampled_atkd_loss(*args, sample_logprobs=lp, group_ids=groups, ce_weight=0.3),
                               full_atkd.detach() / n_groups)
    torch.testing.assert_close(sampled_kd_loss(*args, sample_logprobs=lp, ce_weight=0.3),
                               full_kd.detach() / int(valid.sum()))


def test_tkd_and_split_match_the_topk_version():
    logits, ids, counts, gold, target_lp, valid, lp, groups = random_batch(seed=9)
    p = teacher_batch(n=40, seed=9)[0]
    topk = p.topk(4, dim=1).indices
    topk_terms = position_terms(bucket_logprobs(logits, topk, p.gather(1, topk).log().float(), gold, target_lp,
                                                valid=valid))
    terms = sampled_position_terms(logits, ids, counts, gold, target_lp, lp, valid)
    torch.testing.assert_close(terms.tkd, torch.where(valid, topk_terms.tkd, 0.0), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(terms.nll, torch.where(valid, topk_terms.nll, 0.0))


# -------------------------------------------------------------- edge cases
def test_all_invalid_is_zero_with_graph():
    logits, ids, counts, gold, target_lp, valid, lp, groups = random_batch()
    valid = torch.zeros_like(valid)
    bad = (logits, torch.full_like(ids, -1), counts, torch.full_like(gold, -100), torch.full_like(target_lp, math.nan),
           valid)
    for loss in (sampled_kd_loss(*bad, sample_logprobs=torch.full_like(lp, math.nan)),
                 sampled_atkd_loss(*bad, group_ids=groups), sampled_atkd_loss(*bad, reduction="sum", ce_weight=0.5)):
        assert float(loss.detach()) == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.equal(grad, torch.zeros_like(grad))
    empty = (torch.zeros(0, 5, requires_grad=True), torch.zeros(0, 3, dtype=torch.long),
             torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0),
             torch.zeros(0, dtype=torch.bool))
    assert float(sampled_kd_loss(*empty).detach()) == 0.0 and float(sampled_atkd_loss(*empty).detach()) == 0.0


def test_padding_and_duplicate_ids_do_not_change_the_terms():
    logits, ids, counts, gold, target_lp, valid, lp, _ = random_batch(seed=10)
    base = sampled_position_terms(logits, ids, counts, gold, target_lp, lp, valid)
    pad = torch.full((len(gold), 3), -1)  # garbage ids, count 0, NaN log-probs
    padded = sampled_position_terms(logits, torch.cat([pad, ids], 1), torch.cat([pad * 0, counts], 1), gold,
                                    target_lp, torch.cat([pad.float() * math.nan, lp], 1), valid)
    # Split every count c into (c - c // 2, c // 2) on a repeated id.
    split = sampled_position_terms(logits, torch.cat([ids, ids], 1), torch.cat([counts - counts // 2, counts // 2], 1),
                                   gold, target_lp, torch.cat([lp, lp], 1), valid)
    for other in (padded, split):
        for a, b in zip(base, other):
            torch.testing.assert_close(a, b)


def test_all_gold_draws_give_zero_dkd():
    """Every draw is g: DKD is undefined and contributes 0; TKD and KL^ stay exact/finite."""
    logits = torch.randn(2, 6, requires_grad=True)
    ids, counts = torch.tensor([[2, 0], [4, 1]]), torch.tensor([[16, 0], [10, 6]])
    gold, target_lp = torch.tensor([2, 4]), torch.tensor([-0.01, -0.5])
    lp = torch.tensor([[-0.01, math.nan], [-0.5, -2.0]])
    for unbiased in (True, False):
        terms = sampled_position_terms(logits, ids, counts, gold, target_lp, lp, unbiased_dkd=unbiased)
        assert float(terms.dkd[0].detach()) == 0.0 and float(terms.dkd[1].detach()) != 0.0
        (grad,) = torch.autograd.grad(terms.dkd.sum(), logits)
        assert torch.equal(grad[0], torch.zeros(6)) and torch.isfinite(grad).all()
    lq = logits.detach().log_softmax(-1)
    assert float(terms.kl[0].detach()) == pytest.approx(float(-0.01 - lq[0, 2]), rel=1e-5)
    assert float(terms.tkd[0].detach()) > 0.0


def test_position_without_draws_contributes_only_tkd():
    logits = torch.randn(2, 5, requires_grad=True)
    args = (logits, torch.tensor([[1, 3], [0, 0]]), torch.tensor([[4, 4], [0, 0]]), torch.tensor([1, 2]),
            torch.tensor([-0.7, -0.2]))
    terms = sampled_position_terms(*args)
    kl, dkd, tkd = (float(t[1].detach()) for t in (terms.kl, terms.dkd, terms.tkd))
    assert kl == 0.0 and dkd == 0.0 and tkd > 0.0


def test_fixed_seed_is_deterministic():
    p, logits, gold = teacher_batch()
    runs = []
    for seed in (11, 11, 12):
        ids, counts = draw_teacher_samples(p.log(), N_DRAWS, generator=torch.Generator().manual_seed(seed))
        loss = sampled_atkd_loss(logits, ids, counts, gold, p.gather(1, gold[:, None])[:, 0].log().float(),
                                 torch.ones(len(gold), dtype=torch.bool))
        runs.append((ids, counts, loss))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][1], runs[2][1])
    assert (runs[0][1].sum(1) == N_DRAWS).all()


def test_counts_from_draws():
    ids, counts = counts_from_draws(torch.tensor([[3, 1, 3, 3], [2, 2, 2, 2], [0, 1, 2, 3]]))
    assert ids.tolist() == [[1, 3, 0, 0], [2, 0, 0, 0], [0, 1, 2, 3]]
    assert counts.tolist() == [[1, 3, 0, 0], [4, 0, 0, 0], [1, 1, 1, 1]]


def test_invalid_arguments_raise():
    logits, ids, counts, gold, target_lp, valid, lp, groups = random_batch()
    args = (logits, ids, counts, gold, target_lp, valid)
    with pytest.raises(ValueError, match="reverse_kl.*not supported"):
        sampled_atkd_loss(*args, base="reverse_kl")
    with pytest.raises(ValueError, match="unknown base"):
        sampled_atkd_loss(*args, base="tvd")
    with pytest.raises(ValueError, match="unknown reduction"):
        sampled_kd_loss(*args, reduction="none")
    with pytest.raises(ValueError, match="easy_weight"):
        sampled_atkd_loss(*args, easy_weight=1.5)
    bad = [
        ((logits, ids[:5]) + args[2:], "sample_ids"),
        (args[:2] + (counts[:, :2],) + args[3:], "sample_counts"),
        (args[:2] + (counts.float(),) + args[3:], "integer"),
        (args[:3] + (gold[:-1],) + args[4:], "target_ids"),
        (args[:5] + (valid.long(),), "valid must be a bool"),
    ]
    for bad_args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            sampled_kd_loss(*bad_args)
    with pytest.raises(ValueError, match="sample_logprobs"):
        sampled_kd_loss(*args, sample_logprobs=lp[:, :2])
    with pytest.raises(ValueError, match="group_ids"):
        sampled_atkd_loss(*args, group_ids=groups[:3])
