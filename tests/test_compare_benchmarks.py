"""compare_benchmarks.py reads every project's results (published and the user's own) into one table per
metric, and an optional chart."""

import importlib.util
import json

from conftest import ROOT

spec = importlib.util.spec_from_file_location("compare_benchmarks", ROOT / "compare_benchmarks.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def write_report(folder, project, device, rows, preset="default"):
    folder.mkdir(parents=True, exist_ok=True)
    info = {"type": device[0], "name": device[1], "torch": "2.13.0", "triton": None, "python": "3.11"}
    report = {"schema": 1, "project": project, "title": "t", "date": "2026-11-22T00:00:00Z", "device": info,
              "preset": preset, "config": {}, "rows": rows}  # fmt: skip
    (folder / f"{device[1].lower()}.json").write_text(json.dumps(report))


def tree(tmp_path):
    published = tmp_path / "phase01_foundation" / "project01_minimal_gpt" / "results"
    write_report(published, "project01_minimal_gpt", ("cpu", "EPYC"), [
        {"metric": "train_tok_per_s", "variant": "explicit attention", "value": 1234.5, "unit": "tok/s"},
        {"metric": "peak_memory_mib", "variant": "explicit attention", "value": None, "unit": "MiB"},
    ], preset="cpu")  # fmt: skip
    yours = tmp_path / "data" / "benchmarks" / "project03_pretrain"
    write_report(yours, "project03_pretrain", ("cuda", "H100"), [
        {"metric": "train_tok_per_s", "variant": "bf16-sdpa", "value": 9000.0, "unit": "tok/s",
         "baseline": "fp32-explicit", "ratio": 0.0045}])  # fmt: skip
    (published / "broken.json").write_text("{")
    return tmp_path


def test_one_table_per_metric_across_projects_and_sources(tmp_path, capsys):
    root = tree(tmp_path)
    assert compare.main(["--root", str(root), "--metric", "train_tok_per_s"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 4  # header, rule, one row per project
    assert "1,234" in lines[2] and "published" in lines[2] and " cpu " in lines[2]  # the preset run, named
    assert "9,000" in lines[3] and "yours" in lines[3]
    assert "0.0045x vs fp32-explicit" in lines[3]  # a small ratio keeps its digits
    assert "broken.json" in captured.err

    png = tmp_path / "chart.png"
    assert compare.main(["--root", str(root), "--metric", "train_tok_per_s", "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()
    assert compare.main(["--root", str(root), "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "project03_pretrain" in out and "project01_minimal_gpt" not in out


def test_mistakes_are_refused_before_anything_is_printed(tmp_path, capsys):
    root = tree(tmp_path)
    capsys.readouterr()
    assert compare.main(["--root", str(root), "--plot", str(tmp_path / "x.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--metric" in captured.err
    assert compare.main(["--root", str(root), "--metric", "nothing"]) == 2
    assert "peak_memory_mib, train_tok_per_s" in capsys.readouterr().err  # says which metrics there are
    assert (
        compare.main(
            ["--root", str(root), "--metric", "train_tok_per_s", "--plot", str(tmp_path / "no" / "x.png")]
        )
        == 2
    )
    assert compare.main(["--root", str(tmp_path / "empty")]) == 2
    assert "run a project's benchmark.py" in capsys.readouterr().err


def test_a_tiny_run_and_the_published_figure_are_two_bars_and_presets_filter(tmp_path, monkeypatch, capsys):
    """Project 14's published 124M row and your tiny run of the same variant on the same CPU: two labels,
    never one bar showing either; --preset keeps one of them."""
    published = tmp_path / "phase05_quantization" / "project14_ptq" / "results"
    yours = tmp_path / "data" / "benchmarks" / "project14_ptq"
    row = {"metric": "decode_tok_per_s", "variant": "int4", "unit": "tok/s"}
    write_report(published, "project14_ptq", ("cpu", "EPYC"), [{**row, "value": 7.5}], preset="default")
    write_report(yours, "project14_ptq", ("cpu", "EPYC"), [{**row, "value": 900.0}], preset="tiny")
    drawn = []
    monkeypatch.setattr(
        compare, "plot", lambda rows, path: drawn.append([compare.bar_label(r) for r in rows])
    )
    args = ["--root", str(tmp_path), "--metric", "decode_tok_per_s", "--plot", str(tmp_path / "x.png")]
    assert compare.main(args) == 0
    assert len(drawn[0]) == 2 and len(set(drawn[0])) == 2
    assert any("tiny | yours" in label for label in drawn[0]) and any(
        "published" in label for label in drawn[0]
    )
    capsys.readouterr()
    assert compare.main(["--root", str(tmp_path), "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "900" in out and "7.5" not in out
    assert compare.main(["--root", str(tmp_path), "--preset", "gpt2"]) == 2
