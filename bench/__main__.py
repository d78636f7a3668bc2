"""``python -m bench [micro|step|train|drsom|precond|spread|demo] ...``; no subcommand runs the demo."""
from __future__ import annotations

import argparse
import signal
import sys

from . import drsom, micro, precond, spread, step, train

# A couple of minutes on a 2-core CPU: every op and dtype at three sizes up to n = 4M (the DRSOM
# ops add some 20 s).
DEMO_ARGS = ["micro", "--n", "100k", "1M", "4M", "--min-run-time", "0.3"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of soo_ext against torch.optim, the pure-PyTorch "
                    "references and its own DRSOM modes.  Without a subcommand: the demo (" + " ".join(DEMO_ARGS) + ").",
        epilog=micro.BYTES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="{micro,step,train,drsom,precond,spread,demo}")
    micro.add_parser(subparsers)
    step.add_parser(subparsers)
    train.add_parser(subparsers)
    drsom.add_parser(subparsers)
    precond.add_parser(subparsers)
    spread.add_parser(subparsers)
    subparsers.add_parser("demo", help="python -m bench " + " ".join(DEMO_ARGS))
    return parser


def main(argv: list[str] | None = None) -> tuple[list[dict], dict]:
    """Runs the command; returns its records and environment (for tests and notebooks)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in (None, "demo"):
        args = parser.parse_args(DEMO_ARGS)
    return {"micro": micro.run, "step": step.run, "train": train.run,
            "drsom": drsom.run, "precond": precond.run, "spread": spread.run}[args.command](args)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    # SIGINT and SIGTERM (timeout's default) stop a long run the same way: the benchmark reports
    # the cases measured so far (also when SIGINT was ignored by the launching shell)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    main(sys.argv[1:])
