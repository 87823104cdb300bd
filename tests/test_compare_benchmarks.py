"""compare_benchmarks.py reads every project's results/*.json into one table and an optional chart."""

import importlib.util
import json

from conftest import ROOT

spec = importlib.util.spec_from_file_location("compare_benchmarks", ROOT / "compare_benchmarks.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def write_report(root, project, device, rows):
    folder = root / "phase01_foundation" / project / "results"
    folder.mkdir(parents=True, exist_ok=True)
    info = {"type": device[0], "name": device[1], "torch": "2.13.0", "triton": None, "python": "3.11"}
    report = {"schema": 1, "project": project, "title": "t", "date": "2026-11-22T00:00:00Z", "device": info,
              "preset": "default", "config": {}, "rows": rows}  # fmt: skip
    (folder / f"{device[1].lower()}.json").write_text(json.dumps(report))


def test_one_table_across_projects_with_filters_and_plot(tmp_path, capsys):
    write_report(tmp_path, "project01_minimal_gpt", ("cpu", "EPYC"), [
        {"metric": "train_tok_per_s", "variant": "explicit attention", "value": 1234.5, "unit": "tok/s"},
        {"metric": "peak_train_memory_mb", "variant": "explicit attention", "value": None, "unit": "MiB"},
    ])  # fmt: skip
    write_report(tmp_path, "project02_tokenizer", ("cuda", "H100"), [
        {"metric": "train_tok_per_s", "variant": "bpe", "value": 9000.0, "unit": "tok/s",
         "baseline": "chars", "ratio": 2.5}])  # fmt: skip
    (tmp_path / "phase01_foundation" / "project02_tokenizer" / "results" / "broken.json").write_text("{")

    assert compare.main(["--root", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "1,234" in captured.out and "9,000" in captured.out and "not measured" in captured.out
    assert "2.50x vs chars" in captured.out
    assert "broken.json" in captured.err

    png = tmp_path / "chart.png"
    assert compare.main(["--root", str(tmp_path), "--metric", "train_tok_per_s", "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()

    assert compare.main(["--root", str(tmp_path), "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "project02_tokenizer" in out and "project01_minimal_gpt" not in out
    assert compare.main(["--root", str(tmp_path), "--metric", "nothing"]) == 2
    assert compare.main(["--root", str(tmp_path), "--plot", str(tmp_path / "no" / "x.png")]) == 2
