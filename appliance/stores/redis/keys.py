"""Every Redis key the appliance writes, in one place.

All keys live under `<namespace>:` (`Settings.namespace`, `STEM_NAMESPACE`), so several
environments can share one server without seeing each other. The Python functions below
and the Lua prelude at the bottom (`LUA_KEYS`, prepended to every broker script) are the
only places that spell a key: keep them side by side when a key changes.

Layout (P = "<namespace>:"):

| key                         | type   | holds                                                |
|-----------------------------|--------|------------------------------------------------------|
| P queues                    | set    | names of every queue ever enqueued to                |
| P q:<queue>:<band>          | stream | ready and leased messages of one priority band       |
| P delayed:<queue>           | zset   | members "<band>|<nonce/origin>|<task id>" by due     |
| P delayed-payload:<queue>   | hash   | delayed member -> encoded envelope bytes             |
| P tasks                     | hash   | task id -> where its message is (see `location`)     |
| P consumers                 | hash   | consumer name -> the lease (seconds) it last used    |
| P wake:<queue>              | pubsub | channel: "messages may be due in <queue>"            |
| P wake:control              | pubsub | channel: "a control request was sent"                |
| P control                   | stream | control requests: id, target, command, args, sent_at |
| P control:reply:<id>        | hash   | worker id -> its reply (JSON), PEXPIRE with the TTL  |
| P paused                    | hash   | queue -> when it was paused (paused queues only)     |
| P schedules                 | set    | names of the Beat entries stored                     |
| P schedule:<name>           | hash   | entry JSON, enabled, origin, applied_at, last_* |
| P schedule:runs:<name>      | list   | the entry's runs (JSON), newest first, trimmed       |
| P dlq                       | zset   | every dead-letter id, scored by dead_at              |
| P dlq:q:<queue>             | zset   | dead-letter ids of one original queue, by dead_at    |
| P dlq:entry                 | hash   | dead-letter id -> JSON record (reason, error, times) |
| P dlq:payload               | hash   | dead-letter id -> the raw payload bytes              |
| P result:<task id>          | string | a `TaskResult` as JSON, with the result's TTL        |
| P kv:<key>                  | string | a `put_if_absent` value (unique task, lock), PX TTL  |
| P counter:<key>             | string | an `incr` counter, PX TTL set when it is created     |
| P group:<group id>          | hash   | "size" -> member count; "<index>" -> `TaskResult` JSON |
| P revoked                   | zset   | revoked task ids, scored by expiry (ms, server time) |
| P workers                   | zset   | worker ids, scored by heartbeat expiry (ms)          |
| P worker:<worker id>        | string | a `WorkerHeartbeat` as JSON, PX TTL                  |
| P epoch                     | string | a random token naming this data set (see below)      |
| P rate                      | hash   | limiter key -> its theoretical arrival time (epoch s)|
| P delayed-rate:<queue>      | hash   | delayed member -> "<interval>|<limiter key>"         |
| P chord:<id>                | hash   | size, done, and the callback (q, band, task, payload)|
| P chord:<id>:values         | hash   | member index -> its result value (JSON), HSETNX      |
| P record:<task id>          | hash   | parent, root, canvas (JSON), dups, dup_at; PX TTL    |
| P children:<task id>        | list   | ids of the tasks it enqueued, in order (RPUSH)       |

Stream entries carry `p` (the encoded envelope, verbatim), `t` (the task id, so claims
and settles never parse JSON), `b` (the delivery-count base carried over by a release;
the PEL counter adds the deliveries of this copy) and, on copies, `o` (the origin: the
identity of the message across the copies a release, retry or promotion writes, so that
a late ACK or DEAD from a lost lease still removes the message, as the protocol says).
A fresh entry is its own origin; a delayed member's nonce is its origin. A rate-limited
entry also carries `rk` (its limiter key) and `ri` (the seconds between runs); one that
holds a booked slot carries neither (`appliance.ratelimit`).

`epoch` is written once (SET NX) by the first broker that looks for it. Every broker
remembers the token it saw; a token that changed or vanished means the server lost its
data (it restarted without persistence, or was flushed) while messages were in flight.
"""

from __future__ import annotations

# The consumer group every stream is read through (one group per stream: every
# supervisor competes for the same messages).
GROUP = "stem"

# Priority bands: priority is clamped into 0..9 and claims read band 9 first. Within a
# band, messages are claimed in enqueue order (stream order).
BANDS = 10
BANDS_HIGH_FIRST = tuple(range(BANDS - 1, -1, -1))


def band_of(priority: int) -> int:
    """The stream band of a priority: clamped into 0..BANDS-1."""
    return min(BANDS - 1, max(0, priority))


class Keys:
    """The keys of one namespace, precomputed where they do not depend on a queue."""

    def __init__(self, namespace: str) -> None:
        if not namespace:
            raise ValueError("the Redis namespace must not be empty")
        self.prefix = f"{namespace}:"
        p = self.prefix
        self.queues = f"{p}queues"  # set: queue names ever enqueued to
        self.tasks = f"{p}tasks"  # hash: task id -> location (see `location`)
        self.consumers = f"{p}consumers"  # hash: consumer name -> lease seconds
        self.dlq = f"{p}dlq"  # zset: all dead-letter ids by dead_at
        self.dlq_entry = f"{p}dlq:entry"  # hash: dead-letter id -> JSON record
        self.dlq_payload = f"{p}dlq:payload"  # hash: dead-letter id -> payload bytes
        # zset: revoked task id -> expiry (ms, Redis server clock). One set, not a key per
        # id, so listing every revoke is one read; expired members are trimmed on write.
        self.revoked = f"{p}revoked"
        # zset: worker id -> expiry of its heartbeat key (ms). The index that lists the
        # `worker:<id>` keys without SCAN; members whose key expired are trimmed on write.
        self.workers = f"{p}workers"
        self.epoch = f"{p}epoch"  # string: a random token naming this data set
        self.wake_control = f"{p}wake:control"  # pubsub: a control request was sent
        self.control = f"{p}control"  # stream: control requests (trimmed by age)
        self.paused = f"{p}paused"  # hash: paused queue -> paused_at
        self.schedules = f"{p}schedules"  # set: Beat entry names

    def stream(self, queue: str, band: int) -> str:
        """Stream: the ready and leased messages of `queue` in one priority band."""
        return f"{self.prefix}q:{queue}:{band}"

    def delayed(self, queue: str) -> str:
        """Sorted set: delayed members of `queue`, scored by not_before (epoch seconds)."""
        return f"{self.prefix}delayed:{queue}"

    def delayed_payload(self, queue: str) -> str:
        """Hash: delayed member -> encoded envelope."""
        return f"{self.prefix}delayed-payload:{queue}"

    def wake(self, queue: str) -> str:
        """Pub/sub channel: enqueue publishes here in the same script as its XADD."""
        return f"{self.prefix}wake:{queue}"

    def dlq_queue(self, queue: str) -> str:
        """Sorted set: dead-letter ids whose message came from `queue`, by dead_at."""
        return f"{self.prefix}dlq:q:{queue}"

    def result(self, task_id: str) -> str:
        """String: one `TaskResult` as JSON; expires with the result (PEXPIREAT)."""
        return f"{self.prefix}result:{task_id}"

    def kv(self, key: str) -> str:
        """String: the value `put_if_absent` stored (unique tasks, locks); native PX TTL."""
        return f"{self.prefix}kv:{key}"

    def counter(self, key: str) -> str:
        """String (integer): an `incr` counter; a PX TTL set by the increment creating it.
        A keyspace apart from `kv`, so a counter never satisfies or blocks a lock."""
        return f"{self.prefix}counter:{key}"

    def group(self, group_id: str) -> str:
        """Hash: field "size" holds the member count; field "<index>" the `TaskResult`
        JSON of each finished member (HSETNX: a duplicate report keeps the first). The
        finished count is HLEN - 1. The key carries the group's TTL."""
        return f"{self.prefix}group:{group_id}"

    def control_reply(self, request_id: str) -> str:
        """Hash: worker id -> that worker's reply (JSON) to one control request; the key
        expires with the request's TTL."""
        return f"{self.prefix}control:reply:{request_id}"

    def schedule(self, name: str) -> str:
        """Hash: one Beat entry (its JSON table, the operator's enabled flag, origin,
        applied_at, and the last slot dispatched, when, and the last error)."""
        return f"{self.prefix}schedule:{name}"

    def schedule_runs(self, name: str) -> str:
        """List: the runs of one Beat entry as JSON, newest first (LPUSH + LTRIM)."""
        return f"{self.prefix}schedule:runs:{name}"

    def chord(self, chord_id: str) -> str:
        """Hash: a chord's size, how many members succeeded, and its callback's message."""
        return f"{self.prefix}chord:{chord_id}"

    def record(self, task_id: str) -> str:
        """Hash: a task's parent, root, canvas place and duplicates (`TaskRecord`)."""
        return f"{self.prefix}record:{task_id}"

    def children(self, task_id: str) -> str:
        """List: the ids of the tasks a task enqueued, in enqueue order."""
        return f"{self.prefix}children:{task_id}"

    def worker(self, worker_id: str) -> str:
        """String: the last `WorkerHeartbeat` of one supervisor as JSON; native PX TTL."""
        return f"{self.prefix}worker:{worker_id}"


def delayed_member(band: int | str, nonce: str, task_id: str) -> str:
    """A delayed set member: unique per message (nonce), and carries what promotion needs."""
    return f"{band}|{nonce}|{task_id}"


# Values of the `tasks` hash (the task-id index behind `find_message`):
#   "s|<band>|<entry id>|<queue>"  the message is stream entry <entry id> (ready or leased)
#   "d|<band>|<nonce>|<queue>"     the message is delayed; member = "<band>|<nonce>|<task id>"
# The queue comes last so that any queue name (even one with "|") parses with split("|", 3).
def location(kind: str, band: int | str, ref: str, queue: str) -> str:
    return f"{kind}|{band}|{ref}|{queue}"


# The same layout for the Lua scripts (ARGV[1] is always the prefix, ARGV[2] the group).
LUA_KEYS = f"""
local P = ARGV[1]
local GROUP = ARGV[2]
local BANDS = {BANDS}
local k_queues = P .. 'queues'
local k_tasks = P .. 'tasks'
local k_consumers = P .. 'consumers'
local k_dlq = P .. 'dlq'
local k_dlq_entry = P .. 'dlq:entry'
local k_dlq_payload = P .. 'dlq:payload'
local function k_stream(q, band) return P .. 'q:' .. q .. ':' .. band end
local function k_delayed(q) return P .. 'delayed:' .. q end
local function k_delayed_payload(q) return P .. 'delayed-payload:' .. q end
local function k_wake(q) return P .. 'wake:' .. q end
local function k_dlq_queue(q) return P .. 'dlq:q:' .. q end
local function k_schedule(name) return P .. 'schedule:' .. name end
local function k_schedule_runs(name) return P .. 'schedule:runs:' .. name end
local k_rate = P .. 'rate'
local function k_delayed_rate(q) return P .. 'delayed-rate:' .. q end
local function k_chord(id) return P .. 'chord:' .. id end
local function k_record(task) return P .. 'record:' .. task end
local function k_children(task) return P .. 'children:' .. task end
local function loc_stream(q, band, id) return 's|' .. band .. '|' .. id .. '|' .. q end
local function loc_delayed(q, band, nonce) return 'd|' .. band .. '|' .. nonce .. '|' .. q end
"""
