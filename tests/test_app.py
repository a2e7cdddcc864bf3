"""The app starts and answers API calls (gradio_client), offline, on the CPU."""
import json
import socket

import pytest
import torch
from PIL import Image

import app
from cait.data.photos import SAMPLE_PHOTOS
from cait.measure.speed import Spread
from cait.studio.attention import attention_view
from cait.studio.engine import Studio
from cait.studio.samples import load_sample

PHOTO = next(iter(SAMPLE_PHOTOS))
TINY = "deit:deit_tiny_patch16_224"                                   # the Model dropdown's key


@pytest.fixture(scope="module")
def client():
    from gradio_client import Client
    demo = app.build_app(Studio(device="cpu", pretrained=True))          # offline: falls back visibly
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


def test_build_reports_device_and_untrained_weights(client):
    status, block, reduction, layout = client.predict(TINY, 0.5, "", api_name="/build")
    assert block["maximum"] == 11 and block["value"] == 11                     # blocks from 0, as layouts
    assert reduction["interactive"] is True and layout["interactive"] is True
    assert "`cpu`" in status and "not trained" in status and "Untrained preview" in status


def test_attention_map_for_a_bundled_photo(client):
    view, orig, comp, orig_heads, comp_heads, top5, _, local = client.predict(TINY, 0.5, "", PHOTO, None, 11,
                                                                              api_name="/attention")
    assert "needs a sample with a known object mask" in local and "ImageNet-1k (1000)" in local
    assert Image.open(view).size == (224, 224)
    for path in (orig, comp):
        img = Image.open(path)
        assert img.height == 224 and img.width > 224                          # the map and its colour scale
    assert len(orig_heads) == 3 and len(comp_heads) == 3
    assert len(top5["confidences"]) == 5


def test_bad_upload_and_bad_layout_give_clear_errors(client, tmp_path):
    from gradio_client import handle_file
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    with pytest.raises(Exception, match="notes.png: not an image"):
        client.predict(TINY, 0.5, "", PHOTO, handle_file(str(bad)), 11, api_name="/attention")
    with pytest.raises(Exception, match="ATME layout: merge layout names block 40, but the model has 12 blocks"):
        client.predict(TINY, 0.5, "h40", PHOTO, None, 11, api_name="/attention")
    with pytest.raises(Exception, match="Total FLOPs reduction: 1.5 is outside 0.05 to 0.8"):
        client.predict(TINY, 1.5, "", PHOTO, None, 11, api_name="/attention")
    # A failed build reports in the status line instead of leaving error badges on the page.
    status = client.predict(TINY, 1.5, "", api_name="/build")[0]
    assert status.startswith("**Could not build the twin:** Total FLOPs reduction: 1.5")


def test_channels_and_cost(client):
    fig = json.loads(client.predict(TINY, 0.5, "", api_name="/channels")["plot"])
    bars = {t["name"]: t["y"] for t in fig["data"] if t["type"] == "bar"}
    assert set(bars) == {"q/k kept (%)", "v kept (%)", "FFN kept (%)"}
    assert all(len(y) == 12 and all(0 < v <= 100 for v in y) for y in bars.values())
    assert min(min(y) for y in bars.values()) < 100                                  # something was pruned
    table, blocks, speed = client.predict(TINY, 0.5, "", True, 2, api_name="/cost")
    rows = {r[0]: dict(zip(table["headers"], r)) for r in table["data"]}
    assert rows["original"]["GFLOPs"] == 1.254 and rows["CAIT twin"]["FLOPs reduction (%)"] >= 50.0
    assert rows["CAIT twin"]["ideal speed-up"] >= 2.0
    # The ToMe baseline at the twin's FLOPs, measured in the same run, also in the FLOPs-per-block chart.
    tome = rows["ToMe (baseline)"]
    assert abs(tome["FLOPs reduction (%)"] - rows["CAIT twin"]["FLOPs reduction (%)"]) <= 0.5
    bars = {t["name"]: sum(t["y"]) for t in json.loads(blocks["plot"])["data"]}
    assert bars["ToMe (baseline)"] == pytest.approx(tome["GFLOPs"], abs=0.002)
    # Every timed figure is a median with its range over the rounds; a speed-up is taken round by round, so the
    # ratio of the median images/s lies within its range (each round's ratio bounds it from both sides).
    assert rows["original"]["speed-up"] == "1.00 (1.00–1.00)" and rows["original"]["rounds"] >= 2
    for name in ("CAIT twin", "ToMe (baseline)"):
        ips, ref = Spread.parse(rows[name]["images/s"]), Spread.parse(rows["original"]["images/s"])
        up = Spread.parse(rows[name]["speed-up"])
        assert ips.low <= ips.median <= ips.high and up.low <= up.median <= up.high
        assert up.low - 0.01 <= ips.median / ref.median <= up.high + 0.01
        lat = Spread.parse(rows[name]["latency, batch 1 (ms)"])
        lat_ref = Spread.parse(rows["original"]["latency, batch 1 (ms)"])
        lat_up = Spread.parse(rows[name]["latency speed-up"])
        assert lat_up.low - 0.01 <= lat_ref.median / lat.median <= lat_up.high + 0.01      # batch 1, same run
    plotted = json.loads(speed["plot"])["data"][0]
    assert plotted["x"] == list(rows) and len(plotted["error_y"]["array"]) == 3
    # In another precision the fp32 original is timed first, in the same run, and every speed-up is against it.
    table, _, _ = client.predict(TINY, 0.5, "", True, 2, "int8", api_name="/cost")
    fp32_rows, rows = rows, {r[0]: dict(zip(table["headers"], r)) for r in table["data"]}
    assert list(rows) == ["original (fp32)", "original (int8)", "CAIT twin (int8)", "ToMe (baseline) (int8)"]
    assert [r["precision"] for r in rows.values()] == ["fp32", "int8", "int8", "int8"]
    assert rows["CAIT twin (int8)"]["GFLOPs"] == fp32_rows["CAIT twin"]["GFLOPs"]      # FLOPs do not change
    twin, ref = rows["CAIT twin (int8)"], Spread.parse(rows["original (fp32)"]["images/s"])
    up = Spread.parse(twin["speed-up"])
    assert up.low - 0.01 <= Spread.parse(twin["images/s"]).median / ref.median <= up.high + 0.01
    with pytest.raises(Exception, match="Precision: 'fp8' is not one of fp32, bf16, bf16-autocast, int8|not in"):
        client.predict(TINY, 0.5, "", True, 2, "fp8", api_name="/cost")


def test_a_trained_hub_deit_gets_a_calibrated_twin(monkeypatch, tiny):
    """With trained weights (faked here: the tiny DeiT labelled as timm's), the twin is calibrated, and says so."""
    import cait.studio.pairs as studio_mod
    from cait.models.deit import WeightsInfo
    monkeypatch.setattr(studio_mod, "create_model",
                        lambda name, pretrained: (tiny(), WeightsInfo("timm-imagenet", "timm ImageNet weights (fake)")))
    studio = Studio(device="cpu", bundled=None, calibration_size=8)
    pair = studio.pair("deit:deit_tiny_patch16_224", 0.4, "")
    assert pair.compressed.cait_meta.calibration.images == 8
    assert "Calibrated, training-free" in studio.status(pair) and "8 unlabelled images" in studio.status(pair)
    assert pair.compressed.cait_meta.merge                          # the planned layout merges ...
    assert "Merges without training cost accuracy" in studio.status(pair)   # ... and the status says what it costs
    # Its agreement with the original, measured on 64 other unlabelled images, and the way to recover without labels.
    from cait.data.calibration import calibration_images
    from cait.measure.accuracy import agreement
    c = pair.compressed.cait_meta.calibration
    again = agreement(pair.compressed, pair.original,
                      [(x, 0) for x in calibration_images("default", 64, pair.original, seed=1)], torch.device("cpu"))
    assert c.agreement_images == 64 and c.agreement == pytest.approx(again.agreement, abs=0.01)
    assert f"predicts the original's class for {c.agreement:.1f}% of them" in studio.status(pair)
    assert "To recover accuracy without labels" in studio.status(pair)
    cdcp_only = studio.pair("deit:deit_tiny_patch16_224", 0.4, "none")
    assert not cdcp_only.compressed.cait_meta.merge
    assert "Merges without training" not in studio.status(cdcp_only)
    preview = Studio(device="cpu", bundled=None, calibration_size=0).pair("deit:deit_tiny_patch16_224", 0.4, "")
    assert preview.compressed.cait_meta.preview is True


def test_out_of_range_block_is_a_clear_error(client):
    with pytest.raises(Exception, match="greater than maximum value 11"):           # the slider's own check
        client.predict(TINY, 0.5, "", PHOTO, None, 12, api_name="/attention")
    studio = Studio(device="cpu", pretrained=False)
    pair = studio.pair("deit:deit_tiny_patch16_224", 0.5, "")
    with pytest.raises(ValueError, match=r"block 12 is out of range: the model has 12 blocks \(0..11\)"):
        attention_view(pair, load_sample(PHOTO, None, 224, studio.limits.image_pixels_cap()), 12)


def test_synthetic_sample_reports_attention_localisation(client):
    from cait.studio.samples import SYNTHETIC_SAMPLES
    out = client.predict(TINY, 0.5, "", next(iter(SYNTHETIC_SAMPLES)), None, 11, api_name="/attention")
    assert Image.open(out[0]).size == (224, 224)
    assert "Attention inside the object:" in out[-1] and "the object covers" in out[-1]
    assert "**True label:**" in out[-1]


def test_the_twin_downloads_as_a_loadable_checkpoint(client, tmp_path):
    import zipfile
    import cait
    path = client.predict(TINY, 0.5, "", api_name="/download_twin")["value"]
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["cait-twin/config.json", "cait-twin/model.safetensors"]
        z.extractall(tmp_path)
    twin = cait.load_pretrained(tmp_path / "cait-twin")
    assert 1 - cait.count_flops(twin) / 1_253_683_200 >= 0.5


def test_auto_layout_runs_the_measured_planner_and_says_what_it_chose(monkeypatch, tiny):
    """'auto' in the layout field: the measured planner's calibrated choice, its record in the status line; refused
    in public mode (minutes of compute) and for random weights (agreement would mean nothing), naming the field."""
    import cait.studio.pairs as studio_mod
    from cait.models.deit import WeightsInfo
    from cait.studio.public import Limits
    monkeypatch.setattr(studio_mod, "create_model",
                        lambda name, pretrained: (tiny(), WeightsInfo("timm-imagenet", "timm ImageNet weights (fake)")))
    studio = Studio(device="cpu", bundled=None, calibration_size=8)
    pair = studio.pair("deit:deit_tiny_patch16_224", 0.5, "auto")
    planner = pair.compressed.cait_meta.planner
    assert planner["planner"] == "measured" and planner["layout"] == pair.compressed.cait_meta.merge
    status = studio.status(pair)
    assert "Layout measured, not ruled" in status and f"of {planner['candidates']} layouts" in status
    assert ("CDCP only (no merges)" in status) == (planner["layout"] == "")
    assert "Layout by the paper's rule" in studio.status(studio.pair("deit:deit_tiny_patch16_224", 0.5, ""))
    public = Studio(device="cpu", bundled=None, calibration_size=8, limits=Limits.for_environment(public=True))
    with pytest.raises(ValueError, match="ATME layout: auto .* is off on this public app"):
        public.pair("deit:deit_tiny_patch16_224", 0.5, "auto")
    monkeypatch.setattr(studio_mod, "create_model",
                        lambda name, pretrained: (tiny(), WeightsInfo("random", "random weights")))
    with pytest.raises(ValueError, match="ATME layout: auto .* means nothing for random weights"):
        Studio(device="cpu", bundled=None, calibration_size=8).pair("deit:deit_small_patch16_224", 0.5, "auto")


@pytest.mark.parametrize("name", sorted(__import__("cait.studio.catalogue", fromlist=["CURATED"]).CURATED))
def test_every_curated_vit_pairs_with_its_twin_and_shows_its_attention(name, monkeypatch):
    """The Model list's non-DeiT ViTs (issue "CAIT for the ViTs people compress today", item 5), offline (random
    weights, said so): each builds its twin at 50% fewer FLOPs and shows both attention maps; a feature backbone has
    no top-5 and says why; SigLIP's maps (no class token) are the attention each patch receives."""
    from cait.studio.catalogue import CURATED
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    studio = Studio(device="cpu", bundled=None, calibration_size=0)
    pair = studio.pair(f"timm:{name}", 0.5, "")
    flops = {k: sum(v.values()) for k, v in pair.flops().items()}
    assert flops["compressed"] <= 0.505 * flops["original"] and flops["tome"] <= 0.51 * flops["original"]
    status = studio.status(pair)
    assert CURATED[name] in status and "random initialisation" in status
    view = attention_view(pair, load_sample(PHOTO, None, pair.original.patch_embed.img_size[0], 10 ** 7), -1)
    assert view.original_mean.size == view.compressed_mean.size
    assert len(view.compressed_heads) == pair.original.blocks[0].attn.num_heads
    assert ("has no class token" in view.scale_text()) == (name == "vit_base_patch16_siglip_gap_224")
    if pair.original.num_classes == 0:
        assert view.original_top5 == {} and "a feature backbone without a classifier" in view.classes_note
    else:
        assert len(view.original_top5) == 5 and "ImageNet-1k" in view.classes_note


def test_a_typed_hub_id_pairs_in_local_mode_and_is_refused_in_public_mode(tmp_path, monkeypatch):
    """The Model field takes a typed timm name or hf-hub: id in local mode (here a DINOv2 with registers saved by timm
    into the local Hugging Face cache); a public Space offers its list only, and a typed id is refused by name."""
    import timm
    from timm.models._hub import save_for_hf
    from cait.studio.public import Limits
    from conftest import randomize_
    from test_hub import _cache_repo
    snapshot = _cache_repo(tmp_path, monkeypatch, "someone/dinov2-reg-finetuned")
    save_for_hf(randomize_(timm.create_model("vit_small_patch14_reg4_dinov2", depth=2, embed_dim=48, num_heads=3,
                                             img_size=70, num_classes=7).eval(), std=0.05),
                str(snapshot), safe_serialization=True)
    local = Studio(device="cpu", bundled=None, calibration_size=0, limits=Limits(public=False))
    pair = local.pair("hf-hub:someone/dinov2-reg-finetuned", 0.3, "")
    assert pair.original.num_prefix_tokens == 5 and pair.ref.key == "hf-hub:someone/dinov2-reg-finetuned"
    assert "hf-hub:someone/dinov2-reg-finetuned" in local.status(pair)
    with pytest.raises(ValueError, match="Model: 'swin_imaginary' is not in the list, nor a timm name"):
        local.pair("swin_imaginary", 0.5, "")
    with pytest.raises(ValueError, match="Swin: windowed attention"):
        local.pair("swin_tiny_patch4_window7_224", 0.5, "")
    public = Studio(device="cpu", bundled=None, calibration_size=0, limits=Limits(public=True))
    for typed in ("hf-hub:someone/dinov2-reg-finetuned", str(tmp_path), str(tmp_path / "nowhere")):
        with pytest.raises(ValueError, match="is not one of the listed models .typed names, Hub ids and folders"):
            public.pair(typed, 0.3, "")                # the same answer whether a folder exists or not
