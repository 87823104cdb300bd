"""Project 01: the model against PyTorch's reference attention, training dynamics, sampling
sets, atomic checkpoints, the rules for --out, the memory check, downloads, and the benchmark's output and
where it goes. (Causal masking, checkpoint round trips, exact resume and bad-input exits are in
test_contract.py, which covers this project too.)"""

import argparse
import hashlib
import io
import json
import math
import shutil
import sys
import time

import pytest
import torch
from conftest import (
    assert_one_line_error,
    digest,
    greedy_ids,
    load_project,
    printed,
    project_tokenizer,
    read_report,
    run_main,
    tiny_gpt,
    tiny_trainer,
)

P = load_project("project01_minimal_gpt")
TINY = P.model.GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32)
train_tiny = tiny_trainer("project01_minimal_gpt")


@pytest.fixture(scope="module")
def trained(tiny_runs):
    """The shared tiny checkpoint (read-only: copy to modify)."""
    return tiny_runs.checkpoint("project01_minimal_gpt")


def test_attention_matches_pytorch_sdpa():
    torch.manual_seed(0)
    model = P.model.GPT(TINY).eval()
    reference = P.benchmark.use_sdpa(P.model.GPT(TINY)).eval()
    reference.load_state_dict(model.state_dict())
    idx = torch.randint(TINY.vocab_size, (3, TINY.block_size))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], reference(idx)[0], rtol=1e-5, atol=1e-5)


def test_initial_loss_is_close_to_uniform():
    """Small initial weights give near-uniform predictions: loss ~ ln(vocab_size), not far above it."""
    torch.manual_seed(0)
    model = P.model.GPT(TINY)
    idx = torch.randint(TINY.vocab_size, (8, TINY.block_size))
    targets = torch.randint(TINY.vocab_size, (8, TINY.block_size))  # independent of the input
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.05


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = P.model.GPT(TINY)
    x = torch.randint(TINY.vocab_size, (4, TINY.block_size))
    y = torch.randint(TINY.vocab_size, (4, TINY.block_size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1  # from ~4.2: it memorised 128 random targets


def test_weights_are_tied_and_counted_once():
    model = P.model.GPT(TINY)
    assert model.lm_head.weight is model.wte.weight
    unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model.num_params(non_embedding=False) == unique


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    config = P.model.GPTConfig(vocab_size=65, block_size=32, n_layer=8, n_head=4, n_embd=256)
    model = P.model.GPT(config)
    expected = 0.02 / math.sqrt(2 * config.n_layer)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_learning_rate_warms_up_then_decays_to_min_lr():
    tc = P.train.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100)
    lrs = [P.train.lr_at(s, tc) for s in range(120)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # rising during warm-up
    assert max(lrs) == pytest.approx(tc.lr, rel=1e-6)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rising after it
    assert lrs[100] == pytest.approx(tc.min_lr) and lrs[119] == pytest.approx(tc.min_lr)


def test_a_peak_below_the_floor_is_never_exceeded():
    """--lr under the preset's min_lr (a fine-tuning rate, say) stays flat after warm-up: no climb."""
    tc = P.train.TrainConfig(lr=1e-4, min_lr=2e-4, warmup_iters=10, max_iters=100)
    lrs = [P.train.lr_at(s, tc) for s in range(120)]
    assert max(lrs) == pytest.approx(tc.lr) and lrs[119] == pytest.approx(tc.lr)


def test_weight_decay_applies_to_matrices_only():
    model = P.model.GPT(TINY)
    decay, no_decay = P.train.make_optimizer(model, P.train.TrainConfig(), torch.device("cpu")).param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.wte.weight for p in decay["params"])
    assert any(p is model.ln_f.weight for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params(
        non_embedding=False
    )


# --- sampling -------------------------------------------------------------------------------------------

PROBS = torch.tensor([[0.05, 0.5, 0.1, 0.2, 0.15]])  # ranks: 1, 3, 4, 2, 0


def draw(n=3000, **kw):
    gen = torch.Generator().manual_seed(0)
    logits = PROBS.log().expand(n, -1)
    return set(P.model.sample_next_token(logits, generator=gen, **kw).flatten().tolist())


def test_top_k_samples_only_the_k_likeliest():
    assert draw(top_k=2) == {1, 3}
    assert draw(top_k=1) == {1}


def test_top_p_samples_only_the_nucleus():
    assert draw(top_p=0.6) == {1, 3}  # 0.5 alone is short of 0.6; 0.5 + 0.2 reaches it
    assert draw(top_p=0.5) == {1}  # the likeliest token alone already has mass 0.5
    assert draw(top_p=0.85) == {1, 3, 4}
    assert draw(top_p=0.1) == {1}  # never empty


def test_top_k_and_top_p_combine_and_unrestricted_covers_all():
    assert draw(top_k=3, top_p=0.99) == {1, 3, 4}
    assert draw() == {0, 1, 2, 3, 4}


def test_temperature_zero_is_greedy():
    logits = torch.randn(6, 50)
    assert torch.equal(P.model.sample_next_token(logits, temperature=0).flatten(), logits.argmax(-1))


# --- training runs --------------------------------------------------------------------------------------


def test_training_lowers_the_loss(trained):
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "val_loss" in m]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert metrics[0]["loss"] == pytest.approx(
        math.log(P.checkpoint.read_config(trained)["model"]["vocab_size"]), abs=0.1
    )


def test_failed_save_leaves_the_previous_checkpoint(trained, tmp_path, monkeypatch):
    copy = shutil.copytree(trained, tmp_path / "ckpt")
    before = {f.name: f.read_bytes() for f in copy.iterdir()}
    model, config = P.checkpoint.load_checkpoint(copy)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(P.checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError):
        P.checkpoint.save_checkpoint(copy, model, {"tokenizer": config["tokenizer"]}, {"step": 1})
    assert {f.name: f.read_bytes() for f in copy.iterdir()} == before
    assert sorted(p.name for p in copy.parent.iterdir()) == ["ckpt"]  # no temporary directory left behind


def test_checkpoint_cut_off_between_renames_still_loads(trained, tmp_path):
    """save_checkpoint renames the old directory aside before moving the new one in; a crash between the two
    renames leaves only the old one, which loading falls back to."""
    shutil.copytree(trained, tmp_path / ".ckpt.old")
    model, _ = P.checkpoint.load_checkpoint(tmp_path / "ckpt")
    reference, _ = P.checkpoint.load_checkpoint(trained)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.state_dict().items())


# --- generation ------------------------------------------------------------------------------------------


def test_streaming_prints_the_same_text(trained):
    common = ["--checkpoint", trained, "--max-new-tokens", 80, "--seed", 3, "--top-k", 10]
    assert printed(P.generate, *common, "--stream") == printed(P.generate, *common)


def test_interactive_mode_continues_each_prompt(trained, capsys, monkeypatch):
    """Each prompt typed gets its own greedy continuation (computed here with a plain argmax loop over the
    full forward pass); a prompt outside the vocabulary is reported and the loop goes on."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("ROMEO\nthe 日本\nJULIET\nquit\n"))
    flags = ["--interactive", "--max-new-tokens", 20, "--temperature", 0]
    assert run_main(P.generate, "--checkpoint", trained, *flags) == 0
    captured = capsys.readouterr()
    model, _ = P.checkpoint.load_checkpoint(trained)
    encode, decode = project_tokenizer("project01_minimal_gpt", trained)
    for prompt in ("ROMEO", "JULIET"):
        continuation = decode(greedy_ids(model, encode(prompt), 20))
        assert len(continuation) == 20 and prompt + continuation + "\n" in captured.out
    assert "vocabulary" in captured.err and "日本" not in captured.out


# --- data ------------------------------------------------------------------------------------------------


def test_download_verifies_the_checksum(tmp_path):
    source = tmp_path / "source.txt"
    source.write_text("To be, or not to be\n")
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    dest = P.data.download(source.as_uri(), tmp_path / "cache" / "input.txt", md5)
    assert dest.read_text() == "To be, or not to be\n"
    with pytest.raises(P.cli.UserError, match="corrupt"):
        P.data.download(source.as_uri(), tmp_path / "cache2" / "input.txt", "0" * 32)
    assert list((tmp_path / "cache2").iterdir()) == []  # neither the file nor a partial download


def test_failed_download_names_the_url_and_the_way_out(tmp_path):
    url = (tmp_path / "missing.txt").as_uri()
    with pytest.raises(P.cli.UserError) as err:
        P.data.download(url, tmp_path / "cache" / "input.txt", "0" * 32)
    assert url in str(err.value) and "--data" in str(err.value)


def test_too_little_data_for_the_context(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("abc" * 50)
    rc = train_tiny("--data", small, "--out", tmp_path / "ckpt")
    assert "needs at least" in assert_one_line_error(capsys, rc)


# --- benchmark --------------------------------------------------------------------------------------------


def test_benchmark_writes_the_results_schema(trained, tmp_path, capsys):
    rc = run_main(P.benchmark, "--preset", "tiny", "--checkpoint", trained, "--out", tmp_path, "--warmup", 1,
                  "--repeats", 2, "--gen-tokens", 8)  # fmt: skip
    assert rc == 0
    rows = read_report(tmp_path, "project01_minimal_gpt")
    assert rows[("train_tok_per_s", "explicit attention")]["value"] > 0
    assert rows[("train_tok_per_s", "torch sdpa")]["baseline"] == "explicit attention"
    assert rows[("max_abs_logit_diff", "torch sdpa vs explicit")]["value"] < 1e-5
    # The benchmark's estimate of the checkpoint's val loss is the one training recorded: same batches.
    recorded = P.checkpoint.read_config(trained)["training"]["val_loss"]
    assert rows[("val_loss", "checkpoint")]["value"] == pytest.approx(recorded, abs=1e-6)
    assert "step_ms" in capsys.readouterr().out


def test_benchmark_writes_to_data_benchmarks_unless_published(tmp_path, monkeypatch, capsys):
    """A user's run goes to data/benchmarks/<project>/ or to --out; only --publish writes results/."""
    monkeypatch.setattr(P.results, "LOCAL_DIR", tmp_path / "local")
    monkeypatch.setattr(P.results, "PUBLISHED_DIR", tmp_path / "published")
    monkeypatch.setattr(P.results, "REPO_ROOT", tmp_path)  # --help shows PUBLISHED_DIR relative to it
    monkeypatch.setattr(P.benchmark, "DEFAULT_DIR", tmp_path / "none")  # no checkpoint: val loss not measured
    flags = ["--preset", "tiny", "--warmup", 0, "--repeats", 1, "--gen-tokens", 2]
    runs = [([], "local"), (["--out", tmp_path / "mine"], "mine"), (["--publish"], "published")]
    for extra, folder in runs:
        assert run_main(P.benchmark, *flags, *extra) == 0
        assert {p.parent.name for p in tmp_path.rglob("*.json")} >= {folder}
        read_report(tmp_path / folder, "project01_minimal_gpt")
    assert sorted(p.parent.name for p in tmp_path.rglob("*.json")) == ["local", "mine", "published"]
    capsys.readouterr()
    rc = run_main(P.benchmark, *flags, "--out", tmp_path / "other", "--publish")
    assert "--publish" in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "other").exists()


def test_results_record_paths_inside_the_repository_relative(tmp_path, monkeypatch):
    """A published file names data/models/..., never the home folder of whoever ran it."""
    monkeypatch.setattr(P.results, "REPO_ROOT", tmp_path)
    args = argparse.Namespace(publish=False, out=tmp_path / "out")
    config = {"checkpoint": str(tmp_path / "data" / "models" / "m"), "elsewhere": "/opt/m", "steps": 3}
    path = P.results.write_report(args, "t", torch.device("cpu"), "tiny", "tiny", config, [])
    recorded = json.loads(path.read_text())["config"]
    assert recorded == {"checkpoint": "data/models/m", "elsewhere": "/opt/m", "steps": 3}


# --- the rules for --out, and the memory check ------------------------------------------------------------


def test_overwrite_never_replaces_another_projects_checkpoint(corpus_file, tmp_path, capsys):
    p03 = load_project("project03_pretrain")
    meta = {"tokenizer": {"type": "tiktoken", "name": "gpt2"}, "training": {}}
    p03.checkpoint.save_checkpoint(tmp_path / "p03", tiny_gpt("project03_pretrain"), meta)
    before = digest(tmp_path / "p03")
    rc = train_tiny("--overwrite", "--data", corpus_file, "--out", tmp_path / "p03")
    line = assert_one_line_error(capsys, rc)
    assert "project03_pretrain" in line and "--overwrite" in line
    assert digest(tmp_path / "p03") == before


def test_overwriting_a_base_names_the_adapters_trained_on_it(
    trained, corpus_file, tmp_path, monkeypatch, capsys
):
    """An adapter (project 05) records the folder of its base; replacing that base breaks it: say so."""
    out = shutil.copytree(trained, tmp_path / "base")
    models = tmp_path / "models"
    for name, base in (("on_this_base", out), ("on_another_base", tmp_path / "other")):
        (models / name).mkdir(parents=True)
        (models / name / "config.json").write_text(json.dumps({"base": {"init_from": str(base.resolve())}}))
        (models / name / "adapter.safetensors").write_bytes(b"")
    monkeypatch.setattr(P.checkpoint, "MODELS_DIR", models)
    flags = ["--max-iters", 1, "--eval-iters", 1]
    assert train_tiny("--overwrite", *flags, "--data", corpus_file, "--out", out) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and str(models / "on_this_base") in warnings[0] and str(out) in warnings[0]


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_anything_runs(corpus_file, tmp_path, capsys):
    start = time.perf_counter()
    rc = train_tiny("--batch-size", 100_000_000, "--data", corpus_file, "--out", tmp_path / "out")
    assert "--batch-size" in assert_one_line_error(capsys, rc)
    assert time.perf_counter() - start < 30  # worked out from the sizes, not found out by allocating
    assert not (tmp_path / "out").exists()


def test_benchmark_refuses_a_checkpoint_that_is_not_there(tmp_path, capsys):
    """Named on the command line, a missing checkpoint is a mistake (a typo), not "not measured"."""
    rc = run_main(P.benchmark, "--preset", "tiny", "--checkpoint", tmp_path / "typo", "--out", tmp_path)
    assert "no checkpoint at" in assert_one_line_error(capsys, rc)
    assert not list(tmp_path.glob("*.json"))
