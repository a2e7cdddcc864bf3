"""Token labelling (cait.token_labels): the targets, and the engine's --token-labels runs."""
import pytest
import torch

import cait
from cait.finetune.config import FinetuneConfig, FinetuneError
from cait.finetune.engine import finetune
from cait.finetune.records import EvalRecord, of_type
from cait.finetune.rundir import read_log
from cait.finetune.token_labels import TokenLabelled, token_targets


def test_targets_follow_the_object_share_of_each_patch(tiny):
    model = tiny(num_classes=8)                                     # 32 px, patch 4 → 8×8 tokens
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :4, :4] = True                                         # patch (0, 0) fully
    masks[0, :4, 4:6] = True                                        # patch (0, 1) half
    t = token_targets(masks, torch.tensor([3, 5]), 8, model)
    assert t.shape == (2, 64, 9) and torch.allclose(t.sum(-1), torch.ones(2, 64))
    assert t[0, 0, 3] == 1 and t[0, 1, 3] == 0.5 and t[0, 1, 8] == 0.5 and t[0, 2, 8] == 1
    assert (t[1, :, 8] == 1).all()                                  # no object: all background
    # On a merged model the targets live on the last block's grid, pooled the way the merges pool tokens.
    merged = cait.apply_atme(tiny(num_classes=8), "h2,v4")           # 8×8 → 8×4 → 4×4
    tm = token_targets(masks, torch.tensor([3, 5]), 8, merged)
    assert tm.shape == (2, 16, 9)
    assert tm[0, 0, 3] == pytest.approx((1 + 0.5 + 0 + 0) / 4)     # patches (0,0),(0,1),(1,0),(1,1)


def test_the_training_head_answers_per_token_and_is_not_part_of_the_model(tiny):
    model = tiny(num_classes=8)
    wrapped = TokenLabelled(model, 8)
    logits, tokens = wrapped(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 8) and tokens.shape == (2, 64, 9) and hasattr(model, "token_head")


def test_token_labelled_run_resumes_and_leaves_a_plain_twin(tmp_path):
    base = dict(model=cait.TEST_MODEL, data="synthetic", flops_reduction=0.5, steps=30, batch_size=8, val_size=16,
                synthetic_size=200, mixup=0.0, cutmix=0.0, token_labels=1.0, eval_interval=10, ckpt_interval=10,
                log_interval=5, lr=1e-3, device="cpu")
    full = finetune(FinetuneConfig(**base, output=str(tmp_path / "full")))
    finetune(FinetuneConfig(**base, output=str(tmp_path / "cut"), stop_at=20))
    resumed = finetune(FinetuneConfig(**base, output=str(tmp_path / "cut"), resume=True))
    assert resumed.mask == full.mask and resumed.top1_student == full.top1_student
    twin = cait.load_pretrained(tmp_path / "full" / "compact")
    assert not hasattr(twin, "token_head") and cait.get_layout(twin)
    assert [r.step for r in of_type(read_log(tmp_path / "full"), EvalRecord)] == [10, 20]


def test_token_labels_need_masks_and_no_mixing(tmp_path):
    base = dict(model=cait.TEST_MODEL, steps=5, batch_size=8, token_labels=1.0, device="cpu", output=str(tmp_path))
    with pytest.raises(FinetuneError, match="--mixup 0 --cutmix 0"):
        finetune(FinetuneConfig(**base))
    with pytest.raises(FinetuneError, match="needs object masks"):
        finetune(FinetuneConfig(**base, data=str(tmp_path), mixup=0.0, cutmix=0.0))
    with pytest.raises(FinetuneError, match="must be >= 0"):
        finetune(FinetuneConfig(**dict(base, token_labels=-1.0)))
