"""The writer actor: commits ingested records in batches, then acknowledges.

Everything that changes the store on behalf of a producer passes through one
inbox, so a task's `status` is applied after the records sent before it. A
commit goes to live viewers at once; its answers (acks, POST replies) go
through the syncer, which gives them once the commit is durable.

On a store with row locks (PostgreSQL), a commit never waits for a task row
another session holds (an admin's transaction, a stuck client; another
hub's commit): it stores the other tasks' records and parks that task. A
parked task's requests, and any that come for it meanwhile, are committed in
order by a lane of their own (at most PARKED_LANES at once), which tries
again without waiting, every PARKED_RETRY (growing) and, past PARKED_PATIENCE,
waiting up to PARKED_LOCK_WAIT for the row (a row other hubs keep busy is
then still had in turn; one held for good is never a store outage); once
the lane has nothing left the task is the main commits' again. So one
locked row holds up its own task, not every task's.
"""

from __future__ import annotations

import collections
import logging
import operator
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import attrs
import trio

from hub.actors.broadcaster import Broadcaster
from hub.actors.capper import Capper
from hub.actors.pacing import CommitPacing
from hub.actors.syncer import SYNC_QUEUE, Settled, run_syncer
from hub.messages import Refusal, Withdrawn, WriteOutcome, WriteRequest
from hub.metrics import Metrics
from hub.store.base import (
    ANONYMOUS,
    CONFLICT,
    FULL,
    GAP,
    HUB_MADE,
    STORE_RETRY,
    AppendResult,
    Incoming,
    Store,
    StoreUnavailable,
    TaskBusy,
    hub_made,
)
from keruta.backoff import Backoff
from keruta.channels import receive_now
from keruta.limits import MAX_SEQ
from keruta.records import TaskInfo
from keruta.retry import retry

log = logging.getLogger("keruta.hub.writer")

T = TypeVar("T")

# While commits follow each other (one ended with requests waiting), at most
# one starts per this many seconds (hub/actors/pacing.py); otherwise at once.
COMMIT_PACE = 0.01
# Parked tasks' lanes committing at once (each waits on a connection of the
# store's pool, which the main commits and the readers need too).
PARKED_LANES = 4
# A parked task's lane tries again without waiting after this, growing to a
# tenth of a second; past PARKED_PATIENCE it waits for the row instead, up
# to PARKED_LOCK_WAIT an attempt (in the server's queue for the row, so a
# row other hubs keep busy is still had in turn), and tries again.
PARKED_RETRY = Backoff(initial=0.005, factor=2.0, cap=0.1, jitter=0.0)
PARKED_PATIENCE = 0.5
PARKED_LOCK_WAIT = 1.0


_SEQ = operator.attrgetter("seq")


def _who(producer: str) -> str:
    return "the anonymous producer" if producer == ANONYMOUS else f"producer {producer}"


def settle(items: Sequence[Incoming], result: AppendResult, offset: int) -> WriteOutcome:
    """One request's share of a committed batch: what to acknowledge, what to refuse.

    A request is acknowledged up to its own highest seq at most, never to the
    producer's mark after the whole commit: another request in the same
    commit may have stored higher seqs of that producer with other records,
    which this one's are then refused against (a later request of this
    connection, or one of another connection claiming the same identity). A
    refused record caps its identity's acknowledgement just below it. So an
    ack never covers a record that was not stored.
    """
    records = result.records[offset : offset + len(items)]
    status = result.status[offset : offset + len(items)]
    tasks = {item.task_id for item in items}
    names = {item.producer for item in items}
    # Usually one task's one producer: the pairs are told without a tuple per record.
    if len(tasks) == 1 and len(names) == 1:
        key = (next(iter(tasks)), next(iter(names)))
        sent = {key: max(map(_SEQ, items))}
    else:
        sent = {}
        for item in items:
            key = (item.task_id, item.producer)
            seq = item.seq
            assert seq is not None, "numbered before the commit"
            if seq > sent.get(key, 0):
                sent[key] = seq
    producers = {key: min(result.producers[key], own) for key, own in sent.items() if not hub_made(key[1])}
    refusals: list[Refusal] = []
    if CONFLICT not in status and GAP not in status and FULL not in status:
        return WriteOutcome(records=records, producers=producers, refusals=refusals)
    # One refusal per identity and kind, whatever the number of records: the
    # first names the record, the count says how many.
    first_conflict: dict[tuple[str, str], tuple[int, str, int]] = {}
    conflicts: dict[tuple[str, str], int] = defaultdict(int)
    gap: Refusal | None = None
    full: dict[tuple[str, str], Refusal] = {}
    for i, (item, record, state) in enumerate(zip(items, records, status, strict=True)):
        key = (item.task_id, item.producer)
        if state == CONFLICT:
            assert item.seq is not None, "numbered before the commit"
            cap = item.seq - 1
            producers[key] = min(producers[key], cap)
            task_seq = f" (task seq {record.seq})" if record is not None else ""
            what = f"{_who(item.producer)}'s seq {item.seq}{task_seq}"
            conflicts[key] += 1
            if key not in first_conflict or cap < first_conflict[key][2]:
                first_conflict[key] = (i, what, cap)
        elif state == FULL and key not in full:
            assert item.seq is not None, "numbered before the commit"
            cap = item.seq - 1
            if key in producers:
                producers[key] = min(producers[key], cap)
            full[key] = Refusal(
                "TASK_FULL",
                f"record [{i}]: task {item.task_id} has given every seq it may (up to {MAX_SEQ}); "
                f"{_who(item.producer)}'s seq {item.seq} and what follows it were not stored",
                key=None if hub_made(item.producer) else key,
                cap=cap,
            )
        elif state == GAP and gap is None:
            # From what the hub holds of that producer, not from this request's capped ack.
            resume = result.producers[key] + 1
            gap = Refusal(
                "SEQ_GAP",
                f"record [{i}]: {_who(item.producer)} of task {item.task_id} sent seq "
                f"{item.seq} but the hub holds its records only up to {resume - 1}; "
                f"resend from {resume}",
                resume,
            )
    for key, (i, what, cap) in first_conflict.items():
        more = f" ({conflicts[key] - 1} more records of this request too)" if conflicts[key] > 1 else ""
        refusals.append(
            Refusal(
                "SEQ_CONFLICT",
                f"record [{i}]: task {key[0]} already holds a different record under {what}; "
                f"it was not stored{more}",
                key=key,
                cap=cap,
            )
        )
    refusals.extend(full.values())
    if gap is not None:
        refusals.append(gap)
    return WriteOutcome(records=records, producers=producers, refusals=refusals)


class HubNumbering:
    """The identities a writer gives records a client sent without `seq`
    (REST): its own producer id, made once per writer, and a counter that only
    rises. Numbered before the first commit attempt and kept through retries,
    so a retried commit whose first try did commit (its answer lost) finds
    them stored: a duplicate, never a second copy."""

    def __init__(self) -> None:
        self.producer = HUB_MADE + uuid.uuid4().hex
        self.last = 0

    def number(self, items: Sequence[Incoming]) -> Sequence[Incoming]:
        """`items` with an identity for each record sent without `seq`; the
        same items when every one has its own."""
        if all(item.seq is not None for item in items):
            return items
        out = []
        for item in items:
            if item.seq is None:
                self.last += 1
                item = attrs.evolve(item, producer=self.producer, seq=self.last)
            out.append(item)
        return out


async def write_within(
    inbox: trio.MemorySendChannel[WriteRequest], items: Sequence[Incoming], timeout: float
) -> WriteOutcome | None:
    """Hand `items` to the writer and wait up to `timeout` for their commit.

    None means "not stored": the request was withdrawn, so resending the same
    records later cannot store them twice. If a commit attempt holding them is
    under way at the deadline, its outcome is awaited (bounded by the store's
    own connect and command timeouts), because only it can say which is true.
    """
    outcome: list[WriteOutcome] = []
    done = trio.Event()

    def finished(result: WriteOutcome) -> None:
        outcome.append(result)
        done.set()

    request = WriteRequest(done=finished, items=items)
    with trio.move_on_after(timeout):
        # A cancelled send is guaranteed not to have been delivered.
        await inbox.send(request)
        await done.wait()
    if not done.is_set():
        if request.withdraw():
            return None
        await done.wait()
    if isinstance(outcome[0].error, Withdrawn):
        return None
    return outcome[0]


class Writer:
    def __init__(
        self,
        store: Store,
        broadcaster: Broadcaster,
        metrics: Metrics,
        *,
        batch_size: int = 2000,
        flush_interval: float = 0.0,
        pace: float = COMMIT_PACE,
        retry: Backoff = STORE_RETRY,
        capper: Capper | None = None,
    ) -> None:
        self.store = store
        self.broadcaster = broadcaster
        self.metrics = metrics
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.pacing = CommitPacing(pace)
        self.retry = retry
        self.available = trio.Event()
        self.available.set()
        self._synced: trio.MemorySendChannel[Settled] | None = None
        self.numbering = HubNumbering()
        self.capper = capper
        # Tasks whose row another session held: their requests, in order, for their lane.
        self._parked: dict[str, collections.deque[WriteRequest]] = {}
        self._lanes: trio.Nursery | None = None
        self._lane_slots = trio.Semaphore(PARKED_LANES)
        # The main commits' busy_wait: none at all where rows can be held elsewhere.
        self._busy_wait = 0.0 if getattr(store, "row_locks", False) else None

    async def run(self, inbox: trio.MemoryReceiveChannel[WriteRequest]) -> None:
        """Serve until the inbox is closed and drained, then let the syncer drain."""
        synced, to_sync = trio.open_memory_channel[Settled](SYNC_QUEUE)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_syncer, self.store, to_sync)
            with synced:
                self._synced = synced
                async with trio.open_nursery() as lanes:
                    self._lanes = lanes
                    async for first in inbox:
                        if self._park_if_parked(first):
                            continue
                        if first.status is not None:
                            await self._status_or_park(first)
                            continue
                        batch, status = await self._gather(inbox, first)
                        batch = [req for req in batch if not self._park_if_parked(req)]
                        if batch:
                            self.pacing.started(trio.current_time())
                            held = await self._commit(batch, self._busy_wait)
                            self.pacing.ended(waiting=inbox.statistics().current_buffer_used > 0)
                            if held:
                                self._park(held)
                        if status is not None and not self._park_if_parked(status):
                            await self._status_or_park(status)

    async def _status_or_park(self, req: WriteRequest) -> None:
        if not await self._apply_status(req, self._busy_wait):
            self._park([req])

    # -- parked tasks ----------------------------------------------------------

    def _park_if_parked(self, req: WriteRequest) -> bool:
        """Hands `req` to its task's lane if the task is parked."""
        queue = self._parked.get(req.task_id)
        if queue is None:
            return False
        queue.append(req)
        return True

    def _park(self, reqs: list[WriteRequest]) -> None:
        """Parks the requests' tasks (their rows are held elsewhere), these first."""
        assert self._lanes is not None, "parked only while run() serves"
        for req in reqs:
            queue = self._parked.get(req.task_id)
            if queue is None:
                queue = self._parked[req.task_id] = collections.deque()
                self._lanes.start_soon(self._lane, req.task_id, queue)
                self.metrics.parked_tasks += 1
                log.info("task %s: its row is held by another session; its writes wait apart", req.task_id)
            queue.append(req)

    async def _lane(self, task_id: str, queue: collections.deque[WriteRequest]) -> None:
        """Commits a parked task's requests in order once its row is free;
        the task is unparked once nothing is left (no await in between)."""
        try:
            async with self._lane_slots:
                tries = 0
                since = trio.current_time()
                while queue:
                    batch: list[WriteRequest] = []
                    count = 0
                    while queue and queue[0].status is None and count < self.batch_size:
                        batch.append(queue.popleft())
                        count += len(batch[-1].items)
                    wait = 0.0 if trio.current_time() - since < PARKED_PATIENCE else PARKED_LOCK_WAIT
                    if batch:
                        busy = await self._commit(batch, wait)
                    else:
                        status = queue.popleft()
                        busy = [] if await self._apply_status(status, wait) else [status]
                    if busy:
                        queue.extendleft(reversed(busy))
                        await trio.sleep(PARKED_RETRY.base(tries))
                        tries += 1
                    else:
                        tries = 0
                        since = trio.current_time()
        finally:
            del self._parked[task_id]

    async def _answer(self, answers: list[tuple[WriteRequest, WriteOutcome]]) -> None:
        """Answer once durable, in commit order (failures too, to keep the order)."""
        assert self._synced is not None, "answers are given only while run() serves"
        await self._synced.send(Settled(answers))

    async def _gather(
        self, inbox: trio.MemoryReceiveChannel[WriteRequest], first: WriteRequest
    ) -> tuple[list[WriteRequest], WriteRequest | None]:
        """Group requests for one transaction: what is waiting now (group commit),
        up to batch_size records, for up to flush_interval when it is set, and
        until the pacing lets the commit start (hub/actors/pacing.py).

        A status request ends the batch; it is returned to be applied after it.
        """
        batch = [first]
        count = len(first.items)
        now = trio.current_time()
        deadline = max(now + self.flush_interval, self.pacing.earliest(now))
        while count < self.batch_size:
            nxt = receive_now(inbox)
            if nxt is None and deadline > now:
                with trio.move_on_at(deadline):
                    try:
                        nxt = await inbox.receive()
                    except trio.EndOfChannel:
                        pass
            if nxt is None:
                break
            if nxt.status is not None:
                return batch, nxt
            batch.append(nxt)
            count += len(nxt.items)
        return batch, None

    async def _with_retry(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run a store operation, retrying while the store is unavailable.

        The batch is held meanwhile: acks pause, the inbox fills and producers
        slow down, and nothing is lost.
        """

        def failed(_n: int, exc: BaseException, wait: float) -> None:
            self.metrics.store_failures += 1
            self.available = trio.Event() if self.available.is_set() else self.available
            log.warning("store unavailable during %s (%s); retrying in %.1fs", what, exc, wait)

        result = await retry(operation, backoff=self.retry, retryable=(StoreUnavailable,), on_failure=failed)
        # None: the operation had nothing left to do and did not ask the store.
        if result is not None and not self.available.is_set():
            log.warning("store is back")
            self.available.set()
        return result

    async def _append(self, batch: list[WriteRequest], busy_wait: float | None) -> AppendResult | None:
        """One attempt at committing `batch`, less what was withdrawn meanwhile."""
        kept = []
        for req in batch:
            if req.withdrawn:
                assert req.done is not None, "only a REST POST withdraws its request"
                req.done(WriteOutcome(error=Withdrawn("withdrawn before it was stored")))
            else:
                kept.append(req)
        batch[:] = kept
        if not batch:
            return None
        for req in batch:
            req.attempting = True
        items = [item for req in batch for item in req.items]
        try:
            result = await (self.store.append(items) if busy_wait is None else self.store.append(items, busy_wait))
        except BaseException:
            for req in batch:
                req.attempting = False
            raise
        if result.busy:
            for req in batch:
                req.attempting = False  # nothing was stored
        # Committed: `attempting` stays set, so a POST out of time now waits
        # for its answer (given after the sync) instead of calling it lost.
        return result

    async def _commit(self, batch: list[WriteRequest], busy_wait: float | None) -> list[WriteRequest]:
        """Commits `batch` and answers it; with `busy_wait`, the requests of
        tasks whose rows another session held longer are returned, not stored."""
        started = trio.current_time()
        for req in batch:
            # Once numbered, a request's items are left as they are.
            req.items = self.numbering.number(req.items)
        try:
            result = await self._with_retry("append", lambda: self._append(batch, busy_wait))
        except Exception as exc:
            log.exception("append of %d records failed", sum(len(req.items) for req in batch))
            self.metrics.error("STORE_ERROR")
            await self._answer([(req, WriteOutcome(error=exc)) for req in batch])
            return []
        if result is None:
            return []
        if result.busy:
            # Nothing was stored: the rest again now, those tasks' to the caller.
            busy = set(result.busy)
            rest = [req for req in batch if req.task_id not in busy]
            held = [req for req in batch if req.task_id in busy]
            if rest:
                held += await self._commit(rest, busy_wait)
            return held
        items = [item for req in batch for item in req.items]
        self.metrics.write_batch.observe(trio.current_time() - started)
        self.metrics.records_ingested += len(result.inserted)
        self.metrics.records_duplicate += len(items) - len(result.inserted)
        # Committed is enough for viewers: it survives the hub being killed.
        self.broadcaster.publish_records(result.inserted, result.durable)
        if self.capper is not None:
            self.capper.after_commit(result.sizes)
        answers = []
        offset = 0
        for req in batch:
            answers.append((req, settle(req.items, result, offset)))
            offset += len(req.items)
        await self._answer(answers)
        if result.compact:
            await self._compact(result.compact)
        return []

    async def _compact(self, task_ids: list[str]) -> None:
        """Merge these tasks' small chunks, after their records went live: it
        only saves space, so an outage skips it (the next one merges more)
        and a failure is logged, never raised into the writer."""
        try:
            await self.store.compact(task_ids)
        except StoreUnavailable as exc:
            log.info("chunk merge of %d tasks skipped: store unavailable (%s)", len(task_ids), exc)
        except Exception:
            log.exception("chunk merge of tasks %s failed", ", ".join(task_ids[:5]))

    async def _apply_status(self, req: WriteRequest, busy_wait: float | None = None) -> bool:
        """Applies and answers a status change; False (nothing done, nothing
        answered) if its task's row was held elsewhere past `busy_wait`."""
        change = req.status
        assert change is not None

        def set_state() -> Awaitable[TaskInfo]:
            return self.store.set_state(
                change.task_id, change.state, change.exit_code, change.producer, change.summary, busy_wait
            )

        try:
            task = await self._with_retry("set_state", set_state)
        except TaskBusy:
            return False
        except Exception as exc:
            log.exception("status change of %s failed", change.task_id)
            self.metrics.error("STORE_ERROR")
            await self._answer([(req, WriteOutcome(error=exc))])
            return True
        try:
            max_bytes = change.max_bytes
            if max_bytes is not None:
                # After set_state, which made the task if it is new.
                await self._with_retry("set_max_bytes", lambda: self.store.set_max_bytes(change.task_id, max_bytes))
                if self.capper is not None:
                    self.capper.want(change.task_id)
            run_state = None
            if change.producer is not None:
                producer = change.producer
                stored = await self._with_retry(
                    "run_state", lambda: self.store.run_state(change.task_id, producer)
                )
                if stored is not None:
                    run_state = (producer, *stored)
        except Exception as exc:
            log.exception("status change of %s failed", change.task_id)
            self.metrics.error("STORE_ERROR")
            await self._answer([(req, WriteOutcome(error=exc))])
            return True
        self.broadcaster.publish_status(task)
        await self._answer([(req, WriteOutcome(task=task, run_state=run_state))])
        return True
