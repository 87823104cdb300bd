"""Project 07's mixed precision (its loss scaler against torch.amp.GradScaler: test_training_line.py): 16-bit
inference against fp32, --precision through train.py (checkpoint size, exact resume of the scale), and the
benchmark's report."""

import json

import pytest
import torch
from conftest import assert_one_line_error, load_project, read_report, run_main, tiny_trainer

P = load_project("project07_mixed_precision")
train_tiny = tiny_trainer("project07_mixed_precision")


@pytest.mark.parametrize("dtype, ppl_tolerance", [(torch.float16, 0.005), (torch.bfloat16, 0.01)])
def test_16_bit_weights_stay_close_to_fp32(tiny_runs, dtype, ppl_tolerance):
    """A trained tiny model with its weights cast to 16 bits: logits within a tolerance of fp32's, and the
    perplexity of held-out text within 0.5% (fp16) or 1% (bf16)."""
    model, _ = P.checkpoint.load_checkpoint(tiny_runs.checkpoint("project07_mixed_precision"))
    _, make_val, _ = P.data.make_loaders(
        str(tiny_runs.data("project07_mixed_precision")), 4, 32, P.distributed.Dist()
    )
    x, y = make_val().next_batch()
    with torch.no_grad():
        logits32, loss32 = model(x, y)
        logits16, loss16 = model.to(dtype)(x, y)
    # bf16 keeps 8 significant bits (2**-8 relative), fp16 11; the logits here are of order 1-10
    assert (logits16.float() - logits32).abs().max() < (0.02 if dtype == torch.float16 else 0.15)
    assert abs(torch.exp(loss16.float()) / torch.exp(loss32) - 1) < ppl_tolerance


def test_fp16_run_resumes_exactly_with_its_loss_scale(tiny_runs, tmp_path, monkeypatch):
    """A scale that overflows at first and grows every 2 clean steps, so that the scale at the split (step 4)
    is neither the initial one nor the one a fresh scaler would start from."""
    scaler = lambda p, device, reference=False: P.precision.LossScaler(2.0**24, growth_interval=2)  # noqa: E731
    monkeypatch.setattr(P.train, "make_scaler", scaler)
    data = tiny_runs.data("project07_mixed_precision")
    flags = ["--data", data, "--precision", "fp16", "--eval-interval", "4", "--eval-iters", "1"]
    assert train_tiny(*flags, "--max-iters", "8", "--out", tmp_path / "straight") == 0
    assert train_tiny(*flags, "--max-iters", "4", "--out", tmp_path / "split") == 0
    assert train_tiny(*flags, "--max-iters", "8", "--out", tmp_path / "split", "--resume") == 0
    straight, split = ((tmp_path / d / "metrics.jsonl").read_text() for d in ("straight", "split"))
    assert straight == split
    steps = [json.loads(line) for line in straight.splitlines() if "loss_scale" in line]
    scales = [m["loss_scale"] for m in steps]
    assert scales[0] == 2.0**24 and scales[4] != scales[0] and len(set(scales)) > 2
    assert any(m["skipped"] and m["grad_norm"] is None for m in steps)  # inf/nan kept out of the JSON


def test_bf16_pure_keeps_bf16_weights_in_half_the_file(tiny_runs, tmp_path):
    data = tiny_runs.data("project07_mixed_precision")
    for precision in ("fp32", "bf16-pure"):
        flags = ["--data", data, "--precision", precision, "--max-iters", "2", "--eval-interval", "2"]
        assert train_tiny(*flags, "--eval-iters", "1", "--out", tmp_path / precision) == 0
    sizes = {p: (tmp_path / p / "model.safetensors").stat().st_size for p in ("fp32", "bf16-pure")}
    assert sizes["bf16-pure"] < 0.51 * sizes["fp32"]
    rc = run_main(
        P.generate, "--checkpoint", tmp_path / "bf16-pure", "--max-new-tokens", "3", "--device", "cpu"
    )
    assert rc == 0


def test_resume_cannot_change_the_precision(tiny_runs, tmp_path, capsys):
    data = tiny_runs.data("project07_mixed_precision")
    flags = ["--data", data, "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1"]
    assert train_tiny(*flags, "--out", tmp_path / "run") == 0
    rc = train_tiny(*flags, "--max-iters", "4", "--precision", "fp16", "--out", tmp_path / "run", "--resume")
    assert "--precision" in assert_one_line_error(capsys, rc)


def test_a_device_that_cannot_compute_in_a_dtype_is_refused():
    with pytest.raises(P.cli.UserError, match="cannot compute in float16"):
        P.precision.check_dtype(torch.float16, torch.device("meta"))  # tensors without data


def test_generate_in_16_bits_prints_a_sample(tiny_runs, capsys):
    ckpt = tiny_runs.checkpoint("project07_mixed_precision")
    capsys.readouterr()  # what training printed, if this test trained the shared checkpoint
    for dtype in ("float16", "bfloat16"):
        flags = ["--checkpoint", ckpt, "--prompt", "ROMEO:", "--max-new-tokens", "4", "--device", "cpu"]
        assert run_main(P.generate, *flags, "--dtype", dtype, "--temperature", "0") == 0
        assert capsys.readouterr().out.startswith("ROMEO:")


def test_benchmark_reports_every_precision_side_by_side(tiny_runs, tmp_path):
    data = tiny_runs.data("project07_mixed_precision")
    ckpt = tiny_runs.checkpoint("project07_mixed_precision")
    flags = ["--preset", "tiny", "--data", data, "--checkpoint", ckpt, "--steps", "3", "--gen-tokens", "4"]
    assert run_main(P.benchmark, *flags, "--device", "cpu", "--out", tmp_path) == 0
    rows = read_report(tmp_path, "project07_mixed_precision")
    for variant in P.benchmark.TRAIN_VARIANTS:
        assert rows[("train_tok_per_s", variant)]["value"] > 0
        assert rows[("skipped_steps", variant)]["value"] == 0
    assert rows[("val_loss", "fp16")]["value"] == pytest.approx(rows[("val_loss", "fp32")]["value"], rel=0.01)
    assert rows[("weight_memory_mib", "bfloat16")]["ratio"] == pytest.approx(0.5, rel=0.01)
    assert next(tmp_path.glob("loss_curves-*-tiny.png")).read_bytes()[:4] == b"\x89PNG"
