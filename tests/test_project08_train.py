"""Project 08's train.py, the short single-device loop that every inference project carries: the loss falls;
--init-from continues GPT-2's weights (here a tiny model in Hugging Face's format), its first step computing
exactly the model's loss on the first batch, and --resume needs the weights no more; project 07's token shards
read as project 07 reads them; a damaged shard is one line; Ctrl-C saves the step it arrives in. (Exact
resume, checkpoints and bad input: test_contract.py.)"""

import json
import shutil
import signal

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, load_project, run_main, tiny_gpt, tiny_trainer

PROJECT = "project08_kv_cache"
P = load_project(PROJECT)
P07 = load_project("project07_mixed_precision")
train_tiny = tiny_trainer(PROJECT)


def metrics(ckpt) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


def test_the_loss_falls(tiny_runs):
    log = metrics(tiny_runs.checkpoint(PROJECT))
    steps, evals = [m for m in log if "loss" in m], [m for m in log if "val_loss" in m]
    assert len(steps) == P.config.PRESETS["tiny"][1].max_iters and len(evals) == 2
    assert steps[-1]["loss"] < steps[0]["loss"] - 2 and evals[-1]["val_loss"] < evals[0]["val_loss"]


@pytest.fixture
def hf_folder(tmp_path):
    """A tiny GPT in Hugging Face's GPT-2 format (hf.py's export), with GPT-2's vocabulary: what --init-from
    reads for gpt2, without the download."""
    model = tiny_gpt(PROJECT, seed=4, vocab_size=50257, block_size=32)
    load_project("project03_pretrain").hf.save_hf_dir(model, tmp_path / "hf")  # 03 exports; 08 only loads
    return tmp_path / "hf", model


def test_init_from_continues_the_weights_of_a_hugging_face_folder(hf_folder, tiny_runs, tmp_path):
    folder, model = hf_folder
    data, out = tiny_runs.data(PROJECT), tmp_path / "run"
    flags = ["--data", data, "--eval-interval", 1, "--eval-iters", 1, "--out", out]
    assert train_tiny("--init-from", folder, "--max-iters", 1, *flags) == 0
    # the first step's loss is the model's own on the first batch the run draws (its seed, its windows)
    tc = P.config.PRESETS["tiny"][1]
    tokens, _, _ = P.data.load_tokens(str(data), 32)
    x, y = P.data.get_batch(tokens, tc.batch_size, 32, torch.Generator().manual_seed(tc.seed), "cpu")
    with torch.no_grad():
        expected = model(x, y)[1].item()
    assert metrics(out)[0]["loss"] == pytest.approx(expected, rel=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["block_size"] == 32 and config["training"]["init_from"] == str(folder)
    shutil.rmtree(folder)  # a resumed run's weights are its own
    assert train_tiny("--resume", "--max-iters", 2, "--out", out) == 0
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2]


def test_project07s_shards_are_read_as_project07_reads_them(tiny_runs, tmp_path, capsys):
    text, shards = tiny_runs.data(PROJECT), tmp_path / "shards"
    args = ["--data", text, "--out", shards, "--shard-tokens", 4000, "--workers", 1]
    assert run_main(P07.prepare, *args) == 0
    for split in ("train", "val"):
        theirs = np.concatenate([P07.shards.read_shard(f) for f in P07.shards.list_shards(shards, split)])
        assert np.array_equal(P.data.read_shards(shards, split), theirs)
    assert len(P07.shards.list_shards(shards, "train")) > 1  # several shards, in order
    assert train_tiny("--data", shards, "--max-iters", 2, "--eval-interval", 2, "--out", tmp_path / "r") == 0
    first = next(shards.glob("*_train_*.bin"))
    first.write_bytes(first.read_bytes()[:-10])  # an interrupted copy
    capsys.readouterr()
    rc = train_tiny("--data", shards, "--out", tmp_path / "r2")
    assert "not a complete token shard" in assert_one_line_error(capsys, rc)


def test_ctrl_c_stops_after_the_step_saves_it_and_resume_continues_exactly(tiny_runs, tmp_path, monkeypatch):
    """A real SIGINT during step 3: the step finishes, is saved (exit 130), and --resume then gives every
    later step's loss and the final weights of an uninterrupted run."""
    data = tiny_runs.data(PROJECT)
    flags = ["--data", data, "--max-iters", 8, "--eval-interval", 5, "--eval-iters", 1]
    assert train_tiny(*flags, "--out", tmp_path / "straight") == 0
    real_step, calls = P.train.train_step, []
    before = signal.getsignal(signal.SIGINT)  # Python's default; ignored when pytest runs as a background job

    def ctrl_c_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # as the terminal sends it, in the middle of the step
        return real_step(*args, **kwargs)

    monkeypatch.setattr(P.train, "train_step", ctrl_c_in_step_3)
    assert train_tiny(*flags, "--out", tmp_path / "stopped") == 130
    assert json.loads((tmp_path / "stopped" / "config.json").read_text())["training"]["step"] == 3
    monkeypatch.setattr(P.train, "train_step", real_step)
    assert signal.getsignal(signal.SIGINT) == before  # the handler is put back
    assert train_tiny(*flags, "--out", tmp_path / "stopped", "--resume") == 0
    steps = lambda run: [m for m in metrics(tmp_path / run) if "loss" in m]  # noqa: E731
    assert steps("stopped") == steps("straight")
    a, _ = P.checkpoint.load_checkpoint(tmp_path / "straight")
    b, _ = P.checkpoint.load_checkpoint(tmp_path / "stopped")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
