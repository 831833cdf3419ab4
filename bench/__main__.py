"""`python -m bench`: run the scenarios, write bench/results/latest.{jsonl,md,png}.

Options: `--scenarios S1,S2`, `--rates 10,50`, `--subscribers N`, `--idle N`, `--step-seconds S`,
`--out DIR`, `--render` (redraw the table and plot from the JSON lines). Not run by default: G1
(consumer groups; `--g1-messages N`, `--g1-prefetch N`), S1K (keyed publishes), S1L (S1 on each
cross-process layer in pairs with memory://) and SW (gunicorn with one and two workers on Redis
Streams, S1 and S2 at `--rates`). A partial run writes the
same files, so the table and plot are always one run's output.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path

import orjson

from bench.groups import G1Config
from bench.report import markdown, plot
from bench.run import Config, Record, run, stamp


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--scenarios", default="S1,S2,S3,S4,S5")
    parser.add_argument("--rates", default="10,25,50,100,200")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--storm", type=int, default=1000)
    parser.add_argument("--step-seconds", type=float, default=5.0)
    parser.add_argument("--g1-messages", type=int, default=10_000)
    parser.add_argument("--g1-prefetch", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    parser.add_argument(
        "--render", action="store_true", help="only redraw latest.md and latest.png from .jsonl"
    )
    args = parser.parse_args()
    if args.render:
        lines = (args.out / "latest.jsonl").read_bytes().splitlines()
        saved = [orjson.loads(line) for line in lines]
        (args.out / "latest.md").write_text(markdown(saved))
        plot(saved, args.out / "latest.png")
        return
    config = Config(
        subscribers=args.subscribers,
        rates=[int(r) for r in args.rates.split(",")],
        step_seconds=args.step_seconds,
        idle=args.idle,
        storm=args.storm,
        throughput_seconds=args.step_seconds,
        scenarios=args.scenarios.upper().split(","),
        g1=G1Config(messages=args.g1_messages, prefetch=args.g1_prefetch),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    records: list[Record] = []
    jsonl = args.out / "latest.jsonl"

    def emit(record: Record) -> None:
        records.append(record)
        print(orjson.dumps(record).decode(), flush=True)
        jsonl.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))

    emit(
        stamp(
            {
                "scenario": "meta",
                "cpus": os.cpu_count(),
                "python": f"{platform.python_implementation()} {platform.python_version()}",
                "argv": sys.argv[1:],
            }
        )
    )
    started = time.monotonic()
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(run(config, emit))
    finally:
        (args.out / "latest.md").write_text(markdown(records))
        plot(records, args.out / "latest.png")
        print(f"\n{markdown(records)}\n({time.monotonic() - started:.0f} s)")


def _loop_factory() -> type[asyncio.AbstractEventLoop] | None:
    """uvloop for the load too when it is installed: the client must outrun the servers."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.Loop


if __name__ == "__main__":
    main()
