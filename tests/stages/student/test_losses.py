"""stages.buckets and stages.student.losses against a dense float64 reference written from the formulas."""

import math

import pytest
import torch

from stages.buckets import DIVERGENCES, TEACHER_RESIDUAL_FLOOR, bucket_divergence, bucket_logprobs, position_terms
from stages.student.losses import atkd_loss, atkd_position_weights, kd_loss

F64 = torch.float64


# ----------------------------------------------------------------- reference
def ref_kl(a, b):
    """KL(a||b) for float64 vectors, with 0 * log(0/x) = 0."""
    m = a > 0
    return float((a[m] * (a[m].log() - b[m].log())).sum())


def ref_div(p, q, name, beta=0.5, alpha=0.1):
    if name == "forward_kl":
        return ref_kl(p, q)
    if name == "reverse_kl":
        return ref_kl(q, p)
    if name == "tvd":
        return float(0.5 * (p - q).abs().sum())
    if name == "js":
        m = beta * p + (1 - beta) * q
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if name == "skew_kl":
        return ref_kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_rkl":
        return ref_kl(q, alpha * q + (1 - alpha) * p)
    raise AssertionError(name)


def ref_tkd_dkd(p, q, gold, base):
    """Binary and non-gold divergences of two distributions; index ``gold`` is g."""
    others = torch.ones_like(p, dtype=torch.bool)
    others[gold] = False
    bp = torch.stack([p[gold], p[others].sum()])
    bq = torch.stack([q[gold], q[others].sum()])
    ph, qh = p[others] / p[others].sum(), q[others] / q[others].sum()
    if base == "forward_kl":
        return ref_kl(bp, bq), ref_kl(ph, qh)
    return ref_kl(bq, bp), ref_kl(qh, ph)


def ref_buckets(p_full, q_full, topk, gold, renorm=False):
    """Bucket distributions [gold, S without g, residual?] from full float64 p, q."""
    ids = [gold] + [s for s in topk.tolist() if s != gold]
    p = p_full[ids].clone()
    q = q_full[ids].clone()
    if len(ids) < p_full.numel() and not renorm:
        rest = torch.ones_like(p_full, dtype=torch.bool)
        rest[ids] = False
        p = torch.cat([p, torch.clamp(1 - p.sum(), min=TEACHER_RESIDUAL_FLOOR)[None]])
        q = torch.cat([q, q_full[rest].sum()[None]])
    return p / p.sum(), q / q.sum()


def ref_atkd(tkd, dkd, unc, valid, groups, easy_weight, hard_ratio, reduction="mean"):
    losses = []
    for grp in sorted(set(groups.tolist())):
        idx = [i for i in range(len(valid)) if valid[i] and groups[i] == grp]
        if not idx:
            continue
        idx.sort(key=lambda i: (-unc[i], i))
        n_hard = math.ceil(hard_ratio * len(idx))
        hard, easy = idx[:n_hard], idx[n_hard:]
        loss = 0.0
        if easy:
            loss += easy_weight * sum(dkd[i] for i in easy) / len(easy)
        if hard:
            loss += (1 - easy_weight) * sum(tkd[i] + dkd[i] for i in hard) / len(hard)
        losses.append(loss)
    total = sum(losses)
    return total / max(len(losses), 1) if reduction == "mean" else total


# ---------------------------------------------------------------- fixtures
def make_batch(n=24, vocab=12, k=4, seed=0, scale=2.0):
    """Random teacher/student; half the gold tokens are inside the teacher's top-k."""
    gen = torch.Generator().manual_seed(seed)
    p_full = (torch.randn(n, vocab, generator=gen, dtype=F64) * scale).softmax(-1)
    logits = (torch.randn(n, vocab, generator=gen) * scale).requires_grad_(True)
    topk = p_full.topk(k, dim=1).indices
    target = torch.randint(0, vocab, (n,), generator=gen)
    in_topk = torch.rand(n, generator=gen) < 0.5
    target = torch.where(in_topk, topk[torch.arange(n), torch.randint(0, k, (n,), generator=gen)], target)
    valid = torch.rand(n, generator=gen) < 0.8
    valid[0] = True
    groups = torch.randint(0, 4, (n,), generator=gen) * 3 + 5  # arbitrary, non-contiguous ids
    return dict(
        p_full=p_full,
        student_logits=logits,
        topk_ids=topk,
        topk_logprobs=p_full.gather(1, topk).log().float(),
        target_ids=target,
        target_logprobs=p_full.gather(1, target[:, None])[:, 0].log().float(),
        valid=valid,
        groups=groups,
    )


def call_args(b):
    return (b["student_logits"], b["topk_ids"], b["topk_logprobs"], b["target_ids"], b["target_logprobs"], b["valid"])


def reference_rows(b, renorm=False, dense=False):
    """Per-row float64 (p, q, gold index) on buckets (or on the full vocab if dense)."""
    q_full = b["student_logits"].detach().double().softmax(-1)
    rows = []
    for i in range(len(b["valid"])):
        g = int(b["target_ids"][i])
        if dense:
            rows.append((b["p_full"][i], q_full[i], g))
        else:
            p, q = ref_buckets(b["p_full"][i], q_full[i], b["topk_ids"][i], g, renorm)
            rows.append((p, q, 0))
    return rows


def assert_close(actual, expected, tol=2e-5):
    actual = float(actual.detach()) if torch.is_tensor(actual) else actual
    assert math.isfinite(actual)
    assert float(actual) == pytest.approx(expected, rel=tol, abs=tol)


# -------------------------------------------------------------- divergences
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("renorm", [False, True])
def test_k_equals_v_matches_dense(divergence, renorm):
    b = make_batch(k=12)
    rows = reference_rows(b, dense=True)
    vals = [ref_div(p, q, divergence, 0.3, 0.2) for (p, q, _), v in zip(rows, b["valid"]) if v]
    for reduction, expected in (("mean", sum(vals) / len(vals)), ("sum", sum(vals))):
        got = kd_loss(*call_args(b), divergence=divergence, beta=0.3, alpha=0.2, renormalize_topk=renorm,
                      reduction=reduction)
        assert_close(got, expected)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("renorm", [False, True])
def test_sparse_matches_bucket_reference(divergence, renorm):
    b = make_batch(k=3)
    rows = reference_rows(b, renorm=renorm)
    vals = [ref_div(p, q, divergence) for (p, q, _), v in zip(rows, b["valid"]) if v]
    got = kd_loss(*call_args(b), divergence=divergence, renormalize_topk=renorm)
    assert_close(got, sum(vals) / len(vals))


def test_ce_weight_adds_student_nll():
    b = make_batch(k=3)
    q_full = b["student_logits"].detach().double().log_softmax(-1)
    nll = -q_full.gather(1, b["target_ids"][:, None])[:, 0][b["valid"]].mean()
    plain = kd_loss(*call_args(b))
    assert_close(kd_loss(*call_args(b), ce_weight=0.5), float(plain.detach()) + 0.5 * float(nll))


# --------------------------------------------------------------------- ATKD
def atkd_reference(b, base, dense, easy_weight=0.2, hard_ratio=0.5, reduction="mean", renorm=False):
    rows = reference_rows(b, renorm=renorm, dense=dense)
    tkd, dkd = zip(*(ref_tkd_dkd(p, q, g, base) for p, q, g in rows))
    unc = (1 - b["target_logprobs"].double().exp()).tolist()
    return ref_atkd(tkd, dkd, unc, b["valid"].tolist(), b["groups"], easy_weight, hard_ratio, reduction)


@pytest.mark.parametrize("base", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("k", [12, 3])
@pytest.mark.parametrize("easy_weight,hard_ratio", [(0.2, 0.5), (0.5, 0.3), (0.0, 1.0)])
def test_atkd_matches_reference(base, k, easy_weight, hard_ratio):
    b = make_batch(k=k, seed=1)
    for reduction in ("mean", "sum"):
        got = atkd_loss(*call_args(b), group_ids=b["groups"], base=base, easy_weight=easy_weight,
                        hard_ratio=hard_ratio, reduction=reduction)
        assert_close(got, atkd_reference(b, base, k == 12, easy_weight, hard_ratio, reduction))


def test_atkd_renormalized_matches_reference():
    b = make_batch(k=3, seed=2)
    got = atkd_loss(*call_args(b), group_ids=b["groups"], renormalize_topk=True)
    assert_close(got, atkd_reference(b, "forward_kl", dense=False, renorm=True))


@pytest.mark.parametrize("renorm", [False, True])
def test_kl_decomposes_into_tkd_and_dkd(renorm):
    b = make_batch(k=3, seed=3)
    buckets = bucket_logprobs(*call_args(b)[:5], renorm)
    fwd, rev = position_terms(buckets, "forward_kl"), position_terms(buckets, "reverse_kl")
    p_g, q_g = buckets.teacher[:, 0].exp(), buckets.student[:, 0].exp()
    torch.testing.assert_close(fwd.kl, fwd.tkd + (1 - p_g) * fwd.dkd, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rev.kl, rev.tkd + (1 - q_g) * rev.dkd, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fwd.kl, bucket_divergence(buckets, "forward_kl"))
    sums = torch.where(buckets.present, buckets.teacher.exp(), 0.0).sum(1)
    torch.testing.assert_close(sums, torch.ones_like(sums))


# ------------------------------------------------------- edge cases / grads
def extreme_batch():
    """p_g = 1; teacher residual exactly 0; fp16 top-k summing past 1; q_g -> 1; q -> 0."""
    vocab = 8
    f16 = torch.tensor([[0.6, 0.4, 0.01]]).log().half()
    assert f16.float().exp().sum() > 1
    topk_ids = torch.tensor([[0, 1, 2], [1, 2, 3], [0, 1, 2], [3, 4, 5], [5, 6, 7]])
    topk_lp = torch.cat([
        torch.tensor([[0.0, -30.0, -60.0]]),  # p_g = 1 (gold 0 in S)
        torch.tensor([[0.25, 0.25, 1e-30]]).log(),  # gold 0 outside S with p_g = 0.5: residual 0
        f16.float(),
        torch.tensor([[-0.1, -5.0, -9.0]]),
        torch.tensor([[-1e-4, -12.0, -14.0]]),
    ])
    target_lp = torch.tensor([0.0, math.log(0.5), math.log(0.6), -0.2, -1e-4])
    target_ids = torch.tensor([0, 0, 0, 7, 5])
    logits = torch.zeros(5, vocab)
    logits[3, 7] = 1e4  # student certain of the gold token
    logits[4, 5] = -1e4  # student gives the gold ~0
    logits[0, 1:] = -50.0
    return logits.requires_grad_(True), topk_ids, topk_lp.half(), target_ids, target_lp, torch.ones(5, dtype=torch.bool)


@pytest.mark.parametrize("renorm", [False, True])
def test_losses_and_gradients_finite_at_extremes(renorm):
    logits, *rest = extreme_batch()
    losses = [kd_loss(logits, *rest, divergence=d, renormalize_topk=renorm) for d in DIVERGENCES]
    losses += [atkd_loss(logits, *rest, base=b, renormalize_topk=renorm, ce_weight=0.1)
               for b in ("forward_kl", "reverse_kl")]
    for loss in losses:
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(grad).all()
    buckets = bucket_logprobs(logits, *rest[:4], renorm)
    for terms in (position_terms(buckets, "forward_kl"), position_terms(buckets, "reverse_kl")):
        assert all(torch.isfinite(t).all() for t in terms)


def test_renormalized_row_without_non_gold_buckets():
    """k = 1 and the top-1 is the gold: with renormalize_topk only {g} is left, so TKD = DKD = 0."""
    logits = torch.randn(3, 5, requires_grad=True)
    args = (logits, torch.tensor([[2], [1], [4]]), torch.tensor([[-0.1], [-0.2], [-0.3]]), torch.tensor([2, 0, 4]),
            torch.tensor([-0.1, -1.0, -0.3]), torch.ones(3, dtype=torch.bool))
    for base in ("forward_kl", "reverse_kl"):
        loss = atkd_loss(*args, base=base, renormalize_topk=True)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        terms = position_terms(bucket_logprobs(*args[:5], True), base)
        assert terms.tkd[[0, 2]].abs().max() < 1e-6 and terms.dkd[[0, 2]].abs().max() < 1e-6
        assert terms.tkd[1] > 0


def test_all_masked_is_zero_with_graph():
    b = make_batch(k=3)
    b["valid"] = torch.zeros_like(b["valid"])
    b["target_ids"] = torch.full_like(b["target_ids"], -100)  # padding ids must not be gathered
    b["topk_ids"] = torch.full_like(b["topk_ids"], -1)
    b["topk_logprobs"] = torch.full_like(b["topk_logprobs"], float("nan"))
    for loss in (kd_loss(*call_args(b), divergence="js"), atkd_loss(*call_args(b), group_ids=b["groups"]),
                 atkd_loss(*call_args(b), reduction="sum", renormalize_topk=True)):
        assert float(loss.detach()) == 0.0
        (grad,) = torch.autograd.grad(loss, b["student_logits"])
        assert torch.equal(grad, torch.zeros_like(grad))


def test_empty_batch():
    logits = torch.zeros(0, 5, requires_grad=True)
    ids, lp = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)
    args = (logits, ids, lp, torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    assert float(kd_loss(*args).detach()) == 0.0 and float(atkd_loss(*args).detach()) == 0.0


# ------------------------------------------------------------ ATKD weights
@pytest.mark.parametrize("hard_ratio", [0.0, 0.3, 0.5, 1.0])
def test_hard_easy_split_per_group(hard_ratio):
    gen = torch.Generator().manual_seed(4)
    sizes = [1, 2, 3, 4, 5, 7, 10]
    groups = torch.cat([torch.full((s,), 10 * i) for i, s in enumerate(sizes)])
    perm = torch.randperm(len(groups), generator=gen)
    groups = groups[perm]
    target_lp = -torch.rand(len(groups), generator=gen) * 3
    valid = torch.rand(len(groups), generator=gen) < 0.85
    w = atkd_position_weights(target_lp, valid, groups, hard_ratio=hard_ratio)
    unc = 1 - target_lp.double().exp()
    for grp in groups.unique():
        in_grp = (groups == grp) & valid
        hard, easy = w.hard & in_grp, w.easy & in_grp
        assert int(hard.sum()) == math.ceil(hard_ratio * int(in_grp.sum()))
        assert int(easy.sum()) == int(in_grp.sum()) - int(hard.sum())
        if hard.any() and easy.any():
            assert unc[hard].min() >= unc[easy].max()
    assert not (w.hard | w.easy)[~valid].any()
    assert int(w.num_groups) == len(groups[valid].unique())
    stats = w.stats()
    assert stats["num_hard"] + stats["num_easy"] == int(valid.sum())
    assert stats["mean_unc"] == pytest.approx(float(unc[valid].mean()), rel=1e-5)


def test_ties_broken_by_position_index():
    w = atkd_position_weights(torch.full((5,), -0.7), torch.ones(5, dtype=torch.bool))
    assert w.hard.tolist() == [True, True, True, False, False]


def test_ties_broken_by_position_index_in_large_interleaved_groups():
    n = 3000
    groups = torch.arange(n) % 3
    target_lp = torch.tensor([-0.1, -2.0])[(torch.arange(n) // 3) % 2]  # two UNC levels, many ties
    w = atkd_position_weights(target_lp, torch.ones(n, dtype=torch.bool), groups, hard_ratio=0.3)
    for grp in range(3):
        idx = (groups == grp).nonzero()[:, 0]
        order = sorted(idx.tolist(), key=lambda i: (-(1 - math.exp(float(target_lp[i]))), i))
        expected_hard = set(order[: math.ceil(0.3 * len(idx))])
        assert set(idx[w.hard[idx]].tolist()) == expected_hard


def test_teacher_residual_clamped_and_renormalised():
    """Residual 1 - sum <= 0 (exactly 0, or fp16 masses past 1) becomes the floor, then all renormalise."""
    masses = torch.tensor([[0.5, 0.25, 0.25], [0.6, 0.4, 0.01]], dtype=F64)  # [p_g, top-k without g]
    topk_lp = masses[:, 1:].log().float()
    topk_lp[1] = topk_lp[1].half().float()  # fp16-rounded, as cached
    assert topk_lp.double().exp().sum(1)[0] + 0.5 >= 1 - 1e-7 and topk_lp.double().exp().sum(1)[1] + 0.6 > 1
    buckets = bucket_logprobs(torch.zeros(2, 6), torch.tensor([[1, 2], [1, 2]]), topk_lp, torch.tensor([0, 0]),
                              masses[:, 0].log().float())
    known = torch.cat([masses[:, :1], topk_lp.double().exp()], 1)
    residual = torch.clamp(1 - known.sum(1, keepdim=True), min=TEACHER_RESIDUAL_FLOOR)
    assert (residual == TEACHER_RESIDUAL_FLOOR).all()
    expected = torch.cat([known, residual], 1)
    expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(buckets.teacher.double().exp(), expected, atol=1e-7, rtol=1e-5)


def test_group_none_equals_one_group():
    b = make_batch(k=3, seed=5)
    none = atkd_loss(*call_args(b))
    for ids in (torch.zeros_like(b["groups"]), torch.full_like(b["groups"], 7)):
        torch.testing.assert_close(atkd_loss(*call_args(b), group_ids=ids), none)


def test_empty_group_contributes_zero():
    b = make_batch(k=3, seed=6)
    groups = torch.where(b["valid"], 0, 1)  # group 1 has no valid position
    one = atkd_loss(*call_args(b), group_ids=groups)
    torch.testing.assert_close(one, atkd_loss(*call_args(b)))
    assert int(atkd_position_weights(b["target_logprobs"], b["valid"], groups).num_groups) == 1


def test_reduction_sum_and_mean():
    b = make_batch(k=3, seed=7)
    n_valid = int(b["valid"].sum())
    torch.testing.assert_close(kd_loss(*call_args(b), reduction="sum"), kd_loss(*call_args(b)) * n_valid)
    n_groups = len(b["groups"][b["valid"]].unique())
    torch.testing.assert_close(atkd_loss(*call_args(b), group_ids=b["groups"], reduction="sum"),
                               atkd_loss(*call_args(b), group_ids=b["groups"]) * n_groups)


@pytest.mark.parametrize("base", ["forward_kl", "reverse_kl"])
def test_chunked_weights_path_equals_atkd_loss(base):
    b = make_batch(n=40, k=3, seed=8)
    args = call_args(b)
    full = atkd_loss(*args, group_ids=b["groups"], base=base, ce_weight=0.3, reduction="sum")
    (full_grad,) = torch.autograd.grad(full, b["student_logits"])
    w = atkd_position_weights(b["target_logprobs"], b["valid"], b["groups"], ce_weight=0.3)
    total = 0.0
    for chunk in torch.arange(40).split(7):
        t = position_terms(bucket_logprobs(*(a[chunk] for a in args[:5]), valid=b["valid"][chunk]), base)
        total = total + (w.tkd[chunk] * t.tkd + w.dkd[chunk] * t.dkd + w.ce[chunk] * t.nll).sum()
    (chunk_grad,) = torch.autograd.grad(total, b["student_logits"])
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(chunk_grad, full_grad)


# ------------------------------------------------------------ bad arguments
def test_invalid_arguments_raise():
    b = make_batch(k=3)
    args = call_args(b)
    bad = [
        (dict(divergence="kl"), "unknown divergence"),
        (dict(reduction="none"), "unknown reduction"),
        (dict(divergence="js", beta=1.0), "beta"),
        (dict(divergence="skew_kl", alpha=0.0), "alpha"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(ValueError, match=msg):
            kd_loss(*args, **kwargs)
    with pytest.raises(ValueError, match="unknown base"):
        atkd_loss(*args, base="tvd")
    with pytest.raises(ValueError, match="easy_weight"):
        atkd_loss(*args, easy_weight=1.5)
    with pytest.raises(ValueError, match="group_ids"):
        atkd_loss(*args, group_ids=b["groups"][:3])
    shapes = [
        ((args[0][0],) + args[1:], "student_logits"),
        ((args[0], args[1][:5]) + args[2:], "topk_ids"),
        (args[:2] + (args[2][:, :2],) + args[3:], "topk_logprobs"),
        (args[:3] + (args[3][:-1],) + args[4:], "target_ids"),
        (args[:5] + (args[5].long(),), "valid must be a bool"),
        ((args[0], args[1].float()) + args[2:], "integer"),
    ]
    for bad_args, msg in shapes:
        with pytest.raises(ValueError, match=msg):
            kd_loss(*bad_args)
