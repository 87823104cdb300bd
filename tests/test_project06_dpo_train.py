"""Project 06's DPO training, end to end: the three kinds of reference give the same loss, training raises
the held-out reward margin, --precompute-ref and --lora change the cost but not the numbers, the loss at
step 0 is what the formulas say, bad preference records and flags end with one line, --init-from, and
benchmark.py. Every model is a tiny one built here; the runs are short and shared (module fixtures)."""

import contextlib
import functools
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_one_line_error,
    digest,
    load_project,
    make_preferences,
    read_report,
    run_main,
    serve_named_file,
    tiny_trainer,
    write_json,
)

P = load_project("project06_dpo")
CPU, F32 = torch.device("cpu"), torch.float32
LN2 = math.log(2)
TINY_SFT = P.model.GPTConfig(vocab_size=50257, block_size=128, n_layer=1, n_head=2, n_embd=16)
SFT_META = {"tokenizer": {"type": "tiktoken", "name": "gpt2"}, "template": "alpaca", "training": {}}
N_RECORDS = 20  # 18 pairs to train on, 2 held out: every vocabulary-sized forward pass costs on a CPU
IPO_BETA = 0.25  # IPO's target margin 1 / (2 beta) = 2: its loss with policy = reference is 2^2 = 4
ANSWER_TOKENS = 8  # eval.json's answers, cut short: a 128-token greedy answer costs seconds on a CPU


train_tiny = tiny_trainer("project06_dpo", "--batch-size", 2, "--eval-samples", 0)


def metrics_of(ckpt) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


def step_losses(ckpt) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics_of(ckpt) if "loss" in m}


def config_of(ckpt) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def held_out(data_file, batch_size: int) -> list[dict]:
    """The held-out batches train.py scores for a data file."""
    _, val = P.data.split_records(P.preference.load_preference_records(data_file)[0])
    return P.preference.eval_pair_batches(P.preference.encode_pairs(val, 128, "held-out"), batch_size)


def evaluate_against(policy, reference, batches, tc) -> dict:
    """train.evaluate of `policy`, with `reference`'s log-probs as the reference."""
    ref_logps = [P.dpo.reference_logprobs(reference.eval(), b) for b in batches]
    return P.train.evaluate(policy, batches, ref_logps, tc, CPU, F32)


def scratch_model():
    return P.checkpoint.load_base("scratch", CPU, P.checkpoint.DEFAULT_DIR)[0].eval()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("dpo_data") / "prefs.json", make_preferences(N_RECORDS))


@pytest.fixture(scope="module")
def dpo_run(data_file, tmp_path_factory):
    """The default run (a frozen copy as reference, sigmoid loss), long enough to learn the preferences
    (read-only: copy to modify)."""
    out = tmp_path_factory.mktemp("dpo_run") / "ckpt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P.train, "answer", functools.partial(P.train.answer, max_new_tokens=ANSWER_TOKENS))
        assert train_tiny("--data", data_file, "--out", out, "--max-iters", 6, "--eval-samples", 2) == 0
    return out


@pytest.fixture(scope="module")
def precomputed_run(data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_pre") / "ckpt"
    assert train_tiny("--data", data_file, "--out", out, "--max-iters", 2, "--precompute-ref") == 0
    return out


@pytest.fixture(scope="module")
def lora_runs(data_file, tmp_path_factory):
    """(--lora, --lora --precompute-ref), both with IPO: the pair checks the IPO loss too. Returns the two
    checkpoints and the base fingerprint of the live policy at every save of the first run."""
    root = tmp_path_factory.mktemp("dpo_lora")
    flags = ["--data", data_file, "--max-iters", 2, "--lora", "--loss", "ipo", "--beta", IPO_BETA]
    fingerprints = []
    real_save = P.train.save_run

    def save_run(out, model, *args):
        fingerprints.append(P.lora.base_fingerprint(model))
        return real_save(out, model, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P.train, "save_run", save_run)
        assert train_tiny(*flags, "--out", root / "lora") == 0
    assert train_tiny(*flags, "--precompute-ref", "--out", root / "lora_pre") == 0
    return root / "lora", root / "lora_pre", fingerprints


# --- the three references -------------------------------------------------------------------------------


def test_the_three_references_give_the_same_loss_as_the_starting_model():
    """A policy that has moved away from its start (B != 0) scored against a frozen copy of the start, a
    table of the start's log-probs, and itself with the adapters off: one loss, the hand-computed one."""
    records = P.preference.check_preference_records(make_preferences(8), "test")
    pairs = P.preference.encode_pairs(records, 128, "training")
    policy = P.checkpoint.load_base("scratch", CPU, P.checkpoint.DEFAULT_DIR)[0]
    P.lora.apply_lora(policy, P.lora.LoRAConfig(dropout=0.0))  # B = 0: still the starting model
    amp = contextlib.nullcontext()
    refs = {mode: P.dpo.Reference(mode, policy, pairs, 3, CPU, amp) for mode in ("model", "precomputed")}
    with torch.no_grad():  # now the policy moves away from the reference
        gen = torch.Generator().manual_seed(0)
        for layer in P.lora.lora_layers(policy):
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=gen))
    refs["lora"] = P.dpo.Reference("lora", policy, pairs, 3, CPU, amp)
    policy.eval()
    batch = P.preference.PairLoader(pairs, batch_size=4, seed=1).next_batch()
    assert batch["index"].tolist() != [0, 1, 2, 3]  # the precomputed table is looked up by pair, not row
    chosen, rejected = P.dpo.policy_logprobs(policy, batch)
    losses = {}
    for mode, ref in refs.items():
        loss, _ = P.dpo.dpo_loss(chosen, rejected, *ref.logprobs(policy, batch), beta=0.5)
        losses[mode] = loss.item()
    again = P.dpo.policy_logprobs(policy, batch)  # the "lora" reference switched the adapters back on
    torch.testing.assert_close(again[0], chosen)

    ref_chosen, ref_rejected = P.dpo.reference_logprobs(scratch_model(), batch)  # loaded separately
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    by_hand = -F.logsigmoid(0.5 * h).mean().item()
    assert abs(by_hand - LN2) > 1e-2  # the policy is not its reference: the test can tell them apart
    for mode, loss in losses.items():
        assert loss == pytest.approx(by_hand, abs=1e-5), mode


# --- training end to end --------------------------------------------------------------------------------


def test_training_raises_the_held_out_reward_margin_and_accuracy(dpo_run):
    report = json.loads((dpo_run / "eval.json").read_text())
    training = config_of(dpo_run)["training"]
    before, after = report["before"], report["after"]
    assert before == training["before"] and after == training["after"]
    assert before["val_loss"] == pytest.approx(LN2, abs=1e-6)  # the policy starts as its reference
    assert before["val_reward_margin"] == 0.0 and before["val_reward_accuracy"] == 0.0
    assert after["val_reward_margin"] > before["val_reward_margin"] + 0.05
    assert after["val_reward_accuracy"] > before["val_reward_accuracy"]
    assert after["val_loss"] < before["val_loss"] - 0.02


def test_the_recorded_metrics_are_those_of_the_saved_policy(dpo_run, data_file):
    training = config_of(dpo_run)["training"]
    tc = P.train.TrainConfig(**training["train_config"])
    assert tc.ref == "model" and not tc.lora
    policy, _ = P.checkpoint.load_checkpoint(dpo_run)
    after = evaluate_against(policy, scratch_model(), held_out(data_file, tc.batch_size), tc)
    assert after.keys() == training["after"].keys()
    for key, value in training["after"].items():
        assert after[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert metrics_of(dpo_run)[-1] == {"step": 6, **training["after"]}


def test_eval_json_answers_the_first_held_out_prompts(dpo_run, data_file):
    report = json.loads((dpo_run / "eval.json").read_text())
    _, val = P.data.split_records(P.preference.load_preference_records(data_file)[0])
    model, _ = P.checkpoint.load_checkpoint(dpo_run)
    tokenizer = P.tokenizer.GPT2Tokenizer()
    assert len(report["responses"]) == 2  # --eval-samples
    for r, record in zip(report["responses"], val):
        assert r == {
            **{k: record[k] for k in ("instruction", "input", "chosen", "rejected")},
            "response": P.train.answer(model, tokenizer, record, CPU, ANSWER_TOKENS),
        }


def test_the_held_out_loss_at_step_0_is_ln2_for_dpo_and_the_target_squared_for_ipo(dpo_run, lora_runs):
    (step0,) = [m for m in metrics_of(dpo_run) if m["step"] == 0]
    assert step0["val_loss"] == pytest.approx(LN2, abs=1e-6)
    assert step_losses(dpo_run)[1] == pytest.approx(LN2, abs=1e-6)  # the first batch too
    lora, _, _ = lora_runs
    (step0,) = [m for m in metrics_of(lora) if m["step"] == 0]
    assert config_of(lora)["training"]["train_config"]["loss"] == "ipo"
    assert step0["val_loss"] == pytest.approx((1 / (2 * IPO_BETA)) ** 2, rel=1e-6)


def test_precomputed_reference_trains_exactly_as_the_frozen_copy(dpo_run, precomputed_run):
    assert config_of(precomputed_run)["training"]["train_config"]["ref"] == "precomputed"
    frozen, precomputed = step_losses(dpo_run), step_losses(precomputed_run)
    assert precomputed[1] == pytest.approx(frozen[1], abs=1e-6)
    # After one update the policy differs from its reference: now the reference's numbers matter.
    assert frozen[2] != pytest.approx(LN2, abs=1e-4)
    assert precomputed[2] == pytest.approx(frozen[2], abs=1e-5)


def test_lora_with_a_precomputed_reference_trains_exactly_as_with_adapters_off(lora_runs):
    lora, lora_pre, _ = lora_runs
    assert config_of(lora)["training"]["train_config"]["ref"] == "lora"
    assert config_of(lora_pre)["training"]["train_config"]["ref"] == "precomputed"
    off, precomputed = step_losses(lora), step_losses(lora_pre)
    assert precomputed[1] == pytest.approx(off[1], abs=1e-6)
    assert off[2] != pytest.approx(off[1], abs=1e-4)
    assert precomputed[2] == pytest.approx(off[2], abs=1e-5)


def test_a_lora_run_saves_an_adapter_and_leaves_the_base_frozen(lora_runs):
    lora, _, fingerprints = lora_runs
    assert (lora / "adapter.safetensors").is_file() and not (lora / "model.safetensors").exists()
    config = config_of(lora)
    assert "lora" in config and config["base"]["init_from"] == "scratch"
    start = P.lora.base_fingerprint(scratch_model())
    assert config["base"]["fingerprint"] == start
    assert fingerprints and all(f == start for f in fingerprints)  # the live policy's base, at every save
    model, _ = P.checkpoint.load_checkpoint(lora)
    assert any(layer.lora_B.abs().max() > 0 for layer in P.lora.lora_layers(model))  # the adapter learned


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0.5", "0.6"])
def test_label_smoothing_of_a_half_or_more_is_refused(data_file, tmp_path, capsys, value):
    rc = train_tiny("--data", data_file, "--out", tmp_path / "out", "--label-smoothing", value)
    assert "--label-smoothing" in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "out").exists()


def test_resume_cannot_change_beta(dpo_run, tmp_path, capsys):
    copy = shutil.copytree(dpo_run, tmp_path / "ckpt")
    before = digest(copy)
    rc = run_main(P.train, "--resume", "--beta", "0.5", "--max-iters", 100, "--out", copy)
    assert "--beta" in assert_one_line_error(capsys, rc)
    assert digest(copy) == before


SAME = {"instruction": "Say hi.", "input": "", "chosen": "Hi!", "rejected": "Hi!"}
BAD_FILES = [
    ([*make_preferences(2), {"instruction": "Say hi.", "chosen": "Hi!"}], "record 2 has no 'rejected' field"),
    ([SAME, {**SAME, "instruction": "Say hello."}], "every record has the same 'chosen' and 'rejected'"),
]


@pytest.mark.parametrize("records,message", BAD_FILES, ids=["no-rejected", "all-the-same"])
def test_bad_preference_records_end_training_with_one_line(tmp_path, capsys, records, message):
    """(A pair with two identical answers among good ones is dropped with a warning: test_project06_dpo.)"""
    rc = train_tiny("--data", write_json(tmp_path / "prefs.json", records), "--out", tmp_path / "out")
    assert message in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_named_preference_data_is_downloaded_once_and_trained_on(tmp_path, monkeypatch, capsys):
    source = write_json(tmp_path / "source.json", make_preferences(N_RECORDS, seed=4))
    saved = serve_named_file(monkeypatch, P.data, "instruction-data-with-preference", source)
    flags = ["--data", "instruction-data-with-preference", "--max-iters", 1]
    assert train_tiny(*flags, "--out", tmp_path / "out") == 0
    assert saved.read_bytes() == source.read_bytes()
    assert list(saved.parent.iterdir()) == [saved]  # no partial download left beside it
    assert f"; {N_RECORDS - 2} pairs of instruction-data-with-preference.json" in capsys.readouterr().out
    source.unlink()  # the second time, the saved file is read: no download
    records, _ = P.preference.load_preference_records("instruction-data-with-preference")
    assert records == make_preferences(N_RECORDS, seed=4)


def test_named_preference_data_with_the_wrong_sha256_is_refused(tmp_path, monkeypatch, capsys):
    source = write_json(tmp_path / "source.json", make_preferences(N_RECORDS))
    saved = serve_named_file(monkeypatch, P.data, "instruction-data-with-preference", source, "0" * 64)
    rc = train_tiny("--data", "instruction-data-with-preference", "--out", tmp_path / "out")
    assert "sha256" in assert_one_line_error(capsys, rc)
    assert not any(saved.parent.glob("*"))  # neither the file nor a partial download
    assert not (tmp_path / "out").exists()


# --- the starting model ---------------------------------------------------------------------------------


def test_init_from_an_sft_checkpoint_makes_it_the_reference(data_file, tmp_path):
    torch.manual_seed(2)
    sft = P.model.GPT(TINY_SFT).eval()
    P.checkpoint.save_checkpoint(tmp_path / "sft", sft, SFT_META)  # what project 04 saves
    assert train_tiny("--data", data_file, "--out", tmp_path / "dpo", "--init-from", tmp_path / "sft",
                      "--max-iters", 1) == 0  # fmt: skip
    config = config_of(tmp_path / "dpo")
    assert config["base"] == {
        "init_from": str((tmp_path / "sft").resolve()),
        "fingerprint": P.lora.base_fingerprint(sft),
    }
    assert config["model"] == config_of(tmp_path / "sft")["model"]
    tc = P.train.TrainConfig(**config["training"]["train_config"])
    batches = held_out(data_file, tc.batch_size)
    before = evaluate_against(sft, sft, batches, tc)  # the policy starts as its reference
    for key, value in config["training"]["before"].items():
        assert before[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    policy, _ = P.checkpoint.load_checkpoint(tmp_path / "dpo")
    after = evaluate_against(policy, sft, batches, tc)
    recorded = config["training"]["after"]
    assert after["val_reward_chosen"] == pytest.approx(recorded["val_reward_chosen"], rel=1e-5, abs=1e-6)
    assert after["val_loss"] == pytest.approx(recorded["val_loss"], rel=1e-5)
    against_scratch = evaluate_against(policy, scratch_model(), batches, tc)  # the test can tell
    assert against_scratch["val_reward_chosen"] != pytest.approx(recorded["val_reward_chosen"], abs=1e-3)


def test_auto_without_a_project04_checkpoint_falls_back_to_scratch(data_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(P.train, "BASE", tmp_path / "project04_sft")
    rc = train_tiny("--data", data_file, "--out", tmp_path / "out", "--init-from", "auto", "--max-iters", 1)
    assert rc == 0
    out = capsys.readouterr().out
    assert f"note: no checkpoint in {tmp_path / 'project04_sft'}" in out
    assert "Train project04_sft first" in out
    assert config_of(tmp_path / "out")["base"]["init_from"] == "scratch"


# --- benchmark.py ---------------------------------------------------------------------------------------


def test_benchmark_writes_the_results_schema(dpo_run, tmp_path):
    flags = ["--repeats", 1, "--warmup", 0, "--device", "cpu"]
    assert run_main(P.benchmark, "--checkpoint", dpo_run, *flags, "--out", tmp_path) == 0
    rows = read_report(tmp_path, "project06_dpo")
    training = config_of(dpo_run)["training"]
    before, after = training["before"], training["after"]
    # The same held-out pairs and the same reference as training's own evaluations.
    assert rows[("logp_accuracy", "sft")]["value"] == pytest.approx(before["val_logp_accuracy"])
    assert rows[("logp_accuracy", "dpo")]["value"] == pytest.approx(after["val_logp_accuracy"])
    assert rows[("logp_accuracy", "dpo")]["baseline"] == "sft"
    assert rows[("reward_accuracy", "dpo")]["value"] == pytest.approx(after["val_reward_accuracy"])
    assert rows[("reward_margin", "dpo")]["value"] == pytest.approx(after["val_reward_margin"], rel=1e-5)
    for mode in ("model", "precomputed", "lora"):
        step = rows[("step_ms", f"ref-{mode}")]
        assert step["unit"] == "ms" and step["value"] > 0
        assert rows[("peak_memory_mib", f"ref-{mode}")]["value"] is None  # measured on CUDA only
    for mode in ("precomputed", "lora"):  # each measured against the frozen copy, a variant of the table
        assert rows[("step_ms", f"ref-{mode}")]["baseline"] == "ref-model"
    assert "baseline" not in rows[("step_ms", "ref-model")]


def test_label_smoothing_with_ipo_is_refused(data_file, tmp_path, capsys):
    """IPO has no label-smoothing term: accepting the flag would record a setting that did nothing."""
    flags = ["--loss", "ipo", "--label-smoothing", "0.1"]
    rc = train_tiny("--data", data_file, "--out", tmp_path / "out", *flags)
    assert "--label-smoothing" in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "out").exists()
