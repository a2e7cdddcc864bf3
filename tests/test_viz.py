"""Figures and overlays."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F


def test_overlay_keeps_image_size_and_upscales_small_images():
    from PIL import Image

    from cait.viz.overlay import MIN_DISPLAY_SIDE, overlay
    heat = F.softmax(torch.randn(7, 4).flatten(), 0).reshape(7, 4)
    big = Image.new("RGB", (2 * MIN_DISPLAY_SIDE, MIN_DISPLAY_SIDE + 10), (10, 200, 30))
    out = overlay(big, heat)
    assert out.size == big.size and out.mode == "RGB"
    small = Image.new("RGB", (50, 40), (10, 200, 30))          # upscaled by a whole factor, aspect kept
    out = overlay(small, heat)
    k = out.size[0] // 50
    assert k > 1 and out.size == (50 * k, 40 * k) and min(out.size) >= MIN_DISPLAY_SIDE


def test_colour_bar_widens_the_overlay_and_leaves_the_picture_alone():
    from PIL import Image

    from cait.viz.overlay import overlay
    img = Image.new("RGB", (300, 240), (10, 200, 30))
    heat = torch.rand(6, 5)
    plain, scaled = overlay(img, heat), overlay(img, heat, scale=True)
    assert scaled.size[1] == 240 and scaled.size[0] > 300
    assert scaled.crop((0, 0, 300, 240)).tobytes() == plain.tobytes()


def test_top_k_is_sorted_named_and_a_probability():
    from cait.viz.overlay import top_k
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    out = top_k(logits, ["a", "b", "c", "d"], k=3)
    assert list(out) == ["b", "d", "c"] and list(out.values()) == sorted(out.values(), reverse=True)
    assert sum(top_k(logits, k=10).values()) == pytest.approx(1.0)           # k above the classes: all of them
    assert list(top_k(logits, k=1)) == ["class 1"]


def test_channels_figure_plots_kept_percentages_and_tokens(tiny):
    import cait
    from cait.models.spec import describe
    from cait.viz.charts import channels_figure
    model = tiny()
    twin = cait.compress(model, 0.5, layout="h2")
    fig = channels_figure(describe(model), describe(twin))
    bars = {t.name: list(t.y) for t in fig.data if t.type == "bar"}
    spec = describe(twin)
    assert bars["FFN kept (%)"] == pytest.approx([100 * b.ffn_dim / 192 for b in spec.blocks])
    assert all(0 < y <= 100 for ys in bars.values() for y in ys)
    tokens = next(t for t in fig.data if t.type == "scatter")
    assert list(tokens.y) == [b.tokens for b in spec.blocks] and tokens.y[0] > tokens.y[-1]


def test_cost_table_is_relative_to_the_first_row():
    from cait.viz.charts import cost_table
    from cait.measure.speed import Spread
    timed = {"images_per_s_spread": Spread(180.0, 170.0, 190.0, 3), "latency_ms_spread": Spread(5.0, 4.0, 6.0, 3),
             "speedup": Spread(1.8, 1.7, 1.9, 3), "latency_speedup": Spread(1.5, 1.2, 1.6, 3), "rounds": 3}
    t = cost_table({"original": {"flops": 4e9, "params": 22e6, "top1": 80.0},
                    "CAIT": {"flops": 2e9, "params": 12e6, "top1": 79.5, **timed}}, held_out=200)
    cait_row = t.set_index("model").loc["CAIT"]
    assert cait_row["FLOPs reduction (%)"] == 50.0 and cait_row["ideal speed-up"] == 2.0
    assert cait_row["speed-up"] == "1.80 (1.70–1.90)" and cait_row["images/s"] == "180.0 (170.0–190.0)"
    assert list(t.columns)[:2] == ["model", "held-out top-1 (%, n=200)"]       # the n, and never scrolled away
    assert cait_row["held-out top-1 (%, n=200)"] == 79.5 and cait_row["rounds"] == 3


def test_compactor_figure_marks_exactly_the_masked_channels(tiny):
    import cait
    from cait.compress.select import ChannelMask
    from cait.viz.charts import compactor_figure
    model = cait.add_compactors(tiny())
    scores = cait.compactor_scores(model)
    mask = ChannelMask.empty_like(scores)
    mask.ffn[2][:5] = True
    fig = compactor_figure(scores, mask)
    overlay_ffn = fig.data[-1].z                                             # (blocks, D): 1 in S, NaN elsewhere
    assert np.nansum(overlay_ffn) == 5 and np.nansum(overlay_ffn[2][:5]) == 5


def test_a_shared_colour_scale_shows_a_flatter_map_as_flatter():
    """Min-max stretches any map to full colour, so a near-uniform map looks as focused as a peaked one; on the
    shared scale (the Attention tab's default) the flat one stays in the low colours."""
    import numpy as np
    from PIL import Image
    from cait.viz.overlay import overlay, shared_range
    img = Image.new("RGB", (224, 224), "gray")
    peaked = torch.ones(14, 14)
    peaked[7, 7] = 50.0
    flat = torch.ones(14, 14)
    flat[7, 7] = 1.5
    spread = lambda im: float(np.asarray(im, dtype=np.float32).std())            # noqa: E731  colour variation
    own = overlay(img, flat), overlay(img, peaked)
    assert abs(spread(own[0]) - spread(own[1])) < 0.5 * spread(own[1])             # min-max: both look focused
    vr = shared_range(flat, peaked)
    assert vr[1] == pytest.approx(50 / (195 + 50)) and vr[0] == pytest.approx(1 / (195 + 50))
    shared = overlay(img, flat, vrange=vr), overlay(img, peaked, vrange=vr)
    assert spread(shared[0]) < 0.3 * spread(shared[1])
    # The colour bar states the shared ends: the same labels beside both maps.
    a, b = overlay(img, flat, scale=True, vrange=vr), overlay(img, peaked, scale=True, vrange=vr)
    assert np.array_equal(np.asarray(a)[:, 230:], np.asarray(b)[:, 230:])
