"""``python -m bench [demo|micro|step|train|drsom|precond|spread] ...``; no subcommand runs the
demo.  Every run prints the machine first and the load during the run last."""
from __future__ import annotations

import argparse
import signal
import sys

from . import bfgs, common, demo, drsom, micro, precond, spread, step, train

SUBCOMMANDS = {"demo": demo, "micro": micro, "step": step, "train": train, "drsom": drsom,
               "precond": precond, "spread": spread, "bfgs": bfgs}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of soo_ext against torch.optim, the pure-PyTorch references and "
                    "its own DRSOM modes.  Without a subcommand: the demo (python -m bench demo, "
                    "about a minute).  Times and speed-up ratios vary with the CPU and its load: "
                    "every run prints the machine and the load during the run.",
        epilog=micro.BYTES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for module in SUBCOMMANDS.values():
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> tuple[list[dict], dict]:
    """Runs the command; returns its records and environment (for tests and notebooks)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo"])
    meter = common.start_run(reset=True)
    print(common.machine_line(), flush=True)
    try:
        return SUBCOMMANDS[args.command].run(args)
    finally:
        print(common.load_line(meter.read()))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    # SIGINT and SIGTERM (timeout's default) stop a long run the same way: the benchmark reports
    # the cases measured so far (also when SIGINT was ignored by the launching shell)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    main(sys.argv[1:])
