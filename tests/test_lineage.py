"""The lineage (CONTRIBUTING.md): every project is a copy of its parent plus one idea, and says exactly what
it changed. So `diff -ru <parent> <project>` shows only the files its README's "Changes from" section names,
a fix made in one copy and not in the others fails here, and no project carries code it does not use."""

import re
import subprocess
import sys

import pytest
from conftest import PROJECTS, ROOT

CHANGES = re.compile(r"^## Changes from (project\d\d[a-z]?_\w+)\s*$", re.M)
IGNORED = {"README.md", "results", "__pycache__"}


def lineage_table() -> dict[str, str]:
    """project -> parent, from the table in CONTRIBUTING.md."""
    table = (ROOT / "CONTRIBUTING.md").read_text()
    rows = re.findall(r"^\s*\| `(project\d\d[a-z]?_\w+)` \| `(project\d\d[a-z]?_\w+)` \|", table, re.M)
    return dict(rows)


def declared_parent(project) -> tuple[str, str] | None:
    """(parent, text of the Changes section) from the project's README, or None for the root project."""
    readme = (project / "README.md").read_text()
    match = CHANGES.search(readme)
    if match is None:
        return None
    rest = readme[match.end() :]
    end = re.search(r"^## ", rest, re.M)
    return match.group(1), rest[: end.start()] if end else rest


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name not in IGNORED}


CHILDREN = [p for p in PROJECTS if not p.name.startswith("project01")]


@pytest.mark.parametrize("project", CHILDREN, ids=[p.name for p in CHILDREN])
def test_the_changes_section_names_exactly_the_files_that_differ_from_the_parent(project):
    declared = declared_parent(project)
    assert declared, f"{project.name}/README.md has no '## Changes from projectNN_name' section"
    parent_name, section = declared
    assert lineage_table().get(project.name) == parent_name, (
        "README and CONTRIBUTING.md's lineage table disagree"
    )
    parent = next(p for p in PROJECTS if p.name == parent_name)
    mine, theirs = files(project), files(parent)
    differ = {name for name in mine.keys() | theirs.keys() if mine.get(name) != theirs.get(name)}
    first_cells = re.findall(r"^\| (`[^|]*) \|", section, re.M)  # a row may name several files
    named = {name for cell in first_cells for name in re.findall(r"`([\w.]+)`", cell)}
    assert named - differ == set(), f"named but identical to {parent_name}'s copy"
    assert differ - named == set(), f"differ from {parent_name}'s copy (or added/dropped) but not named"


def test_every_project_but_the_first_has_a_parent_in_the_table():
    table = lineage_table()
    assert {p.name for p in CHILDREN} <= table.keys()
    assert all(parent < child for child, parent in table.items()), "a parent comes before its children"


@pytest.mark.parametrize("project", PROJECTS, ids=[p.name for p in PROJECTS])
def test_no_dead_code(project):
    """vulture, per project folder: a project carries only what its own scripts use (pyproject.toml lists
    the few names that frameworks call for us)."""
    cmd = [sys.executable, "-m", "vulture", ".", "--config", str(ROOT / "pyproject.toml")]
    result = subprocess.run(cmd, cwd=project, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("project", CHILDREN, ids=[p.name for p in CHILDREN])
def test_new_markers_belong_to_this_project(project):
    """A `# NEW:` line that the parent's copy of the file also has is the parent's change, not this one's."""
    parent = next(p for p in PROJECTS if p.name == declared_parent(project)[0])
    for f in project.glob("*.py"):
        if (parent / f.name).exists():
            marked = {line.strip() for line in f.read_text().splitlines() if "NEW:" in line}
            inherited = marked & {line.strip() for line in (parent / f.name).read_text().splitlines()}
            assert not inherited, f"{f.name} keeps {parent.name}'s markers: {sorted(inherited)[:2]}"
