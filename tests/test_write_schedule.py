"""hub/ws/write_schedule.py: which of a connection's queued writes goes next."""

from __future__ import annotations

from hub.ws.write_schedule import WriteSchedule


def take_all(schedule: WriteSchedule[str]) -> list[str]:
    out = []
    while schedule.next_at() is not None:
        out.append(schedule.pop())
    return out


def test_an_earlier_ready_write_of_another_task_goes_first() -> None:
    schedule: WriteSchedule[str] = WriteSchedule()
    schedule.add("noisy", 12.0, "noisy logs")
    schedule.add("quiet", 10.0, "quiet logs")
    assert schedule.next_at() == 10.0
    assert take_all(schedule) == ["quiet logs", "noisy logs"]


def test_one_tasks_writes_keep_their_order_whatever_their_times() -> None:
    """A status reserves no tokens (ready at once) yet goes after its task's records."""
    schedule: WriteSchedule[str] = WriteSchedule()
    schedule.add("t", 12.0, "records")
    schedule.add("t", 10.0, "status")
    schedule.add("u", 11.0, "other")
    assert take_all(schedule) == ["other", "records", "status"]


def test_equal_times_go_in_arrival_order() -> None:
    schedule: WriteSchedule[str] = WriteSchedule()
    for n in range(5):
        schedule.add(f"task{n % 2}", 1.0, f"w{n}")
    assert take_all(schedule) == [f"w{n}" for n in range(5)]


def test_a_task_drained_is_forgotten() -> None:
    """Once a task's writes are all gone, its next write is not held to their times."""
    schedule: WriteSchedule[str] = WriteSchedule()
    schedule.add("t", 50.0, "late")
    assert take_all(schedule) == ["late"]
    schedule.add("t", 1.0, "next")
    assert schedule.next_at() == 1.0 and len(schedule) == 1


def test_drain_gives_back_everything_waiting() -> None:
    schedule: WriteSchedule[str] = WriteSchedule()
    schedule.add("a", 3.0, "x")
    schedule.add("b", 1.0, "y")
    schedule.add("a", 2.0, "z")
    assert sorted(schedule.drain()) == ["x", "y", "z"]
    assert len(schedule) == 0 and schedule.next_at() is None
