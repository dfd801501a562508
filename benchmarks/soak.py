"""Take-over soak: N kill -9 / take-over cycles of one of two workers under a steady replay.

    python benchmarks/soak.py [--cycles 50] [--seed S] [--rate 300]   # KAFKA_BOOTSTRAP, else a dev broker
    make soak-takeover

Every cycle must see the survivor take over (when the cycle waits for it) and both workers ready again
within --deadline seconds (30); at the end every user's counts must equal the input exactly (HTTP and
changelog). A worker that misses a deadline is sent `kill -USR1` and its state dump and log tail are
printed. The seed is printed first; `--seed` replays the same kills and plays. Exit status 1 on a failure.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from playrec.devbroker import DevBroker, resolve_bootstrap  # noqa: E402
from tests.faults.soak import RECOVER_DEADLINE_S, run_soak  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument(
        "--rate", type=float, default=300.0, help="plays per second (faster grows the changelog, and restores, faster)"
    )
    parser.add_argument("--deadline", type=float, default=RECOVER_DEADLINE_S, help="seconds per recovery")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(
        f"soak: seed {seed}, {args.cycles} cycles, {args.rate:.0f} plays/s, deadline {args.deadline:.0f} s", flush=True
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `finally` stops the workers and the broker
    tmp = Path(tempfile.mkdtemp(prefix="playrec-soak-"))
    bootstrap = resolve_bootstrap()
    broker = None
    if bootstrap is None:
        broker = DevBroker(data_dir=tmp / "kafka")
        bootstrap = broker.start()
    started = time.monotonic()
    try:
        result = run_soak(
            bootstrap,
            tmp,
            args.cycles,
            seed,
            rate=args.rate,
            deadline_s=args.deadline,
            log=lambda line: print(line, flush=True),
        )
    except AssertionError as exc:
        print(f"SOAK FAILED (seed {seed}, logs in {tmp}):\n{exc}", flush=True)
        return 1
    finally:
        if broker is not None:
            broker.stop()
    print(result.summary(), f"({time.monotonic() - started:.0f} s in all)", flush=True)
    ok = result.lost == 0 and result.duplicated == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
