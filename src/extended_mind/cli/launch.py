"""The entry point: parse, join the process group under torchrun, run the command, report errors."""

from __future__ import annotations

import os
import sys

from extended_mind.base.errors import ExtendedMindError
from extended_mind.bench import cli as bench_cli
from extended_mind.cli.commands import COMMANDS
from extended_mind.cli.parser import build_parser
from extended_mind.parallel.group import ShardError, init_from_env, launched_distributed

# Commands that run under torchrun, with their memories sharded over the ranks
SHARDED_COMMANDS = ("ask", "memorize", "demo", "serve")


def _exit_with_launcher() -> None:
    """A rank ends when its launcher does (Linux: the parent-death signal): a killed torchrun must not leave ranks
    serving on their own, holding the model in memory."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    launcher = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: the rank outlives its launcher, as before
        return
    if os.getppid() != launcher:  # the launcher died before the signal was set
        raise ExtendedMindError("the launcher of this rank is gone")


def _join_process_group() -> int:
    """Under torchrun: join the process group (memories are then sharded over the ranks) and leave the output to
    rank 0. Returns this process's rank (0 when alone)."""
    _exit_with_launcher()
    group = init_from_env()
    if group is None or group.rank == 0:
        return 0
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - rank 0 reports errors of every rank
    return group.rank


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = 0
    try:
        if launched_distributed() and args.command not in SHARDED_COMMANDS:
            raise ExtendedMindError(
                f"'{args.command}' does not run under torchrun; sharded over ranks: {', '.join(SHARDED_COMMANDS)}"
            )
        rank = _join_process_group() if launched_distributed() else 0
        if args.command in ("bench", "tune", "data"):
            return bench_cli.run(args)
        command = COMMANDS.get(args.command)
        if command is not None:
            command(args)
    except ExtendedMindError as exc:
        print(f"extended-mind: error: {exc}", file=sys.stderr)
        if sys.stderr is not sys.__stderr__ and not isinstance(exc, ShardError):  # a rank's own error: say it
            print(f"extended-mind (rank {rank}): error: {exc}", file=sys.__stderr__)
        return 2
    return 0
