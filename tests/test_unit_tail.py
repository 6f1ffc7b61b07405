"""agent/tail.py's timers on the autojump clock: the idle check (a quiet link
asks the REST API whether the task ended) and the reconnect after a lost
connection. The "hub" is a real trio-websocket server in the test's run that
plays its part frame by frame; the idle checks reach a TCP listener that counts
them and hangs up (the tail takes that as "cannot tell" and keeps listening)."""

from __future__ import annotations

import functools
import io

import orjson
import trio
import trio.testing
from trio_websocket import WebSocketRequest, serve_websocket

from agent.tail import IDLE_CHECK, RECONNECT, Printer, TailSettings, _follow, _session


class SilentLink:
    """What `_session` needs of a WebSocket: sends recorded, messages on demand."""

    def __init__(self) -> None:
        self.sent: list[dict[str, object]] = []
        self.to_tail, self._inbox = trio.open_memory_channel[str](10)

    async def send_message(self, text: str) -> None:
        self.sent.append(orjson.loads(text))

    async def get_message(self) -> str:
        return await self._inbox.receive()


async def counting_listener(nursery: trio.Nursery) -> tuple[int, list[float]]:
    """A TCP port that notes when it is connected to and hangs up."""
    calls: list[float] = []

    async def hang_up(stream: trio.SocketStream) -> None:
        calls.append(trio.current_time())
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], calls


async def test_a_quiet_link_checks_every_idle_period(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        port, checks = await counting_listener(nursery)
        link = SilentLink()
        settings = TailSettings(hub_url=f"http://127.0.0.1:{port}", task_id="quiet")
        start = trio.current_time()
        codes: list[int | None] = []

        async def follow() -> None:
            codes.append(await _session(link, settings, Printer(io.BytesIO(), False)))

        nursery.start_soon(follow)
        await trio.sleep(IDLE_CHECK * 3 + 1)
        # The status reaches the tail: it ends with the task's exit code.
        await link.to_tail.send(orjson.dumps({"type": "status", "taskId": "quiet", "state": "failed", "exitCode": 4}).decode())
        await trio.testing.wait_all_tasks_blocked()
        assert codes == [4]
        nursery.cancel_scope.cancel()
    assert link.sent[0] == {"type": "subscribe", "taskId": "quiet", "fromSeq": 1}
    assert [round(at - start) for at in checks] == [IDLE_CHECK, 2 * IDLE_CHECK, 3 * IDLE_CHECK]


async def test_a_lost_connection_is_reconnected_after_a_backoff(autojump_clock: trio.testing.MockClock) -> None:
    connections: list[float] = []
    subscribes: list[dict[str, object]] = []

    async def hub(request: WebSocketRequest) -> None:
        ws = await request.accept()
        connections.append(trio.current_time())
        subscribes.append(orjson.loads(await ws.get_message()))
        if len(connections) == 1:
            record = {"seq": 1, "timestamp": "2026-01-01T00:00:00.000000Z", "source": "stdout",
                      "level": "INFO", "message": "one", "taskId": "cut"}
            await ws.send_message(orjson.dumps({"type": "logs", "taskId": "cut", "records": [record]}).decode())
            await ws.aclose()  # the link breaks
            return
        await ws.send_message(orjson.dumps({"type": "status", "taskId": "cut", "state": "succeeded"}).decode())
        await trio.sleep_forever()

    said: list[str] = []
    out = io.BytesIO()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, hub, "127.0.0.1", 0, None)
        port = server.port
        code = await _follow(
            TailSettings(hub_url=f"http://127.0.0.1:{port}", task_id="cut"), Printer(out, False), said.append
        )
        nursery.cancel_scope.cancel()
    assert code == 0
    assert out.getvalue() == b"one\n"
    assert len(connections) == 2
    waited = connections[1] - connections[0]
    assert RECONNECT.initial * (1 - RECONNECT.jitter) <= waited <= RECONNECT.initial * (1 + RECONNECT.jitter) + 0.1
    # The second subscription resumes after what was printed.
    assert [s.get("fromSeq") for s in subscribes] == [1, 2]
    assert said[0].startswith("connection lost") and "reconnecting from seq 2" in said[0]
    assert said[1] == "reconnected"
