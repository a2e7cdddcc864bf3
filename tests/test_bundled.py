"""The trained offline pair: finding and loading it, the app's offline default, the localisation score, and the
shipped checkpoints themselves (size, provenance, the numbers they claim)."""
import dataclasses
import json

import pytest
import torch

import cait
from cait.measure.attention import localisation_score
from cait.models.meta import FinetuneSummary, meta_of
from cait.data.datasets import build_datasets
from cait.io.bundled import ORIGINAL_DIR, PROVENANCE_NAME, TWIN_DIR, bundled_pair
from cait.measure.accuracy import evaluate
from cait.studio.attention import attention_view
from cait.studio.catalogue import BUNDLED, BUNDLED_LABEL, ModelRef
from cait.studio.cost import cost_view
from cait.studio.engine import Studio
from cait.studio.samples import SYNTHETIC_SAMPLES, load_sample


def test_uniform_attention_scores_the_object_area(tiny):
    """A block whose q and k are zero attends uniformly: its score is the mean object area, exactly."""
    model = tiny(num_classes=8)
    with torch.no_grad():
        model.blocks[-1].attn.qkv.weight[:2 * 48].zero_()
        model.blocks[-1].attn.qkv.bias[:2 * 48].zero_()
    s = localisation_score(model, images=20, batch_size=8)
    assert s["images"] == 20 and s["block"] == 6
    assert s["attention_in_object"] == pytest.approx(s["object_area"], abs=2e-4)
    assert s["ratio"] == pytest.approx(1, abs=0.01)
    assert 0.02 < s["object_area"] < 0.2


def _fake_pair(root, tiny):
    """A bundled-pair layout made of tiny models (what the app needs, not what the real assets hold)."""
    original = tiny(num_classes=8)
    twin = cait.compress(original, 0.5)
    for name, model, loc in ((ORIGINAL_DIR, original, 0.3), (TWIN_DIR, twin, 0.28)):
        model.cait_meta = dataclasses.replace(meta_of(model), classes=list(cait.data.synthetic.CLASSES))
        if name == TWIN_DIR:
            model.cait_meta.kind = "finetuned"
            model.cait_meta.finetune = FinetuneSummary(step=1, merge=model.cait_meta.merge,
                                                       base_flops=cait.count_flops(original),
                                                       flops=cait.count_flops(twin), flops_reduction=0.5,
                                                       top1_student=61.0, top1_teacher=64.0)
        d = cait.save_pretrained(model, root / name, dtype=torch.float16)
        (d / PROVENANCE_NAME).write_text(json.dumps({"top1": 63.0 if name == ORIGINAL_DIR else 66.0, "localisation": {
            "attention_in_object": loc, "object_area": 0.08, "images": 1000}}))
    return bundled_pair(root)


def test_offline_the_app_defaults_to_the_bundled_pair(tmp_path, tiny, monkeypatch):
    assert bundled_pair(tmp_path) is None                               # a checkout without assets
    pair = _fake_pair(tmp_path, tiny)
    studio = Studio(device="cpu", pretrained=True, bundled=pair)
    assert studio.catalogue.choices()[0] == (BUNDLED_LABEL, "bundled")
    assert studio.catalogue.default() == BUNDLED                         # conftest: HF_HUB_OFFLINE=1
    assert studio.default_sample() in SYNTHETIC_SAMPLES and "Offline" in studio.startup_note()
    p = studio.pair("bundled", 0.5, "")
    assert p.ref == BUNDLED and not cait.get_layout(p.original) and cait.get_layout(p.compressed)
    assert not p.settings_apply                                          # fixed by its training
    status = studio.status(p)
    assert "bundled weights trained by this project" in status and "HF_HUB_OFFLINE" in status
    assert "original 30.0%, CAIT twin 28.0%" in status and "8.0%" in status
    assert "held-out top-1 66.0% (teacher 63.0%)" in status                # as shipped (provenance)
    assert "above its teacher" in status and "under-trained" in status       # 3 points above: said why
    view = attention_view(p, load_sample(next(iter(SYNTHETIC_SAMPLES)), None, 32, 10 ** 6))
    assert view.localisation is not None and set(view.original_top5) <= set(cait.data.synthetic.CLASSES)
    # Cost: the held-out split exists for these classes, so all three models get the top-1 they score on it.
    table, _, speed = cost_view(p, studio.limits, measure=False, held_out=16)
    assert list(table["model"]) == ["original", "CAIT twin", "ToMe (baseline)"]
    _, val, _ = build_datasets("synthetic", 32, val_size=16)
    expected = [round(evaluate(m, val, p.device), 1) for m in (p.original, p.compressed, p.tome())]
    assert list(table["held-out top-1 (%, n=16)"]) == expected and speed is None
    # Hub reachable: timm's ImageNet weights stay the default; the bundled pair stays selectable.
    monkeypatch.setattr(type(studio.catalogue), "hub_reason", lambda self: None)
    assert studio.catalogue.default() == ModelRef.deit("deit_tiny_patch16_224")
    assert "bundled" in {key for _, key in studio.catalogue.choices()}
    # Without assets, offline: DeiT-Tiny (random, flagged), and the note says why.
    monkeypatch.undo()
    bare = Studio(device="cpu", bundled=None)
    assert bare.catalogue.default() == ModelRef.deit("deit_tiny_patch16_224")
    assert "not in this checkout" in bare.startup_note()
    with pytest.raises(ValueError, match="not in this checkout"):
        bare.pair("bundled", 0.5, "")


def test_a_damaged_bundled_checkpoint_is_reported_not_crashed(tmp_path, tiny):
    pair = _fake_pair(tmp_path, tiny)
    (tmp_path / TWIN_DIR / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot be loaded.*corrupt or truncated"):
        Studio(device="cpu", bundled=pair).pair("bundled", 0.5, "")


# ---------------------------------------------------------------------------------------------------------------
# The shipped checkpoints
# ---------------------------------------------------------------------------------------------------------------
shipped = pytest.mark.skipif(bundled_pair() is None, reason="assets/ holds no trained pair")


@shipped
def test_shipped_pair_fits_and_says_how_it_was_made():
    pair = bundled_pair()
    total = sum((d / "model.safetensors").stat().st_size for d in (pair.original_dir, pair.twin_dir))
    assert total <= 20_000_000                                                          # the budget
    for prov in (pair.original_provenance, pair.twin_provenance):
        assert {"command", "seed", "data", "stages", "environment", "top1", "flops", "params", "localisation",
                "training_cost_s", "date"} <= set(prov)
    original, twin = pair.load()
    assert original.patch_embed.img_size == (224, 224) and twin.patch_embed.img_size == (224, 224)
    assert cait.count_flops(original) == pair.original_provenance["flops"] == cait.analytic_flops(original)
    assert 1 - cait.count_flops(twin) / cait.count_flops(original) == pytest.approx(0.5, abs=0.01)   # paper Tab. III
    # Widths as the recipe asks (multiples of 8), and some channels pruned in some block.
    blocks = cait.describe(twin).blocks
    assert all(w % 8 == 0 for b in blocks for w in (b.qk_dim, b.v_dim, b.ffn_dim))
    assert any(b.ffn_dim < 768 or b.qk_dim < 64 or b.v_dim < 64 for b in blocks)
    # Fine-tuned from the original with the engine (the issue asks for it), not made one-shot: the run's summary
    # travels in the checkpoint, and its teacher is the original's last stage.
    final = twin.cait_meta.finetune
    assert final.flops == cait.count_flops(twin) and final.max_removed_row_norm == 0.0
    stages = pair.twin_provenance["stages"]
    assert stages[-1]["config"]["model"] == "@" + stages[-2]["stage"]
    assert stages[-1]["images_seen"] == stages[-1]["config"]["steps"] * stages[-1]["config"]["batch_size"]
    assert [s["stage"] for s in pair.original_provenance["stages"]] == [s["stage"] for s in stages[:-1]]
    # An original that has learned (issue 12 asks >= 85% on the 1000 held-out images, as exported).
    assert pair.original_provenance["top1"] >= 85.0


@shipped
def test_shipped_twin_within_one_point_of_its_original():
    """Issue 12's bound: the twin's held-out top-1 (as exported) within 1 point of the original's, at 50% fewer FLOPs
    (shipped: 91.2% against 90.9%; a 1,400-step twin stage was 4.4 points below)."""
    pair = bundled_pair()
    assert pair.twin_provenance["top1"] >= pair.original_provenance["top1"] - 1.0


@shipped
def test_shipped_pair_classifies_and_looks_at_the_object():
    """On the first 200 held-out images: both beat chance (12.5%) by far (shipped: 90.9% and 91.2% on 1000), and
    the CLS attention mass inside the object is several times the object's area (what uniform attention would
    score; shipped: 10.4× and 7.1×)."""
    from cait.data.datasets import build_datasets
    from cait.measure.accuracy import evaluate
    pair = bundled_pair()
    _, val, _ = build_datasets("synthetic", 224, 0, val_size=200)
    for model, prov in zip(pair.load(), (pair.original_provenance, pair.twin_provenance)):
        top1 = evaluate(model, val, torch.device("cpu"))
        assert top1 > 75.0 and abs(top1 - prov["top1"]) < 10                # chance: 12.5%
        loc = localisation_score(model, images=100)
        assert loc["ratio"] > 4.0


@pytest.fixture(scope="module")
def script():
    """``assets/train_offline_weights.py`` imported as a module."""
    import importlib.util
    from cait.io.bundled import ROOT_SCRIPT
    spec = importlib.util.spec_from_file_location("train_offline_weights", ROOT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduction_script_end_to_end(tmp_path, capsys, script):
    """The script's three stages on the tiny DeiT: resized between stages, exported fp16 with provenance, loadable
    as the bundled pair; a second call skips the finished stages."""
    args = ["--recipe", "smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "assets"), "--device", "cpu"]
    summary = script.main(args)
    pair = bundled_pair(tmp_path / "assets")
    assert pair is not None and set(summary) == {ORIGINAL_DIR, TWIN_DIR}
    original, twin = pair.load()
    assert original.patch_embed.img_size == (32, 32)                   # stage 1 at 16 px, stage 2 resized to 32
    assert 1 - cait.count_flops(twin) / cait.count_flops(original) >= 0.49
    prov = pair.twin_provenance
    assert [s["stage"] for s in prov["stages"]] == ["stage1", "stage2", "twin"]
    assert prov["stages"][0]["config"]["img_size"] == 16 and prov["seed"] == 0
    assert prov["flops"] == cait.count_flops(twin) and prov["localisation"]["images"] == 32
    assert prov["training_cost_s"] == pytest.approx(sum(s["wall_s"] for s in prov["stages"]), abs=0.1)
    assert prov["fp16_bytes"] == (pair.twin_dir / "model.safetensors").stat().st_size
    script.main(args)
    assert capsys.readouterr().out.count("finished earlier, skipped") == 3


def test_training_time_survives_interruptions(script):
    """A stage's time is summed from its log, so a session that ended mid-stage (nothing written at the kill) keeps
    the time before it; steps a resumed run logs again count once, at their last measurement."""
    from cait.finetune.records import EvalRecord, StartRecord, TrainRecord
    start = StartRecord(config={"batch_size": 4}, teacher="t", distill_alpha=0.1, merge="", base_flops=2,
                        atme_flops=2, target_flops=1, classes=8, world_size=1, device="cpu")

    def train(step: int, images_per_s: float) -> TrainRecord:
        return TrainRecord(step=step, epoch=0.0, loss=1.0, lr=1e-4, flops_target=None, s_size=0, s_entered=0,
                           max_masked_norm=0.0, images_per_s=images_per_s)
    log = [start, train(50, 10.0), train(100, 20.0),                   # killed after this; resumed from step 50
           start, train(100, 40.0), EvalRecord(step=100, top1_student=50.0, top1_teacher=None), train(150, 10.0)]
    assert script.training_seconds(log) == pytest.approx(50 * 4 / 10 + 50 * 4 / 40 + 50 * 4 / 10)
