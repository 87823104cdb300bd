"""Benchmark results, the same way in every project: a timer, the device, one row per measurement, a table on
the console and one JSON file (schema in CONTRIBUTING.md). The same file in every project.

A user's run writes to data/benchmarks/<project>/ (git-ignored): it never replaces the published results in
the project's results/ folder, which only `--publish` writes, from a real run on the device it names.
"""

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cli import HERE, PROJECT, REPO_ROOT, sync, unwritable

PUBLISHED_DIR = HERE / "results"
LOCAL_DIR = REPO_ROOT / "data" / "benchmarks" / PROJECT


def output_dir(text: str) -> Path:
    """argparse type for --out: a folder we can write, checked at once (not after minutes of measuring)."""
    path = Path(text)
    if unwritable(path):
        raise argparse.ArgumentTypeError(f"cannot write results into {path}: {unwritable(path)}")
    return path


def add_output_args(parser: argparse.ArgumentParser) -> None:
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--out", type=output_dir, default=LOCAL_DIR, help="folder for the JSON results")
    out.add_argument(
        "--publish", action="store_true", help=f"write into {PUBLISHED_DIR.relative_to(REPO_ROOT)}/ instead"
    )


def time_it(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, float | None]:
    """(median seconds of fn(), peak GPU memory in MiB) over `repeats` calls after `warmup` untimed ones,
    with the GPU synchronised around each call. The peak is None off the GPU (not measured)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak


def device_info(device: torch.device) -> dict:
    try:
        import triton  # noqa: PLC0415 - optional: not installed on macOS or Windows

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        name = "Apple MPS"
    else:
        name = _cpu_name()
    return {
        "type": device.type,
        "name": name,
        "torch": torch.__version__.split("+")[0],
        "triton": triton_version,
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def row(metric: str, variant: str, value, unit: str, baseline: tuple[str, float] | None = None, note=None):
    """One measurement. baseline = (variant, its value): adds the ratio value / baseline value."""
    r = {"metric": metric, "variant": variant, "value": value, "unit": unit}
    if value is None:
        r["note"] = note or "not measured on this device"
    elif baseline is not None and baseline[1]:
        r.update(baseline=baseline[0], ratio=value / baseline[1])
    if note and value is not None:
        r["note"] = note
    return r


def compare(metric: str, unit: str, values: dict[str, float | None]) -> list[dict]:
    """One row per variant of a metric; the first variant is the baseline the others are divided by."""
    base, base_value = next(iter(values.items()))
    return [
        row(metric, name, v, unit, None if name == base else (base, base_value)) for name, v in values.items()
    ]


def fmt(value) -> str:
    """A value for a table: thousands separators for large numbers, 4 significant digits for small ones."""
    if value is None:
        return "not measured"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"  # 0.0045x, not 0.00x


def print_table(rows: list[dict]) -> None:
    """The rows as a table; the last column: the ratio to the baseline, then the row's note (why a value is
    missing, or what a preset cannot show)."""
    cells = [(r["metric"], r["variant"], fmt(r["value"]), r["unit"],
              "  ".join(filter(None, [f"{fmt_ratio(r['ratio'])} vs {r['baseline']}" if "ratio" in r else "",
                                      r.get("note", "")])))
             for r in rows]  # fmt: skip
    header = ("metric", "variant", "value", "unit", "")
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(4)]
    print()
    for c in [header, *cells]:
        left = [c[0].ljust(widths[0]), c[1].ljust(widths[1]), c[2].rjust(widths[2]), c[3].ljust(widths[3])]
        print("  ".join([*left, c[4]]).rstrip())


def _portable(value):
    """A path as a results file records it: relative to the repository when inside it (no home folders)."""
    inside = isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(REPO_ROOT)
    return os.path.relpath(value, REPO_ROOT) if inside else value


def write_report(
    args, title: str, device: torch.device, preset: str, default_preset: str, config: dict, rows: list[dict]
) -> Path | None:
    """results/<device>[-<preset>].json: the schema every project's benchmark writes. A run cut short
    (config["cut_short"]) that measured nothing writes nothing, and one that measured something never
    replaces a complete result: it goes beside it, as <name>-cut-short.json, and says so."""
    if config.get("cut_short") and not rows:
        print("\nstopped before anything was measured: nothing written", file=sys.stderr)
        return None
    info = device_info(device)
    report = {
        "schema": 1,
        "project": PROJECT,
        "title": title,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": info,
        "preset": preset,
        "config": {k: _portable(v) for k, v in config.items()},
        "rows": rows,
    }
    name = re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")
    name += "" if preset == default_preset else f"-{preset}"
    folder = PUBLISHED_DIR if args.publish else args.out
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    if config.get("cut_short") and _complete(path):
        print(f"note: {path} holds a complete run; this one, cut short, goes beside it", file=sys.stderr)
        path = path.with_name(f"{name}-cut-short.json")
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {path}")
    return path


def _complete(path: Path) -> bool:
    """Whether a results file is there and was not cut short (one unreadable is no complete result)."""
    try:
        return not json.loads(path.read_text())["config"].get("cut_short")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
