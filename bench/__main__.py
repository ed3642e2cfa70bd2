"""`make bench`: run every benchmark, print its table, write JSON to bench/results/."""

from __future__ import annotations

import asyncio
import sys

from bench import cancel_latency, interrupt


def main() -> None:
    quick = "--quick" in sys.argv
    results = asyncio.run(cancel_latency.run(
        trials=100 if quick else 1000, peer_trials=30 if quick else 200,
        polling_trials=5 if quick else 20, interval=0.01))
    cancel_latency.table(results)
    print(f"written {cancel_latency.save('cancel_latency', results)}")
    trials = 50 if quick else 300
    results = asyncio.run(interrupt.run(trials=trials, peer_trials=trials, interval=0.01))
    interrupt.table(results)
    print(f"written {interrupt.save('interrupt', results)}")


if __name__ == "__main__":
    main()
