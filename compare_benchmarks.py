"""One table of benchmark results across projects: every project's published results/*.json, and the runs you
made yourself (data/benchmarks/<project>/*.json, where benchmark.py writes unless given --publish).

python compare_benchmarks.py --metric train_tok_per_s            # training speed, project by project
python compare_benchmarks.py --metric decode_tok_per_s --device cpu
python compare_benchmarks.py --metric train_tok_per_s --plot tok_s.png
python compare_benchmarks.py                                     # everything, grouped by metric

Metric names are shared by every benchmark (CONTRIBUTING.md lists them), so a metric's rows compare across
projects: the same quantity, in the same unit.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
COLUMNS = ("metric", "project", "variant", "value", "unit", "vs baseline", "device", "preset", "source")


def load_results(root: Path = ROOT) -> list[dict]:
    """Every row of every results file, flattened, with its project, device, preset and source attached."""
    rows = []
    sources = [(p, "published") for p in sorted(root.glob("phase*/project*/results/*.json"))]
    sources += [(p, "yours") for p in sorted(root.glob("data/benchmarks/*/*.json"))]
    for path, source in sources:
        try:
            report = json.loads(path.read_text())
            device = report["device"]
            for row in report["rows"]:
                rows.append(
                    {
                        "project": report["project"],
                        "device": device["name"],
                        "device_type": device["type"],
                        "preset": report.get("preset", ""),
                        "source": source,
                        **row,
                    }
                )
        except (ValueError, KeyError, TypeError) as e:
            print(f"warning: skipping {path.relative_to(root)}: not a results file ({e})", file=sys.stderr)
    return rows


def select(
    rows: list[dict], metric: str | None, device: str | None, project: str | None, preset: str | None = None
) -> list[dict]:
    def keep(r):
        return (
            (metric is None or r["metric"] == metric)
            and (device is None or device.lower() in (r["device"].lower(), r["device_type"]))
            and (project is None or project in r["project"])
            and (preset is None or r["preset"] == preset)
        )

    return sorted((r for r in rows if keep(r)), key=lambda r: (r["metric"], r["project"], r["device"]))


def fmt_value(value) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"  # 0.0045x, not 0.00x


def format_table(rows: list[dict]) -> str:
    cells = [
        [
            r["metric"],
            r["project"],
            r["variant"],
            fmt_value(r["value"]),
            r.get("unit", ""),
            f"{fmt_ratio(r['ratio'])} vs {r['baseline']}" if "ratio" in r else "",
            r["device"],
            r["preset"],
            r["source"],
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(COLUMNS, *cells)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [COLUMNS, *cells]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def bar_label(row: dict) -> str:
    """What tells one row from another: the project, variant, device, preset and whose run it is (a tiny run
    and a published 124M figure are two bars, never one)."""
    return f"{row['project']} | {row['variant']} | {row['device']} | {row['preset']} | {row['source']}"


def plot(rows: list[dict], path: Path) -> None:
    """A horizontal bar per row of one metric (bar_label); rows not measured are left out."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - only --plot needs matplotlib

    rows = [r for r in rows if isinstance(r["value"], (int, float))]
    labels = [bar_label(r) for r in rows]
    if len(set(labels)) < len(labels):  # the same run read twice (a file and its copy): number the repeats
        labels = [f"{label} ({labels[:i].count(label) + 1})" if labels.count(label) > 1 else label
                  for i, label in enumerate(labels)]  # fmt: skip
    fig = Figure(figsize=(10, 0.4 * len(rows) + 1.5), dpi=120)
    ax = fig.add_subplot()
    ax.barh(labels, [r["value"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"{rows[0]['metric']} ({rows[0].get('unit', '')})")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compare benchmark results across projects.")
    p.add_argument("--metric", help="only this metric, e.g. train_tok_per_s (CONTRIBUTING.md lists them)")
    p.add_argument("--device", help="only this device type (cpu, cuda) or exact device name")
    p.add_argument("--project", help="only projects whose name contains this")
    p.add_argument("--preset", help="only runs of this preset (tiny, cpu, gpt2, ...)")
    p.add_argument("--plot", type=Path, help="also write a bar chart of --metric to this PNG")
    p.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plot and not args.metric:  # checked before anything is printed
        print("error: --plot draws one metric; choose it with --metric", file=sys.stderr)
        return 2
    if args.plot and args.plot.suffix.lower() != ".png":
        print(f"error: --plot {args.plot}: give a file name ending in .png", file=sys.stderr)
        return 2
    if args.plot and not args.plot.parent.is_dir():
        print(f"error: cannot write {args.plot}: no folder {args.plot.parent}", file=sys.stderr)
        return 2
    everything = load_results(args.root)
    if not everything:
        print(
            "error: no results yet; run a project's benchmark.py (or run_benchmarks.py) first",
            file=sys.stderr,
        )
        return 2
    known = sorted({r["metric"] for r in everything})
    if args.metric and args.metric not in known:
        print(
            f"error: no results for metric {args.metric!r}; the metrics measured are: {', '.join(known)}",
            file=sys.stderr,
        )
        return 2
    rows = select(everything, args.metric, args.device, args.project, args.preset)
    if not rows:
        print(
            "error: no results match --device/--project/--preset; drop a filter to see what there is",
            file=sys.stderr,
        )
        return 2
    print(format_table(rows))
    if args.plot:
        if not any(isinstance(r["value"], (int, float)) for r in rows):
            print(f"error: no measured values of {args.metric} to plot", file=sys.stderr)
            return 2
        plot(rows, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
