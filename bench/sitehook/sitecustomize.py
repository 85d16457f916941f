"""Counts the gateway's crossings to its database thread (bench/cpuab.py ``--count``), and
times its stalls (bench/stalls.py).

Put on ``PYTHONPATH`` of a gateway process with ``UDSGATEWAY_BENCH_COUNTS`` naming a file:
every ``ThreadRunner.run`` (one hand-off to the database thread and one back) is counted
by the name of the function it runs (for ``Database.transaction``, the function run in the
transaction). ``SIGUSR2`` writes the counts so far to the file as JSON. Not loaded by the
gateway otherwise; the counting itself costs a dict update per crossing.

With ``UDSGATEWAY_BENCH_STALLS`` naming a file instead: every job of the database thread
that runs longer than ``UDSGATEWAY_BENCH_STALL_MS`` (3 ms) and every time the reactor came
back that much later than a 2 ms timer asked is kept as ``[kind, wall start, ms, what]``;
``SIGUSR2`` writes the list to the file as JSON.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

_PATH = os.environ.get("UDSGATEWAY_BENCH_COUNTS")
_STALLS = os.environ.get("UDSGATEWAY_BENCH_STALLS")


def _name(function: Any) -> str:
    function = getattr(function, "func", function)  # a functools.partial: what it calls
    name = getattr(function, "__qualname__", None)
    return name if isinstance(name, str) else type(function).__name__


def _install() -> None:
    from udsgateway.store import engine

    counts: dict[str, int] = {}
    original = engine.ThreadRunner.run

    def run(self: Any, function: Any, *args: Any) -> Any:
        # Never repr() a bound method here: it would repr its object, and a dispatcher's
        # repr holds every lane and delivery (it once tripled the CPU per message).
        name = _name(function)
        if name == "Database.transaction_now" and args:
            name = _name(args[0])
            if name == "GroupCommitter._run_batch":  # which committer: its batch function
                name = "group commit: " + _name(args[0].__self__._batch)
        counts[name] = counts.get(name, 0) + 1
        return original(self, function, *args)

    engine.ThreadRunner.run = run  # type: ignore[method-assign]

    # Every SQL statement SQLite runs, by its first words (SQLite connections only).
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    def statement(sql: str) -> None:
        words = sql.split(None, 3)
        verb = words[0].upper() if words else "?"
        if verb in ("INSERT", "DELETE") and len(words) > 2:
            verb += " " + words[2]
        elif verb == "UPDATE" and len(words) > 1:
            verb += " " + words[1]
        elif verb == "SELECT":
            table = sql.upper().split(" FROM ", 1)
            verb += " " + (table[1].split(None, 1)[0] if len(table) > 1 else "")
        key = "sql: " + verb
        counts[key] = counts.get(key, 0) + 1

    def connected(dbapi_connection: Any, _record: Any) -> None:
        if hasattr(dbapi_connection, "set_trace_callback"):
            dbapi_connection.set_trace_callback(statement)

    event.listen(Pool, "connect", connected)

    def dump(_signum: int, _frame: Any) -> None:
        assert _PATH is not None
        with open(_PATH + ".tmp", "w", encoding="utf-8") as out:
            json.dump(counts, out)
        os.replace(_PATH + ".tmp", _PATH)

    signal.signal(signal.SIGUSR2, dump)


def _install_stalls() -> None:
    import sys
    import threading
    import time
    import traceback

    from twisted.internet import reactor, task

    from udsgateway.store import engine

    limit = float(os.environ.get("UDSGATEWAY_BENCH_STALL_MS", "3")) / 1000
    events: list[tuple[str, float, float, str]] = []
    original = engine.ThreadRunner.run

    def run(self: Any, function: Any, *args: Any) -> Any:
        name = _name(function)
        if name == "Database.transaction_now" and args:
            name = _name(args[0])
            if name == "GroupCommitter._run_batch":
                name = "group commit: " + _name(args[0].__self__._batch)

        def timed(*inner: Any) -> Any:
            wall, start = time.time(), time.perf_counter()
            try:
                return function(*inner)
            finally:
                took = time.perf_counter() - start
                if took > limit:
                    events.append(("database", wall, took * 1000, name))

        return original(self, timed, *args)

    engine.ThreadRunner.run = run  # type: ignore[method-assign]
    tick = 0.002
    last = [time.perf_counter()]

    def beat() -> None:
        now = time.perf_counter()
        late = now - last[0] - tick
        if late > limit:
            events.append(("reactor", time.time() - late, late * 1000, "late timer"))
        last[0] = now

    def begin() -> None:
        last[0] = time.perf_counter()
        task.LoopingCall(beat).start(tick, now=False)
        threading.Thread(target=watch, args=(threading.get_ident(),), daemon=True).start()

    def watch(reactor_thread: int) -> None:
        # What the reactor is running while it is late: its stack, once per stall.
        seen = 0.0
        while True:
            time.sleep(0.002)
            beat_at = last[0]
            if time.perf_counter() - beat_at > 5 * limit and beat_at != seen:
                seen = beat_at
                frame = sys._current_frames().get(reactor_thread)
                if frame is not None:
                    stack = traceback.extract_stack(frame)[-8:]
                    where = " < ".join(
                        f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                        for f in reversed(stack)
                    )
                    events.append(("reactor stack", time.time(), 0.0, where))

    reactor.callWhenRunning(begin)  # type: ignore[attr-defined]

    import gc

    collecting = [0.0, 0.0]

    def collected(phase: str, info: dict[str, Any]) -> None:
        # The garbage collector holds the GIL: every thread waits for a long collection.
        if phase == "start":
            collecting[0], collecting[1] = time.perf_counter(), time.time()
            return
        took = time.perf_counter() - collecting[0]
        if took > limit:
            what = f"generation {info.get('generation')}, {info.get('collected')} freed"
            events.append(("garbage collector", collecting[1], took * 1000, what))

    gc.callbacks.append(collected)

    def dump() -> None:
        assert _STALLS is not None
        with open(_STALLS + ".tmp", "w", encoding="utf-8") as out:
            json.dump(events, out)
        os.replace(_STALLS + ".tmp", _STALLS)

    signal.signal(signal.SIGUSR2, lambda _s, _f: reactor.callFromThread(dump))  # type: ignore[attr-defined]


if _PATH:
    _install()
elif _STALLS:
    _install_stalls()
