"""A run directory: training states written atomically (newest two kept) and restored exactly, the log read back as
records, and clear errors for what is not there."""
import json

import pytest
import torch

import cait
from cait.compress.select import ChannelMask
from cait.finetune.records import StartRecord, TrainRecord, to_json
from cait.finetune.rundir import (LOG_NAME, RunDirError, compactor_snapshot, read_log, read_state, restore_state,
                                  save_state, state_files)


def _trained(tiny):
    model = cait.add_compactors(cait.apply_atme(tiny(), "h2,v4"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    return model, opt


def test_a_state_restores_model_optimizer_and_mask_exactly(tmp_path, tiny):
    model, opt = _trained(tiny)
    mask = ChannelMask.keep_all(cait.describe(model))
    mask.ffn[0][:5] = True
    for step in (10, 20, 30):
        save_state(tmp_path, step, model, opt, mask, {"history": {"10": 1.0}})
    assert [s for s, _, _ in state_files(tmp_path)] == [20, 30]                      # the newest two kept
    meta, tensors = read_state(tmp_path)
    assert meta["step"] == 30 and meta["history"] == {"10": 1.0}
    assert ChannelMask.from_dict(meta["mask"]).size() == 5
    fresh, fresh_opt = _trained(lambda: tiny(seed=1))
    restore_state(fresh, fresh_opt, meta, tensors)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    params = [p for g in opt.param_groups for p in g["params"]]
    fresh_params = [p for g in fresh_opt.param_groups for p in g["params"]]
    for a, b in zip(params, fresh_params):                          # the Adam moments, parameter by parameter
        assert torch.equal(opt.state[a]["exp_avg"], fresh_opt.state[b]["exp_avg"])
        assert torch.equal(opt.state[a]["exp_avg_sq"], fresh_opt.state[b]["exp_avg_sq"])


def test_missing_or_unreadable_states_are_clear_errors(tmp_path, tiny):
    with pytest.raises(RunDirError, match="no training state to resume from"):
        read_state(tmp_path)
    model, opt = _trained(tiny)
    save_state(tmp_path, 5, model, opt, None, {})
    (tmp_path / "train_state-0000005.json").write_text("{not json")
    with pytest.raises(RunDirError, match="training state of step 5 is unreadable"):
        read_state(tmp_path)
    with pytest.raises(RunDirError, match="no training state yet"):
        compactor_snapshot(tmp_path / "empty")


def test_the_log_reads_back_as_records_in_order(tmp_path):
    start = StartRecord(config={}, teacher="t", distill_alpha=0.1, merge="", base_flops=2, atme_flops=2, target_flops=1,
                        classes=8, world_size=1, device="cpu")
    train = TrainRecord(step=1, epoch=0.1, loss=1.0, lr=0.1, flops_target=1, s_size=2, s_entered=2,
                        max_masked_norm=0.5, images_per_s=3.0)
    lines = [to_json(start), "garbage", to_json(train), json.dumps({"t": 1})]
    (tmp_path / LOG_NAME).write_text("\n".join(lines) + "\n")
    assert read_log(tmp_path) == [start, train]
