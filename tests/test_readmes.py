"""Every README's commands run in order as typed: each script that reads a checkpoint finds one that an
earlier command wrote (its --out, or the project's default folder); no command names a file users lack."""

import re
import shlex

import pytest
from conftest import PROJECTS, ROOT

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
        if name in ("train.py", "quantize.py") and "--resume" not in words:
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
