"""Project 04's supervised fine-tuning: the Alpaca template and its loss mask, packing checked against padding
(loss and per-example logits), the resumable loader, instruction records and the Alpaca download (through a
fake `datasets`), training from a base model (checkpoint, Hugging Face folder, fallback), eval.json, the
instruction and chat modes of generate.py, and benchmark.py. Offline: every model is a tiny one built here."""

import builtins
import functools
import json
import random
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import (
    assert_one_line_error,
    fake_datasets,
    load_project,
    make_instructions,
    project_dir,
    read_report,
    run_main,
    serve_named_file,
    tiny_trainer,
    with_flags,
    write_json,
    write_training_data,
)

P = load_project("project04_sft")
D = P.data
EOT, IGNORE = D.EOT, D.IGNORE
CPU, F32 = torch.device("cpu"), torch.float32
TINY = P.model.GPTConfig(vocab_size=50257, block_size=128, n_layer=1, n_head=2, n_embd=16)
RECORD_FIELDS = ("instruction", "input", "output")
BASE_META = {"tokenizer": {"type": "tiktoken", "name": "gpt2"}, "training": {}}  # what project 03 records
RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
    {"instruction": "Fix the grammar.", "input": "He go home.", "output": "He goes home."},
]


train_tiny = tiny_trainer("project04_sft")
generate = with_flags(P.generate, "--device", "cpu")


def tiny_gpt(seed: int = 0, **changes) -> "P.model.GPT":
    torch.manual_seed(seed)
    return P.model.GPT(replace(TINY, **changes)).eval()


def numbered_records(n: int) -> list[dict]:
    """Records that are all different, so an example can be recognised by its response."""
    return [{"instruction": f"Task {i}.", "input": "", "output": f"Answer {i}."} for i in range(n)]


def response_of(e: "D.Example") -> tuple[int, ...]:
    return tuple(e.ids[e.n_prompt :].tolist())  # response tokens and <|endoftext|>: the trained targets


def held_out_batches(data_file, block_size: int = 128, batch_size: int = 4) -> list[dict]:
    """The held-out batches train.py scores for a data file (the tiny preset's batch size)."""
    _, val = D.split_records(D.load_records(data_file)[0])
    return D.eval_batches(D.encode_examples(val, block_size, "held-out"), batch_size)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_training_data(project_dir("project04_sft"), tmp_path_factory.mktemp("sft_data") / "train")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """20 records: enough for a one-step run from a base model (18 to train on, 2 held out)."""
    return write_json(tmp_path_factory.mktemp("sft_small") / "small.json", make_instructions(20, seed=3))


ANSWER_TOKENS = 16  # eval.json's answers, cut short in tests: a 128-token answer costs seconds on a CPU


@pytest.fixture(scope="module")
def trained(data_file, tmp_path_factory):
    """One tiny fine-tuning run from scratch, shared by the tests below (read-only). A high learning rate
    makes 8 steps enough to lower the held-out loss clearly."""
    out = tmp_path_factory.mktemp("sft_run") / "ckpt"
    flags = ["--max-iters", 8, "--lr", 3e-2, "--eval-interval", 8, "--eval-samples", 3]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P.train, "answer", functools.partial(P.train.answer, max_new_tokens=ANSWER_TOKENS))
        assert train_tiny("--data", data_file, "--out", out, *flags) == 0
    return out


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    """A checkpoint of a random tiny GPT in this repository's format: its greedy answers are long and
    arbitrary, so comparing two routes to them means something."""
    out = tmp_path_factory.mktemp("sft_random") / "ckpt"
    P.checkpoint.save_checkpoint(out, tiny_gpt(seed=1), BASE_META)
    return out


@pytest.fixture
def scripted_model(monkeypatch):
    """Every model answers "Hello", then <|endoftext|>, then text that must never be shown. Returns the list
    of prompts (token ids) the model was given."""
    enc = D.gpt2_encoding()
    reply = [*enc.encode_ordinary("Hello"), EOT, *enc.encode_ordinary(" NEVER SHOWN")]
    prompts = []

    def generate_stream(self, idx, max_new_tokens, **sampling):
        prompts.append(idx[0].tolist())
        for token in reply[:max_new_tokens]:
            yield torch.tensor([[token]])

    monkeypatch.setattr(P.model.GPT, "generate_stream", generate_stream)
    return prompts


# --- template and loss mask -----------------------------------------------------------------------------


def test_format_prompt_is_the_alpaca_template():
    assert D.format_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert D.format_prompt("Add the numbers.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers."
        "\n\n### Input:\n2 and 3\n\n### Response:\n"
    )


def test_only_response_tokens_and_the_end_of_text_are_trained():
    examples = [D.encode_example(r) for r in D.check_records(RECORDS, "test")]
    batch = D.pad_batch(examples)
    x, y = batch["x"], batch["y"]
    enc = D.gpt2_encoding()
    for row, (e, r) in enumerate(zip(examples, RECORDS)):
        prompt = enc.encode_ordinary(D.format_prompt(r["instruction"], r["input"]))
        assert e.ids[: e.n_prompt].tolist() == prompt  # exactly the ids generate.py will feed
        assert enc.decode(e.ids[e.n_prompt : -1].tolist()) == r["output"] and e.ids[-1] == EOT
        n, length = e.n_prompt, len(e.ids) - 1
        assert x[row, :length].tolist() == e.ids[:-1].tolist()
        assert (y[row, : n - 1] == IGNORE).all()  # positions that predict prompt tokens
        assert y[row, n - 1] == e.ids[n]  # the last prompt position predicts the first response token
        assert y[row, :length].tolist()[n - 1 :] == e.ids[n:].tolist()  # every response token is trained
        assert y[row, length - 1] == EOT  # the last trained target: learn to stop
        assert (y[row, length:] == IGNORE).all()  # padding
    xi, yi = D.inputs_and_targets(examples[0])
    assert yi.tolist() == y[0, : len(yi)].tolist() and xi.tolist() == x[0, : len(xi)].tolist()


# --- packing --------------------------------------------------------------------------------------------


def test_packed_positions_and_mask_of_a_hand_written_row():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 1, 1, 1, 1, 1, 1, 1]])
    pos, mask = P.model.packed_positions_and_mask(segments)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]
    assert mask.shape == (2, 1, 8, 8)
    for b in range(2):
        for i in range(8):
            visible = [j for j in range(8) if j <= i and segments[b, j] == segments[b, i]]
            assert mask[b, 0, i].nonzero().flatten().tolist() == visible
    assert mask[0, 0, 4].nonzero().flatten().tolist() == [3, 4]  # example 1 sees itself only, causally


@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "explicit"])
def test_packed_rows_compute_exactly_what_each_example_computes_alone(flash):
    model = tiny_gpt(flash=flash)
    examples = [D.encode_example(r) for r in D.check_records(RECORDS, "test")]
    padded = D.pad_batch(examples)
    rows = [examples[:2], examples[2:]]
    packed = D.pack_batch(rows)
    with torch.no_grad():
        _, padded_loss = model(padded["x"], padded["y"])
        logits, packed_loss = model(packed["x"], packed["y"], packed["segments"])
        unpacked = model(packed["x"])[0]  # the same row as one sequence: examples see each other
    assert packed_loss.item() == pytest.approx(padded_loss.item(), abs=1e-5)
    for r, row in enumerate(rows):
        t = 0
        for e in row:
            n = len(e.ids) - 1
            alone = model(torch.from_numpy(e.ids[:-1])[None])[0][0]  # (n, V)
            torch.testing.assert_close(logits[r, t : t + n], alone, atol=1e-5, rtol=1e-5)
            t += n
    n0 = len(examples[0].ids) - 1
    assert not torch.allclose(unpacked[0, n0:], logits[0, n0:], atol=1e-3)  # the test can tell


def test_packed_loader_fills_rows_with_whole_examples_in_the_shuffled_order():
    # Four examples of 35, 54, 74 and 94 tokens in rows of 108 (54 + 54 fits exactly): whether the next one
    # fits depends on both lengths, and with so few examples many rows end at an epoch boundary, where the
    # loader peeks into the next epoch's order.
    block = 108
    records = [
        {"instruction": f"Task {i}.", "input": "", "output": "word " * k}
        for i, k in enumerate((1, 20, 40, 60))
    ]
    examples = D.encode_examples(D.check_records(records, "test"), block, "training")
    assert [len(e.ids) - 1 for e in examples] == [35, 54, 74, 94]
    by_inputs = {tuple(e.ids[:-1].tolist()): e for e in examples}
    loader = D.SFTLoader(examples, batch_size=4, block_size=block, pack=True, seed=0)
    rows = []  # every row's examples, in the order the loader took them
    for _ in range(6):  # about 30 examples: seven epochs
        b = loader.next_batch()
        assert b["x"].shape[1] <= block
        for x, y, seg in zip(b["x"], b["y"], b["segments"]):
            assert seg[seg >= 0].tolist() == sorted(seg[seg >= 0].tolist())  # contiguous, numbered in order
            assert (seg[(seg >= 0).sum() :] == -1).all()  # padding only at the end
            row = []
            for s in range(seg.max().item() + 1):
                here = seg == s
                e = by_inputs.get(tuple(x[here].tolist()))
                assert e is not None  # the whole example, never a piece of one
                assert y[here].tolist() == D.inputs_and_targets(e)[1].tolist()  # with its own targets
                row.append(e)
            rows.append(row)
    lengths = [[len(e.ids) - 1 for e in row] for row in rows]
    assert all(sum(n) <= block for n in lengths) and max(len(n) for n in lengths) >= 2
    for n, following in zip(lengths, lengths[1:]):
        assert sum(n) + following[0] > block  # a row ends only when the next example does not fit
    padded = D.SFTLoader(examples, batch_size=1, block_size=block, pack=False, seed=0)
    taken = [e.ids.tolist() for row in rows for e in row]
    assert [padded._take().ids.tolist() for _ in taken] == taken  # packing keeps the (seed, epoch) shuffle


# --- the loader -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_loader_resumes_the_identical_batches_across_an_epoch(pack):
    examples = [D.encode_example(r) for r in D.check_records(numbered_records(7), "test")]
    loader = D.SFTLoader(examples, batch_size=2, block_size=128, pack=pack, seed=5)
    loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(6)]  # 12+ examples: crosses into the next epochs
    assert loader.state_dict()["epoch"] >= 1
    resumed = D.SFTLoader(examples, batch_size=2, block_size=128, pack=pack, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state is plain data
    for want in expected:
        got = resumed.next_batch()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_loader_order_follows_the_seed_and_covers_every_example_once_per_epoch():
    examples = [D.encode_example(r) for r in D.check_records(numbered_records(10), "test")]

    def taken(seed: int, n_batches: int) -> list[tuple]:
        loader = D.SFTLoader(examples, batch_size=4, block_size=128, pack=False, seed=seed)
        batches = [loader.next_batch()["y"] for _ in range(n_batches)]
        return [tuple(y[y != IGNORE].tolist()) for b in batches for y in b]

    first = taken(seed=1, n_batches=5)  # 20 examples: two epochs of 10
    assert sorted(first[:10]) == sorted(response_of(e) for e in examples)
    assert sorted(first[10:]) == sorted(first[:10]) and first[10:] != first[:10]  # reshuffled
    assert taken(seed=1, n_batches=5) == first
    assert taken(seed=2, n_batches=3) != first[:12]


def test_eval_batches_score_every_held_out_example_once_in_order():
    examples = [D.encode_example(r) for r in D.check_records(numbered_records(5), "test")]
    batches = D.eval_batches(examples, batch_size=2)
    assert [b["x"].shape[0] for b in batches] == [2, 2, 1]
    seen = [tuple(y[y != IGNORE].tolist()) for b in batches for y in b["y"]]
    assert seen == [response_of(e) for e in examples]


# --- records --------------------------------------------------------------------------------------------

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi!"}


@pytest.mark.parametrize(
    "content,message",
    [
        (json.dumps([GOOD, {"instruction": "Say hi."}]), r"record 1 has no 'output' field"),
        (json.dumps([{**GOOD, "output": "  "}]), r"record 0 has an empty or non-text 'output'"),
        (json.dumps([GOOD, GOOD, "Say hi."]), r"record 2 is not a JSON object"),
        (json.dumps([GOOD, {**GOOD, "input": 3}]), r"record 1 has a non-text 'input'"),
        ("", r"is empty"),
        ("[]", r"holds no records"),
        ('[{"instruction": "Say hi.", "output": "Hi!"', r"neither a JSON list nor JSON Lines \(line 1"),
    ],
    ids=["no-output", "empty-output", "not-object", "bad-input", "empty-file", "no-records", "bad-json"],
)
def test_bad_records_name_the_problem(tmp_path, content, message):
    path = tmp_path / "records.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(P.cli.UserError, match=message):
        D.load_records(path)


def test_a_bad_record_ends_training_with_one_line(tmp_path, capsys):
    bad = write_json(tmp_path / "bad.json", [GOOD, {"instruction": "Say hi.", "input": ""}])
    rc = train_tiny("--data", bad, "--out", tmp_path / "out")
    assert "record 1 has no 'output' field" in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_jsonl_gives_the_same_records_as_json(tmp_path):
    records = [{k: v for k, v in r.items() if v} for r in RECORDS]  # record 0 has no "input" at all
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    from_jsonl, name = D.load_records(jsonl)
    from_json, _ = D.load_records(write_json(tmp_path / "records.json", records))
    assert name == "records.jsonl" and from_jsonl == from_json == RECORDS  # "input" filled in as ""


def test_held_out_split_is_fixed_and_disjoint():
    records = numbered_records(50)
    random.seed(1)
    train, val = D.split_records(records)
    random.seed(2)  # what --seed sets: the split must not follow it
    assert D.split_records(records) == (train, val)
    assert len(val) == 5 and len(train) == 45
    assert sorted(r["output"] for r in train + val) == sorted(r["output"] for r in records)  # disjoint
    assert val != records[-5:]  # shuffled, not the file's tail
    with pytest.raises(P.cli.UserError, match="at least 2 records"):
        D.split_records(records[:1])


def test_records_longer_than_the_context_are_dropped_with_a_warning(tmp_path, capsys):
    long = {**GOOD, "output": "word " * 200}
    examples = D.encode_examples(D.check_records([GOOD, long, GOOD], "test"), 128, "training")
    assert len(examples) == 2 and all(len(e.ids) - 1 <= 128 for e in examples)
    assert "dropped 1 of 3 training records longer than the context (128 tokens)" in capsys.readouterr().out
    path = write_json(tmp_path / "long.json", [long] * 4)
    rc = train_tiny("--data", path, "--out", tmp_path / "out")
    assert "longer than the model's context" in assert_one_line_error(capsys, rc)


# --- the Alpaca download --------------------------------------------------------------------------------

ALPACA_ROWS = [
    {"instruction": "Give a tip.", "input": "", "output": "Sleep well.", "text": "the whole prompt ..."},
    {"instruction": "Translate.", "input": "Bonjour", "output": "Hello.", "text": "..."},
]


def test_alpaca_download_maps_the_fields_and_is_saved_once(tmp_path, monkeypatch):
    calls = fake_datasets(monkeypatch, lambda *args, **kwargs: ALPACA_ROWS)
    monkeypatch.setattr(D, "ALPACA_FILE", tmp_path / "alpaca" / "alpaca.json")
    records, name = D.load_records(None)
    assert [(args, kwargs["split"]) for args, kwargs in calls] == [(("tatsu-lab/alpaca",), "train")]
    assert name == "alpaca.json"
    expected = [{k: r[k] for k in RECORD_FIELDS} for r in ALPACA_ROWS]
    assert records == expected
    assert json.loads((tmp_path / "alpaca" / "alpaca.json").read_text()) == expected
    assert D.load_records(None)[0] == expected and len(calls) == 1  # read from the file the second time


def test_failed_alpaca_download_says_use_data(tmp_path, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("no network")

    fake_datasets(monkeypatch, load_dataset)
    monkeypatch.setattr(D, "ALPACA_FILE", tmp_path / "alpaca" / "alpaca.json")
    with pytest.raises(P.cli.UserError, match="tatsu-lab/alpaca") as err:
        D.load_records(None)
    assert "--data" in str(err.value) and "no network" in str(err.value)
    assert not (tmp_path / "alpaca").exists()  # nothing half-written


def test_named_data_is_downloaded_once_and_trained_on(tmp_path, monkeypatch, capsys):
    source = write_json(tmp_path / "source.json", make_instructions(20, seed=4))
    saved = serve_named_file(monkeypatch, D, "instruction-data", source)
    flags = ["--max-iters", 1, "--eval-samples", 0]
    assert train_tiny("--data", "instruction-data", "--out", tmp_path / "out", *flags) == 0
    assert saved.read_bytes() == source.read_bytes()
    assert list(saved.parent.iterdir()) == [saved]  # no partial download left beside it
    assert "on 18 records of instruction-data.json" in capsys.readouterr().out  # 20, 2 held out
    source.unlink()  # the second time, the saved file is read: no download
    assert D.load_records("instruction-data") == (make_instructions(20, seed=4), "instruction-data.json")


def test_named_data_with_the_wrong_sha256_is_refused(tmp_path, monkeypatch, capsys):
    source = write_json(tmp_path / "source.json", make_instructions(20, seed=4))
    saved = serve_named_file(monkeypatch, D, "instruction-data", source, sha256="0" * 64)
    rc = train_tiny("--data", "instruction-data", "--out", tmp_path / "out")
    assert "sha256" in assert_one_line_error(capsys, rc)
    assert not any(saved.parent.glob("*"))  # neither the file nor a partial download
    assert not (tmp_path / "out").exists()


# --- training from a base model -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["checkpoint", "hf"])
def test_fine_tuning_starts_from_the_base_weights(fmt, small_data, tmp_path, monkeypatch):
    base = tiny_gpt(seed=2)
    if fmt == "checkpoint":  # project 03's format: this repository's checkpoint with tiktoken's tokens
        P.checkpoint.save_checkpoint(tmp_path / "base", base, BASE_META)
    else:
        load_project("project03_pretrain").hf.save_hf_dir(base, tmp_path / "base")  # 03's GPT: the same model
    monkeypatch.chdir(tmp_path)  # a relative --init-from is recorded as an absolute path
    flags = ["--max-iters", 1, "--eval-samples", 0]
    assert train_tiny("--data", small_data, "--out", "sft", "--init-from", "base", *flags) == 0
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert config["training"]["init_from"] == str((tmp_path / "base").resolve())
    assert [config["model"][k] for k in ("n_layer", "n_embd", "block_size")] == [1, 16, 128]  # the base's
    expected = P.train.response_loss(base, held_out_batches(small_data), CPU, F32)
    assert config["training"]["val_loss_before"] == pytest.approx(expected, rel=1e-6)


def test_a_base_with_a_smaller_vocabulary_is_refused(small_data, tmp_path, capsys):
    """GPT-2's token ids cannot be embedded by a 100-row table: one line, not an IndexError."""
    load_project("project03_pretrain").hf.save_hf_dir(tiny_gpt(vocab_size=100), tmp_path / "hf")
    rc = train_tiny("--data", small_data, "--out", tmp_path / "o", "--init-from", tmp_path / "hf")
    assert "vocabulary of 100 tokens" in assert_one_line_error(capsys, rc)
    rc = generate("--init-from", tmp_path / "hf", "--instruction", "Say hi.")
    assert "vocabulary of 100 tokens" in assert_one_line_error(capsys, rc)


def test_init_from_nowhere_is_one_line(small_data, tmp_path, capsys):
    rc = train_tiny("--data", small_data, "--out", tmp_path / "out", "--init-from", tmp_path / "nowhere")
    line = assert_one_line_error(capsys, rc)
    assert "--init-from" in line and "nowhere" in line
    assert not (tmp_path / "out").exists()


def test_auto_without_a_project03_checkpoint_falls_back_to_scratch(small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(P.train, "BASE", tmp_path / "project03_pretrain")
    flags = ["--init-from", "auto", "--max-iters", 1, "--eval-samples", 0]
    rc = train_tiny("--data", small_data, "--out", tmp_path / "out", *flags)
    assert rc == 0
    assert f"note: no checkpoint in {tmp_path / 'project03_pretrain'}" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["training"]["init_from"] == "scratch"
    scratch = P.checkpoint.SCRATCH_MODEL
    assert (config["model"]["n_embd"], config["model"]["block_size"]) == (scratch.n_embd, scratch.block_size)


# --- after training: eval.json --------------------------------------------------------------------------


def test_training_lowers_the_held_out_response_loss(trained, data_file):
    report = json.loads((trained / "eval.json").read_text())
    training = json.loads((trained / "config.json").read_text())["training"]
    assert report["val_loss_before"] == training["val_loss_before"]
    assert report["val_loss_after"] == training["val_loss"]
    # From ln(50257) = 10.8 nats: 8 steps learn at least which tokens answers are made of.
    assert report["val_loss_after"] < report["val_loss_before"] - 1.0
    model, _ = P.checkpoint.load_checkpoint(trained)
    after = P.train.response_loss(model, held_out_batches(data_file), CPU, F32)
    assert after == pytest.approx(report["val_loss_after"], rel=1e-5)  # measured on the saved weights


def test_eval_json_answers_the_first_held_out_records_greedily(trained, data_file):
    report = json.loads((trained / "eval.json").read_text())
    _, val = D.split_records(D.load_records(data_file)[0])
    model, _ = P.checkpoint.load_checkpoint(trained)
    tokenizer = P.tokenizer.GPT2Tokenizer()
    assert len(report["responses"]) == 3  # --eval-samples
    for r, record in zip(report["responses"], val):
        assert set(r) == {"instruction", "input", "reference", "response"}
        assert [r["instruction"], r["input"], r["reference"]] == [record[k] for k in RECORD_FIELDS]
        assert r["response"] == P.train.answer(model, tokenizer, record, CPU, ANSWER_TOKENS)


def test_evaluation_answers_without_dropout(monkeypatch):
    """eval.json's answers come from the model as generate.py sees it (eval mode), and training goes on with
    dropout afterwards."""
    model = tiny_gpt(dropout=0.5).train()
    modes = []
    monkeypatch.setattr(P.train, "answer", lambda m, *args, **kwargs: modes.append(m.training) or "answer")
    meta = {"training": {"val_loss_before": 2.0, "val_loss": 1.0}}
    tc = replace(P.train.PRESETS["tiny"], eval_samples=2)
    report = json.loads(P.train.evaluation(model, D.check_records(RECORDS, "test"), meta, tc, CPU))
    assert modes == [False, False] and model.training
    assert [r["response"] for r in report["responses"]] == ["answer", "answer"]


# --- generate.py ----------------------------------------------------------------------------------------


def test_generation_stops_at_end_of_text(random_ckpt, scripted_model, capsys):
    rc = generate("--checkpoint", random_ckpt, "--instruction", "Say hi.")
    assert rc == 0 and capsys.readouterr().out == "Hello\n"  # the instruction's answer alone, then a newline
    assert scripted_model == [D.gpt2_encoding().encode_ordinary(D.format_prompt("Say hi."))]
    assert generate("--checkpoint", random_ckpt, "--prompt", "Once", "--num-samples", 2) == 0
    assert capsys.readouterr().out == "--- sample 1 ---\nOnceHello\n--- sample 2 ---\nOnceHello\n"


def test_instruction_output_is_the_greedy_answer(random_ckpt, capsys):
    model, _ = P.checkpoint.load_checkpoint(random_ckpt)
    record = {"instruction": "Add the numbers.", "input": "2 and 3"}
    expected = P.train.answer(model, P.tokenizer.GPT2Tokenizer(), record, CPU, max_new_tokens=8)
    assert len(expected) > 8  # a random model rambles on: eight tokens of something
    flags = ["--instruction", record["instruction"], "--input", record["input"], "--temperature", 0]
    rc = generate("--checkpoint", random_ckpt, *flags, "--max-new-tokens", 8)
    assert rc == 0 and capsys.readouterr().out == expected + "\n"


def test_prompt_and_instruction_together_are_refused(random_ckpt, capsys):
    rc = generate("--checkpoint", random_ckpt, "--prompt", "Once", "--instruction", "Say hi.")
    assert "--prompt" in assert_one_line_error(capsys, rc)


def test_fit_history_drops_the_oldest_turns_first():
    tokenizer = P.tokenizer.GPT2Tokenizer()
    turns = [("Say hi.", "Hi!"), ("Name a colour.", "Blue."), ("Add 2 and 3.", "5.")]

    def text(kept, instruction):
        return "".join(D.format_prompt(q) + a + "\n\n" for q, a in kept) + D.format_prompt(instruction)

    def n_tokens(kept):
        return len(tokenizer.encode(text(kept, "Spell 'cat'.")))

    assert n_tokens(turns[1:]) < n_tokens(turns)
    budget = n_tokens(turns[1:])  # the last two turns fit, all three do not
    kept = list(turns)
    ids = P.generate.fit_history(tokenizer, kept, "Spell 'cat'.", budget)
    assert ids == tokenizer.encode(text(turns[1:], "Spell 'cat'.")) and kept == turns[1:]
    kept = list(turns)
    ids = P.generate.fit_history(tokenizer, kept, "Spell 'cat'.", budget=5)  # nothing fits but the question
    assert ids == tokenizer.encode(D.format_prompt("Spell 'cat'.")) and kept == []
    everything = tokenizer.encode(text(turns, "Spell 'cat'."))
    assert P.generate.fit_history(tokenizer, list(turns), "Spell 'cat'.", budget=10_000) == everything


def test_interactive_chat_keeps_the_conversation(random_ckpt, scripted_model, monkeypatch, capsys):
    lines = iter(["Say hi.", "", "Name a colour."])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None  # Ctrl-D

    monkeypatch.setattr(builtins, "input", fake_input)
    rc = generate("--checkpoint", random_ckpt, "--interactive", "--max-new-tokens", 8)
    assert rc == 0
    assert capsys.readouterr().out == "Hello\nHello\n"  # two answers; the empty line is skipped
    enc = D.gpt2_encoding()
    assert len(scripted_model) == 2
    assert enc.decode(scripted_model[1]) == (
        D.format_prompt("Say hi.") + "Hello\n\n" + D.format_prompt("Name a colour.")
    )  # the first turn and its answer stay in the context


# --- benchmark.py ---------------------------------------------------------------------------------------


def test_real_tokens_counts_the_tokens_of_the_examples():
    examples = [D.encode_example(r) for r in D.check_records(RECORDS, "test")]
    n_real = sum(len(e.ids) - 1 for e in examples)
    padded = D.pad_batch(examples)
    assert padded["x"].numel() > n_real  # there is padding to leave out
    assert P.benchmark.real_tokens(padded) == n_real
    assert P.benchmark.real_tokens(D.pack_batch([examples[:2], examples[2:]])) == n_real


def test_benchmark_writes_the_results_schema(trained, tmp_path, capsys):
    flags = ["--repeats", 1, "--warmup", 0, "--device", "cpu"]
    rc = run_main(P.benchmark, "--checkpoint", trained, *flags, "--out", tmp_path)
    assert rc == 0
    rows = read_report(tmp_path, "project04_sft")
    base, tuned = rows[("val_loss", "base")], rows[("val_loss", "fine-tuned")]
    assert tuned["value"] < base["value"] and tuned["baseline"] == "base"
    assert tuned["ratio"] == pytest.approx(tuned["value"] / base["value"], abs=1e-3)
    padded, packed = rows[("padding_percent", "padded")], rows[("padding_percent", "packed")]
    assert 0 <= packed["value"] < padded["value"] < 100  # packing spends less compute on padding
    assert rows[("peak_memory_mib", "padded")]["value"] is None  # measured on CUDA only, said so
    training = json.loads((trained / "config.json").read_text())["training"]
    assert tuned["value"] == pytest.approx(training["val_loss"], rel=1e-5)  # the same held-out tokens


# --- review fixes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", [["--lr", "0.1"], ["--batch-size", "2"], ["--seed", "3"], ["--pack"]])
def test_resume_refuses_flags_that_would_change_the_run(trained, tmp_path, capsys, flag):
    copy = shutil.copytree(trained, tmp_path / "ckpt")
    rc = train_tiny("--resume", "--max-iters", 20, "--out", copy, *flag)
    assert flag[0] in assert_one_line_error(capsys, rc)


@pytest.mark.parametrize(
    "flags", [["--instruction", "  "], ["--interactive", "--prompt", "hi"], ["--interactive", "--input", "x"]]
)
def test_generate_refuses_input_it_would_ignore(random_ckpt, capsys, flags):
    rc = generate("--checkpoint", random_ckpt, *flags)
    assert flags[0] in assert_one_line_error(capsys, rc)


def test_a_project01_checkpoint_is_refused_for_its_tokenizer_not_called_corrupt(small_data, tmp_path, capsys):
    """Its weights do not fit this GPT either; the reason to give is the tokenizer, checked first."""
    p01 = load_project("project01_minimal_gpt")
    small = p01.model.GPT(p01.model.GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=8))
    meta = {"tokenizer": {"type": "char", "chars": "ab"}, "training": {}}
    p01.checkpoint.save_checkpoint(tmp_path / "p01", small, meta)
    rc = generate("--checkpoint", tmp_path / "p01")
    assert "holds a project01_minimal_gpt checkpoint" in assert_one_line_error(capsys, rc)
    rc = train_tiny("--data", small_data, "--init-from", tmp_path / "p01", "--out", tmp_path / "o")
    assert "project01_minimal_gpt/generate.py" in assert_one_line_error(capsys, rc)
