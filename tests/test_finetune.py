"""CDCP fine-tuning: the gradient rule, the schedule, short runs end to end, resume, torchrun, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cait
from cait.cdcp import (FlopsSchedule, apply_gradient_rule, compactor_rows, max_masked_row_norm,
                       reset_optimizer_rows_, shrink_masked_rows_)
from cait.data import DataError, StepBatchSampler
from cait.finetune import FinetuneConfig, FinetuneError, finetune
from cait.select import ChannelMask
from cait.synthetic import CLASSES, SyntheticShapes, export_imagefolder

ROOT = Path(__file__).resolve().parents[1]


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


def test_step_batches_are_disjoint_across_ranks_and_reproducible():
    a = StepBatchSampler(10, 2, steps=6, rank=0, world=2, seed=1)
    b = StepBatchSampler(10, 2, steps=6, rank=1, world=2, seed=1)
    first_epoch = sum((a.batch(s) + b.batch(s) for s in range(2)), []) + a.batch(2)[:0]
    assert len(set(first_epoch)) == len(first_epoch) == 8
    assert list(StepBatchSampler(10, 2, steps=6, start=3, rank=0, world=2, seed=1)) == [a.batch(s) for s in (3, 4, 5)]


def test_synthetic_set_is_deterministic_with_masks(tmp_path):
    ds = SyntheticShapes(length=20, img_size=32, seed=3, split="val")
    img, label, mask = ds.sample(5)
    img2, label2, mask2 = SyntheticShapes(length=20, img_size=32, seed=3, split="val").sample(5)
    assert img.size == (32, 32) and label == label2 and (mask == mask2).all() and img.tobytes() == img2.tobytes()
    assert 0 < mask.mean() < 0.5
    assert ds.sample(5)[0].tobytes() != SyntheticShapes(20, 32, 3, "train").sample(5)[0].tobytes()
    big = SyntheticShapes(length=20, img_size=96, seed=3, split="val").sample(5)
    assert big[1] == label                                   # same scene at any resolution
    labels = {SyntheticShapes(200, 16, 0).sample(i)[1] for i in range(200)}
    assert labels == set(range(len(CLASSES)))
    root = export_imagefolder(tmp_path / "shapes", n_train=16, n_val=8, img_size=32)
    assert sum(1 for _ in (root / "train").rglob("*.png")) == 16 and (root / "masks" / "val").is_dir()


def _cfg(tmp_path, **kw):
    base = dict(model=cait.TEST_MODEL, data="synthetic", flops_reduction=0.5, steps=40, batch_size=8,
                output=str(tmp_path / "run"), eval_interval=20, log_interval=10, ckpt_interval=20, val_size=64,
                synthetic_size=400, mask_interval=5, lr=1e-3, device="cpu")
    base.update(kw)
    return FinetuneConfig(**base)


def test_short_run_reaches_target_and_compact_equals_masked(tmp_path):
    summary = finetune(_cfg(tmp_path))
    assert summary["flops_reduction"] >= 0.5
    assert summary["max_removed_row_norm"] == 0.0                     # the shrink step took S to exactly 0
    assert summary["top1_student"] == summary["top1_masked"]            # pruning changed nothing
    out = tmp_path / "run"
    compact = cait.load_pretrained(out / "compact")
    assert cait.count_flops(compact) == summary["flops"] and compact.cait_meta.kind == "finetuned"
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["type"] == "train"]
    assert [x["step"] for x in train] == [10, 20, 30, 40]
    assert {"step", "epoch", "loss", "lr", "flops_target", "s_size", "max_masked_norm", "images_per_s"} <= set(train[0])
    evals = [x for x in lines if x["type"] == "eval"]
    assert evals and {"top1_student", "top1_teacher"} <= set(evals[0]) and lines[-1]["type"] == "final"
    # The teacher here is a random init (and has 10 classes, the data 8): no top-1 of it is reported, no distillation.
    assert evals[0]["top1_teacher"] is None and summary["top1_teacher"] is None and lines[0]["distill_alpha"] == 0.0
    # Every S of the run was head-consistent: the compact model exists, and its widths match the final mask.
    ChannelMask.from_dict(summary["mask"]).check_consistency()


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = finetune(_cfg(tmp_path / "a"))
    stopped = finetune(_cfg(tmp_path / "b", stop_at=20))
    assert stopped["type"] == "stopped"
    resumed = finetune(_cfg(tmp_path / "b", resume=True))
    assert resumed["mask"] == full["mask"]
    a = cait.load_pretrained(tmp_path / "a" / "run" / "compact")
    b = cait.load_pretrained(tmp_path / "b" / "run" / "compact")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-4)


def test_resume_refuses_a_different_configuration_and_keeps_states(tmp_path):
    finetune(_cfg(tmp_path, stop_at=20))
    states = sorted((tmp_path / "run").glob("train_state-*"))
    with pytest.raises(FinetuneError, match=r"different configuration; changed: flops_reduction \(0.5 → 0.6\)"):
        finetune(_cfg(tmp_path, resume=True, flops_reduction=0.6))
    with pytest.raises(FinetuneError, match="holds an earlier run"):
        finetune(_cfg(tmp_path))
    assert sorted((tmp_path / "run").glob("train_state-*")) == states


def test_bad_input_stops_with_a_clear_message(tmp_path):
    with pytest.raises(DataError, match="no such data directory"):
        finetune(_cfg(tmp_path, data=str(tmp_path / "missing")))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(DataError, match="no usable images"):
        finetune(_cfg(tmp_path, data=str(tmp_path / "empty")))
    with pytest.raises(FinetuneError, match="out of reach"):
        finetune(_cfg(tmp_path, flops_reduction=0.97, merge=""))
    with pytest.raises(FinetuneError, match="must split into an even batch"):
        finetune(_cfg(tmp_path, batch_size=7))
    with pytest.raises(FinetuneError, match="--mask-shrink must be >= 0"):
        finetune(_cfg(tmp_path, mask_shrink=-0.01))
    ckpt = cait.save_pretrained(cait.create_model(cait.TEST_MODEL, pretrained=False, num_classes=5)[0],
                                tmp_path / "five")
    with pytest.raises(FinetuneError, match="5 classes, the data 'synthetic' has 8"):
        finetune(_cfg(tmp_path, model=str(ckpt)))


def test_nan_loss_stops_and_keeps_earlier_states(tmp_path, monkeypatch):
    finetune(_cfg(tmp_path, stop_at=20))
    import timm.loss
    monkeypatch.setattr(timm.loss.SoftTargetCrossEntropy, "forward", lambda self, x, t: x.sum() * float("nan"))
    with pytest.raises(FinetuneError, match="loss became nan at step 20"):
        finetune(_cfg(tmp_path, resume=True))
    assert (tmp_path / "run" / "train_state-0000020.json").is_file()
    assert not (tmp_path / "run" / "compact").exists()


def test_imagefolder_and_checkpoint_teacher(tmp_path):
    root = export_imagefolder(tmp_path / "shapes", n_train=32, n_val=16, img_size=32)
    teacher = cait.save_pretrained(cait.create_model(cait.TEST_MODEL, pretrained=False, num_classes=8)[0],
                                   tmp_path / "teacher")
    summary = finetune(_cfg(tmp_path, model=str(teacher), data=str(root), steps=20, eval_interval=100))
    assert summary["flops_reduction"] >= 0.5 and summary["top1_student"] == summary["top1_masked"]


def test_help_documents_every_flag():
    r = subprocess.run([sys.executable, "-m", "cait.finetune", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0
    for flag in ("--model", "--data", "--flops-reduction", "--merge", "--steps", "--batch-size", "--img-size",
                 "--device", "--output", "--resume", "--pretrained"):
        assert flag in r.stdout
    assert "(default: 0.5)" in r.stdout.replace("\n", " ").replace("  ", " ") or "default: 0.5" in r.stdout


def test_torchrun_two_processes_gloo_hold_the_same_mask(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "cait.finetune", "--model", cait.TEST_MODEL, "--steps", "20", "--batch-size", "8",
           "--output", str(out), "--device", "cpu", "--val-size", "32", "--synthetic-size", "200",
           "--mask-interval", "4", "--eval-interval", "100", "--log-interval", "10", "--ckpt-interval", "100"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    m0 = json.loads((out / "final_mask_rank0.json").read_text())
    m1 = json.loads((out / "final_mask_rank1.json").read_text())
    assert m0 == m1 and any(any(row) for block in m0["qk"] + m0["v"] for row in block)
    compact = cait.load_pretrained(out / "compact")
    assert 1 - cait.count_flops(compact) / compact.cait_meta.finetune.base_flops >= 0.5


def test_zero_reduction_trains_a_plain_deit_without_compactors(tmp_path):
    summary = finetune(_cfg(tmp_path, flops_reduction=0.0, steps=10, eval_interval=100))
    assert summary["flops_reduction"] == 0.0 and summary["s_size"] == 0
    model = cait.load_pretrained(tmp_path / "run" / "compact")
    from timm.layers import Attention
    assert type(model.blocks[0].attn) is Attention and not cait.get_layout(model)
    # ... so it can teach a CAIT run.
    student = finetune(_cfg(tmp_path / "next", model=str(tmp_path / "run" / "compact"), steps=20, eval_interval=100))
    assert student["flops_reduction"] >= 0.5


def test_checkpoint_trained_at_one_size_continues_at_another(tmp_path):
    """Progressive resizing: a 32 px checkpoint fine-tunes at 48 px; its position embedding is resampled, and the
    result is a 48 px checkpoint. A size the patch does not divide is refused before anything is written."""
    small = cait.create_model(cait.TEST_MODEL, pretrained=False, num_classes=8)[0]
    ckpt = cait.save_pretrained(small, tmp_path / "at32")
    with pytest.raises(FinetuneError, match="not a multiple of the patch size 4"):
        finetune(_cfg(tmp_path / "bad", model=str(ckpt), img_size=50, flops_reduction=0.0))
    assert not (tmp_path / "bad" / "run" / "compact").exists()
    summary = finetune(_cfg(tmp_path, model=str(ckpt), img_size=48, flops_reduction=0.0, steps=10,
                            eval_interval=100, distill_alpha=0.0))
    assert "resized to 48 px" in json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])["teacher"]
    big = cait.load_pretrained(tmp_path / "run" / "compact")
    assert big.patch_embed.img_size == (48, 48) and big.pos_embed.shape[1] == 1 + 12 * 12
    assert big(torch.randn(2, 3, 48, 48)).shape == (2, 8) and summary["flops"] > cait.count_flops(small)


def test_distillation_weight_follows_the_teachers_architecture(tmp_path):
    """SPEC §3: α = 0.1 for DeiT-Tiny and 0.25 otherwise, read from the teacher, not from a substring of --model."""
    import timm
    teacher = timm.create_model(cait.TEST_MODEL, num_classes=8)                       # not DeiT-Tiny ...
    path = cait.save_pretrained(teacher, tmp_path / "tiny-named-teacher")            # ... whatever its path says
    finetune(_cfg(tmp_path / "d", model=str(path), steps=2, flops_reduction=0.0, eval_interval=100))
    start = json.loads((tmp_path / "d" / "run" / "log.jsonl").read_text().splitlines()[0])
    assert start["distill_alpha"] == 0.25
