"""Project 07's mixed precision: our loss scaler against torch.amp.GradScaler (the same scales, skipped steps
and weights), an overflowed gradient never reaching the weights, fp16's underflow that scaling cures, 16-bit
inference against fp32, --precision through train.py (checkpoint size, exact resume of the scale), and the
benchmark's report."""

import json

import pytest
import torch
from conftest import assert_one_line_error, load_project, read_report, run_main, tiny_trainer

P = load_project("project07_mixed_precision")
CPU = torch.device("cpu")
TINY = P.model.GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32)
FP16 = P.precision.PRECISIONS["fp16"]
train_tiny = tiny_trainer("project07_mixed_precision")


class Batches:
    """The same fixed random batches for every run, in order."""

    def __init__(self, n: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.batches = torch.randint(TINY.vocab_size, (n, 4, TINY.block_size + 1), generator=g)
        self.i = 0

    def next_batch(self):
        b, self.i = self.batches[self.i % len(self.batches)], self.i + 1
        return b[:, :-1], b[:, 1:]


def run_fp16(scaler, steps: int) -> tuple[list[float], list[bool], dict]:
    """`steps` fp16 training steps with `scaler`: (the scale of each step, which were skipped, weights)."""
    torch.manual_seed(0)
    model = P.model.GPT(TINY)
    tc = P.train.TrainConfig(batch_size=4)
    opt = P.train.make_optimizer(model, tc, CPU)
    loader, scales, skipped = Batches(), [], []
    for _ in range(steps):
        scales.append(scaler.get_scale())
        _, _, skip = P.train.train_step(
            model, opt, scaler, loader, 2, 1e-3, tc, CPU, FP16, P.distributed.Dist()
        )
        skipped.append(skip)
    return scales, skipped, model.state_dict()


def test_our_scaler_equals_torch_gradscaler_through_overflow_and_growth():
    """2**24 overflows fp16 (the logits' gradient is about scale / tokens), so the first steps are skipped and
    the scale halves until gradients fit; growth_interval 3 then doubles it into overflow again."""
    settings = dict(init_scale=2.0**24, growth_interval=3)
    ours = run_fp16(P.precision.LossScaler(**settings), 10)
    theirs = run_fp16(torch.amp.GradScaler("cpu", **settings), 10)
    assert ours[0] == theirs[0]  # the scale sequence
    assert ours[1] == theirs[1]  # which steps were skipped
    assert ours[0] == [2.0**e for e in (24, 23, 22, 21, 20, 19, 19, 19, 20, 19)]  # halve, settle, grow
    assert ours[1] == [True] * 5 + [False] * 3 + [True, False]  # 2**20 overflows again after growing
    for name, weight in theirs[2].items():
        assert torch.equal(ours[2][name], weight), name


def test_an_overflowed_gradient_never_reaches_the_weights():
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scaler = P.precision.LossScaler(init_scale=8.0)
    scaler.scale(model(torch.ones(1, 4)).sum()).backward()
    model.weight.grad[0, 0] = float("nan")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert opt.state == {}  # not even Adam's moments saw the step
    assert scaler.get_scale() == 4.0


def test_small_gradients_flush_to_zero_in_fp16_and_survive_with_scaling():
    """Micikevicius et al.'s figure 3: many gradients lie below fp16's smallest subnormal (6e-8). Here every
    gradient is about 1e-8: an fp16 backward makes them 0, the same backward of a scaled loss keeps them."""
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))

    def grad(scaler) -> torch.Tensor:
        layer = torch.nn.Linear(16, 16, bias=False)
        torch.nn.init.eye_(layer.weight)
        out = layer.half()(x.half())  # an fp16 layer, as autocast runs it on a GPU
        scaler.scale(out.float().sum() * 1e-8).backward()
        g = layer.weight.grad.float() / scaler.get_scale()  # what unscale_ would hand the optimizer
        return g

    exact = x.sum(0).expand(16, 16) * 1e-8  # d(sum(x W^T) * 1e-8) / dW
    unscaled = grad(P.precision.NoScaler())
    scaled = grad(P.precision.LossScaler())
    assert torch.count_nonzero(unscaled) == 0
    torch.testing.assert_close(scaled, exact, rtol=1e-2, atol=0)  # fp16 rounding of a sum of 8 terms


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
