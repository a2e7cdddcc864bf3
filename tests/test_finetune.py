"""The CDCP fine-tuning engine: short runs end to end, resume, torchrun, bad input, distillation."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cait
from cait.data.datasets import DataError
from cait.finetune.config import FinetuneConfig, FinetuneError
from cait.finetune.engine import finetune
from cait.finetune.records import EvalRecord, FinalRecord, StartRecord, StoppedRecord, TrainRecord, of_type
from cait.finetune.rundir import read_log
from cait.compress.select import ChannelMask
from cait.data.synthetic import export_imagefolder

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, **kw):
    base = dict(model=cait.TEST_MODEL, data="synthetic", flops_reduction=0.5, steps=40, batch_size=8,
                output=str(tmp_path / "run"), eval_interval=20, log_interval=10, ckpt_interval=20, val_size=64,
                synthetic_size=400, mask_interval=5, lr=1e-3, device="cpu")
    base.update(kw)
    return FinetuneConfig(**base)


def test_short_run_reaches_target_and_compact_equals_masked(tmp_path):
    summary = finetune(_cfg(tmp_path))
    carried = (tmp_path / "run" / "compact" / "config.json").read_text()      # shared on the Hub, downloaded ...
    assert str(tmp_path) not in carried and '"output"' not in carried          # ... so no server path in it
    assert summary.flops_reduction >= 0.5
    assert summary.max_removed_row_norm == 0.0                     # the shrink step took S to exactly 0
    assert summary.top1_student == summary.top1_masked            # pruning changed nothing
    out = tmp_path / "run"
    compact = cait.load_pretrained(out / "compact")
    assert cait.count_flops(compact) == summary.flops and compact.cait_meta.kind == "finetuned"
    records = read_log(out)
    train = of_type(records, TrainRecord)
    assert [x.step for x in train] == [10, 20, 30, 40]
    assert all(0 < x.lr and x.images_per_s > 1e-3 and x.s_size >= 0 for x in train)
    evals = of_type(records, EvalRecord)
    assert evals and 0 <= evals[0].top1_student <= 100 and isinstance(records[-1], FinalRecord)
    # The teacher here is a random init (and has 10 classes, the data 8): no top-1 of it is reported, no distillation.
    start = of_type(records, StartRecord)[0]
    assert evals[0].top1_teacher is None and summary.top1_teacher is None and start.distill_alpha == 0.0
    # Every S of the run was head-consistent: the compact model exists, and its widths match the final mask.
    ChannelMask.from_dict(summary.mask).check_consistency()


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = finetune(_cfg(tmp_path / "a"))
    stopped = finetune(_cfg(tmp_path / "b", stop_at=20))
    assert isinstance(stopped, StoppedRecord) and stopped.step == 20
    resumed = finetune(_cfg(tmp_path / "b", resume=True))
    assert resumed.mask == full.mask
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
    assert summary.flops_reduction >= 0.5 and summary.top1_student == summary.top1_masked


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
    assert summary.flops_reduction == 0.0 and summary.s_size == 0
    model = cait.load_pretrained(tmp_path / "run" / "compact")
    from timm.layers import Attention
    assert type(model.blocks[0].attn) is Attention and not cait.get_layout(model)
    assert "uncompressed" in model.cait_meta.note and "CDCP" not in model.cait_meta.note    # says what it is
    # ... so it can teach a CAIT run.
    student = finetune(_cfg(tmp_path / "next", model=str(tmp_path / "run" / "compact"), steps=20, eval_interval=100))
    assert student.flops_reduction >= 0.5


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
    assert "resized to 48 px" in of_type(read_log(tmp_path / "run"), StartRecord)[0].teacher
    big = cait.load_pretrained(tmp_path / "run" / "compact")
    assert big.patch_embed.img_size == (48, 48) and big.pos_embed.shape[1] == 1 + 12 * 12
    assert big(torch.randn(2, 3, 48, 48)).shape == (2, 8) and summary.flops > cait.count_flops(small)


def test_distillation_weight_follows_the_teachers_architecture(tmp_path):
    """docs/method.md: fine-tuning recipe: α = 0.1 for DeiT-Tiny and 0.25 otherwise, read from the teacher, not from a
    substring of --model."""
    import timm
    teacher = timm.create_model(cait.TEST_MODEL, num_classes=8)                       # not DeiT-Tiny ...
    path = cait.save_pretrained(teacher, tmp_path / "tiny-named-teacher")            # ... whatever its path says
    finetune(_cfg(tmp_path / "d", model=str(path), steps=2, flops_reduction=0.0, eval_interval=100))
    assert of_type(read_log(tmp_path / "d" / "run"), StartRecord)[0].distill_alpha == 0.25


def test_a_time_limit_stops_cleanly_with_its_state_and_the_run_resumes(tmp_path):
    stopped = finetune(_cfg(tmp_path, time_limit_s=0.0))
    assert isinstance(stopped, StoppedRecord) and stopped.reason == "time_limit" and stopped.step == 1
    last = read_log(tmp_path / "run")[-1]
    assert isinstance(last, StoppedRecord) and last.reason == "time_limit"
    assert (tmp_path / "run" / "train_state-0000001.json").is_file() and not (tmp_path / "run" / "compact").exists()
    final = finetune(_cfg(tmp_path, resume=True, eval_interval=100))   # no limit this time: it finishes
    assert final.flops_reduction >= 0.5


def test_soft_distillation_is_the_tempered_kl():
    from cait.finetune.engine import soft_distillation
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    assert float(soft_distillation(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    p_t = torch.softmax(t / 2, -1)
    manual = (p_t * (p_t.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert float(soft_distillation(s, t, 2.0)) == pytest.approx(float(manual), rel=1e-5)


def test_label_free_runs_never_read_the_training_labels(tmp_path, monkeypatch):
    """--labels none: the student learns from the teacher alone. With the training labels scrambled the run is the
    same to the last bit; a random teacher, which could teach nothing, is refused."""
    import cait.finetune.build as build
    teacher = cait.save_pretrained(cait.create_model(cait.TEST_MODEL, pretrained=False, num_classes=8)[0],
                                   tmp_path / "teacher")
    losses = {}
    real = build.build_datasets
    runs = (("true", False, "none"), ("scrambled", True, "none"), ("labelled", False, "data"),
            ("labelled-scrambled", True, "data"))
    for name, scramble, labels in runs:
        def datasets(*args, scramble=scramble, **kwargs):
            train, val, classes = real(*args, **kwargs)

            class Wrong(torch.utils.data.Dataset):
                def __len__(self):
                    return len(train)

                def __getitem__(self, i):
                    return train[i][0], (train[i][1] + 3) % 8
            return (Wrong() if scramble else train), val, classes
        monkeypatch.setattr(build, "build_datasets", datasets)
        summary = finetune(_cfg(tmp_path / name, model=str(teacher), labels=labels, temperature=2.0, steps=10,
                                eval_interval=100, log_interval=2))
        losses[name] = [r.loss for r in of_type(read_log(tmp_path / name / "run"), TrainRecord)]
        assert summary.flops_reduction >= 0.5
    assert losses["true"] == losses["scrambled"] and len(losses["true"]) == 5
    assert losses["labelled"] != losses["labelled-scrambled"]               # where labels are read, they matter
    with pytest.raises(FinetuneError, match="--labels none learns from the teacher alone"):
        finetune(_cfg(tmp_path / "random", labels="none", steps=2))
    with pytest.raises(FinetuneError, match="--labels must be 'data' or 'none'"):
        finetune(_cfg(tmp_path / "bad", labels="some", steps=2))


def test_calibrate_starts_the_student_from_the_calibrated_twin_s_merges(tmp_path):
    """--calibrate N refits the student's merge fusions to the teacher's tokens before training (cait.compress.refit);
    without it the fusions start as average pooling. (Whether that lowers the starting loss depends on the teacher:
    on this random one it does not, so only the mechanism is asserted here.)"""
    import cait.finetune.build as build
    torch.manual_seed(0)
    teacher = cait.create_model(cait.TEST_MODEL, pretrained=False, num_classes=8)[0]
    path = cait.save_pretrained(teacher, tmp_path / "teacher")
    fusions = {}
    for n in (0, 16):
        run = build.build_run(_cfg(tmp_path / f"c{n}", model=str(path), labels="none", calibrate=n, steps=1,
                                   flops_reduction=0.6, merge="h1,v3"), 0, 1, torch.device("cpu"))
        fusions[n] = [m.weight.detach().clone() for name, m in run.nets.student.named_modules()
                      if name.endswith(".fuse")]
    assert fusions[0] and len(fusions[0]) == len(fusions[16])
    assert all(not torch.equal(a, b) for a, b in zip(fusions[0], fusions[16]))


def test_calibrate_start_merges_keeps_every_channel_for_cdcp_to_prune(tmp_path):
    """--calibrate-start merges: the layout refit alone (cait.compress.calibrate_merges: the teacher's widths, merges
    no longer average pooling), so CDCP's compactors train and the run still ends at the FLOPs target; a start that
    is neither 'twin' nor 'merges' is refused before anything is written."""
    import cait.finetune.build as build
    from cait.compress.plan import atme_reduction, layout_spec
    from cait.compress.prune import is_pruned
    torch.manual_seed(0)
    teacher = cait.create_model(cait.TEST_MODEL, pretrained=False, num_classes=8)[0]
    path = cait.save_pretrained(teacher, tmp_path / "teacher")
    kw = dict(model=str(path), labels="none", calibrate=16, flops_reduction=0.6, merge="h1,v3")
    run = build.build_run(_cfg(tmp_path / "m", calibrate_start="merges", steps=1, **kw), 0, 1, torch.device("cpu"))
    assert run.nets.cdcp and not is_pruned(run.nets.student)
    assert cait.describe(run.nets.student).flops() == layout_spec(teacher, "h1,v3").flops()
    plain = cait.apply_atme(copy.deepcopy(teacher), "h1,v3")
    fuse = [m.weight for n, m in run.nets.student.named_modules() if n.endswith(".fuse")]
    assert fuse and all(not torch.equal(a, m.weight) for a, (n, m) in
                        zip(fuse, [(n, m) for n, m in plain.named_modules() if n.endswith(".fuse")]))
    summary = finetune(_cfg(tmp_path / "r", calibrate_start="merges", steps=20, **kw))
    assert summary.flops_reduction >= 0.6 and summary.max_removed_row_norm == 0.0
    kept = cait.load_pretrained(tmp_path / "r" / "run" / "calibrated")
    assert kept.cait_meta.kind == "calibrated" and kept.cait_meta.calibration.images == 16
    assert kept.cait_meta.achieved_reduction == pytest.approx(atme_reduction(teacher, "h1,v3"), abs=1e-6)
    with pytest.raises(FinetuneError, match="--calibrate-start must be 'twin' or 'merges'"):
        finetune(_cfg(tmp_path / "bad", calibrate_start="channels", steps=2, **kw))
    assert not (tmp_path / "bad").exists()


def test_a_resume_reads_its_calibrated_start_back_and_refuses_a_corrupt_one(tmp_path, monkeypatch):
    """--calibrate keeps its twin in OUTPUT/calibrated; a resume trains those weights (not a fresh calibration), and a
    damaged copy stops the resume by name, leaving the training state as it was."""
    from safetensors.torch import load_file
    torch.manual_seed(0)
    teacher = cait.create_model(cait.TEST_MODEL, pretrained=False, num_classes=8)[0]
    path = cait.save_pretrained(teacher, tmp_path / "teacher")
    kw = dict(model=str(path), labels="none", calibrate=8, steps=4, ckpt_interval=2, eval_interval=4,
              flops_reduction=0.5)
    full = finetune(_cfg(tmp_path / "a", **kw))
    assert finetune(_cfg(tmp_path / "b", stop_at=2, **kw)).reason == "stop_at"
    kept = tmp_path / "b" / "run" / "calibrated"
    weights = next(kept.glob("*.safetensors"))
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    states = {p.name: p.read_bytes() for p in (tmp_path / "b" / "run").glob("train_state-*")}
    with pytest.raises(FinetuneError, match="calibrated start cannot be read"):
        finetune(_cfg(tmp_path / "b", resume=True, **kw))
    assert {p.name: p.read_bytes() for p in (tmp_path / "b" / "run").glob("train_state-*")} == states
    weights.write_bytes(intact)
    import cait.finetune.build as build
    monkeypatch.setattr(build, "compress", lambda *a, **k: pytest.fail("a resume calibrated again"))
    resumed = finetune(_cfg(tmp_path / "b", resume=True, **kw))
    assert resumed.agreement == full.agreement and resumed.kl == pytest.approx(full.kl, rel=1e-5)
    a, b = (load_file(next((tmp_path / d / "run" / "compact").glob("*.safetensors"))) for d in "ab")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_teacher_tokens_pool_onto_the_students_merged_grid():
    """The token-distillation target: the CLS as is, each merged token the mean of the patches it stands for."""
    from cait.finetune.token_distill import pool_teacher_tokens, token_distill_loss
    teacher = cait.create_model(cait.TEST_MODEL, pretrained=False, num_classes=8)[0]
    H, W = cait.models.atme.patch_grid(teacher)
    feats = torch.randn(2, 1 + H * W, teacher.embed_dim)
    assert torch.equal(pool_teacher_tokens(feats, teacher, teacher), feats)   # no merges: the target is the teacher
    student = cait.apply_atme(copy.deepcopy(teacher), "h1,v2")          # H then V: 2×2 patches per token
    target = pool_teacher_tokens(feats, teacher, student)
    assert target.shape == (2, 1 + (H // 2) * (W // 2), teacher.embed_dim)
    assert torch.equal(target[:, 0], feats[:, 0])
    grid = feats[:, 1:].reshape(2, H, W, -1)
    torch.testing.assert_close(target[:, 1], grid[:, :2, :2].mean(dim=(1, 2)))
    assert float(token_distill_loss(target, target)) == 0.0
    s = torch.randn_like(target)
    assert float(token_distill_loss(3 * s, 3 * target)) == pytest.approx(float(token_distill_loss(s, target)))
    with pytest.raises(ValueError, match="patch grid"):
        pool_teacher_tokens(feats[:, :-1], teacher, student)


def test_every_block_tokens_are_pooled_onto_each_blocks_grid():
    """--token-distill-blocks all: one token set per block (timm's forward, hooks removed after), each compared with
    the teacher's pooled onto that block's grid; blocks before the first merge match the teacher exactly, and one
    entry is the final-features loss alone."""
    from cait.finetune.token_distill import forward_tokens, pool_teacher_tokens, token_distill_loss, tokens_loss
    teacher = cait.create_model(cait.TEST_MODEL, pretrained=False, num_classes=8)[0].eval()
    L = len(teacher.blocks)
    student = cait.apply_atme(copy.deepcopy(teacher), f"h1,v{L - 1}").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t, s = forward_tokens(teacher, x, every_block=True), forward_tokens(student, x, every_block=True)
        assert len(t) == len(s) == L and all(not b._forward_hooks for b in student.blocks)
        torch.testing.assert_close(s[-1], student.forward_features(x))
        H, W = cait.models.atme.patch_grid(teacher)
        assert [u.shape[1] for u in s] == [1 + H * W] + [1 + H * W // 2] * (L - 2) + [1 + H * W // 4]
        torch.testing.assert_close(s[0], t[0])                             # block 0 is before every merge
        assert float(tokens_loss(t, t, teacher, teacher)) == 0.0
        per_block = [float(token_distill_loss(s[i], pool_teacher_tokens(t[i], teacher, student, i if i < L - 1
                                                                        else None))) for i in range(L)]
        assert per_block[0] < 1e-10 and min(per_block[1:]) > 1e-6          # merged blocks differ from the teacher
        assert float(tokens_loss(s, t, teacher, student)) == pytest.approx(sum(per_block) / L, rel=1e-5)
        assert float(tokens_loss(s[-1:], t[-1:], teacher, student)) == pytest.approx(per_block[-1], rel=1e-6)
        with pytest.raises(ValueError, match="token sets"):
            tokens_loss(s, t[-1:], teacher, student)


def test_token_distillation_and_cpu_bf16_change_the_label_free_loss(tmp_path):
    """--token-distill adds the token term to the first step's loss (same seed, same batch), and
    --token-distill-blocks all its every-block form; --cpu-bf16 runs the step under bfloat16 autocast on the CPU:
    close to float32, not equal. All refused where they cannot apply."""
    teacher = cait.save_pretrained(cait.create_model(cait.TEST_MODEL, pretrained=False, num_classes=8)[0],
                                   tmp_path / "teacher")
    first = {}
    runs = (("logits", {}), ("tokens", {"token_distill": 1.0}), ("bf16", {"token_distill": 1.0, "cpu_bf16": True}),
            ("blocks", {"token_distill": 1.0, "token_distill_blocks": "all"}))
    for name, kw in runs:
        finetune(_cfg(tmp_path / name, model=str(teacher), labels="none", steps=2, eval_interval=100,
                      log_interval=1, **kw))
        first[name] = of_type(read_log(tmp_path / name / "run"), TrainRecord)[0].loss
    assert first["tokens"] > first["logits"] + 1e-3
    assert first["bf16"] != first["tokens"] and first["bf16"] == pytest.approx(first["tokens"], rel=0.1)
    assert abs(first["blocks"] - first["tokens"]) > 1e-4                # every block's term, not the last one alone
    with pytest.raises(FinetuneError, match="--token-distill"):
        finetune(_cfg(tmp_path / "labelled", model=str(teacher), token_distill=1.0, steps=2))
    with pytest.raises(FinetuneError, match="--token-distill-blocks"):
        finetune(_cfg(tmp_path / "bad", model=str(teacher), labels="none", token_distill=1.0,
                      token_distill_blocks="every", steps=2))
    assert not (tmp_path / "bad").exists()


def test_report_to_mirrors_the_log_into_trackio_and_tensorboard(tmp_path):
    """--report-to: the tracker holds the same numbers as log.jsonl, at the same steps; an unknown tracker is
    refused before anything is written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trackio.sqlite_storage import SQLiteStorage

    from cait.finetune.report import TRACKIO_PROJECT
    teacher = cait.save_pretrained(cait.create_model(cait.TEST_MODEL, pretrained=False, num_classes=8)[0],
                                   tmp_path / "teacher")
    for tracker in ("trackio", "tensorboard"):
        out = tmp_path / f"report-{tracker}"
        finetune(_cfg(out, model=str(teacher), steps=4, log_interval=2, eval_interval=2, report_to=tracker))
        log = read_log(out / "run")
        losses = {r.step: r.loss for r in of_type(log, TrainRecord)}
        top1 = of_type(log, FinalRecord)[0].top1_student
        assert sorted(losses) == [2, 4]
        if tracker == "trackio":
            rows = SQLiteStorage.get_logs(TRACKIO_PROJECT, "run")
            got = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
            assert any(r.get("final/top1_student") == pytest.approx(top1) for r in rows)
            assert SQLiteStorage.get_run_config(TRACKIO_PROJECT, "run")["steps"] == 4
        else:
            acc = EventAccumulator(str(out / "run" / "tensorboard"))
            acc.Reload()
            got = {e.step: e.value for e in acc.Scalars("train/loss")}
            assert acc.Scalars("final/top1_student")[0].value == pytest.approx(top1)
        assert got == pytest.approx(losses)
    with pytest.raises(FinetuneError, match="--report-to must be one of"):
        finetune(_cfg(tmp_path / "bad", model=str(teacher), steps=2, report_to="wandb"))
    assert not (tmp_path / "bad" / "run").exists()
