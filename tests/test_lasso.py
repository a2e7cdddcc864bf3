"""CDCP's training rule (Eq. 2): masked group-lasso gradients, the proximal shrink, the FLOPs schedule."""
import pytest
import torch

import cait
from cait.finetune.lasso import (FlopsSchedule, apply_gradient_rule, compactor_rows, max_masked_row_norm,
                                 reset_optimizer_rows_, shrink_masked_rows_)
from cait.compress.select import ChannelMask


def _mask_half(model):
    scores = cait.compactor_scores(model)
    m = ChannelMask.empty_like(scores)
    for l in range(len(m.qk)):
        m.qk[l][:, :4] = True
        m.v[l][:, 2:5] = True
        m.ffn[l][::3] = True
    return m


def _backward_through_perturbed_compactors(tiny):
    """A compactor model away from identity, a mask, one backward pass; returns (model, mask, task grads by id)."""
    model = cait.add_compactors(tiny())
    with torch.no_grad():
        for _, Q in cait.iter_compactors(model):
            Q.add_(0.1 * torch.randn_like(Q))
    mask = _mask_half(model)
    model(torch.randn(4, 3, 32, 32)).square().mean().backward()
    return model, mask, {id(Q): Q.grad.clone() for Q, _ in compactor_rows(model, mask)}


def test_gradient_rule_masked_rows_get_only_the_lasso_term(tiny):
    model, mask, task = _backward_through_perturbed_compactors(tiny)
    lam, eps = 1e-3, 1e-8
    apply_gradient_rule(model, mask, lasso=lam, eps=eps)
    for Q, in_s in compactor_rows(model, mask):
        lasso = lam * Q.detach() / Q.detach().norm(dim=-1, keepdim=True).clamp_min(eps)
        expected = torch.where(in_s.unsqueeze(-1), lasso, task[id(Q)] + lasso)
        torch.testing.assert_close(Q.grad, expected, rtol=0, atol=1e-9)
        assert task[id(Q)][in_s].abs().sum() > 0              # the task gradient really was there, and is gone


def test_gradient_rule_without_mask_and_zero_rows():
    model = cait.add_compactors(cait.create_model(cait.TEST_MODEL, pretrained=False)[0])
    Q = model.blocks[0].mlp.fc1.q
    with torch.no_grad():
        Q[0] = 0                                               # a zero row: ε avoids 0/0
    apply_gradient_rule(model, None, lasso=1e-5)              # no backward yet: grads start as None
    assert torch.isfinite(Q.grad).all() and Q.grad[0].abs().sum() == 0
    torch.testing.assert_close(Q.grad[1], 1e-5 * Q[1].detach() / Q[1].detach().norm())


def test_masked_row_norms_fall_under_adamw(tiny):
    model = cait.add_compactors(tiny())
    mask = _mask_half(model)
    params = [Q for _, Q in cait.iter_compactors(model)]
    opt = torch.optim.AdamW(params, lr=0.02, betas=(0.99, 0.999), weight_decay=0.0)
    norms = []
    for step in range(60):
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        apply_gradient_rule(model, mask, lasso=1e-5)
        opt.step()
        norms.append(max_masked_row_norm(model, mask))
    assert norms[-1] < 0.5 * norms[0] and norms[-1] < norms[30]


def test_proximal_rule_leaves_masked_rows_to_the_shrink_step(tiny):
    model, mask, task = _backward_through_perturbed_compactors(tiny)
    apply_gradient_rule(model, mask, lasso=1e-3, proximal=True)
    for Q, in_s in compactor_rows(model, mask):
        lasso = 1e-3 * Q.detach() / Q.detach().norm(dim=-1, keepdim=True)
        assert Q.grad[in_s].abs().sum() == 0                  # masked: nothing for AdamW to act on
        torch.testing.assert_close(Q.grad[~in_s], (task[id(Q)] + lasso)[~in_s], rtol=0, atol=1e-9)


def test_shrink_takes_a_fixed_norm_off_masked_rows_and_stops_at_zero(tiny):
    model = cait.add_compactors(tiny())
    with torch.no_grad():
        for _, Q in cait.iter_compactors(model):
            Q.mul_(1.5).add_(0.05 * torch.randn_like(Q))
    mask = _mask_half(model)
    before = {id(Q): Q.detach().clone() for Q, _ in compactor_rows(model, mask)}
    shrink_masked_rows_(model, mask, 0.4)
    for Q, in_s in compactor_rows(model, mask):
        old, new = before[id(Q)], Q.detach()
        assert torch.equal(new[~in_s], old[~in_s])             # rows outside S untouched
        old_n, new_n = old[in_s].norm(dim=-1), new[in_s].norm(dim=-1)
        torch.testing.assert_close(new_n, (old_n - 0.4).clamp_min(0))
        cos = (old[in_s] * new[in_s]).sum(-1) / (old_n * new_n)
        torch.testing.assert_close(cos, torch.ones_like(cos))  # direction kept
    for _ in range(10):
        shrink_masked_rows_(model, mask, 0.4)
    assert max_masked_row_norm(model, mask) == 0.0            # exactly zero, no oscillation around it
    with pytest.raises(ValueError, match="shrink"):
        shrink_masked_rows_(model, mask, -0.1)


def test_adamw_leaves_masked_rows_still_under_the_proximal_rule(tiny):
    """A row entering S carries task momentum; once its moments are reset, AdamW must not move it at all (the
    shrink step alone takes it to zero), while unmasked rows keep training."""
    model = cait.add_compactors(tiny())
    params = [Q for _, Q in cait.iter_compactors(model)]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.99, 0.999), weight_decay=0.0)
    for _ in range(5):                                        # build up moments before S exists
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        apply_gradient_rule(model, None, proximal=True)
        opt.step()
    mask = _mask_half(model)
    assert reset_optimizer_rows_(model, opt, None, mask) == sum(int(m.sum()) for _, m in compactor_rows(model, mask))
    before = {id(Q): Q.detach().clone() for Q, _ in compactor_rows(model, mask)}
    opt.zero_grad()
    model(torch.randn(4, 3, 32, 32)).square().mean().backward()
    apply_gradient_rule(model, mask, proximal=True)
    opt.step()
    for Q, in_s in compactor_rows(model, mask):
        assert torch.equal(Q.detach()[in_s], before[id(Q)][in_s])
        assert not torch.equal(Q.detach()[~in_s], before[id(Q)][~in_s])


def test_schedule_warmup_ramp_hold():
    s = FlopsSchedule(steps=100, start_flops=1000, final_flops=500, warmup=0.1, ramp=0.4, interval=10)
    assert s.target(0) is None and s.target(9) is None
    targets = [s.target(t) for t in range(10, 100)]
    assert targets == sorted(targets, reverse=True) and targets[-1] == 500 and s.target(s.hold_step) == 500
    assert [t for t in range(100) if s.rebuild_at(t)] == [10, 20, 30, 40, 49]
    with pytest.raises(ValueError):
        FlopsSchedule(100, 1000, 500, warmup=0.7, ramp=0.5)
