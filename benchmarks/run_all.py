"""Run every benchmark, then render the results as Markdown tables and a PNG plot.

    python -m benchmarks.run_all [--quick] [--peers] [--only NAME,...] [--out DIR]
    python -m benchmarks.run_all --render-only [--out DIR]

Each benchmark runs as its own process with its own throwaway redis-server, for 100 B
and 4 KiB bodies and for uvloop and plain asyncio where the issue of speed depends on
them, and writes JSON into DIR (default ``benchmarks/results``). Then ``RESULTS.md``
(every table, with the machine and versions, and the targets met or missed) and
``throughput.png`` are written there from the JSON alone, so ``--render-only`` redraws
them from an earlier run. ``--quick`` runs fewer messages (still 3 rounds, so every
figure is a median). ``--peers`` adds FastStream, taskiq-redis and saq (install them
with ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import CaseResult

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [(100, "uvloop"), (100, "asyncio"), (4096, "uvloop"), (4096, "asyncio")]
"""(body bytes, event loop) of the throughput benchmarks."""


def plan(quick: bool, peers: bool) -> list[tuple[str, str, list[str]]]:
    """(output name, module, arguments) of every run."""
    n_small, n_large = (20_000, 5_000) if quick else (100_000, 20_000)
    runs: list[tuple[str, str, list[str]]] = []
    for bench in ("queue", "stream"):
        for size, loop in CONFIGS:
            n = n_small if size < 1000 else n_large
            args = [f"--messages={n}", f"--body-bytes={size}", f"--loop={loop}"]
            runs.append((f"{bench}-{size}-{loop}", f"bench_{bench}", args))
    for loop in ("uvloop", "asyncio"):
        seconds = "1" if quick else "3"
        runs.append((f"latency-100-{loop}", "bench_latency", [f"--loop={loop}", f"--seconds={seconds}"]))
    runs.append(("memory", "bench_memory", ["--messages=200000" if quick else "--messages=1000000"]))
    runs.append(("idle", "bench_idle", ["--seconds=10" if quick else "--seconds=20"]))
    runs.append(("recovery", "bench_recovery", []))
    runs.append(("delayed", "bench_delayed", ["--messages=100" if quick else "--messages=200"]))
    runs.append(("cluster-100-uvloop", "bench_cluster", ["--messages=10000" if quick else "--messages=50000"]))
    if peers:
        runs.append(("peers-100-uvloop", "bench_peers", [f"--messages={n_large}"]))
    return runs


def run(out: Path, quick: bool, peers: bool, only: set[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, module, args in plan(quick, peers):
        if only and not any(name.startswith(o) for o in only):
            continue
        target = out / f"{name}.json"
        command = [sys.executable, "-m", f"benchmarks.{module}", *args, "--rounds=3", f"--json={target}"]
        print(f"\n=== {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, check=False)
        if done.returncode:
            raise SystemExit(f"{name} failed (exit {done.returncode}); the results so far are in {out}")
        print(f"=== {name}: {time.perf_counter() - t:.0f} s", file=sys.stderr)


# -- rendering -------------------------------------------------------------------------


def _load(out: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def _num(x: float, unit: str) -> str:
    if unit == "msg/s":
        return f"{x / 1000:,.1f}k" if x >= 1000 else f"{x:,.0f}"
    return f"{x:,.2f}"


def _cell(case: CaseResult, cases: dict[str, CaseResult]) -> str:
    u = case["unit"]
    text = f"{_num(case['median'], u)} ({_num(case['min'], u)}-{_num(case['max'], u)})"
    base = cases.get(case["baseline"] or "")
    if base and base["median"]:
        text += f" **{case['median'] / base['median']:.2f}x**"
    return text


def _by_name(result: dict[str, Any]) -> dict[str, CaseResult]:
    return {c["name"]: c for c in result["cases"]}


def matrix_table(results: dict[str, dict[str, Any]], bench: str) -> list[str]:
    """One row per case, one column per (body, loop): median (min-max) and ratio to raw."""
    columns = [(f"{bench}-{size}-{loop}", f"{'100 B' if size < 1000 else '4 KiB'}, {loop}") for size, loop in CONFIGS]
    columns = [(key, label) for key, label in columns if key in results]
    if not columns:
        return []
    names: list[str] = []
    for key, _ in columns:
        names += [n for n in _by_name(results[key]) if n not in names]
    unit = results[columns[0][0]]["cases"][0]["unit"]
    lines = [
        f"| case ({unit}) | " + " | ".join(label for _, label in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name in names:
        cells = []
        for key, _ in columns:
            cases = _by_name(results[key])
            cells.append(_cell(cases[name], cases) if name in cases else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def simple_table(result: dict[str, Any]) -> list[str]:
    cases = _by_name(result)
    lines = ["| case | median (min-max) | unit |", "|---|---:|---|"]
    lines += [f"| {c['name']} | {_cell(c, cases)} | {c['unit']} |" for c in result["cases"]]
    return lines


def _find(result: dict[str, Any] | None, name: str) -> CaseResult | None:
    """The case of this name, or else the first whose name starts with it."""
    if result is None:
        return None
    cases = result["cases"]
    return next((c for c in cases if c["name"] == name), None) or next(
        (c for c in cases if c["name"].startswith(name)), None
    )


def _best(result: dict[str, Any] | None, prefix: str) -> CaseResult | None:
    if result is None:
        return None
    found = [c for c in result["cases"] if c["name"].startswith(prefix)]
    return max(found, key=lambda c: c["median"]) if found else None


def targets(results: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets (100 B, uvloop, one process), each met or not, from the JSON,
    with the raw redis-py figure of the same run beside it."""
    q, s = results.get("queue-100-uvloop"), results.get("stream-100-uvloop")
    lat, mem, idle = results.get("latency-100-uvloop"), results.get("memory"), results.get("idle")
    at_2k, backlog = "at 2,000 msg/s", "aioredmq: runner draining a backlog of 1,000,000"
    idle_q, idle_s = "aioredmq: idle list queue consumer", "aioredmq: idle stream group consumer"
    raw_take, raw_group = "raw: reliable consume (Lua move 256, LREM ack)", "raw: group consume (XREADGROUP 256"
    Row = tuple[str, str, CaseResult | None, CaseResult | None, float, bool]
    rows: list[Row] = [
        ("`publish_many`", "≥ 400k msg/s", _find(q, "aioredmq: publish_many"), _find(q, "raw: LPUSH, 1000"), 4e5, True),
        ("100 concurrent publishes", "≥ 150k msg/s", _find(q, "aioredmq: 100 c"), _find(q, "raw: 100 c"), 1.5e5, True),
        ("End to end, list queue", "≥ 150k msg/s", _best(q, "aioredmq: runner"), _find(q, raw_take), 1.5e5, True),
        ("End to end, streams", "≥ 120k msg/s", _best(s, "aioredmq: stream runner"), _find(s, raw_group), 1.2e5, True),
        ("Latency at 2k msg/s, queue, p50", "≤ 0.3 ms", _find(lat, f"aioredmq: queue, runner, {at_2k}: p50"),
         _find(lat, f"raw: LPUSH + BRPOP {at_2k}: p50"), 0.3, False),
        ("Latency at 2k msg/s, queue, p99", "≤ 1 ms", _find(lat, f"aioredmq: queue, runner, {at_2k}: p99"),
         _find(lat, f"raw: LPUSH + BRPOP {at_2k}: p99"), 1.0, False),
        ("1M backlog: peak RSS", "≤ 60 MB", _find(mem, f"{backlog}: peak"), None, 60, False),
        ("1M backlog: RSS growth, 10% to end", "flat, < 2 MB", _find(mem, f"{backlog}: growth"), None, 2, False),
        ("Idle list queue consumer", "≤ 1 command/s", _find(idle, f"{idle_q}: all"), None, 1, False),
        ("Idle stream consumer", "≤ 1 command/s", _find(idle, f"{idle_s}: all"), None, 1, False),
    ]  # fmt: skip
    lines = [
        "| measure | target | reached (median, min-max) | raw redis-py, same run | met |",
        "|---|---|---:|---:|:---:|",
    ]
    for label, target, case, raw, bound, higher in rows:
        if case is None:
            lines.append(f"| {label} | {target} | not run | | |")
            continue
        u = case["unit"] or target.split()[-1]  # memory figures carry their unit in the target
        met = case["median"] >= bound if higher else case["median"] <= bound
        reached = f"{_num(case['median'], u)} ({_num(case['min'], u)}-{_num(case['max'], u)}) {u}"
        ref = f"{_num(raw['median'], u)} {u}" if raw else ""
        lines.append(f"| {label} | {target} | {reached} | {ref} | {'yes' if met else '**no**'} |")
    return lines


def render(out: Path) -> None:
    results = _load(out)
    if not results:
        raise SystemExit(f"no results in {out}: run without --render-only first")
    env = next(iter(results.values()))["env"]
    md = [
        "# Benchmark results",
        "",
        f"Machine: {env['cpus']} CPUs ({env['machine']}, {env['system']}); Python {env['python']}, "
        f"redis-py {env['redis_py']} with hiredis, Redis {env['redis_server']}, aioredmq {env['aioredmq']}. "
        "Every figure is the median of 3 rounds (min-max in brackets); a bold ratio compares "
        "it with the raw redis-py case of the same run. Rendered by `python -m benchmarks.run_all` "
        f"on {time.strftime('%Y-%m-%d')}.",
        "",
        "## Targets (100 B bodies, one process, uvloop)",
        "",
        *targets(results),
    ]
    for bench, title in (
        ("queue", "List queue: publish and end to end"),
        ("stream", "Streams: publish and end to end"),
    ):
        md += ["", f"## {title}", "", *matrix_table(results, bench)]
    sections = [
        ("latency-100-uvloop", "Latency, publish to handler start (uvloop)"),
        ("latency-100-asyncio", "Latency, publish to handler start (asyncio)"),
        ("peers-100-uvloop", "Peers, end to end on the same server (100 B, uvloop)"),
        ("memory", "Memory"),
        ("idle", "Idle cost"),
        ("recovery", "Recovery after SIGKILL"),
        ("delayed", "Delayed delivery: lateness after the due time"),
        ("cluster-100-uvloop", "Redis Cluster: routing and replicas=1 (100 B, uvloop)"),
    ]
    for key, title in sections:
        if key in results:
            md += ["", f"## {title}", "", *simple_table(results[key])]
    md += ["", "![throughput](throughput.png)", ""]
    (out / "RESULTS.md").write_text("\n".join(md))
    print(f"wrote {out / 'RESULTS.md'}", file=sys.stderr)
    plot(results, out / "throughput.png")


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    panels = [
        ("Publish, list queue (100 B, uvloop)", results.get("queue-100-uvloop"), "publish"),
        ("End to end, list queue (100 B, uvloop)", results.get("queue-100-uvloop"), "e2e"),
        ("End to end, streams (100 B, uvloop)", results.get("stream-100-uvloop"), "e2e"),
        ("End to end, peers (100 B, uvloop)", results.get("peers-100-uvloop"), "e2e"),
    ]
    panels = [p for p in panels if p[1] is not None]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.2 + 2.6 * len(panels)), squeeze=False)
    for ax, (title, result, group) in zip(axes[:, 0], panels, strict=True):
        assert result is not None
        cases = [c for c in result["cases"] if c["group"] == group]
        names = [c["name"] for c in cases]
        med = [c["median"] / 1000 for c in cases]
        err = [[m - c["min"] / 1000 for m, c in zip(med, cases, strict=True)],
               [c["max"] / 1000 - m for m, c in zip(med, cases, strict=True)]]  # fmt: skip
        colors = [
            "#999999" if n.startswith("raw") else "#c0392b" if n.startswith("aioredmq") else "#2e86c1" for n in names
        ]
        ax.barh(names, med, xerr=err, color=colors, capsize=3)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("thousand messages per second (median of 3; bars: min-max)", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        for y, m in enumerate(med):
            ax.text(m, y, f" {m:,.0f}k", va="center", fontsize=7)
    env = next(iter(results.values()))["env"]
    fig.suptitle(
        f"aioredmq vs raw redis-py (grey) and peers (blue): {env['cpus']} CPUs, Python {env['python']}, "
        f"redis-py {env['redis_py']}, Redis {env['redis_server']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


def _color(case: str) -> str:
    return "#999999" if case.startswith("raw") else "#c0392b" if case.startswith("aioredmq") else "#2e86c1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer messages, shorter runs")
    parser.add_argument("--peers", action="store_true", help="also run the peers (needs the bench extra)")
    parser.add_argument("--only", default="", help="run only these, by name prefix (queue,stream,latency,...)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--render-only", action="store_true", help="redraw the tables and plot from the JSON")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.render_only:
        print(f"{platform.node()}: {os.cpu_count()} CPUs; results go to {out}", file=sys.stderr)
        run(out, args.quick, args.peers, {o for o in args.only.split(",") if o})
    render(out)


if __name__ == "__main__":
    main()
