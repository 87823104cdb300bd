"""Project 05's scripts with LoRA: train.py trains and saves only the adapter, on a base it leaves untouched;
--lora-* flags; an adapter is refused on another base (generate.py --base) and on a changed base (--resume);
generate.py --merge and merge.py give the adapted model's outputs; a merged checkpoint is a base for the next
run; benchmark.py compares full fine-tuning with LoRA. Offline: every model is a tiny one built here."""

import contextlib
import io
import json
import shutil

import pytest
import torch
from conftest import (
    assert_one_line_error,
    base_weights,
    digest,
    load_project,
    logits_of,
    make_instructions,
    printed,
    project_dir,
    read_report,
    run_main,
    tiny_trainer,
    with_flags,
    write_json,
    write_training_data,
)
from safetensors.torch import load_file

P = load_project("project05_lora")
L, C = P.lora, P.checkpoint
CPU = torch.device("cpu")
BASE_META = {"tokenizer": {"type": "tiktoken", "name": "gpt2"}, "template": "alpaca", "training": {}}
LORA_DROPOUT = 0.2  # not the default (0.05) nor the tiny preset's model dropout (0.1)
ONE_STEP = ["--max-iters", 1, "--eval-samples", 0]


def lora_params(r: int) -> int:
    """r (in + out) per adapted Linear of SCRATCH_MODEL (C = n_embd): attn.qkv C -> 3C, attn.proj C -> C,
    mlp.fc C -> 4C, mlp.proj 4C -> C; 16 C in all, in each of n_layer blocks."""
    return C.SCRATCH_MODEL.n_layer * r * (4 + 2 + 5 + 5) * C.SCRATCH_MODEL.n_embd


train_tiny = tiny_trainer("project05_lora")
generate = with_flags(P.generate, "--device", "cpu")


def scratch_base() -> "P.model.GPT":
    return C.load_base("scratch", CPU, C.DEFAULT_DIR)[0].eval()


def save_gpt(path, seed: int | None = None):
    """A full checkpoint of SCRATCH_MODEL's shape: the scratch base itself, or (seed) other random weights."""
    if seed is None:
        model = scratch_base()
    else:
        torch.manual_seed(seed)
        model = P.model.GPT(C.SCRATCH_MODEL)
    C.save_checkpoint(path, model, BASE_META)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """40 records (36 to train on, 4 held out): every run here scores the held-out set twice."""
    return write_json(tmp_path_factory.mktemp("lora_data") / "train.json", make_instructions(40))


@pytest.fixture(scope="module")
def run(data_file, tmp_path_factory):
    """One tiny LoRA run from the scratch base, shared by the tests below (read-only: copy to modify).
    It keeps the model train.py trained in memory, the LoRA tensors before the first step, and stdout."""
    out = tmp_path_factory.mktemp("lora_run") / "adapter"
    seen = {}
    real_step = P.train.train_step

    def recording_step(model, *args, **kwargs):
        if not seen:
            seen["model"] = model
            seen["lora_before"] = {k: v.clone() for k, v in L.lora_state_dict(model).items()}
        return real_step(model, *args, **kwargs)

    stdout = io.StringIO()
    flags = ["--max-iters", 8, "--eval-interval", 8, "--eval-samples", 0, "--lora-dropout", LORA_DROPOUT]
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(P.train, "train_step", recording_step)
        assert train_tiny("--data", data_file, "--out", out, *flags) == 0
    return {"out": out, "stdout": stdout.getvalue(), **seen}


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """The scratch base (the one `run` trained on) saved as a full checkpoint."""
    return save_gpt(tmp_path_factory.mktemp("lora_base") / "base")


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_merged") / "merged"
    assert run_main(P.merge, "--checkpoint", run["out"], "--out", out) == 0
    return out


PROMPT = "Below is"


def greedy(*argv) -> str:
    """generate.py's greedy continuation of PROMPT, as printed. Plain text, not an instruction: 8 steps
    teach the adapter to end an answer with <|endoftext|> at once, and an empty answer would compare
    equal to anything empty."""
    flags = ["--device", "cpu", "--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 12]
    text = printed(P.generate, *flags, *argv)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT) + 12  # twelve tokens of something
    return text


# --- what training writes -------------------------------------------------------------------------------


def test_training_saves_only_a_small_adapter(run, base_ckpt):
    out = run["out"]
    assert (out / "adapter.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()
    adapter_bytes = (out / "adapter.safetensors").stat().st_size
    assert adapter_bytes < (base_ckpt / "model.safetensors").stat().st_size / 50
    config = json.loads((out / "config.json").read_text())
    assert config["lora"] == L.LoRAConfig(dropout=LORA_DROPOUT).to_dict()
    assert config["base"] == {"init_from": "scratch", "fingerprint": L.base_fingerprint(scratch_base())}
    tensors = load_file(str(out / "adapter.safetensors"))
    assert tensors.keys() == L.lora_state_dict(run["model"]).keys()
    assert all(torch.equal(t, L.lora_state_dict(run["model"])[k]) for k, t in tensors.items())


def test_training_changes_the_adapters_and_nothing_else(run):
    model, before = run["model"], run["lora_before"]
    base = base_weights(scratch_base())
    trained = base_weights(model)
    assert trained.keys() == base.keys()
    assert all(torch.equal(trained[k], base[k]) for k in base)  # the frozen base, bit for bit
    after = L.lora_state_dict(model)
    assert all(torch.count_nonzero(before[k]) == 0 for k in before if k.endswith("lora_B"))  # B starts at 0
    assert all(not torch.equal(after[k], before[k]) for k in before)  # every A and B moved
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(after)


def test_trainable_count_printed_is_the_adapters(run):
    n_lora = L.trainable_parameters(run["model"])
    assert n_lora == lora_params(8)
    total = run["model"].num_params(non_embedding=False)
    assert f"LoRA r=8 on scratch ({n_lora:,} of {total:,} parameters trainable" in run["stdout"]


def test_lora_dropout_flag_reaches_the_adapters(run):
    """--lora-dropout is the adapters' dropout during training; the model's own dropout is the preset's."""
    layers = L.lora_layers(run["model"])
    assert layers and all(layer.lora_dropout.p == LORA_DROPOUT for layer in layers)
    adapter_dropouts = {id(layer.lora_dropout) for layer in layers}
    others = [
        m for m in run["model"].modules() if isinstance(m, torch.nn.Dropout) and id(m) not in adapter_dropouts
    ]
    assert others and all(m.p == P.train.PRESETS["tiny"].dropout for m in others)


def test_seed_fixes_the_adapters_initial_weights(data_file, base_ckpt, tmp_path, monkeypatch):
    """--seed fixes the adapters' random A from a checkpoint base too, whatever ran before in the process."""

    def initial_adapter(seed) -> dict[str, torch.Tensor]:
        seen = {}

        def stop_at_the_first_step(model, *args, **kwargs):
            seen.update(L.lora_state_dict(model))
            raise KeyboardInterrupt

        monkeypatch.setattr(P.train, "train_step", stop_at_the_first_step)
        flags = ["--init-from", base_ckpt, "--seed", seed, *ONE_STEP]
        assert train_tiny("--data", data_file, "--out", tmp_path / str(seed), *flags) == 130
        torch.rand(1)  # and the process's random state moves on, as any other work would move it
        return seen

    first, again, other = initial_adapter(1), initial_adapter(1), initial_adapter(2)
    assert first.keys() == again.keys() == other.keys() and len(first) == 16
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first if k.endswith("lora_A"))


# --- --lora-* flags -------------------------------------------------------------------------------------


def test_lora_targets_and_rank(data_file, tmp_path):
    flags = ["--lora-targets", "attn.qkv", "--lora-r", 4, *ONE_STEP]
    assert train_tiny("--data", data_file, "--out", tmp_path / "qkv", *flags) == 0
    tensors = load_file(str(tmp_path / "qkv" / "adapter.safetensors"))
    n, d = C.SCRATCH_MODEL.n_layer, C.SCRATCH_MODEL.n_embd
    expected = {f"blocks.{i}.attn.qkv.lora_{m}" for i in range(n) for m in "AB"}
    assert set(tensors) == expected
    for name, t in tensors.items():
        assert t.shape == ((4, d) if name.endswith("lora_A") else (3 * d, 4))
    config = json.loads((tmp_path / "qkv" / "config.json").read_text())
    assert config["lora"]["r"] == 4 and config["lora"]["targets"] == ["attn.qkv"]


def test_a_target_that_matches_no_layer_is_refused(data_file, tmp_path, capsys):
    rc = train_tiny("--data", data_file, "--out", tmp_path / "out", "--lora-targets", "attn.qkv,attn.qkvv")
    assert "'attn.qkvv'" in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "out").exists()


def test_a_rank_above_a_layers_width_is_refused(data_file, tmp_path, capsys):
    """The tiny model is 32 wide: a rank of 33 would not be low-rank (and 100,000 would not finish)."""
    rc = train_tiny("--data", data_file, "--out", tmp_path / "out", "--lora-r", 33)
    assert "LoRA rank 33" in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "out").exists()


def test_resume_cannot_change_the_rank(run, data_file, tmp_path, capsys):
    copy = shutil.copytree(run["out"], tmp_path / "ckpt")
    before = digest(copy)
    rc = train_tiny("--resume", "--max-iters", 10, "--lora-r", 16, "--data", data_file, "--out", copy)
    assert "--lora" in assert_one_line_error(capsys, rc)
    assert digest(copy) == before


# --- the base an adapter belongs to ---------------------------------------------------------------------


def test_adapter_on_a_different_base_is_refused(run, tmp_path, capsys):
    other = save_gpt(tmp_path / "other", seed=1)
    rc = generate("--checkpoint", run["out"], "--base", other, "--instruction", "Say hi.")
    line = assert_one_line_error(capsys, rc)
    assert "different base model" in line and "scratch" in line  # names the base it was trained on


def test_base_with_the_same_weights_gives_the_same_continuation(run, base_ckpt):
    assert greedy("--checkpoint", run["out"], "--base", base_ckpt) == greedy("--checkpoint", run["out"])


def test_resume_on_a_changed_base_is_refused(data_file, tmp_path, capsys):
    base = save_gpt(tmp_path / "base", seed=2)
    out = tmp_path / "adapter"
    assert train_tiny("--data", data_file, "--out", out, "--init-from", base, *ONE_STEP) == 0
    assert train_tiny("--resume", "--max-iters", 2, "--out", out) == 0  # the same base: it continues
    save_gpt(base, seed=3)  # same shape, other weights
    capsys.readouterr()
    before = digest(out)
    rc = train_tiny("--resume", "--max-iters", 3, "--out", out)
    line = assert_one_line_error(capsys, rc)
    assert "base model" in line and "has changed" in line
    assert digest(out) == before


# --- merging --------------------------------------------------------------------------------------------


def test_generate_merge_gives_the_same_greedy_continuation(run, base_ckpt):
    unmerged = greedy("--checkpoint", run["out"])
    assert greedy("--checkpoint", run["out"], "--merge") == unmerged
    assert greedy("--checkpoint", base_ckpt) != unmerged  # the adapter changes it


def test_merge_writes_a_full_checkpoint_with_the_adapted_logits(run, merged):
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter.safetensors").exists()
    config = json.loads((merged / "config.json").read_text())
    assert "lora" not in config and "base" not in config
    merged_model, _ = C.load_checkpoint(merged)
    lora_model, _ = C.load_checkpoint(run["out"])
    expected = logits_of(lora_model)
    torch.testing.assert_close(logits_of(merged_model), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits_of(scratch_base()), expected, atol=1e-3)  # the adapter is in there


def test_merge_refuses_an_existing_out_and_a_full_checkpoint(run, merged, tmp_path, capsys):
    before = digest(merged)
    rc = run_main(P.merge, "--checkpoint", run["out"], "--out", merged)
    assert "--overwrite" in assert_one_line_error(capsys, rc)
    assert digest(merged) == before
    rc = run_main(P.merge, "--checkpoint", merged, "--out", tmp_path / "again")
    assert "not an adapter" in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "again").exists()


def test_merge_never_writes_over_the_adapter_it_merges(run, tmp_path, capsys):
    copy = shutil.copytree(run["out"], tmp_path / "adapter")
    before = digest(copy)
    rc = run_main(P.merge, "--checkpoint", copy, "--out", copy, "--overwrite")
    assert "is the adapter being merged" in assert_one_line_error(capsys, rc)
    assert digest(copy) == before  # the adapter, its train state and metrics are all still there


def test_base_and_merge_flags_on_a_whole_model_are_refused(merged, capsys):
    for flags in (["--merge"], ["--base", "gpt2"]):
        rc = run_main(P.generate, "--checkpoint", merged, *flags, "--max-new-tokens", 2)
        assert "apply to an adapter" in assert_one_line_error(capsys, rc)


def test_a_merged_checkpoint_is_a_base_and_an_adapter_is_not(run, merged, data_file, tmp_path, capsys):
    out = tmp_path / "next"
    assert train_tiny("--data", data_file, "--out", out, "--init-from", merged, *ONE_STEP) == 0
    base = json.loads((out / "config.json").read_text())["base"]
    assert base["init_from"] == str(merged.resolve())
    assert base["fingerprint"] == L.base_fingerprint(C.load_checkpoint(merged)[0])
    assert base["fingerprint"] != L.base_fingerprint(scratch_base())
    capsys.readouterr()
    rc = train_tiny("--data", data_file, "--out", tmp_path / "o", "--init-from", run["out"], *ONE_STEP)
    line = assert_one_line_error(capsys, rc)
    assert "adapter" in line and "merge" in line
    assert not (tmp_path / "o").exists()


# --- benchmark.py ---------------------------------------------------------------------------------------


def test_benchmark_compares_full_fine_tuning_with_lora_ranks(tmp_path):
    data = write_json(tmp_path / "records.json", make_instructions(40, seed=5))
    flags = ["--preset", "tiny", "--data", data, "--steps", 2, "--ranks", "2,4", "--device", "cpu"]
    assert run_main(P.benchmark, *flags, "--out", tmp_path / "results") == 0
    rows = read_report(tmp_path / "results", "project05_lora")
    assert {v for _, v in rows} == {"full", "lora-r2", "lora-r4", "lora-r2 merged", "lora-r4 merged"}
    merged = rows[("decode_tok_per_s", "lora-r2 merged")]
    assert merged["baseline"] == "lora-r2" and merged["value"] > 0
    full = rows[("trainable_params", "full")]["value"]
    assert full == scratch_base().num_params(non_embedding=False)
    for r in (2, 4):
        lora = rows[("trainable_params", f"lora-r{r}")]
        assert lora["value"] == lora_params(r) and lora["baseline"] == "full"
        state = rows[("optimizer_state_mib", f"lora-r{r}")]["value"]
        assert state < rows[("optimizer_state_mib", "full")]["value"] / 100
        assert state == pytest.approx(2 * 4 * lora_params(r) / 2**20, rel=0.01)  # two fp32 moments each


@pytest.mark.parametrize("ranks", ["0", "x", "4,-1"])
def test_benchmark_bad_ranks(tmp_path, capsys, ranks):
    data = write_training_data(project_dir("project05_lora"), tmp_path / "train")
    rc = run_main(P.benchmark, "--preset", "tiny", "--data", data, "--ranks", ranks, "--out", tmp_path / "r")
    assert "--ranks" in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "r").exists()


# --- review fixes: nothing the user has is overwritten by accident; flags mean what they say ---------------


def test_out_cannot_be_the_base_it_starts_from(data_file, tmp_path, capsys):
    """An adapter saved over its own base would destroy the weights it is a correction to."""
    base = save_gpt(tmp_path / "base")
    before = digest(base)
    rc = train_tiny("--data", data_file, "--init-from", base, "--out", base, "--overwrite", *ONE_STEP)
    assert "the model this run starts from" in assert_one_line_error(capsys, rc)
    assert digest(base) == before


@pytest.mark.parametrize("value,ok", [("0", True), ("0.5", True), ("1", False), ("-0.1", False)])
def test_lora_dropout_range_is_zero_to_one(data_file, tmp_path, capsys, value, ok):
    rc = train_tiny("--data", data_file, "--out", tmp_path / "o", "--lora-dropout", value, *ONE_STEP)
    if ok:
        assert rc == 0
        assert json.loads((tmp_path / "o" / "config.json").read_text())["lora"]["dropout"] == float(value)
    else:
        assert "--lora-dropout" in assert_one_line_error(capsys, rc)


def test_merge_from_inside_the_checkpoint_and_into_an_empty_folder(run, tmp_path, monkeypatch):
    adapter = shutil.copytree(run["out"], tmp_path / "adapter")
    monkeypatch.chdir(adapter)
    assert run_main(P.merge, "--checkpoint", ".") == 0  # default --out: a sibling named <checkpoint>_merged
    assert (tmp_path / "adapter_merged" / "model.safetensors").is_file()
    (tmp_path / "empty").mkdir()
    assert run_main(P.merge, "--checkpoint", adapter, "--out", tmp_path / "empty") == 0
