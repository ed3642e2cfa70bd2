"""`make bench`: run every benchmark, print its table, write JSON to bench/results/.

`python -m bench [--quick] [NAME ...]` runs the named ones only. Each module
listed in BENCHES has ``bench(quick: bool) -> None``, which runs, prints its
table(s) and saves its JSON.
"""

from __future__ import annotations

import asyncio
import importlib
import sys

BENCHES = ["cancel_latency", "interrupt", "providers", "cluster", "load", "redis_store", "barge_in", "resume_drop",
           "fanout", "tracing", "send_ack"]


def _cancel_latency(quick: bool) -> None:
    from bench import cancel_latency

    results = asyncio.run(cancel_latency.run(
        trials=100 if quick else 1000, peer_trials=30 if quick else 200,
        polling_trials=5 if quick else 20, interval=0.01))
    cancel_latency.table(results)
    print(f"written {cancel_latency.save('cancel_latency', results)}")


def _interrupt(quick: bool) -> None:
    from bench import interrupt

    trials = 50 if quick else 300
    results = asyncio.run(interrupt.run(trials=trials, peer_trials=trials, interval=0.01))
    interrupt.table(results)
    print(f"written {interrupt.save('interrupt', results)}")


BUILTIN = {"cancel_latency": _cancel_latency, "interrupt": _interrupt}


def main() -> None:
    quick = "--quick" in sys.argv
    wanted = [a for a in sys.argv[1:] if not a.startswith("-")] or BENCHES
    for name in wanted:
        if name in BUILTIN:
            BUILTIN[name](quick)
        else:
            importlib.import_module(f"bench.{name}").bench(quick)


if __name__ == "__main__":
    main()
