"""Throughput measurement and the ``python -m cait.bench`` command line."""
import json
import subprocess
import sys

import pytest

import cait
from cait.cli.bench import main
from cait.measure.speed import resolve_device


def test_measure_throughput_reports_images_per_second(tiny):
    r = cait.measure_throughput(tiny(), batch_size=4, device="cpu", warmup=1, iters=2)
    assert r["batch_size"] == 4 and r["device"] == "cpu"
    assert r["images_per_s"] == pytest.approx(4 / r["latency_s"])          # images/s is the batch over its latency


def test_bench_cli_prints_one_json_object(capsys):
    code = main(["--model", cait.TEST_MODEL, "--flops-reduction", "0.5", "--merge", "h2,v4", "--batch-size", "4",
                 "--device", "cpu", "--iters", "1", "--rounds", "1", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["merge"] == "h2,v4" and out["device"] == "cpu" and out["batch_size"] == 4
    for k in ("original", "compressed"):
        assert {"flops", "params", "images_per_s"} <= set(out[k])
    assert out["compressed"]["flops"] <= 0.5 * out["original"]["flops"]
    assert out["flops_ratio"] == pytest.approx(out["original"]["flops"] / out["compressed"]["flops"])
    assert out["speedup"] == pytest.approx(out["compressed"]["images_per_s"] / out["original"]["images_per_s"])


def test_bench_in_another_precision_keeps_the_fp32_original_as_reference():
    from cait.cli.bench import run
    out = run(cait.TEST_MODEL, 0.5, batch_size=2, device="cpu", warmup=1, iters=1, rounds=1, precision="int8")
    assert out["precision"] == "int8" and out["original_fp32"]["batch_size"] == 2
    assert out["speedup_vs_fp32"] == pytest.approx(out["compressed"]["images_per_s"]
                                                   / out["original_fp32"]["images_per_s"])
    assert out["compressed"]["flops"] <= 0.5 * out["original"]["flops"]      # FLOPs of the models, not the runners
    r = subprocess.run([sys.executable, "-m", "cait.bench", "--model", cait.TEST_MODEL, "--precision", "fp8"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'fp8'" in r.stderr


def test_bench_cli_bad_input_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "cait.bench", "--model", cait.TEST_MODEL, "--flops-reduction", "0.3",
                        "--merge", "h0,v1,h2", "--json"], capture_output=True, text=True)
    assert r.returncode == 2 and "alone removes" in r.stderr and r.stdout == ""


def test_cuda_request_without_gpu_is_refused():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="CUDA was asked for"):
        resolve_device("cuda")


def test_import_cait_leaves_the_command_lines_unloaded_and_names_its_api():
    """`import cait` loads neither the benchmark command line nor Gradio (the library needs neither); the public
    names come from the modules the API reference documents them in; an unknown attribute raises."""
    import subprocess
    import sys
    code = ("import cait, sys; assert 'cait.bench' not in sys.modules and 'gradio' not in sys.modules; "
            "assert cait.export_model.__module__ == 'cait.io.export'; "
            "assert cait.compare_throughput.__module__ == 'cait.measure.speed'; "
            "import pytest\n"
            "with pytest.raises(AttributeError): cait.not_a_module")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
