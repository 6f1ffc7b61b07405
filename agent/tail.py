"""`keruta-agent tail`: a task's history, then live, without gap or duplicate.

Following subscribes with `fromSeq`; the hub sends stored records first, then
live ones, then (after everything stored so far) the task's state. A dropped
connection or a SLOW_CONSUMER error resubscribes from the seq after the last
one printed, so nothing is skipped or printed twice. The hub publishes a
task's final `status` only after the records before it, and the agent sends
it only once all its records are stored: when it arrives, all is printed.

`--no-follow` pages through the REST API instead and stops at the end.

For a finished task, the last line (on stderr) is the hub's verdict on the
log (GET .../verify: complete, incomplete or unverified); with `--verify` an
incomplete log is exit status VERIFY_FAILED. A `gap` record (lines knowingly
not kept) prints as a row of its own, `--- <its message> ---`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import BinaryIO

import attrs
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, open_websocket_url

from agent import http
from agent.hubaddr import auth_headers, http_base, ws_url
from keruta.backoff import Backoff
from keruta.basics import MAX_SEQ
from keruta.frames import ErrorFrame, FrameError, LogsFrame, StatusFrame, SubscribeFrame
from keruta.records import FINAL_STATES, LogRecord
from keruta.retry import Failures, retry
from keruta.wire import decode_hub_frame, encode_bytes, records_from_wire

PAGE_SIZE = 1000
MAX_MESSAGE = 64 * 1024 * 1024
# Longest a connection may take to close once its session has ended.
CLOSE_TIMEOUT = 2.0
# With no frame for this long, ask the REST API whether the task has ended.
IDLE_CHECK = 5.0
RECONNECT = Backoff(initial=0.5, factor=2.0, cap=10.0, jitter=0.3)
# `--no-follow` on a task the hub does not know (2 is for an unreachable or refusing hub).
NO_SUCH_TASK = 1
# Following: how long to wait to learn whether the task exists before
# subscribing anyway (the subscription's own reconnects handle a silent hub).
EXISTS_TIMEOUT = 5.0

RESET = b"\x1b[0m"
COLOURS = {
    "ERROR": b"\x1b[1;31m",
    "WARN": b"\x1b[33m",
    "DEBUG": b"\x1b[2m",
}
STDERR_COLOUR = b"\x1b[31m"
GAP_COLOUR = b"\x1b[1;33m"
# `--verify` and the hub found the log incomplete.
VERIFY_FAILED = 3
AGENT_COLOUR = b"\x1b[36m"


@attrs.define
class TailSettings:
    hub_url: str
    task_id: str
    token: str | None = None
    from_seq: int = 1
    source: str | None = None
    level: str | None = None
    follow: bool = True
    verify: bool = False


class Fatal(Exception):
    """Retrying will not help (bad token, bad request)."""


class Printer:
    def __init__(self, out: BinaryIO, colour: bool) -> None:
        self.out = out
        self.colour = colour
        self.next_seq = 1
        self.printed = 0

    def records(self, records: list[LogRecord]) -> None:
        parts = []
        for r in records:
            if r.seq < self.next_seq:
                continue  # already printed (a resend after a reconnect)
            self.next_seq = r.seq + 1
            self.printed += 1
            if r.kind in SECTION_KINDS:
                heading = section_heading(r)
                if heading is not None:
                    text = heading.encode("utf-8", "replace")
                    parts.append(SECTION_COLOUR + text + RESET + b"\n" if self.colour else text + b"\n")
                    continue
            if r.kind == "gap":
                parts.append(self._gap(r))
                continue
            text = r.message.encode("utf-8", "replace")
            end = b"" if r.partial else b"\n"
            colour = self._colour(r) if self.colour else None
            parts.append(colour + text + RESET + end if colour else text + end)
        if parts:
            self.out.write(b"".join(parts))
            self.out.flush()

    def _gap(self, r: LogRecord) -> bytes:
        """A row of its own, never mistaken for a line of the command's."""
        row = f"--- {r.message} ---".encode("utf-8", "replace")
        return (GAP_COLOUR + row + RESET if self.colour else row) + b"\n"

    @staticmethod
    def _colour(r: LogRecord) -> bytes | None:
        if r.level in COLOURS:
            return COLOURS[r.level]
        if r.source == "stderr":
            return STDERR_COLOUR
        if r.source == "agent":
            return AGENT_COLOUR
        return None


SECTION_KINDS = ("section_start", "section_end")
SECTION_COLOUR = b"\x1b[1m"


def section_heading(r: LogRecord) -> str | None:
    """What `tail` prints for a section's marker (agent/pipeline/sections.py):
    `▸ Title (1.2 s)` for each section it ends, `▾ Title` for the one it
    starts; None (the line as printed) when its metadata says neither."""
    section = r.metadata.get("section")
    if not isinstance(section, dict):
        return None
    rows = []
    ends = section.get("ends")
    for ended in ends if isinstance(ends, list) else []:
        if isinstance(ended, dict):
            rows.append(_ended(ended))
    if r.kind == "section_end":
        rows.append(_ended(section))
    else:
        rows.append(f"▾ {_title(section)}")
    return "\n".join(rows)


def _title(section: dict[str, object]) -> str:
    title = section.get("title") or section.get("name")
    return title if isinstance(title, str) else "section"


def _ended(section: dict[str, object]) -> str:
    ms = section.get("durationMs")
    if not isinstance(ms, int):
        return f"▸ {_title(section)}"
    return f"▸ {_title(section)} ({format_duration(ms)})"


def format_duration(ms: int) -> str:
    """`12.3 s`, `2 min 5 s`, `1 h 2 min`."""
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _stdout() -> BinaryIO:
    return sys.stdout.buffer


def _say(message: str) -> None:
    sys.stderr.write(f"keruta-agent tail: {message}\n")
    sys.stderr.flush()


async def tail(
    settings: TailSettings,
    out: BinaryIO | None = None,
    say: Callable[[str], None] = _say,
) -> int:
    out = out or _stdout()
    colour = out.isatty() and not os.environ.get("NO_COLOR")
    printer = Printer(out, colour)
    printer.next_seq = settings.from_seq
    try:
        if not settings.follow:
            await _history(settings, printer)
            # The hub answered; an empty history may be a task it does not know.
            task = await _task(settings)
            if task is NO_TASK:
                say(f"task {settings.task_id!r} does not exist on the hub at {settings.hub_url}")
                return NO_SUCH_TASK
            code = 0
            if not _finished(task):
                return code
        else:
            if await _task(settings, EXISTS_TIMEOUT) is NO_TASK:
                say(f"task {settings.task_id!r} does not exist yet; waiting for it to start (Ctrl-C to stop)")
            code = await _follow(settings, printer, say)
    except Fatal as exc:
        say(str(exc))
        return 2
    verdict = await _verdict(settings, say)
    return VERIFY_FAILED if settings.verify and verdict == "incomplete" else code


def _finished(task: object) -> bool:
    return isinstance(task, dict) and task.get("state") in FINAL_STATES


async def _verdict(settings: TailSettings, say: Callable[[str], None]) -> str | None:
    """Ask the hub whether the finished task's log is complete, and say it."""
    url = f"{http_base(settings.hub_url)}/api/v1/tasks/{settings.task_id}/verify"
    try:
        answer = await http.get_json(url, token=settings.token)
    except (http.HttpError, OSError, ValueError) as exc:
        say(f"could not verify the log: {exc}")
        return None
    if not isinstance(answer, dict):
        return None
    say(str(answer.get("message") or answer.get("verdict")))
    verdict = answer.get("verdict")
    return verdict if isinstance(verdict, str) else None


# `_task`'s answer for a task the hub does not know.
NO_TASK = object()


async def _task(settings: TailSettings, timeout: float = http.TIMEOUT) -> object:
    """The task as the hub answers it; NO_TASK when the hub does not know it;
    None when it cannot tell now (following retries on its own). A refused
    token or a bad task id is Fatal."""
    url = f"{http_base(settings.hub_url)}/api/v1/tasks/{settings.task_id}"
    try:
        return await http.get_json(url, token=settings.token, timeout=timeout)
    except http.HttpError as exc:
        if exc.status == 404:
            return NO_TASK
        if exc.status in (400, 401, 403):
            raise Fatal(f"{url}: {exc}") from None
        return None
    except (OSError, ValueError):
        return None


async def _history(settings: TailSettings, printer: Printer) -> None:
    url = f"{http_base(settings.hub_url)}/api/v1/tasks/{settings.task_id}/logs"
    while True:
        try:
            page = await http.get_json(
                url,
                {
                    "afterSeq": printer.next_seq - 1,
                    "size": PAGE_SIZE,
                    "source": settings.source,
                    "level": settings.level,
                },
                settings.token,
            )
        except http.HttpError as exc:
            raise Fatal(f"{url}: {exc}") from None
        except OSError as exc:
            raise Fatal(
                f"cannot reach the hub at {settings.hub_url}: {exc.strerror or exc}"
            ) from None
        except ValueError:
            raise Fatal(f"{url}: the hub's answer is not JSON") from None
        if not isinstance(page, dict):
            raise Fatal(f"{url}: the hub's answer is not a page of records")
        try:
            content = records_from_wire(page.get("content", []))
        except FrameError as exc:
            raise Fatal(f"{url}: the hub's answer holds no valid records ({exc})") from None
        if not content:
            return
        after = printer.next_seq
        printer.records(content)
        if printer.next_seq == after:
            # Nothing past the cursor: asking again would get the same page for ever.
            raise Fatal(f"{url}: the hub answered records before afterSeq={after - 1}, not after it")


async def _follow(settings: TailSettings, printer: Printer, say: Callable[[str], None]) -> int:
    url = ws_url(settings.hub_url)
    failures = Failures()
    ever_connected = False

    async def connection() -> int:
        nonlocal ever_connected
        while True:
            # How the session ended (an exit code, Fatal or _Resubscribe): a
            # failure of the close handshake after that (a hub that never
            # answers the close) must not lose it and start over.
            ended: int | Exception | None = None
            lost_link: BaseException | None = None
            resume_from = printer.next_seq
            with trio.CancelScope() as closing:
                try:
                    async with open_websocket_url(
                        url,
                        extra_headers=auth_headers(settings.token),
                        max_message_size=MAX_MESSAGE,
                        connect_timeout=10.0,
                        disconnect_timeout=1.0,
                    ) as ws:
                        try:
                            if failures.count and ever_connected:
                                say("reconnected")
                            ever_connected = True
                            failures.reset()
                            ended = await _session(ws, settings, printer)
                        except (Fatal, _Resubscribe) as exc:
                            ended = exc
                        except _LINK_ERRORS as exc:
                            lost_link = exc
                        finally:
                            # trio-websocket waits for the hub to close TCP
                            # after the close frames: a hub that never does
                            # must not hold the tail here.
                            closing.deadline = trio.current_time() + CLOSE_TIMEOUT
                except ConnectionRejected as exc:
                    if exc.status_code in (401, 403):
                        raise Fatal(
                            f"the hub refused the connection (HTTP {exc.status_code}); check --token"
                        ) from None
                    raise
                except _LINK_ERRORS as exc:
                    # Closing failed too: what the session came to still stands.
                    lost_link = lost_link or exc
            if ended is None:
                raise lost_link or ConnectionError("the hub did not close the connection")
            if isinstance(ended, Fatal):
                raise ended
            if isinstance(ended, _Resubscribe):
                if printer.next_seq == resume_from:
                    # Told to resume where it started, with nothing sent in
                    # between: not falling behind; wait as for a lost link.
                    raise ConnectionError("the hub said SLOW_CONSUMER before sending anything")
                say(f"fell behind the hub; resuming from seq {printer.next_seq}")
            elif isinstance(ended, int):
                return ended

    def lost(count: int, error: BaseException, _delay: float) -> None:
        if not ever_connected:
            raise Fatal(f"cannot reach the hub at {settings.hub_url}: {_reason(error)}")
        if count == 1:
            say(f"connection lost ({_reason(error)}); reconnecting from seq {printer.next_seq}")

    return await retry(
        connection, backoff=RECONNECT, retryable=_LINK_ERRORS, on_failure=lost, failures=failures
    )


# What ends a connection but not the tail: reconnect after a backoff.
_LINK_ERRORS = (OSError, HandshakeError, ConnectionClosed, ConnectionRejected, trio.BrokenResourceError)


class _Resubscribe(Exception):
    pass


async def _session(ws: object, settings: TailSettings, printer: Printer) -> int | None:
    """Subscribe and print until the task ends (its exit code) or the link breaks."""
    if printer.next_seq > MAX_SEQ:
        raise Fatal(f"the hub sent seq {printer.next_seq - 1}, past any task's last ({MAX_SEQ}); cannot resume after it")
    subscribe = SubscribeFrame(
        settings.task_id, from_seq=printer.next_seq, source=settings.source, level=settings.level
    )
    await ws.send_message(encode_bytes(subscribe).decode())  # type: ignore[attr-defined]
    while True:
        with trio.move_on_after(IDLE_CHECK) as idle:
            message = await ws.get_message()  # type: ignore[attr-defined]
        if idle.cancelled_caught:
            code = await _ended_meanwhile(settings, printer)
            if code is not None:
                return code
            continue
        try:
            frame = decode_hub_frame(message)
        except FrameError:
            continue
        if isinstance(frame, LogsFrame):
            if frame.task_id == settings.task_id:
                printer.records(frame.records)
        elif isinstance(frame, StatusFrame):
            if frame.task_id == settings.task_id and frame.state in FINAL_STATES:
                return _exit_code(frame.state, frame.exit_code)
        elif isinstance(frame, ErrorFrame):
            if frame.code == "SLOW_CONSUMER":
                # Everything before printer.next_seq is printed; pick up from there.
                raise _Resubscribe()
            if frame.code in ("UNAUTHORIZED", "FORBIDDEN", "INVALID_MESSAGE_FORMAT"):
                raise Fatal(f"the hub said {frame.code}: {frame.message}")


async def _ended_meanwhile(settings: TailSettings, printer: Printer) -> int | None:
    """When the link has been quiet for a while: has the task ended without
    its `status` reaching us? Then print the rest from the REST API and
    return its exit code. (Belt and braces: the hub sends the status.)"""
    try:
        task = await _task(settings)
    except Fatal:
        return None
    if not isinstance(task, dict) or not _finished(task):
        return None
    try:
        await _history(settings, printer)
    except Fatal:
        return None
    return _exit_code(task.get("state"), task.get("exitCode"))


def _exit_code(state: object, exit_code: object) -> int:
    """The task's exit code as this process's exit status. One outside
    0..255 (another producer's, over the API) would be cut to its low byte,
    and 256 would read as success: it counts as no code."""
    if type(exit_code) is int and 0 <= exit_code <= 255:
        return exit_code
    return 0 if state == "succeeded" else 1


def _reason(error: BaseException) -> str:
    if isinstance(error, ConnectionRejected):
        return f"HTTP {error.status_code}"
    if isinstance(error, HandshakeError) and error.__cause__ is not None:
        return _reason(error.__cause__)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
