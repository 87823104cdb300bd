"""The contract every project folder keeps (CONTRIBUTING.md), on both lines: its scripts import and answer
--help; a tiny training run writes a checkpoint that generate.py loads; checkpoints round-trip exactly; an
interrupted run resumes exactly; a seed fixes the sample; attention is causal; bad input ends with one line on
stderr and exit code 2, and never costs the user an existing checkpoint; another project's checkpoint is named
as such. What the training line adds (DDP, loss scaling) is test_training_line.py's."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    PROJECTS,
    ROOT,
    assert_one_line_error,
    data_kind,
    digest,
    greedy_ids,
    load_project,
    printed,
    project_tokenizer,
    run_main,
    tiny_gpt,
    train_tiny,
    write_training_data,
)

SCRIPTS = ("train", "generate", "benchmark")
EOT = 50256  # GPT-2's <|endoftext|>: a fine-tuned model's answer ends there


@pytest.fixture(scope="session", params=PROJECTS, ids=[p.name for p in PROJECTS])
def project(request):
    return request.param


@pytest.fixture(scope="session")
def corpus_file(project, tiny_runs) -> Path:
    """Training data of the kind this project reads: text, instruction records or preference pairs."""
    return tiny_runs.data(project)


@pytest.fixture(scope="session")
def trained(project, tiny_runs) -> Path:
    """A checkpoint from `train.py --preset tiny` on corpus_file, shared by the tests below (read-only:
    copy to modify)."""
    return tiny_runs.checkpoint(project)


def weights_file(ckpt: Path) -> str:
    """model.safetensors, or for projects that save only what they trained (LoRA), adapter.safetensors."""
    return "adapter.safetensors" if (ckpt / "adapter.safetensors").exists() else "model.safetensors"


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_answers_help(project, script, capsys):
    module = getattr(load_project(project), script)
    assert run_main(module, "--help") == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--device" in out


def test_training_writes_a_complete_checkpoint(trained):
    """Weights, config, what --resume needs, and every step's metrics (the training line also draws the loss
    curve: test_training_line.py)."""
    for name in (weights_file(trained), "config.json", "train_state.pt", "metrics.jsonl"):
        assert (trained / name).is_file(), name


def test_generate_prints_the_models_own_greedy_continuation(project, trained):
    """--temperature 0 prints the prompt and then exactly the tokens that the full forward pass ranks first
    (up to <|endoftext|> for a fine-tuned model), the same on every run."""
    P = load_project(project)
    flags = ["--checkpoint", trained, "--prompt", "ROMEO:", "--max-new-tokens", 30, "--temperature", 0]
    out = printed(P.generate, *flags)
    assert printed(P.generate, *flags) == out
    model, _ = P.checkpoint.load_checkpoint(trained)
    encode, decode = project_tokenizer(project, trained)
    stop = None if data_kind(project) == "text" else EOT  # (a fine-tuned model may end its answer at once)
    continuation = greedy_ids(model, encode("ROMEO:"), 30, stop)
    assert out == "ROMEO:" + decode(continuation) + "\n"


def test_checkpoint_round_trip_gives_identical_logits(project, trained, tmp_path):
    ckpt = load_project(project).checkpoint
    model, config = ckpt.load_checkpoint(trained)
    meta = {k: v for k, v in config.items() if k not in ("format", "project", "model")}
    ckpt.save_checkpoint(tmp_path / "copy", model, meta)
    again, _ = ckpt.load_checkpoint(tmp_path / "copy")
    idx = torch.randint(
        model.config.vocab_size, (2, model.config.block_size), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert torch.equal(model(idx)[0], again(idx)[0])
    assert again.lm_head.weight.data_ptr() == again.wte.weight.data_ptr(), "weight tying lost on load"


def test_same_seed_same_sample(project, trained):
    def sample(seed):
        flags = ["--checkpoint", trained, "--max-new-tokens", 60, "--temperature", 1.0, "--seed", seed]
        return printed(load_project(project).generate, *flags)

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_changing_a_future_token_never_changes_earlier_logits(project, trained):
    model, _ = load_project(project).checkpoint.load_checkpoint(trained)
    T, V = model.config.block_size, model.config.vocab_size
    idx = torch.randint(V, (1, T), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    t = T // 2
    changed[0, t:] = (changed[0, t:] + 1) % V  # every token from position t on is different
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_resume_after_interruption_reproduces_the_uninterrupted_run(
    project, corpus_file, tmp_path, monkeypatch
):
    P = load_project(project)
    flags = ["--data", corpus_file, "--max-iters", 12, "--eval-interval", 5]
    assert train_tiny(project, *flags, "--out", tmp_path / "straight") == 0

    real_step, calls = P.train.train_step, []

    def crash_on_step_8(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt  # as if Ctrl-C arrived mid-run, 3 steps after the step-5 checkpoint
        return real_step(*args, **kwargs)

    monkeypatch.setattr(P.train, "train_step", crash_on_step_8)
    assert train_tiny(project, *flags, "--out", tmp_path / "resumed") == 130
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["training"]["step"] == 5
    monkeypatch.setattr(P.train, "train_step", real_step)
    assert train_tiny(project, "--resume", "--out", tmp_path / "resumed") == 0

    def metrics(name):
        return (tmp_path / name / "metrics.jsonl").read_text().splitlines()

    assert metrics("resumed") == metrics("straight")  # every step's loss, lr, grad norm and every eval
    a, _ = P.checkpoint.load_checkpoint(tmp_path / "straight")
    b, _ = P.checkpoint.load_checkpoint(tmp_path / "resumed")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


# --- bad input: one line on stderr, exit code 2, nothing lost -------------------------------------------


def test_missing_checkpoint(project, tmp_path, capsys):
    rc = run_main(load_project(project).generate, "--checkpoint", tmp_path / "nowhere")
    line = assert_one_line_error(capsys, rc)
    assert "train.py" in line  # says what to run first


@pytest.mark.parametrize("broken", ["weights", "config.json"])
def test_corrupt_checkpoint(project, trained, tmp_path, capsys, broken):
    copy = shutil.copytree(trained, tmp_path / "ckpt")
    broken = weights_file(copy) if broken == "weights" else broken
    data = (copy / broken).read_bytes()
    (copy / broken).write_bytes(data[: len(data) // 2])  # a torn write
    rc = run_main(load_project(project).generate, "--checkpoint", copy)
    assert "corrupt" in assert_one_line_error(capsys, rc)


def test_corrupt_train_state_on_resume(project, trained, corpus_file, tmp_path, capsys):
    copy = shutil.copytree(trained, tmp_path / "ckpt")
    (copy / "train_state.pt").write_bytes(b"not a torch file")
    before = digest(copy)
    rc = run_main(
        load_project(project).train, "--resume", "--max-iters", 1000, "--data", corpus_file, "--out", copy
    )
    assert_one_line_error(capsys, rc)
    assert digest(copy) == before


@pytest.mark.parametrize(
    "content", [b"", b"caf\xe9 au lait, latin-1 not utf-8\n" * 100], ids=["empty", "not-utf8"]
)
def test_bad_data_file_keeps_existing_checkpoint(project, trained, tmp_path, capsys, content):
    copy = shutil.copytree(trained, tmp_path / "ckpt")
    before = digest(copy)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    train = load_project(project).train
    for flags in (["--resume", "--max-iters", "1000"], ["--overwrite", "--preset", "tiny"]):
        rc = run_main(train, *flags, "--data", bad, "--out", copy)
        assert_one_line_error(capsys, rc)
    assert digest(copy) == before


def test_training_refuses_to_overwrite_a_checkpoint(project, trained, corpus_file, tmp_path, capsys):
    copy = shutil.copytree(trained, tmp_path / "ckpt")
    before = digest(copy)
    rc = train_tiny(project, "--data", corpus_file, "--out", copy)
    assert "--resume" in assert_one_line_error(capsys, rc)
    assert digest(copy) == before


@pytest.mark.parametrize("value", ["0", "-5", "ten"])
def test_bad_max_new_tokens(project, trained, capsys, value):
    rc = run_main(load_project(project).generate, "--checkpoint", trained, "--max-new-tokens", value)
    assert "--max-new-tokens" in assert_one_line_error(capsys, rc)


def test_prompt_outside_the_vocabulary(project, trained, capsys):
    config = load_project(project).checkpoint.read_config(trained)
    if config["tokenizer"]["type"] != "char":
        pytest.skip("a byte-level vocabulary encodes any text")
    rc = run_main(load_project(project).generate, "--checkpoint", trained, "--prompt", "日本")
    assert "vocabulary" in assert_one_line_error(capsys, rc)


def test_prompt_longer_than_the_context(project, trained, capsys):
    model, _ = load_project(project).checkpoint.load_checkpoint(trained)
    rc = run_main(
        load_project(project).generate, "--checkpoint", trained, "--prompt", "a " * model.config.block_size
    )
    assert "context" in assert_one_line_error(capsys, rc)


def test_real_command_line_error_has_no_traceback(project, tmp_path):
    """The same as above, but through the interpreter, as a user runs it."""
    script = project / "generate.py"
    result = subprocess.run([sys.executable, str(script), "--checkpoint", str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_out_that_is_not_a_checkpoint_is_left_alone(project, corpus_file, tmp_path, capsys):
    folder = tmp_path / "my_notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    rc = train_tiny(project, "--data", corpus_file, "--out", folder)
    assert "not a checkpoint" in assert_one_line_error(capsys, rc)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_out_that_cannot_be_written_is_refused_before_training(
    project, corpus_file, tmp_path, monkeypatch, capsys
):
    """A file where --out's folder should be: found before the first step, not at the first save."""
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    steps = []
    monkeypatch.setattr(load_project(project).train, "train_step", lambda *a, **k: steps.append(1))
    rc = train_tiny(project, "--data", corpus_file, "--out", afile / "run")
    assert "cannot write --out" in assert_one_line_error(capsys, rc)
    assert steps == [] and afile.read_text() == "keep me"


def test_benchmark_names_another_projects_checkpoint(project, tmp_path, capsys):
    """benchmark.py reads a run's training settings: another project's run is named, not misread."""
    if "--checkpoint" not in printed(load_project(project).benchmark, "--help"):
        pytest.skip("this project's benchmark reads no checkpoint")
    # project 02's own BPE, which no other project reads (07 and 08 benchmark project 03's checkpoints, and
    # phase 5's benchmarks project 01's character model)
    other = "project02_tokenizer" if project.name != "project02_tokenizer" else "project03_pretrain"
    meta = {"tokenizer": {"type": "tiktoken" if other == "project03_pretrain" else "bpe"}, "training": {}}
    load_project(other).checkpoint.save_checkpoint(tmp_path / "other", tiny_gpt(other), meta)
    rc = run_main(
        load_project(project).benchmark, "--checkpoint", tmp_path / "other", "--out", tmp_path / "r"
    )
    assert other in assert_one_line_error(capsys, rc)


def test_benchmark_given_a_checkpoint_that_is_not_there_measures_nothing(project, tmp_path, capsys):
    """An explicit --checkpoint that holds none (a typo) is an error, never quietly random weights."""
    if "--checkpoint" not in printed(load_project(project).benchmark, "--help"):
        pytest.skip("this project's benchmark reads no checkpoint")
    rc = run_main(load_project(project).benchmark, "--checkpoint", tmp_path / "typo", "--out", tmp_path / "r")
    assert "typo" in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag", [["--seed", "-1"], ["--lr", "-1"], ["--lr", "nan"]])
def test_bad_training_flags(project, corpus_file, tmp_path, capsys, flag):
    rc = train_tiny(project, "--data", corpus_file, "--out", tmp_path / "c", *flag)
    assert flag[0] in assert_one_line_error(capsys, rc)


def test_tiny_temperature_is_refused(project, trained, capsys):
    rc = run_main(load_project(project).generate, "--checkpoint", trained, "--temperature", "1e-45")
    assert "--temperature" in assert_one_line_error(capsys, rc)


def test_resume_and_overwrite_together_are_refused(project, trained, tmp_path, capsys):
    copy = shutil.copytree(trained, tmp_path / "ckpt")
    before = digest(copy)
    rc = run_main(load_project(project).train, "--resume", "--overwrite", "--out", copy)
    assert "--overwrite" in assert_one_line_error(capsys, rc)
    assert digest(copy) == before


def test_generate_refuses_a_checkpoint_and_gpt2_weights_at_once(project, trained, capsys):
    if "--init-from" not in printed(load_project(project).generate, "--help"):
        pytest.skip("this project's generate.py reads only its checkpoints")
    rc = run_main(load_project(project).generate, "--checkpoint", trained, "--init-from", "gpt2")
    assert "--init-from" in assert_one_line_error(capsys, rc)


def test_resume_cannot_change_the_preset(project, trained, corpus_file, tmp_path, capsys):
    copy = shutil.copytree(trained, tmp_path / "ckpt")
    rc = run_main(
        load_project(project).train, "--resume", "--preset", "cpu", "--data", corpus_file, "--out", copy
    )
    assert "preset" in assert_one_line_error(capsys, rc)


def test_resume_on_other_data_is_refused(project, trained, tmp_path, capsys):
    copy = shutil.copytree(trained, tmp_path / "ckpt")
    other = write_training_data(project, tmp_path / "other", seed=1)
    before = digest(copy)
    rc = run_main(
        load_project(project).train, "--resume", "--max-iters", 1000, "--data", other, "--out", copy
    )
    assert "same data" in assert_one_line_error(capsys, rc)
    assert digest(copy) == before


def test_benchmark_out_that_is_a_file_is_refused_before_measuring(project, tmp_path, capsys):
    afile = tmp_path / "results.json"
    afile.write_text("keep me")
    rc = run_main(load_project(project).benchmark, "--out", afile)
    assert "--out" in assert_one_line_error(capsys, rc)
    assert afile.read_text() == "keep me"


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(
    project, corpus_file, tmp_path, monkeypatch, capsys
):
    P = load_project(project)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(P.train, "train_step", interrupted)
    assert train_tiny(project, "--data", corpus_file, "--out", tmp_path / "run") == 130
    assert "nothing was saved" in capsys.readouterr().out  # not "continue with --resume": there is nothing
    assert not (tmp_path / "run").exists()


def test_data_inside_a_project_folder_is_git_ignored(project):
    """A relative --out run from inside a project folder writes data/models/... there: never committed."""
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    path = (project / "data" / "models" / "x").relative_to(ROOT)
    assert subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT).returncode == 0


# --- another project's checkpoint: named as such, not called corrupt ------------------------------------


@pytest.mark.parametrize(
    "reader,script,writer",
    [
        ("project04_sft", "generate", "project05_lora"),  # a LoRA adapter folder
        ("project03_pretrain", "train", "project01_minimal_gpt"),  # --resume of another project's run
        ("project01_minimal_gpt", "generate", "project03_pretrain"),
    ],
)
def test_another_projects_checkpoint_is_named_not_called_corrupt(
    tiny_runs, tmp_path, capsys, reader, script, writer
):
    ckpt = shutil.copytree(tiny_runs.checkpoint(writer), tmp_path / "ckpt")
    before = digest(ckpt)
    flags = ["--checkpoint", ckpt] if script == "generate" else ["--resume", "--out", ckpt]
    line = assert_one_line_error(capsys, run_main(getattr(load_project(reader), script), *flags))
    assert writer in line and f"{script}.py" in line and "corrupt" not in line  # says which script reads it
    assert digest(ckpt) == before
