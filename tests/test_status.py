"""The status lines: what each kind of twin is said to be, with its own numbers, and what a model's classes are."""
import dataclasses

import torch

import cait
from cait.data.synthetic import CLASSES
from cait.models.deit import WeightsInfo
from cait.models.meta import FinetuneSummary, meta_of
from cait.studio.catalogue import ModelRef
from cait.studio.pairs import ModelPair
from cait.studio.status import ABOVE_TEACHER, classes_note, pair_status, startup_note


def _pair(original, twin, ref=ModelRef("deit", cait.TEST_MODEL), trained=False):
    weights = WeightsInfo("timm-imagenet" if trained else "random", "the weights' story")
    return ModelPair(ref, 0.5, cait.get_layout(twin), original, twin, weights, torch.device("cpu"))


def test_a_preview_twin_says_it_is_untrained_with_its_own_flops(tiny):
    original = tiny()
    twin = cait.compress(original, 0.5)
    status = pair_status(_pair(original, twin))
    fo, fc = cait.count_flops(original) / 1e9, cait.count_flops(twin) / 1e9
    assert f"{fo:.3f} → {fc:.3f} GFLOPs ({100 * (1 - fc / fo):.1f}% fewer)" in status
    assert "Weights: not trained" in status and "Untrained preview" in status
    assert f"ATME layout `{twin.cait_meta.merge}`" in status


def _finetuned(tiny, student: float, teacher: float | None):
    original = tiny(num_classes=8)
    twin = cait.compress(original, 0.5)
    twin.cait_meta = dataclasses.replace(meta_of(twin), kind="finetuned", finetune=FinetuneSummary(
        step=10, merge="h2,v4", base_flops=100, flops=50, flops_reduction=0.5, top1_student=student,
        top1_teacher=teacher))
    return pair_status(_pair(original, twin, trained=True))


def test_a_finetuned_twin_reports_its_run_and_says_why_when_above_its_teacher(tiny):
    close = _finetuned(tiny, 80.4, 80.0)
    assert "held-out top-1 80.4% (teacher 80.0%)" in close and ABOVE_TEACHER not in close
    assert "0.0000 → 0.0000 GFLOPs (50.0% fewer)" in close and "controls do not apply" in close
    assert ABOVE_TEACHER in _finetuned(tiny, 83.0, 80.0)                 # more than a point above: said why
    assert "(its teacher was not trained)" in _finetuned(tiny, 30.0, None)


def test_classes_are_named_for_what_they_are(tiny):
    shapes = tiny(num_classes=8)
    shapes.cait_meta = dataclasses.replace(meta_of(shapes), classes=list(CLASSES))
    assert "the 8 synthetic shapes" in classes_note(shapes) and "predictions mean nothing" in classes_note(shapes)
    assert classes_note(tiny(num_classes=1000)) == "**Classes:** ImageNet-1k (1000)."
    assert classes_note(tiny(num_classes=5)) == "**Classes:** 5, unnamed."


def test_the_first_screen_says_which_weights_and_why():
    assert startup_note("cpu", None, None) == "Device: `cpu`."
    assert "DeiTs will be randomly initialised" in startup_note("cpu", "no network", None)
