"""One table of every benchmark result in the repository: phase*/project*/results/*.json.

python compare_benchmarks.py                         # everything
python compare_benchmarks.py --metric train_tok_per_s --device cuda
python compare_benchmarks.py --metric train_tok_per_s --plot results.png
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
COLUMNS = ("project", "device", "preset", "metric", "variant", "value", "unit", "vs baseline")


def load_results(root: Path = ROOT) -> list[dict]:
    """Every row of every results file, flattened, with its project, device and preset attached."""
    rows = []
    for path in sorted(root.glob("phase*/project*/results/*.json")):
        try:
            report = json.loads(path.read_text())
            for row in report["rows"]:
                rows.append({"project": report["project"], "device": report["device"]["name"],
                             "device_type": report["device"]["type"], "preset": report.get("preset", ""),
                             "date": report.get("date", ""), **row})  # fmt: skip
        except (ValueError, KeyError, TypeError) as e:
            print(f"warning: skipping {path.relative_to(root)}: not a results file ({e})", file=sys.stderr)
    return rows


def select(rows: list[dict], metric: str | None, device: str | None, project: str | None) -> list[dict]:
    def keep(r):
        return ((metric is None or r["metric"] == metric)
                and (device is None or device.lower() in (r["device"].lower(), r["device_type"]))
                and (project is None or project in r["project"]))  # fmt: skip

    return [r for r in rows if keep(r)]


def fmt_value(value) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float) and abs(value) < 1000:
        return f"{value:.4g}"
    return f"{value:,.0f}"


def format_table(rows: list[dict]) -> str:
    cells = [[r["project"], r["device"], r["preset"], r["metric"], r["variant"], fmt_value(r["value"]),
              r.get("unit", ""), f"{r['ratio']:.2f}x vs {r['baseline']}" if "ratio" in r else ""]
             for r in rows]  # fmt: skip
    widths = [max(len(str(c)) for c in col) for col in zip(COLUMNS, *cells)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [COLUMNS, *cells]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """A horizontal bar per (project, variant, device) for one metric."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - only --plot needs matplotlib

    rows = [r for r in rows if r["value"] is not None]
    metrics = {r["metric"] for r in rows}
    if len(metrics) != 1:
        print(
            f"error: --plot needs exactly one metric (choose with --metric); found {len(metrics)}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    labels = [f"{r['project']} | {r['variant']} | {r['device']}" for r in rows]
    fig = Figure(figsize=(10, 0.4 * len(rows) + 1.5), dpi=120)
    ax = fig.add_subplot()
    ax.barh(labels, [r["value"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"{rows[0]['metric']} ({rows[0].get('unit', '')})")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compare benchmark results across projects.")
    p.add_argument("--metric", help="only this metric, e.g. train_tok_per_s")
    p.add_argument("--device", help="only this device type (cpu, cuda) or exact device name")
    p.add_argument("--project", help="only projects whose name contains this")
    p.add_argument("--plot", type=Path, help="also write a bar chart of the (single) metric to this PNG")
    p.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rows = select(load_results(args.root), args.metric, args.device, args.project)
    if not rows:
        print("no results match; run a project's benchmark.py first", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.plot:
        if not args.plot.parent.is_dir():
            print(f"error: cannot write {args.plot}: no folder {args.plot.parent}", file=sys.stderr)
            return 2
        plot(rows, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
