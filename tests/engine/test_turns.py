"""Whose turn it is: light first, synchronous heavy work next, jobs never starved."""

from __future__ import annotations

import threading

from service.engine.turns import BACKGROUND_EVERY, DeviceTurns


def _grants(turns: DeviceTurns, count: int) -> list[str]:
    """The next ``count`` holders the policy picks, each going back to the end of its line."""
    order = []
    for _ in range(count):
        with turns._changed:  # as the turns' own methods call it
            turns._grant()
        holder = turns._holder
        assert holder is not None
        order.append(str(holder))
        turns._holder = None
        turns._line(holder).append(holder)
    return order


class Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return self.name


def test_synchronous_heavy_work_goes_before_jobs_which_still_get_every_fourth_turn() -> None:
    turns = DeviceTurns()
    a, b, job = Named("a"), Named("b"), Named("job")
    turns._in_background.add(id(job))
    turns._heavy.extend([a, b])
    turns._background.append(job)
    order = _grants(turns, 2 * BACKGROUND_EVERY)
    assert order.count("job") == 2  # one turn in BACKGROUND_EVERY
    assert order[:BACKGROUND_EVERY - 1] == ["a", "b", "a"] and order[BACKGROUND_EVERY - 1] == "job"
    # With no job waiting, synchronous heavy work takes every turn.
    turns._background.clear()
    assert _grants(turns, 4) == ["a", "b", "a", "b"]


def test_light_work_goes_first_whatever_waits() -> None:
    turns = DeviceTurns()
    heavy, job, light = Named("heavy"), Named("job"), Named("light")
    turns._in_background.add(id(job))
    turns._heavy.append(heavy)
    turns._background.append(job)
    turns._light.append(light)
    with turns._changed:
        turns._grant()
    assert turns._holder is light


def test_a_heavy_holder_gets_its_turn_back_after_waiting_light_work() -> None:
    turns = DeviceTurns()
    order: list[str] = []
    holder = Named("heavy")
    inside = threading.Event()
    release = threading.Event()

    def heavy() -> None:
        with turns.heavy(holder):
            order.append("heavy starts")
            inside.set()
            release.wait(10)
            turns.pass_turn(holder)  # the light call runs here
            order.append("heavy resumes")

    def light() -> None:
        with turns.light():
            order.append("light")

    worker = threading.Thread(target=heavy)
    worker.start()
    assert inside.wait(10)
    caller = threading.Thread(target=light)
    caller.start()
    while turns.waiting[0] == 0:  # the light call is in line (bounded by the join below)
        threading.Event().wait(0.001)
    release.set()
    worker.join(10)
    caller.join(10)
    assert order == ["heavy starts", "light", "heavy resumes"]
