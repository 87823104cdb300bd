"""What the training line adds to the contract every project keeps (test_contract.py): the projects that carry
project 03's pre-training pipeline (distributed.py: 03, 07, and the projects that train at scale after 07)
train with DDP under torchrun exactly as one process does, resume only with as many processes, and draw
their loss curve; those that carry project 07's loss scaler (precision.py) scale as torch.amp.GradScaler
does, keep an overflowed step out of the weights, and keep fp16's small gradients alive. The inference line
(08 on) has none of this: its short single-device loop is held to test_contract.py alone."""

import json
import shutil

import pytest
import torch
from conftest import (
    PROJECTS,
    assert_one_line_error,
    assert_same_weights,
    load_project,
    train_tiny,
    train_with_and_without_ddp,
)

TRAINING_LINE = [p for p in PROJECTS if (p / "distributed.py").exists()]
LOSS_SCALING = [
    p for p in PROJECTS if (p / "precision.py").exists() and "LossScaler" in (p / "precision.py").read_text()
]
CPU = torch.device("cpu")


@pytest.fixture(params=TRAINING_LINE, ids=[p.name for p in TRAINING_LINE])
def project(request):
    return request.param


def test_two_processes_with_ddp_equal_one_process(project, corpus_file, tiktoken_cache, tmp_path):
    """512 tokens a step: 4 micro-batches of 4 x 32 in one process, or 2 in each of two gloo processes
    (torchrun), so DDP's no_sync path runs too. Same data, same averaged gradient, so the same weights."""
    P = load_project(project)
    flags = ["--preset", "tiny", "--data", str(corpus_file), "--max-iters", "4", "--eval-interval", "4",
             "--eval-iters", "1", "--device", "cpu", "--total-batch-tokens", "512"]  # fmt: skip
    ddp, single = train_with_and_without_ddp(P, flags, tmp_path, tiktoken_cache)
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["training"]["world_size"] == 2
    assert_same_weights(ddp, single)
    torch.manual_seed(1337)  # the tiny preset's seed: the weights the runs started from
    start = P.model.GPT(single.config)
    assert not torch.equal(single.wpe.weight, start.wpe.weight)  # it did train


def test_resume_needs_the_same_number_of_processes(project, tiny_runs, tmp_path, capsys):
    ckpt = shutil.copytree(tiny_runs.checkpoint(project), tmp_path / "ck")
    config = json.loads((ckpt / "config.json").read_text())
    config["training"]["world_size"] = 2  # as if it had been trained by two torchrun processes
    (ckpt / "config.json").write_text(json.dumps(config))
    assert train_tiny(project, "--resume", "--max-iters", 1000, "--out", ckpt) == 2
    assert "2 process(es)" in capsys.readouterr().err


# A field value each project's GPTConfig checks and refuses: what a config.json edited by hand might hold.
REFUSED_MODEL_FIELDS = {
    "project19_weight_sharing": {"repeat": 0},
    "project21_moe": {"n_expert": 2, "top_k": 5},
    "project22_memory_efficient": {"recompute": "bogus"},
    "project22b_mamba": {"d_state": 0},
    "project22c_kan": {"grid_size": 0},
}


@pytest.mark.parametrize("name", sorted(REFUSED_MODEL_FIELDS))
def test_resuming_a_checkpoint_whose_model_config_is_refused_is_one_line(name, tiny_runs, tmp_path, capsys):
    ckpt = shutil.copytree(tiny_runs.checkpoint(name), tmp_path / "ck")
    config = json.loads((ckpt / "config.json").read_text())
    config["model"].update(REFUSED_MODEL_FIELDS[name])
    (ckpt / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    rc = train_tiny(name, "--resume", "--max-iters", 1000, "--out", ckpt)
    assert "model config" in assert_one_line_error(capsys, rc)


def test_training_draws_its_loss_curve(project, tiny_runs):
    assert (tiny_runs.checkpoint(project) / "loss_curve.png").read_bytes().startswith(b"\x89PNG")


# --- loss scaling (project 07's precision.py) -------------------------------------------------------------


@pytest.fixture(params=LOSS_SCALING, ids=[p.name for p in LOSS_SCALING])
def scaling(request):
    return load_project(request.param)


class Batches:
    """The same fixed random batches for every run, in order."""

    def __init__(self, vocab_size: int, block_size: int, n: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.batches = torch.randint(vocab_size, (n, 4, block_size + 1), generator=g)
        self.i = 0

    def next_batch(self):
        b, self.i = self.batches[self.i % len(self.batches)], self.i + 1
        return b[:, :-1], b[:, 1:]


def run_fp16(P, scaler, steps: int) -> tuple[list[float], list[bool], dict]:
    """`steps` fp16 training steps with `scaler`: (the scale of each step, which were skipped, weights)."""
    config = P.model.GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = P.model.GPT(config)
    tc = P.train.TrainConfig(batch_size=4)
    opt = P.train.make_optimizer(model, tc, CPU)
    loader, scales, skipped, fp16 = (
        Batches(config.vocab_size, config.block_size),
        [],
        [],
        P.precision.PRECISIONS["fp16"],
    )
    for _ in range(steps):
        scales.append(scaler.get_scale())
        _, _, skip = P.train.train_step(
            model, opt, scaler, loader, 2, 1e-3, tc, CPU, fp16, P.distributed.Dist()
        )
        skipped.append(skip)
    return scales, skipped, model.state_dict()


def test_our_scaler_equals_torch_gradscaler_through_overflow_and_growth(scaling):
    """2**24 overflows fp16 (the logits' gradient is about scale / tokens), so the first steps are skipped and
    the scale halves until gradients fit; growth_interval 3 then doubles it into overflow again."""
    settings = dict(init_scale=2.0**24, growth_interval=3)
    ours = run_fp16(scaling, scaling.precision.LossScaler(**settings), 10)
    theirs = run_fp16(scaling, torch.amp.GradScaler("cpu", **settings), 10)
    assert ours[0] == theirs[0]  # the scale sequence
    assert ours[1] == theirs[1]  # which steps were skipped
    assert ours[0] == [2.0**e for e in (24, 23, 22, 21, 20, 19, 19, 19, 20, 19)]  # halve, settle, grow
    assert ours[1] == [True] * 5 + [False] * 3 + [True, False]  # 2**20 overflows again after growing
    for name, weight in theirs[2].items():
        assert torch.equal(ours[2][name], weight), name


def test_an_overflowed_gradient_never_reaches_the_weights(scaling):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scaler = scaling.precision.LossScaler(init_scale=8.0)
    scaler.scale(model(torch.ones(1, 4)).sum()).backward()
    model.weight.grad[0, 0] = float("nan")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert opt.state == {}  # not even Adam's moments saw the step
    assert scaler.get_scale() == 4.0


def test_small_gradients_flush_to_zero_in_fp16_and_survive_with_scaling(scaling):
    """Micikevicius et al.'s figure 3: many gradients lie below fp16's smallest subnormal (6e-8). Here every
    gradient is about 1e-8: an fp16 backward makes them 0, the same backward of a scaled loss keeps them."""
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))

    def grad(scaler) -> torch.Tensor:
        layer = torch.nn.Linear(16, 16, bias=False)
        torch.nn.init.eye_(layer.weight)
        out = layer.half()(x.half())  # an fp16 layer, as autocast runs it on a GPU
        scaler.scale(out.float().sum() * 1e-8).backward()
        return layer.weight.grad.float() / scaler.get_scale()  # what unscale_ would hand the optimizer

    exact = x.sum(0).expand(16, 16) * 1e-8  # d(sum(x W^T) * 1e-8) / dW
    unscaled = grad(scaling.precision.NoScaler())
    scaled = grad(scaling.precision.LossScaler())
    assert torch.count_nonzero(unscaled) == 0
    torch.testing.assert_close(scaled, exact, rtol=1e-2, atol=0)  # fp16 rounding of a sum of 8 terms
