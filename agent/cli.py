"""`keruta-agent run | tail | flush`.

`run` starts COMMAND (agent/launch.py) before it imports Trio and the
pipeline: every import at this module's top is a delay before the command
starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from agent.hubaddr import BadHubUrl, http_base
from agent.spool.root import default_root
from keruta.basics import MAX_SEQ, SOURCES, TASK_ID_RULE, valid_task_id
from keruta.cliargs import number, size
from keruta.levels import LEVELS

DEFAULT_HUB = "http://127.0.0.1:8080"

RUN_EPILOG = """\
Every line COMMAND writes is masked, written to a local spool, mirrored to
this process's stdout/stderr, and streamed to the hub, which stores it
exactly once. The hub being down never slows COMMAND: lines wait in the spool
and are sent when it is back (reconnecting with backoff up to 30 s,
--reconnect-max). The exit status is COMMAND's (128+N if it died of signal
N). SIGINT and SIGTERM are passed on to COMMAND's process group (COMMAND
and what it started); whatever of it still runs --kill-grace seconds later is
killed with SIGKILL, so nothing outlives the agent.

Masked (replaced by ***) everywhere, including the spool and the mirror:
--mask values, and values (4+ characters) of environment variables whose
names contain TOKEN, SECRET, PASSWORD or KEY.

If the spool is full (--spool-max-bytes) because the hub has been away for
long, lines are dropped, the agent says so on stderr, and one `gap` record
in the task says where, how many lines and bytes, and why.

With --no-wait, `run` exits as soon as COMMAND has and its output is spooled,
without waiting for the hub's acknowledgements: a background
`keruta-agent flush --task-id ID` goes on delivering. Run
`keruta-agent flush --wait` once at the job's end: it waits for every such
delivery, delivers what is left, and exits 1 naming every task not stored.

example:
  keruta-agent run --hub http://127.0.0.1:8080 --task-id build-42 -- make test
  keruta-agent run --no-wait --task-id build-42-lint -- make lint   # a step
  keruta-agent flush --wait                                        # the job's end
"""


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value else default


_positive_int = number(int, 1)
_seq = number(int, 1, high=MAX_SEQ)
_non_negative_float = number(float, 0)
_positive_float = number(float, 0, strict=True)


def _task_id(text: str) -> str:
    if not valid_task_id(text):
        raise argparse.ArgumentTypeError(f"a task id is {TASK_ID_RULE}")
    return text


def _hub_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hub",
        metavar="URL",
        help=f"the hub's base URL (env KERUTA_HUB_URL; default {DEFAULT_HUB})",
    )
    p.add_argument(
        "--token", metavar="T",
        help="bearer token for the hub (env KERUTA_TOKEN); `run` never passes it on to COMMAND",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keruta-agent",
        description="Run a command and stream every line of its output to a keruta hub; "
        "follow a task's output; deliver what an earlier run left in the spool.",
    )
    sub = parser.add_subparsers(dest="subcommand", metavar="{run,tail,flush}")
    sub.required = True

    run = sub.add_parser(
        "run",
        help="run COMMAND and stream its output",
        usage="keruta-agent run [options] -- COMMAND [ARG...]",
        description="Run COMMAND and stream every line of its stdout and stderr to the hub.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _hub_args(run)
    run.add_argument(
        "--task-id",
        metavar="ID",
        type=_task_id,
        help="the task's id (env KERUTA_TASK_ID; default: a new UUID, printed to stderr)",
    )
    run.add_argument(
        "--spool-dir",
        metavar="DIR",
        type=Path,
        help="where unacknowledged records are kept (env KERUTA_SPOOL_DIR; "
        "default ~/.local/share/keruta/spool)",
    )
    run.add_argument(
        "--spool-max-bytes",
        metavar="SIZE",
        type=size,
        default=1 << 30,
        help="disk budget of the task's spool, e.g. 500M (default 1G); "
        "past it lines are dropped and counted",
    )
    run.add_argument(
        "--max-bytes",
        metavar="SIZE",
        type=size,
        default=None,
        help="ask the hub to keep at most SIZE of this task's output, e.g. 50M: its first "
        "half and its last half, with a gap record between (the hub's --max-task-bytes "
        "where lower; default: the hub's)",
    )
    run.add_argument(
        "--batch-size",
        metavar="N",
        type=_positive_int,
        default=500,
        help="most records in one frame under load (default 500, at most 1000)",
    )
    run.add_argument(
        "--flush-interval",
        metavar="SECONDS",
        type=_non_negative_float,
        default=0.2,
        help="longest a record waits for a batch to fill under load (default 0.2); "
        "when the link is idle a line goes out at once",
    )
    run.add_argument(
        "--rate-limit",
        metavar="LINES_PER_SECOND",
        type=_positive_float,
        default=None,
        help="send at most this many records per second; the rest wait in the spool "
        "(default: unlimited)",
    )
    run.add_argument(
        "--mask",
        metavar="VALUE",
        action="append",
        default=[],
        help="a secret to replace by *** (repeatable)",
    )
    run.add_argument(
        "--pty",
        action="store_true",
        help="run COMMAND under a pseudo-terminal (stdout and stderr both arrive as stdout), "
        "for programs that buffer when piped",
    )
    run.add_argument(
        "--drain-timeout",
        metavar="SECONDS",
        type=_non_negative_float,
        default=30.0,
        help="after COMMAND exits, how long to wait for the hub's acknowledgements (default 30)",
    )
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="exit when COMMAND has, without waiting for the hub: a background "
        "`keruta-agent flush --task-id ID` delivers the rest; `keruta-agent flush --wait` "
        "at the job's end waits for it and says what was not delivered",
    )
    run.add_argument(
        "--max-in-flight-bytes",
        metavar="SIZE",
        type=size,
        default=4 << 20,
        help="most bytes of records sent and not yet acknowledged by the hub, e.g. 8M "
        "(default 4M); a quiet line always goes at once",
    )
    run.add_argument(
        "--pipe-grace",
        metavar="SECONDS",
        type=_positive_float,
        default=1.0,
        help="after COMMAND exits, stop reading its output once it has been quiet this long "
        "(something COMMAND started in the background may hold it open) (default 1)",
    )
    run.add_argument(
        "--kill-grace",
        metavar="SECONDS",
        type=_non_negative_float,
        default=10.0,
        help="after passing a SIGINT/SIGTERM on to COMMAND's process group, SIGKILL "
        "whatever of the group still runs this long after (default 10)",
    )
    run.add_argument(
        "--reconnect-max",
        metavar="SECONDS",
        type=_positive_float,
        default=30.0,
        help="longest wait between attempts to reach the hub; the waits grow from 0.5 s "
        "up to it (default 30)",
    )
    run.add_argument("--quiet", action="store_true", help="do not mirror COMMAND's output")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND", help=argparse.SUPPRESS)

    tail = sub.add_parser(
        "tail",
        help="print a task's output, then follow it live",
        description="Print a task's stored output, then follow it live without gap or "
        "duplicate until the task finishes; exit with the task's exit code "
        "(130 on Ctrl-C). With --no-follow: print what is stored and exit 0. "
        "For a finished task, the last line (on stderr) is the hub's verdict on "
        "the log: complete, incomplete (what is missing) or unverified.",
    )
    tail.add_argument("task_id", metavar="TASK_ID", type=_task_id)
    _hub_args(tail)
    tail.add_argument(
        "--from-seq",
        metavar="N",
        type=_seq,
        default=1,
        help="first seq to print (default 1)",
    )
    tail.add_argument("--source", choices=SOURCES, help="only this source")
    tail.add_argument("--level", choices=LEVELS, help="only this level")
    tail.add_argument("--no-follow", action="store_true", help="print the stored history and exit")
    tail.add_argument(
        "--verify",
        action="store_true",
        help="exit 3 when the hub finds the finished task's log incomplete",
    )

    flush = sub.add_parser(
        "flush",
        help="deliver what earlier runs left in the spool",
        description="Deliver every task left in the spool (records the hub had not acknowledged "
        "and final states) and remove it. Exits 0 when everything was delivered, 1 otherwise.",
    )
    flush.add_argument(
        "--spool-dir",
        metavar="DIR",
        type=Path,
        help="the spool (env KERUTA_SPOOL_DIR; default ~/.local/share/keruta/spool)",
    )
    _hub_args(flush)
    flush.add_argument(
        "--task-id",
        metavar="ID",
        type=_task_id,
        help="deliver only this task (default: every task in the spool)",
    )
    flush.add_argument(
        "--wait",
        action="store_true",
        help="wait for a task whose agent, or whose background delivery (`run --no-wait`), "
        "still runs, then deliver what it left: at a job's end, every line is stored once "
        "flush --wait exits 0 (default: leave such a task to its agent)",
    )
    flush.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=60.0,
        help="give up on a task the hub has not fully acknowledged after this long (and, "
        "with --wait, on one still in use after this long); its records stay in the spool "
        "and flush exits 1 (default 60)",
    )
    flush.add_argument(
        "--reconnect-max",
        metavar="SECONDS",
        type=_positive_float,
        default=5.0,
        help="longest wait between attempts to reach the hub; the waits grow from 0.5 s "
        "up to it, and flush gives up on a hub it could not reach 4 times in a row (default 5)",
    )
    return parser


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """`run [options] -- COMMAND...`: everything after the first `--` is COMMAND."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, None


def _resolve_hub(parser: argparse.ArgumentParser, value: str | None) -> str:
    hub = value or _env("KERUTA_HUB_URL", DEFAULT_HUB)
    assert hub is not None
    try:
        http_base(hub)
    except BadHubUrl as exc:
        parser.error(str(exc))
    return hub


def _quiet_supervisor() -> None:
    """The agent reports reconnects itself, once and then once a minute."""
    import logging

    logging.getLogger("keruta.supervisor").setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command: list[str] | None = None
    if args_list[:1] == ["run"]:
        head, command = _split_command(args_list)
        args_list = head
    args = parser.parse_args(args_list)
    token = args.token or _env("KERUTA_TOKEN")

    if args.subcommand == "run":
        from agent.launch import launch
        from agent.voice import say

        command = command if command is not None else args.command
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            parser.error("run: give the command after --, e.g. keruta-agent run -- make test")
        hub = _resolve_hub(parser, args.hub)
        task_id = args.task_id or _env("KERUTA_TASK_ID")
        if task_id is not None and not valid_task_id(task_id):
            parser.error(f"KERUTA_TASK_ID: a task id is {TASK_ID_RULE}")
        if task_id is None:
            import uuid

            task_id = str(uuid.uuid4())
            say(f"task id {task_id}")
        spool_root = args.spool_dir or default_root()
        launched = launch(command, os.environ, token, spool_root, task_id, say, use_pty=args.pty)
        if launched is None:
            return 1
        # The command runs (its pipes read) from here on, while the rest loads.
        try:
            _quiet_supervisor()
            import trio

            from agent.run import RunSettings, run
        except BaseException:
            launched.kill()
            raise

        settings = RunSettings(
            command=command,
            hub_url=hub,
            task_id=task_id,
            token=token,
            spool_root=spool_root,
            spool_max_bytes=args.spool_max_bytes,
            max_bytes=args.max_bytes,
            batch_size=args.batch_size,
            flush_interval=args.flush_interval,
            rate_limit=args.rate_limit or None,
            masks=args.mask,
            pty=args.pty,
            drain_timeout=args.drain_timeout,
            reconnect_max=args.reconnect_max,
            pipe_grace=args.pipe_grace,
            kill_grace=args.kill_grace,
            quiet=args.quiet,
            no_wait=args.no_wait,
            max_in_flight_bytes=args.max_in_flight_bytes,
        )
        result = trio.run(run, settings, say, launched)
        return result.exit_code

    _quiet_supervisor()
    if args.subcommand == "tail":
        import trio

        from agent.tail import TailSettings, tail

        hub = _resolve_hub(parser, args.hub)
        try:
            return trio.run(
                tail,
                TailSettings(
                    hub_url=hub,
                    task_id=args.task_id,
                    token=token,
                    from_seq=args.from_seq,
                    source=args.source,
                    level=args.level,
                    verify=args.verify,
                    follow=not args.no_follow,
                ),
            )
        except KeyboardInterrupt:
            return 130

    if args.subcommand == "flush":
        import trio

        from agent.flush import FlushSettings, flush

        return trio.run(
            flush,
            FlushSettings(
                spool_root=args.spool_dir or default_root(),
                hub_url=args.hub or None,
                fallback_hub_url=_env("KERUTA_HUB_URL", DEFAULT_HUB) or DEFAULT_HUB,
                token=token,
                timeout=args.timeout,
                reconnect_max=args.reconnect_max,
                task_id=args.task_id,
                wait=args.wait,
            ),
        )
    parser.error(f"unknown subcommand {args.subcommand}")
    return 2


def console() -> NoReturn:
    """The `keruta-agent` command and `python -m agent`: `main`, then exit
    at once. By then every file the agent wrote is closed and the spool
    synced; the interpreter's teardown (finalizing a few hundred modules,
    30-40 ms) would only hold up the step that ran the agent."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    console()
