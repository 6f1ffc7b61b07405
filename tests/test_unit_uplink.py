"""agent/pipeline/uplink.py's ping timeout on the autojump clock: a hub that stops
answering is given up on after `ping_timeout` of silence, and one that answers
is not. The WebSocket is a stand-in that records what is sent and hands out
what the "hub" says; the spool is real."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import trio
import trio.testing

from agent.pipeline.uplink import Uplink, UplinkSettings, _Session
from agent.spool.spool import Spool


class FakeHubSocket:
    """What `_Session` needs of a trio-websocket connection: send and receive text."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, dict[str, object]]] = []
        self.to_agent, self._inbox = trio.open_memory_channel[str](100)

    async def send_message(self, text: str) -> None:
        self.sent.append((trio.current_time(), orjson.loads(text)))

    async def get_message(self) -> str:
        return await self._inbox.receive()

    def pings(self) -> list[float]:
        return [at for at, frame in self.sent if frame["type"] == "ping"]


@pytest.fixture
def uplink(tmp_path: Path) -> Uplink:
    spool = Spool.open(tmp_path, "pinged", hub_url="http://127.0.0.1:9")
    settings = UplinkSettings(hub_url="http://127.0.0.1:9", task_id="pinged", ping_interval=5.0, ping_timeout=20.0)
    return Uplink(spool, settings)


async def test_a_silent_hub_is_given_up_after_the_ping_timeout(
    uplink: Uplink, autojump_clock: trio.testing.MockClock
) -> None:
    ws = FakeHubSocket()
    session = _Session(uplink, ws)
    start = trio.current_time()
    with pytest.raises(TimeoutError, match="has not answered for 25 s"):
        await session.ping_loop()
    assert trio.current_time() - start == 25.0
    assert [at - start for at in ws.pings()] == [5.0, 10.0, 15.0, 20.0]
    uplink.spool.close()


async def test_a_hub_that_answers_pings_is_kept(uplink: Uplink, autojump_clock: trio.testing.MockClock) -> None:
    ws = FakeHubSocket()
    session = _Session(uplink, ws)

    async def hub_answers() -> None:
        seen = 0
        while True:
            await trio.sleep(1.0)
            pings = len(ws.pings())
            if pings > seen:
                seen = pings
                await ws.to_agent.send(orjson.dumps({"type": "pong"}).decode())

    with trio.move_on_after(120.0):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub_answers)
            nursery.start_soon(session.receive_loop)
            await session.ping_loop()
    assert len(ws.pings()) >= 20, "still pinging after two minutes"
    uplink.spool.close()


async def test_late_answers_within_the_timeout_are_enough(
    uplink: Uplink, autojump_clock: trio.testing.MockClock
) -> None:
    ws = FakeHubSocket()
    session = _Session(uplink, ws)
    start = trio.current_time()

    async def hub_answers_once_late() -> None:
        await trio.sleep(19.0)
        await ws.to_agent.send(orjson.dumps({"type": "pong"}).decode())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub_answers_once_late)
        nursery.start_soon(session.receive_loop)
        with pytest.raises(TimeoutError, match="for 21 s"):
            await session.ping_loop()
        nursery.cancel_scope.cancel()
    # Heard at 19 s: silent for more than 20 s first at the ping tick of 40 s.
    assert trio.current_time() - start == 40.0
    uplink.spool.close()
