"""What only the PostgreSQL store does: insert methods, notices between hubs,
lost connections, schema creation by several hubs.

Each PostgreSQL test runs its own trio-asyncio loop through `pg_url`."""

from __future__ import annotations

import pytest
import trio

from hub.store.base import Rewrite, StoreUnavailable
from hub.store.pg_notices import parse_notice, parse_rewrite, rewrite_payload
from hub.store.pg_schema import SCHEMA_VERSION
from tests.storedata import all_seqs, rec


def test_parse_notice():
    assert parse_notice("task-1 42") == ("task-1", 42, "")
    assert parse_notice("a:b.c 1") == ("a:b.c", 1, "")
    assert parse_notice("t 7 hubA") == ("t", 7, "hubA")
    assert parse_notice("nonsense") is None
    assert parse_notice("t x") is None
    assert parse_notice(" 5") is None


def test_rewrite_notices_round_trip_in_runs_and_stay_under_notifys_bound():
    rewrite = Rewrite("t", "redacted", (3, 4, 5, 9, 11, 12))
    payload = rewrite_payload(rewrite, "hubA")
    assert payload == "t ~redacted 3-5,9,11-12 hubA"
    assert parse_rewrite(payload) == (rewrite, "hubA")
    # Older hubs' parser ignores it; this one ignores watermark notices.
    assert parse_notice(payload) is None and parse_rewrite("t 7 hubA") is None
    # Too many runs for a NOTIFY: the one run covering them (a superset, nothing missed).
    scattered = Rewrite("t" * 128, "replaced", tuple(range(1, 40_000, 2)))
    payload = rewrite_payload(scattered, "hubA")
    assert len(payload.encode()) < 8000
    parsed, _ = parse_rewrite(payload)
    assert parsed.seqs == tuple(range(1, 39_999 + 1)) and set(scattered.seqs) <= set(parsed.seqs)
    for bad in ("t ~deleted 1 hubA", "t ~redacted 0-3 hubA", "t ~redacted 5-3 hubA", "t ~redacted x hubA", " ~redacted 1 h"):
        assert parse_rewrite(bad) is None, bad


@pytest.mark.pg
async def test_pg_appends_report_exactly_what_they_inserted(pg_url):
    from hub.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    await store.open()
    try:
        result = await store.append([rec(s) for s in range(1, 301)])
        assert len(result.inserted) == 300
        result = await store.append([rec(s) for s in range(250, 551)])
        assert [r.seq for r in result.inserted] == list(range(301, 551))
        assert result.durable == {"t1": 550}
        result = await store.append([rec(5), rec(600), rec(5), rec(551), rec(1, producer="other")])
        assert [r.seq for r in result.inserted] == [551, 552]
        assert (await store.stats("t1")).total_logs == 552
    finally:
        await store.close()


@pytest.mark.pg
async def test_pg_notices_tell_other_hubs_of_durable_progress(pg_url):
    from hub.store.postgres import NOTIFY_CHANNEL, STATUS_NOTICE, PostgresStore

    listener, writer = PostgresStore(pg_url), PostgresStore(pg_url)
    await listener.open()
    await writer.open()
    try:
        async with listener.listen() as notices:
            with trio.fail_after(30):
                await writer.append([rec(1), rec(2)])
                assert await anext(notices) == ("t1", 2)
                await writer.append([rec(4)])  # ahead of the producer: not stored, no notice
                await writer.append([rec(3)])
                assert await anext(notices) == ("t1", 3)
                await writer.set_state("t1", "succeeded", 0)
                # A state change is announced too, so other hubs' subscribers see it.
                assert await anext(notices) == ("t1", STATUS_NOTICE)
                # A notice as another hub's commit sends it.
                async with writer._connection() as conn:
                    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, f"t9 7 {writer.origin}")
                assert await anext(notices) == ("t9", 7)
    finally:
        await listener.close()
        await writer.close()


@pytest.mark.pg
async def test_pg_notices_overflow_is_reported(pg_url):
    from hub.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    await store.open()
    try:
        async with store.listen(buffer=2) as notices:
            for seq in range(1, 6):
                await store.append([rec(seq)])
            # A round trip on the listening connection: notices committed
            # before it are delivered before its answer.
            await notices._conn.fetchval("SELECT 1")
            with trio.fail_after(30):
                assert [await anext(notices) for _ in range(3)] == [("t1", 1), ("t1", 2), None]
                await store.append([rec(6)])
                assert await anext(notices) == ("t1", 6)
    finally:
        await store.close()


@pytest.mark.pg
async def test_pg_lost_listen_connection_raises_store_unavailable(pg_url):
    from hub.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    await store.open()
    try:
        async with store.listen() as notices:
            pid = await notices._conn.fetchval("SELECT pg_backend_pid()")
            async with store._connection() as conn:
                await conn.execute("SELECT pg_terminate_backend($1)", pid)
            with trio.fail_after(30), pytest.raises(StoreUnavailable):
                await anext(notices)
    finally:
        await store.close()


@pytest.mark.pg
async def test_pg_lost_connections_surface_as_store_unavailable_then_recover(pg_url):
    from hub.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    await store.open()
    try:
        await store.append([rec(1)])
        with pytest.raises(StoreUnavailable):
            async with store._connection() as conn:
                await conn.execute(
                    """
                    SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                    WHERE datname = current_database() AND pid <> pg_backend_pid()
                    """
                )
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        failures = 0
        for _ in range(5):
            try:
                await store.append([rec(2)])
                break
            except StoreUnavailable:
                failures += 1
        assert failures < 5
        assert await all_seqs(store) == [1, 2]
    finally:
        await store.close()


@pytest.mark.pg
async def test_pg_reads_outlive_the_server_ending_idle_pooled_connections(pg_url):
    """The server ends a session idle for 50 ms (idle_session_timeout): a read
    that takes a pooled connection at about that moment finds it closed at its
    first statement, before anything was read. It is run again on a new
    connection, not answered StoreUnavailable (a REST 503 to a reader of a
    healthy database)."""
    from hub.store.postgres import PostgresStore

    store = PostgresStore(f"{pg_url}?idle_session_timeout=50", command_timeout=5)
    await store.open()
    try:
        await store.append([rec(1)])
        for i in range(40):
            # Each read comes at another moment across the one the server ends
            # the connection the last one left idle.
            await trio.sleep(0.044 + (i % 12) / 1000)
            assert (await store.stats("t1")).total_logs == 1
            await trio.sleep(0.044 + (i * 5 % 12) / 1000)
            assert (await store.sections("t1")) is not None  # a snapshot read: its BEGIN first
            await trio.sleep(0.044 + (i * 7 % 12) / 1000)
            verified = await store.verify("t1")  # snapshot reads, then a write
            assert verified is not None and verified.verdict == "unverified", verified
    finally:
        await store.close()


@pytest.mark.pg
async def test_pg_unreachable_server_is_store_unavailable(pg_url):
    from hub.store.postgres import PostgresStore

    with pytest.raises(StoreUnavailable):
        await PostgresStore("postgresql://postgres@127.0.0.1:1/nothing", connect_timeout=5).open()


@pytest.mark.pg
async def test_pg_hubs_starting_together_create_the_schema_once(pg_url):
    from hub.store.postgres import PostgresStore

    stores = [PostgresStore(pg_url) for _ in range(4)]
    async with trio.open_nursery() as nursery:
        for s in stores:
            nursery.start_soon(s.open)
    try:
        await stores[0].append([rec(1)])
        assert await all_seqs(stores[3]) == [1]
        async with stores[0]._connection() as conn:
            assert await conn.fetch("SELECT version FROM keruta_schema") == [(SCHEMA_VERSION,)]
    finally:
        for s in stores:
            await s.close()


@pytest.mark.pg
async def test_pg_newer_schema_is_refused(pg_url):
    from hub.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    await store.open()
    async with store._connection() as conn:
        await conn.execute("UPDATE keruta_schema SET version = 99")
    await store.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        await PostgresStore(pg_url).open()
