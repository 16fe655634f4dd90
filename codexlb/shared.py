"""What the replicas of one pool share (SPEC S12), behind one interface.

``SharedState`` is what the rest of codexlb sees: ``take`` counts against a limit shared by
every replica (a client key's requests per minute), and the pool's ``Observer`` hooks carry
what the pool learns to the others. Two implementations:

- ``LocalState``, for SQLite (one process): counters in memory, nothing to tell anyone; no
  call makes a round trip, and the pool has no observer at all.
- ``PostgresState``, for replicas sharing a PostgreSQL database, with PostgreSQL alone:

  - what the pool learns about an account (``knowledge.Knowledge``: cooldowns with their
    reason, usage windows, refused credentials) and soft-affinity pins are upserted into
    ``account_knowledge`` / ``affinity`` and announced with ``NOTIFY`` in the same
    transaction, batched by one writer task a few milliseconds after they happen; every
    replica ``LISTEN``s on a connection of its own and adopts them (``Pool.adopt``), so
    they arrive within a second. A replica that starts, or whose listening connection came
    back, reads the tables first: it does not try an account that is cooling down.
  - counters are per-second buckets in ``key_counters``, taken by the ``codexlb_take``
    function under a per-counter advisory lock: one round trip, and two replicas never both
    take the last unit.
  - liveness: each replica upserts its row in ``replicas`` every ``heartbeat_seconds`` and
    announces its in-flight leases per account (at once, too, when some account has a
    ``max_inflight``) and its gauges (``add_gauges``: a client key's requests in flight, say);
    the others count them (``Account.elsewhere``, ``elsewhere``). A replica silent for
    ``replica_timeout_seconds`` (killed, cut off) is dropped, and so are its leases: no
    account stays busy because of a dead replica. Its row is deleted by the next heartbeat
    of any replica.

The merge rules (``knowledge.merged``) do not depend on arrival order, so replicas converge;
times are epoch seconds, as the upstream's reset times are, so replicas need synchronized
clocks (NTP). Notifications from the database are validated like any input; a bad one is
logged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from codexlb.config import DatabaseConfig
from codexlb.knowledge import Knowledge, merged
from codexlb.pool import AFFINITY_CAPACITY, AFFINITY_KEY_LENGTH, Account, Pool

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger(__name__)

CHANNEL = "codexlb_shared"
PAYLOAD_BYTES = 7000
"""Below PostgreSQL's 8000-byte ``NOTIFY`` payload limit; longer batches are split."""
FLUSH_DELAY_SECONDS = 0.02
"""What the writer waits after the first change, gathering a burst into one transaction."""
RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
"""Back-off of the writer and of the listening connection after a failure."""
MAX_SLOT_CHARS = 2 * AFFINITY_KEY_LENGTH
"""No slot the pool makes is longer (``pool._affinity_slot``)."""
RESET_SLACK_SECONDS = 2.0
AFFINITY_PRUNE_BEATS = 60
"""Expired affinity rows are deleted every this many heartbeats."""


InFlight = dict[str, dict[str, int]]
"""What a replica carries, as its heartbeat says: ``{"a": {account: requests in flight},
"g": {gauge: value}}``."""


class Taken(NamedTuple):
    """The answer of ``SharedState.take``."""

    admitted: bool
    used: int
    """Units counted in the window, this one included when admitted."""
    retry_after: float
    """When refused: seconds until the window frees a unit."""


class SharedState(Protocol):
    """What the replicas share; one process has a ``LocalState``."""

    async def start(self) -> None:
        """Read what the others know, and start telling them (before serving)."""

    async def close(self) -> None: ...

    async def take(self, counter: str, *, limit: int, window: float) -> Taken:
        """Count one unit of ``counter`` unless ``limit`` units were counted in the last
        ``window`` seconds (rolling, to the second) by any replica."""

    async def used(self, counter: str, *, window: float) -> int:
        """The units of ``counter`` counted in the last ``window`` seconds by any replica
        (``GET /v1/usage`` answers the same from every replica)."""

    def add_gauges(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Publish what ``source`` returns (gauge name → this replica's value, such as a
        client key's requests in flight) with every heartbeat; ``gauges_changed`` sends it at
        once. A replica taken for dead stops counting."""

    def gauges_changed(self) -> None:
        """A value of a gauge source changed: tell the others now (not awaited)."""

    def elsewhere(self, gauge: str) -> int:
        """The sum of ``gauge`` over the other live replicas (no round trip)."""


def shared_state(
    engine: AsyncEngine,
    pool: Pool,
    settings: DatabaseConfig,
    *,
    clock: Callable[[], float] = time.time,
) -> SharedState:
    """The ``SharedState`` for the engine's database; ``clock`` times ``LocalState``'s windows
    (PostgreSQL's are timed by the database)."""
    if engine.dialect.name == "postgresql":
        return PostgresState(engine, pool, settings)
    return LocalState(clock)


class LocalState:
    """One process: counters in memory, in the same per-second buckets as PostgreSQL's."""

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._buckets: dict[str, deque[list[int]]] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def take(self, counter: str, *, limit: int, window: float) -> Taken:
        now = self._clock()
        second, span = int(now), _span(window)
        buckets = self._buckets.setdefault(counter, deque())
        used = self._count(buckets, second, span)
        if used >= limit:
            return Taken(False, used, max(buckets[0][0] + span - now, 0.0))
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += 1
        else:
            buckets.append([second, 1])
        return Taken(True, used + 1, 0.0)

    async def used(self, counter: str, *, window: float) -> int:
        buckets = self._buckets.get(counter)
        return 0 if buckets is None else self._count(buckets, int(self._clock()), _span(window))

    def add_gauges(self, source: Callable[[], Mapping[str, int]]) -> None:
        return None

    def gauges_changed(self) -> None:
        return None

    def elsewhere(self, gauge: str) -> int:
        return 0

    @staticmethod
    def _count(buckets: deque[list[int]], second: int, span: int) -> int:
        while buckets and buckets[0][0] <= second - span:
            buckets.popleft()
        return sum(count for _, count in buckets)


def _span(window: float) -> int:
    """Whole seconds of buckets a window covers (as ``codexlb_take`` computes it)."""
    return max(math.ceil(window), 1)


_KNOWLEDGE_COLUMNS = tuple(Knowledge.__dataclass_fields__)
_NEWEST_WINS = {
    "cooldown_until": ("cooldown_until", "reason"),
    "usage_at": (
        "usage_at",
        "primary_used",
        "primary_resets_at",
        "secondary_used",
        "secondary_resets_at",
    ),
    "refused_at": ("refused", "retry_at", "refused_at"),
}


def _knowledge_upsert() -> str:
    """The upsert of one ``account_knowledge`` row by ``knowledge.merged``'s rules."""
    other = "old.identity <> excluded.identity"
    sets = ["identity = excluded.identity"]
    for order, columns in _NEWEST_WINS.items():
        newer = f"{other} OR excluded.{order} > old.{order}"
        sets += [
            f"{column} = CASE WHEN {newer} THEN excluded.{column} ELSE old.{column} END"
            for column in columns
        ]
    sets.append(
        "rate_limited_until = CASE WHEN "
        f"{other} THEN excluded.rate_limited_until "
        "ELSE greatest(old.rate_limited_until, excluded.rate_limited_until) END"
    )
    names = ", ".join(("account", *_KNOWLEDGE_COLUMNS))
    values = ", ".join(f":{c}" for c in ("account", *_KNOWLEDGE_COLUMNS))
    return (
        f"INSERT INTO account_knowledge AS old ({names}) VALUES ({values}) "
        f"ON CONFLICT (account) DO UPDATE SET {', '.join(sets)}"
    )


UPSERT_KNOWLEDGE = text(_knowledge_upsert())
UPSERT_AFFINITY = text(
    "INSERT INTO affinity (slot, account, expires_at) VALUES (:slot, :account, :until) "
    "ON CONFLICT (slot) DO UPDATE SET account = excluded.account, expires_at = excluded.expires_at"
)
NOTIFY = text("SELECT pg_notify(:channel, :payload)")
HEARTBEAT = text(
    "INSERT INTO replicas (replica, heartbeat_at, inflight) VALUES (:replica, now(), :inflight) "
    "ON CONFLICT (replica) DO UPDATE SET heartbeat_at = now(), inflight = excluded.inflight"
)
DROP_DEAD = text(
    "DELETE FROM replicas WHERE heartbeat_at < now() - make_interval(secs => :timeout)"
)
LIVE_REPLICAS = text(
    "SELECT replica, inflight FROM replicas "
    "WHERE heartbeat_at >= now() - make_interval(secs => :timeout) AND replica <> :replica"
)
TAKE_SQL = "SELECT admitted, used, retry_after FROM codexlb_take($1, $2, $3)"
USED_SQL = (
    "SELECT coalesce(sum(count), 0) FROM key_counters WHERE counter = $1 "
    "AND second > floor(extract(epoch from clock_timestamp()))::bigint - $2"
)
COUNTER_CONNECTIONS = 8
"""Connections of a replica's counter pool: a take holds one for a round trip."""


class PostgresState:
    """Replicas on one PostgreSQL database (the module docstring); the pool's ``Observer``."""

    def __init__(self, engine: AsyncEngine, pool: Pool, settings: DatabaseConfig) -> None:
        self.replica = uuid.uuid4().hex[:16]
        self._engine = engine
        self._pool = pool
        self._settings = settings
        self._dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._listener: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._accounts: set[str] = set()
        """Accounts whose knowledge changed since the last flush."""
        self._told: dict[str, Knowledge] = {}
        """What the others know of each account, as far as this replica can tell: what it
        wrote and what it adopted. Knowledge that tells them nothing new is not written."""
        self._pins: dict[str, tuple[str, float]] = {}
        self._leases_changed = False
        self._watch_leases = False
        """Some account has a ``max_inflight``: lease changes go out at once, not with the
        next heartbeat."""
        self._gauge_sources: list[Callable[[], Mapping[str, int]]] = []
        self._gauges_changed = False
        self._peers: dict[str, tuple[float, InFlight]] = {}
        """Live replicas: when they were last heard of (monotonic), what they carry."""
        self._elsewhere: dict[str, int] = {}
        """Gauges summed over the live peers."""
        self._beats = 0
        self._failing = False
        self._counters: asyncpg.Pool | None = None
        self._counters_lock = asyncio.Lock()

    # -- SharedState ----------------------------------------------------------------------

    async def start(self) -> None:
        self._pool.observer = self
        self._watch_leases = any(a.max_inflight for a in self._pool.accounts)
        try:
            await self._listen()
        except (OSError, _asyncpg().PostgresError, TimeoutError) as exc:
            log.error("replicas: cannot listen for the others' news yet (%s); retrying", exc)
            self._lost.set()
        self._tasks = [
            asyncio.create_task(self._keep_listening(), name="codexlb-replicas-listen"),
            asyncio.create_task(self._write_forever(), name="codexlb-replicas-write"),
            asyncio.create_task(self._beat_forever(), name="codexlb-replicas-heartbeat"),
        ]
        log.info("replica %s shares its pool through PostgreSQL", self.replica)

    async def close(self) -> None:
        self._pool.observer = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self._flush()
                async with self._engine.begin() as conn:
                    await conn.execute(
                        text("DELETE FROM replicas WHERE replica = :replica"),
                        {"replica": self.replica},
                    )
                    await self._notify(conn, "g", [True])
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=2)
            self._listener = None
        if self._counters is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._counters.close(), 2)
            self._counters = None

    async def take(self, counter: str, *, limit: int, window: float) -> Taken:
        """One statement on a connection of the counters' own asyncpg pool: its implicit
        transaction holds the counter's advisory lock until it commits. (Through SQLAlchemy,
        with its pre-ping and explicit transaction, a request would cost twice the CPU.)"""
        try:
            counters = self._counters or await self._open_counters()
            row = await counters.fetchrow(TAKE_SQL, counter, float(window), limit)
        except Exception as exc:  # the database failed: the limit must not fail the request
            log.warning("counter %s not shared (%s): request admitted", counter, type(exc).__name__)
            return Taken(True, 0, 0.0)
        assert row is not None  # the function returns one row
        return Taken(bool(row["admitted"]), int(row["used"]), float(row["retry_after"]))

    async def used(self, counter: str, *, window: float) -> int:
        try:
            counters = self._counters or await self._open_counters()
            used = await counters.fetchval(USED_SQL, counter, _span(window))
        except Exception as exc:
            log.warning("counter %s not read (%s)", counter, type(exc).__name__)
            return 0
        return int(used)

    async def _open_counters(self) -> asyncpg.Pool:
        async with self._counters_lock:
            if self._counters is None:
                self._counters = await _asyncpg().create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=COUNTER_CONNECTIONS,
                    timeout=10,
                    reset=_keep_session,
                )
            return self._counters

    # -- Observer (called by the pool, never awaits) --------------------------------------

    def learned(self, account: Account) -> None:
        self._accounts.add(account.name)
        self._wake.set()

    def pinned(self, slot: str, account: str, until: float) -> None:
        self._pins[slot] = (account, until)
        if len(self._pins) > AFFINITY_CAPACITY:  # the database is away: keep the latest
            del self._pins[next(iter(self._pins))]
        self._wake.set()

    def leased(self) -> None:
        self._leases_changed = True
        if self._watch_leases:
            self._wake.set()

    # -- gauges ---------------------------------------------------------------------------

    def add_gauges(self, source: Callable[[], Mapping[str, int]]) -> None:
        self._gauge_sources.append(source)

    def gauges_changed(self) -> None:
        self._gauges_changed = True
        self._wake.set()

    def elsewhere(self, gauge: str) -> int:
        return self._elsewhere.get(gauge, 0)

    def _carried(self) -> InFlight:
        """What this replica carries: leases per account, and its gauges."""
        gauges: dict[str, int] = {}
        for source in self._gauge_sources:
            gauges.update(source())
        return {"a": self._pool.leases(), "g": gauges}

    # -- telling the others ---------------------------------------------------------------

    async def _write_forever(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            await asyncio.sleep(FLUSH_DELAY_SECONDS)
            self._wake.clear()
            try:
                await self._flush()
            except Exception as exc:
                self._wake.set()  # what was not written is still pending (``_flush``)
                delay = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
                failures += 1
                log.warning(
                    "replicas: cannot share what this one learned (%s); retrying in %.1fs",
                    type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
            else:
                failures = 0

    async def _flush(self) -> None:
        """Write and announce what changed; on failure it stays pending."""
        names, self._accounts = self._accounts, set()
        pins, self._pins = self._pins, {}
        leases = (self._leases_changed and self._watch_leases) or self._gauges_changed
        self._leases_changed = self._gauges_changed = False
        try:
            news = {  # in one order on every replica: concurrent upserts cannot deadlock
                name: knowledge
                for name in sorted(names)
                if (account := self._pool.get(name)) is not None
                and not _nothing_new(self._told.get(name), knowledge := account.knowledge())
            }
            rows = [{"account": name, **knowledge.row()} for name, knowledge in news.items()]
            if not rows and not pins and not leases:
                return
            async with self._engine.begin() as conn:
                if rows:
                    await conn.execute(UPSERT_KNOWLEDGE, rows)
                    await self._notify(conn, "k", rows)
                if pins:
                    entries = [[slot, *pins[slot]] for slot in sorted(pins)]
                    await conn.execute(
                        UPSERT_AFFINITY,
                        [{"slot": s, "account": a, "until": u} for s, a, u in entries],
                    )
                    await self._notify(conn, "a", entries)
                if leases:
                    await self._notify(conn, "i", [self._carried()])
            for name, knowledge in news.items():
                self._told[name] = merged(self._told.get(name), knowledge)
        except BaseException:
            self._accounts |= names
            self._pins = {**pins, **self._pins}
            self._gauges_changed = self._gauges_changed or leases
            raise

    async def _notify(self, conn: Any, kind: str, entries: Iterable[Any]) -> None:
        """Announce ``entries`` as messages ``{"r": replica, kind: [...]}`` under the size
        limit of a payload."""
        head = orjson.dumps({"r": self.replica, kind: []})
        batch: list[bytes] = []
        size = len(head)
        for entry in entries:
            encoded = orjson.dumps(entry)
            if batch and size + len(encoded) + 1 > PAYLOAD_BYTES:
                await self._send(conn, kind, batch)
                batch, size = [], len(head)
            batch.append(encoded)
            size += len(encoded) + 1
        if batch:
            await self._send(conn, kind, batch)

    async def _send(self, conn: Any, kind: str, batch: list[bytes]) -> None:
        payload = b'{"r":%s,"%s":[%s]}' % (
            orjson.dumps(self.replica),
            kind.encode(),
            b",".join(batch),
        )
        await conn.execute(NOTIFY, {"channel": CHANNEL, "payload": payload.decode()})

    async def _beat_forever(self) -> None:
        while True:
            try:
                await self._beat()
            except Exception as exc:
                if not self._failing:
                    log.warning("replicas: heartbeat failed (%s)", type(exc).__name__)
                self._failing = True
            else:
                if self._failing:
                    log.info("replicas: heartbeat written again")
                self._failing = False
            self._forget_silent_peers()
            await asyncio.sleep(self._settings.heartbeat_seconds)

    async def _beat(self) -> None:
        self._watch_leases = any(a.max_inflight for a in self._pool.accounts)
        carried = self._carried()
        self._beats += 1
        async with self._engine.begin() as conn:
            await conn.execute(
                HEARTBEAT, {"replica": self.replica, "inflight": orjson.dumps(carried).decode()}
            )
            await conn.execute(DROP_DEAD, {"timeout": self._settings.replica_timeout_seconds})
            if self._beats % AFFINITY_PRUNE_BEATS == 0:
                await conn.execute(
                    text("DELETE FROM affinity WHERE expires_at < :now"), {"now": time.time()}
                )
            await self._notify(conn, "i", [carried])

    # -- hearing the others ---------------------------------------------------------------

    async def _listen(self) -> None:
        """Open the listening connection, then read what is known (so nothing announced in
        between is missed: adopting twice is harmless)."""
        connection = await _asyncpg().connect(self._dsn, timeout=10)
        try:
            await connection.add_listener(CHANNEL, self._on_notification)
            connection.add_termination_listener(lambda _: self._lost.set())
            await self._load()
        except BaseException:
            await connection.close()
            raise
        self._listener = connection
        self._lost.clear()

    async def _keep_listening(self) -> None:
        failures = 0
        while True:
            await self._lost.wait()
            if self._listener is not None:
                log.warning("replicas: the listening connection was lost; reconnecting")
                with contextlib.suppress(Exception):
                    await self._listener.close(timeout=1)
                self._listener = None
            await asyncio.sleep(RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)])
            try:
                await self._listen()
            except (OSError, _asyncpg().PostgresError, TimeoutError) as exc:
                failures += 1
                log.warning("replicas: cannot listen yet (%s)", type(exc).__name__)
            else:
                failures = 0
                log.info("replicas: listening again")

    async def _load(self) -> None:
        """Adopt the tables: account knowledge, live affinity, live replicas' leases."""
        now = time.time()
        async with self._engine.connect() as conn:
            knowledge = (await conn.execute(text("SELECT * FROM account_knowledge"))).mappings()
            self._adopt_knowledge([dict(row) for row in knowledge])
            pins = await conn.execute(
                text(
                    "SELECT slot, account, expires_at FROM affinity WHERE expires_at > :now "
                    "ORDER BY expires_at DESC LIMIT :capacity"
                ),
                {"now": now, "capacity": AFFINITY_CAPACITY},
            )
            for slot, account, until in reversed(pins.all()):
                self._pool.adopt_affinity(slot, account, until)
            peers = await conn.execute(
                LIVE_REPLICAS,
                {"timeout": self._settings.replica_timeout_seconds, "replica": self.replica},
            )
            for replica, inflight in peers.all():
                try:
                    self._heard(replica, orjson.loads(inflight))
                except ValueError as exc:
                    log.warning("replicas: ignored the row of replica %s (%s)", replica, exc)
        self._count_elsewhere()

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = orjson.loads(payload)
            if not isinstance(message, dict) or not isinstance(message.get("r"), str):
                raise ValueError("not a message of a replica")
            replica = message["r"]
            if replica == self.replica:
                return
            if "k" in message:
                self._adopt_knowledge(_entries(message["k"]))
            if "a" in message:
                for entry in _entries(message["a"]):
                    slot, account, until = _pin(entry)
                    self._pool.adopt_affinity(slot, account, until)
            if "i" in message:
                for entry in _entries(message["i"]):
                    self._heard(replica, entry)
                self._count_elsewhere()
            if "g" in message:
                self._peers.pop(replica, None)
                self._count_elsewhere()
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("replicas: dropped a malformed notification (%s)", exc)

    def _adopt_knowledge(self, rows: list[Any]) -> None:
        for row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("account"), str):
                raise ValueError("knowledge without an account")
            name, news = row["account"], Knowledge.from_row(row)
            self._pool.adopt(name, news)
            if self._pool.get(name) is not None:
                self._told[name] = merged(self._told.get(name), news)

    def _heard(self, replica: str, carried: Any) -> None:
        if not isinstance(carried, dict) or not all(
            _counts(carried.get(part, {})) for part in ("a", "g")
        ):
            raise ValueError("in-flight counts must map names to counts")
        self._peers[replica] = (time.monotonic(), carried)

    def _forget_silent_peers(self) -> None:
        cutoff = time.monotonic() - self._settings.replica_timeout_seconds
        silent = [replica for replica, (seen, _) in self._peers.items() if seen < cutoff]
        for replica in silent:
            del self._peers[replica]
            log.warning("replica %s went silent; its in-flight requests no longer count", replica)
        if silent:
            self._count_elsewhere()

    def _count_elsewhere(self) -> None:
        totals: dict[str, dict[str, int]] = {"a": {}, "g": {}}
        for _, carried in self._peers.values():
            for part, total in totals.items():
                for name, count in carried.get(part, {}).items():
                    total[name] = total.get(name, 0) + count
        self._pool.set_elsewhere(totals["a"])
        self._elsewhere = totals["g"]


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """A counter connection runs single ``TAKE`` statements and keeps no session state: the
    reset asyncpg makes on each release (a round trip) has nothing to undo."""


def _nothing_new(told: Knowledge | None, knowledge: Knowledge) -> bool:
    """Whether ``knowledge`` tells the others nothing they do not know: the same but for the
    time of the observation and reset times that moved by less than ``RESET_SLACK_SECONDS``
    (an upstream that reports "resets in N seconds" moves them at every answer)."""
    if told is None:
        return False
    resets = ("primary_resets_at", "secondary_resets_at")
    for name in Knowledge.__dataclass_fields__:
        old, new = getattr(told, name), getattr(knowledge, name)
        if name == "usage_at" or old == new:
            continue
        if name in resets and abs(old - new) < RESET_SLACK_SECONDS:
            continue
        return False
    return True


def _counts(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in value.items()
    )


def _entries(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("entries must be a list")
    return value


def _pin(entry: Any) -> tuple[str, str, float]:
    if (
        isinstance(entry, list)
        and len(entry) == 3
        and isinstance(entry[0], str)
        and len(entry[0]) <= MAX_SLOT_CHARS
        and isinstance(entry[1], str)
        and isinstance(entry[2], int | float)
    ):
        return entry[0], entry[1], float(entry[2])
    raise ValueError("a pin is [slot, account, until]")


def _asyncpg() -> Any:
    """asyncpg, imported when PostgreSQL is first used: a process on SQLite never holds it."""
    import asyncpg

    return asyncpg
