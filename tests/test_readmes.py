"""Every README's commands run in order as typed: each script that reads a checkpoint finds one that an
earlier command wrote (its --out, or the project's default folder); no command names a file users lack."""

import contextlib
import io
import re
import shlex
import shutil

import pytest
from conftest import PROJECTS, ROOT, load_project, run_main

READMES = [ROOT / "README.md", *(p / "README.md" for p in PROJECTS)]


def commands(readme) -> list[list[str]]:
    """The `python ...` lines of the README's bash blocks, as argument lists (comments and \\ continuations
    handled as a shell would)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            lines += [words] if words[:1] == ["python"] and len(words) > 1 else []
    return lines


def flag(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


@pytest.mark.parametrize("readme", READMES, ids=[r.parent.name for r in READMES])
def test_commands_find_what_the_commands_before_them_wrote(readme):
    written: dict[
        str, set[str]
    ] = {}  # project folder -> checkpoint folders written so far ("" = the default)
    for words in commands(readme):
        script = words[1]
        folder = script.rsplit("/", 1)[0] if "/" in script else readme.parent.name
        project = folder.rsplit("/", 1)[-1]
        name = script.rsplit("/", 1)[-1]
        if name in ("train.py", "quantize.py", "prune.py") and "--resume" not in words:
            out = flag(words, "--out") or ""
            assert out not in written.get(project, set()) or "--overwrite" in words, (
                f"{' '.join(words)}: --out {out or '(default)'} already holds an earlier command's checkpoint"
            )
            written.setdefault(project, set()).add(out)
        elif name in ("generate.py", "benchmark.py", "merge.py") and "--init-from" not in words:
            ckpt = flag(words, "--checkpoint") or ""
            needs_one = name != "benchmark.py" or ckpt  # a benchmark without a checkpoint says "not measured"
            if needs_one and project.startswith("project"):
                assert ckpt in written.get(project, set()), (
                    f"{' '.join(words)}: no earlier command wrote {ckpt or 'the default checkpoint'}"
                )


@pytest.mark.parametrize("readme", READMES, ids=[r.parent.name for r in READMES])
def test_no_command_names_a_file_users_do_not_have(readme):
    text = readme.read_text()
    assert "../shared" not in text
    for words in commands(readme):
        data = flag(words, "--data")
        assert data is None or not data.startswith("/"), f"{' '.join(words)}: a path on someone's machine"


def shell_lines(readme) -> list[str]:
    """Every line of the README's bash blocks, continuations joined, comments kept out."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S):
        lines += [
            line for line in block.replace("\\\n", " ").splitlines() if shlex.split(line, comments=True)
        ]
    return lines


@pytest.mark.parametrize("readme", READMES, ids=[r.parent.name for r in READMES])
def test_every_file_a_command_reads_is_made_by_an_earlier_command(readme):
    """--prompt-file and $(cat FILE) read files: an earlier line writes them (`> FILE`), or they are the
    reader's own text file, input.txt (any text file, as each README says)."""
    made = {"input.txt"}
    for line in shell_lines(readme):
        read = re.findall(r"--prompt-file\s+(\S+)", line) + re.findall(
            r"\$\((?:cat|head[^)]*?)\s+(\S+?)\)", line
        )
        missing = [f for f in read if f not in made]
        assert not missing, f"{line}: reads {missing}, which no earlier command writes"
        made.update(re.findall(r">\s*(\S+)\s*(?:#.*)?$", line))


PROMPT_FILE_READMES = [r for r in READMES if "--prompt-file" in r.read_text() and r.parent != ROOT]


@pytest.mark.parametrize("readme", PROMPT_FILE_READMES, ids=[r.parent.name for r in PROMPT_FILE_READMES])
def test_the_prompt_file_commands_fit_the_tiny_model_they_use(readme, tiny_runs, tmp_path, monkeypatch):
    """The README's commands that serve a prompt file, run as written on the tiny checkpoint they name (its
    train.py line is the contract's tiny run), the files they read made as the README makes them."""
    project = readme.parent.name
    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_runs.data(project), tmp_path / "input.txt")
    for line in shell_lines(readme):
        words = shlex.split(line, comments=True)
        if words[0] == "printf":  # printf '...' > FILE
            target = re.search(r">\s*(\S+)", line).group(1)
            (tmp_path / target).write_text(words[1].encode().decode("unicode_escape"))
        elif words[:1] == ["python"] and words[1].endswith("generate.py") and "--prompt-file" in words:
            args = [
                tiny_runs.checkpoint(project) if w == flag(words, "--checkpoint") else w for w in words[2:]
            ]
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert run_main(load_project(project).generate, *args, "--device", "cpu") == 0, line
            assert out.getvalue().strip()


def test_no_two_readmes_train_into_the_same_folder():
    """A reader follows READMEs one after another: one project's commands must never write (or find) the
    checkpoint another project's commands made."""
    owners: dict[str, str] = {}
    for readme in READMES:
        for words in commands(readme):
            out = flag(words, "--out")
            if (
                out
                and out.startswith("data/models/")
                and words[1].rsplit("/", 1)[-1] in ("train.py", "quantize.py", "prune.py")
            ):
                assert owners.setdefault(out, readme.parent.name) == readme.parent.name, (
                    f"{readme.parent.name} and {owners[out]} both write {out}"
                )
