"""results.py, the helper every benchmark shares (byte-identical in every project: test_lineage.py): a run cut
short that measured nothing writes nothing, and one that measured something never replaces a complete
result, going beside it instead."""

import json
from types import SimpleNamespace

import torch
from conftest import load_project

R = load_project("project08_kv_cache").results
ROW = {"metric": "decode_tok_per_s", "variant": "kv cache", "value": 1.0, "unit": "tok/s"}


def report(tmp_path, rows, **config):
    args = SimpleNamespace(publish=False, out=tmp_path)
    return R.write_report(args, "test", torch.device("cpu"), "tiny", "gpt2", config, rows)


def test_a_run_stopped_before_measuring_anything_writes_nothing(tmp_path, capsys):
    assert report(tmp_path, [], cut_short=True) is None
    assert list(tmp_path.iterdir()) == [] and "nothing written" in capsys.readouterr().err


def test_a_run_cut_short_never_replaces_a_complete_result(tmp_path, capsys):
    complete = report(tmp_path, [ROW], cut_short=False)
    before = complete.read_text()
    partial = report(tmp_path, [ROW], cut_short=True)
    assert complete.read_text() == before and partial.name == complete.stem + "-cut-short.json"
    assert "complete run" in capsys.readouterr().err
    assert report(tmp_path, [ROW], cut_short=True) == partial  # a partial result may replace a partial one
    again = report(tmp_path, [ROW])  # a complete run replaces the complete result, as always
    assert again == complete and json.loads(again.read_text())["rows"] == [ROW]
