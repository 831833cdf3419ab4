"""Turn the run's JSON lines into the markdown table (ratios to the baseline) and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import idempotency, pairs, workers
from bench.groups import markdown as groups_markdown

Record = dict[str, Any]


def _by(records: list[Record], scenario: str) -> list[Record]:
    return [r for r in records if r.get("scenario") == scenario and "not_run" not in r]


def _ratio(value: Any, base: Any) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 100 else f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _lost(r: Record) -> str:
    lost = r["missing"] + r["sample_lost"] + r["sample_duplicates"] + r["extra"]
    return "0" if lost == 0 and r["drained"] else f"{r['missing']}/{r['sample_lost']}/{r['extra']}"


def markdown(records: list[Record]) -> str:
    from bench.run import sustained

    lines: list[str] = []
    header = [r for r in records if r.get("scenario") == "meta"]
    if header:
        meta = header[0]
        lines += [
            f"Run {meta['time']} on {meta['cpus']} CPUs ({meta['python']}; load average "
            f"{meta['loadavg']} at start). Servers on CPU 0, load on CPU 1; ratios are to the "
            "raw-ASGI baseline measured in the same run.",
            "",
        ]
    s1 = _by(records, "S1")
    base1 = next((r for r in s1 if r["target"] == "baseline"), None)
    if s1:
        lines += [
            "**S1 publish throughput** (no subscribers)",
            "",
            "| target | requests/s | ratio | server CPU µs/request | tool | load avg |",
            "|---|---:|---:|---:|---|---:|",
        ]
        for r in s1:
            lines.append(
                f"| {r['target']} | {_fmt(r['requests_per_s'])} | "
                f"{_ratio(r['requests_per_s'], base1 and base1['requests_per_s'])} | "
                f"{_fmt(r['server_cpu_us_per_request'])} | {r['tool']} | {r['loadavg']} |"
            )
        lines.append("")
    lines += pairs.markdown(records)
    lines += idempotency.markdown(records)
    s2 = _by(records, "S2") + _by(records, "S4")
    if s2:
        base2 = {r["rate"]: r for r in s2 if r["target"] == "baseline"}
        memory = {r["rate"]: r for r in s2 if r["target"] == "gateway"}
        lines += [
            "**S2 fan-out to 1,000 subscribers on one channel** (S4: the gateway on a broker "
            "layer; its ratio is to the memory layer). Loss: missing / sampled seq gaps / extra.",
            "",
            "| rate msg/s | target | deliveries/s | ratio | p50 ms | p99 ms | loss | "
            "server CPU µs/delivery | CPU ratio | server CPU | load CPU | sustained | load avg |",
            "|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|",
        ]
        for r in sorted(s2, key=lambda r: (r["rate"], r["scenario"], r["target"])):
            base = memory if r["scenario"] == "S4" else base2
            reference = base.get(r["rate"], {})
            lines.append(
                f"| {r['rate']} | {r['target']} | {_fmt(r['deliveries_per_s'])} | "
                f"{_ratio(r['deliveries_per_s'], reference.get('deliveries_per_s'))} | "
                f"{_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | {_lost(r)} | "
                f"{_fmt(r['server_cpu_us_per_delivery'])} | "
                f"{_ratio(r['server_cpu_us_per_delivery'], reference.get('server_cpu_us_per_delivery'))} | "  # noqa: E501
                f"{r['server_cpu_pct']}% | {r['load_cpu_pct']}% | "
                f"{'yes' if sustained(r) else 'no'} | {r['loadavg']} |"
            )
        lines.append("")
    s3 = _by(records, "S3")
    base3 = next((r for r in s3 if r["target"] == "baseline"), None)
    if s3:
        lines += [
            "**S3 idle SSE connections** (keepalive every 2 s)",
            "",
            "| target | connections | connect all s | connect p99 ms | RSS KiB/conn | ratio | "
            "got keepalives | idle CPU | load avg |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in s3:
            lines.append(
                f"| {r['target']} | {_fmt(r['connections'])} | {r['connect_all_s']} | "
                f"{_fmt(r['connect_p99_ms'])} | {r['rss_per_connection_kib']} | "
                f"{_ratio(r['rss_per_connection_kib'], base3 and base3['rss_per_connection_kib'])} | "  # noqa: E501
                f"{_fmt(r['keepalive_received'])} | {r['idle_cpu_pct']}% | {r['loadavg']} |"
            )
        lines.append("")
    s5 = _by(records, "S5")
    base5 = next((r for r in s5 if r["target"] == "baseline"), None)
    if s5:
        lines += [
            "**S5 resume storm**: clients reconnect at once with Last-Event-ID 100 messages "
            "behind while 20 msg/s keep coming",
            "",
            "| target | clients | complete | missing | extra | sampled lost/dup | "
            "s to complete | ratio | server CPU s | load avg |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in s5:
            lines.append(
                f"| {r['target']} | {_fmt(r['clients'])} | {_fmt(r['complete_clients'])} | "
                f"{r['missing']} | {r['extra']} | {r['sample_lost']}/{r['sample_duplicates']} | "
                f"{r['seconds_to_complete']} | "
                f"{_ratio(r['seconds_to_complete'], base5 and base5['seconds_to_complete'])} | "
                f"{r['server_cpu_s']} | {r['loadavg']} |"
            )
        lines.append("")
    lines += workers.markdown(records)
    lines += groups_markdown(records)
    checks = targets(records)
    if checks:
        lines += ["**Targets** (this run)", "", "| target | measured | met |", "|---|---|---|"]
        lines += [
            f"| {name} | {measured} | {'yes' if met else 'no'} |" for name, measured, met in checks
        ]
        lines.append("")
    skipped = [r for r in records if "not_run" in r]
    if skipped:
        lines += ["Not run:", ""]
        lines += [f"- {r['scenario']} {r['target']}: {r['not_run']}" for r in skipped]
        lines.append("")
    return "\n".join(lines)


def targets(records: list[Record]) -> list[tuple[str, str, bool]]:
    """The issue's targets, checked against this run: (target, what was measured, met)."""
    from bench.run import sustained

    def one(scenario: str, target: str, **match: Any) -> Record | None:
        return next(
            (
                r
                for r in _by(records, scenario)
                if r["target"] == target and all(r.get(k) == v for k, v in match.items())
            ),
            None,
        )

    def best(scenario: str, target: str) -> int:
        return max(
            (r["rate"] for r in _by(records, scenario) if r["target"] == target and sustained(r)),
            default=0,
        )

    out: list[tuple[str, str, bool]] = []
    top = max((r["rate"] for r in _by(records, "S2")), default=None)
    gateway, baseline = one("S2", "gateway", rate=top), one("S2", "baseline", rate=top)
    if gateway and baseline:
        ratio = gateway["deliveries_per_s"] / baseline["deliveries_per_s"]
        out.append(
            (
                f"S2 {top} msg/s: >= 0.95x baseline deliveries/s, no loss, p99 <= 1 s",
                f"{ratio:.2f}x, p99 {_fmt(gateway['p99_ms'])} ms, loss {_lost(gateway)}",
                ratio >= 0.95 and sustained(gateway),
            )
        )
    gateway, baseline = one("S2", "gateway", rate=50), one("S2", "baseline", rate=50)
    if gateway and baseline:
        ratio = gateway["server_cpu_us_per_delivery"] / baseline["server_cpu_us_per_delivery"]
        out.append(
            ("S2 50 msg/s: CPU per delivery <= 1.5x baseline", f"{ratio:.2f}x", ratio <= 1.5)
        )
    gateway, baseline = one("S1", "gateway"), one("S1", "baseline")
    if gateway and baseline:
        ratio = gateway["requests_per_s"] / baseline["requests_per_s"]
        out.append(("S1: publish throughput >= 0.6x baseline", f"{ratio:.2f}x", ratio >= 0.6))
    litestar = one("S1", "litestar")
    if gateway and litestar:
        ratio = gateway["requests_per_s"] / litestar["requests_per_s"]
        out.append(("S1: publish throughput >= 1.5x Litestar", f"{ratio:.2f}x", ratio >= 1.5))
    gateway, baseline = one("S3", "gateway"), one("S3", "baseline")
    if gateway and baseline:
        ratio = gateway["rss_per_connection_kib"] / baseline["rss_per_connection_kib"]
        out.append(("S3: RSS per idle connection <= 1.3x baseline", f"{ratio:.2f}x", ratio <= 1.3))
        held = gateway["keepalive_received"] == gateway["connections"] >= 10_000
        out.append(
            (
                "S3: 10,000 connections held, keepalives flowing",
                f"{gateway['keepalive_received']:,} of {gateway['connections']:,} got keepalives",
                held,
            )
        )
    if _by(records, "S4"):
        streams, memory = best("S4", "redis+streams"), best("S2", "gateway")
        out.append(
            (
                "S4: redis+streams sustains >= 0.8x the memory layer's rate",
                f"{streams} vs {memory} msg/s sustained",
                bool(memory) and streams >= 0.8 * memory,
            )
        )
    gateway = one("S5", "gateway")
    if gateway:
        out.append(
            (
                "S5: resume storm, every client complete, no loss",
                f"{gateway['complete_clients']:,} of {gateway['clients']:,} complete, "
                f"missing {gateway['missing']}, extra {gateway['extra']}",
                bool(gateway["complete"])
                and gateway["sample_lost"] == gateway["sample_duplicates"] == 0,
            )
        )
    return out


def plot(records: list[Record], path: Path) -> bool:
    """Deliveries/s and latency against publish rate, one line per target; False without
    matplotlib (install the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = _by(records, "S2") + _by(records, "S4")
    if not rows:
        return False
    targets = list(dict.fromkeys(r["target"] for r in rows))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target in targets:
        mine = sorted((r for r in rows if r["target"] == target), key=lambda r: r["rate"])
        rates = [r["rate"] for r in mine]
        (line,) = left.plot(rates, [r["deliveries_per_s"] for r in mine], marker="o", label=target)
        color = line.get_color()
        right.plot(
            rates, [r["p99_ms"] for r in mine], marker="o", color=color, label=f"{target} p99"
        )
        right.plot(
            rates,
            [r["p50_ms"] for r in mine],
            marker=".",
            linestyle=":",
            color=color,
            label=f"{target} p50",
        )
    left.set(xlabel="publish rate (msg/s)", ylabel="deliveries/s", title="1,000 subscribers")
    right.set(xlabel="publish rate (msg/s)", ylabel="latency (ms)", yscale="log", title="latency")
    left.grid(alpha=0.3)
    right.grid(alpha=0.3)
    left.legend()
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
