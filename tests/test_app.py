"""The app starts and answers API calls (gradio_client), offline, on the CPU."""
import socket

import pytest
from PIL import Image

import app
from cait.photos import SAMPLE_PHOTOS
from cait.studio import Studio

PHOTO = next(iter(SAMPLE_PHOTOS))


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
    status, block = client.predict("DeiT-Tiny", 0.5, "", api_name="/build")
    assert block["maximum"] == 12
    assert "`cpu`" in status and "not trained" in status and "Untrained preview" in status


def test_attention_map_for_a_bundled_photo(client):
    orig, comp, orig_heads, comp_heads, top5, _, local = client.predict("DeiT-Tiny", 0.5, "", PHOTO, None, 12,
                                                                        api_name="/attention")
    assert "needs a sample with a known object mask" in local
    for path in (orig, comp):
        img = Image.open(path)
        assert img.size == (224, 224)
    assert len(orig_heads) == 3 and len(comp_heads) == 3
    assert len(top5["confidences"]) == 5


def test_bad_upload_and_bad_layout_give_clear_errors(client, tmp_path):
    from gradio_client import handle_file
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    with pytest.raises(Exception, match="notes.png: not an image"):
        client.predict("DeiT-Tiny", 0.5, "", PHOTO, handle_file(str(bad)), 12, api_name="/attention")
    with pytest.raises(Exception, match="has 12 blocks"):
        client.predict("DeiT-Tiny", 0.5, "h40", PHOTO, None, 12, api_name="/attention")


def test_channels_and_cost(client):
    fig = client.predict("DeiT-Tiny", 0.5, "", api_name="/channels")
    assert fig is not None
    table, _ = client.predict("DeiT-Tiny", 0.5, "", True, 2, api_name="/cost")
    rows = {r[0]: dict(zip(table["headers"], r)) for r in table["data"]}
    assert rows["original"]["GFLOPs"] == 1.254 and rows["CAIT twin"]["FLOPs reduction (%)"] >= 50.0
    assert rows["CAIT twin"]["images/s"] > 0 and rows["CAIT twin"]["ideal speed-up"] >= 2.0
    # The ToMe baseline at the twin's FLOPs, measured in the same run.
    tome = rows["ToMe (baseline)"]
    assert abs(tome["FLOPs reduction (%)"] - rows["CAIT twin"]["FLOPs reduction (%)"]) <= 0.5 and tome["images/s"] > 0


def test_a_trained_hub_deit_gets_a_calibrated_twin(monkeypatch, tiny):
    """With trained weights (faked here: the tiny DeiT labelled as timm's), the twin is calibrated, and says so."""
    import cait.studio as studio_mod
    from cait.models import WeightsInfo
    monkeypatch.setattr(studio_mod, "create_model",
                        lambda name, pretrained: (tiny(), WeightsInfo("timm-imagenet", "timm ImageNet weights (fake)")))
    studio = Studio(device="cpu", bundled=None, calibration_size=8)
    pair = studio.pair("DeiT-Tiny", 0.4, "")
    assert pair.compressed.cait_meta["calibration"]["images"] == 8
    assert "Calibrated, training-free" in studio.status(pair) and "8 unlabelled images" in studio.status(pair)
    preview = Studio(device="cpu", bundled=None, calibration_size=0).pair("DeiT-Tiny", 0.4, "")
    assert preview.compressed.cait_meta["preview"] is True


def test_out_of_range_block_is_a_clear_error(client):
    with pytest.raises(Exception, match="greater than maximum value 12"):           # the slider's own check
        client.predict("DeiT-Tiny", 0.5, "", PHOTO, None, 13, api_name="/attention")
    studio = Studio(device="cpu", pretrained=False)
    pair = studio.pair("DeiT-Tiny", 0.5, "")
    with pytest.raises(ValueError, match="block 13 is out of range: the model has 12 blocks"):
        studio.attention(pair, studio.image(PHOTO), 12)


def test_synthetic_sample_reports_attention_localisation(client):
    from cait.studio import SYNTHETIC_SAMPLES
    out = client.predict("DeiT-Tiny", 0.5, "", next(iter(SYNTHETIC_SAMPLES)), None, 12, api_name="/attention")
    assert Image.open(out[0]).size == (224, 224)
    assert "Attention inside the object:" in out[-1] and "the object covers" in out[-1]
