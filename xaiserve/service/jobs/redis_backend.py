"""Distributed job store on Redis, for gateway replicas and a fleet of `xaiserve worker` processes.

Why this pattern:

* Ready queue = one sorted set per method, all scores 0, members "<inverted priority:10><fifo:16>:<id>".
  Equal scores sort lexicographically, so ZRANGE 0 0 is the highest priority, then the oldest job.
  A Stream alone is strictly FIFO and cannot honour JobRequest.priority; a list cannot either.
* Running jobs = entries of one Stream (`lease`) read by the consumer group `workers`. The claim
  script pops the best ready job, XADDs a lease entry and XREADGROUPs it to the claiming worker in
  the same atomic script, so the group's pending-entries list (PEL) *is* the set of leases:
  - a worker heart-beats with XCLAIM-to-itself (JUSTID), which resets the entry's idle time;
  - XAUTOCLAIM with min-idle = claim_idle_s finds exactly the leases whose worker stopped
    heart-beating (SIGKILL, OOM, node loss); the recover script re-queues them (or fails them after
    max_attempts) in the same atomic step, so two reclaimers can never both act on one job;
  - XPENDING / XRANGE give operators the fleet view (who runs what, idle times) with stock tools.
  This is the standard at-least-once Streams pattern, with priorities added by the sorted set.
* Every write about a running job is fenced by (state = running, worker, attempt) inside a Lua
  script, and the result is written with SET NX by the script that ends the job: a worker that lost
  its lease (cancelled, expired, reclaimed) can never store a second result or a stale event.
* Per-job hash for the state (small, read by GetJob), the request and the result in their own keys
  (large; read only by workers / GetJob with include_result), and one small Stream of events per job
  with explicit ids 0-<seq>: any gateway's WatchJob reads the hash (which holds seq) and then XREAD
  BLOCKs from 0-<seq>, so progress fans out to every gateway with nothing lost between the snapshot
  and the live events (pub/sub would lose events published before the SUBSCRIBE).
* Cancellation = the job's state in the hash; the worker's check_cancelled reads it (throttled).
* Bounded queue: the submit script sums ZCARD over the methods' ready sets and refuses beyond
  max_queued. Finished jobs get PEXPIRE result_ttl_s on all their keys: Redis purges them itself.
* Workers block on BLPOP of per-method wake-up lists (pushed by submit/re-queue) instead of polling.

* Owners: the job hash holds its owner; an idempotency key lives at `idem:<len>:<owner>:<key>`, so
  two principals using the same key get two jobs.
* Durability: gateways and workers call `durability()` at start and refuse a Redis that neither
  appends (appendonly) nor snapshots (an RDB save policy), unless allowed. An `epoch` key written at
  start and checked by housekeeping tells when Redis lost its data anyway (a restart without
  persistence, a FLUSHALL): that is logged as an error and counted, and GetJob says so for the
  jobs submitted before it.

Deployment notes: one Redis primary (optionally with replicas / Sentinel), not Redis Cluster (the
scripts compute key names); `maxmemory-policy noeviction` (an evicted job would be lost); enable
`appendonly yes` so queued jobs survive a Redis restart.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio as aredis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.errors import InvalidArgument, ResourceExhausted, quote
from xaiserve.service.jobs.backend import (
    ANONYMOUS,
    Claim,
    JobBackend,
    QueueStats,
    Recovered,
    deadline_from,
    job_message,
)
from xaiserve.service.jobs.options import JobOptions

log = logging.getLogger("xaiserve.jobs.redis")

GROUP = "workers"
_PRIO_OFFSET = 2**31 - 1  # priority p -> 2^31-1-p in [0, 2^32-1]: 10 digits, higher priority sorts first
_ID_OFFSET = 10 + 16 + 1  # chars before the job id in a ready-set member

_PRELUDE = r"""
local P = ARGV[1]
local QUEUED, RUNNING, SUCCEEDED = 1, 2, 3
local EV = {[3] = 4, [4] = 5, [5] = 6, [6] = 7}
local function jk(id) return P .. ':job:' .. id end
local function emit(id, now, etype, progress, message, maxlen, pbdata)
  local seq = redis.call('HINCRBY', jk(id), 'seq', 1)
  if pbdata ~= nil and pbdata ~= '' then
    redis.call('XADD', P .. ':ev:' .. id, 'MAXLEN', maxlen, '0-' .. seq,
               't', etype, 'p', progress, 'm', message, 'ts', now, 'pb', pbdata)
  else
    redis.call('XADD', P .. ':ev:' .. id, 'MAXLEN', maxlen, '0-' .. seq,
               't', etype, 'p', progress, 'm', message, 'ts', now)
  end
  return seq
end
local function wake(method)
  local k = P .. ':wake:' .. method
  redis.call('RPUSH', k, '1')
  redis.call('LTRIM', k, -64, -1)
end
local function release_lease(h)
  local entry = redis.call('HGET', h, 'entry')
  if entry and entry ~= '' then
    redis.call('XACK', P .. ':lease', 'workers', entry)
    redis.call('XDEL', P .. ':lease', entry)
  end
end
local function terminate(id, state, now, err, ttl_ms, maxlen)
  local h = jk(id)
  local f = redis.call('HMGET', h, 'method', 'qm', 'progress', 'idemk')
  release_lease(h)
  redis.call('ZREM', P .. ':q:' .. f[1], f[2])
  redis.call('ZREM', P .. ':qtime', id)
  redis.call('ZREM', P .. ':deadlines', id)
  local prog = f[3]
  if state == SUCCEEDED then prog = '1' end
  redis.call('HSET', h, 'state', state, 'finished', now, 'error', err, 'progress', prog, 'worker', '', 'entry', '')
  emit(id, now, EV[state], prog, err, maxlen)
  for _, k in ipairs({h, P .. ':req:' .. id, P .. ':res:' .. id, P .. ':ev:' .. id}) do
    redis.call('PEXPIRE', k, ttl_ms)
  end
  if f[4] and f[4] ~= '' then redis.call('PEXPIRE', P .. ':idem:' .. f[4], ttl_ms) end
end
local function to_queue(id, now, reason, maxlen)
  local h = jk(id)
  local f = redis.call('HMGET', h, 'method', 'qm')
  release_lease(h)
  redis.call('HSET', h, 'state', QUEUED, 'worker', '', 'entry', '', 'progress', 0, 'queued_at', now,
             'last_error', reason)
  redis.call('ZADD', P .. ':q:' .. f[1], 0, f[2])
  redis.call('ZADD', P .. ':qtime', now, id)
  emit(id, now, 1, 0, reason, maxlen)
  wake(f[1])
end
local function is_current(h, worker, attempt)
  local f = redis.call('HMGET', h, 'state', 'worker', 'attempts')
  return f[1] == '2' and f[2] == worker and tonumber(f[3]) == tonumber(attempt)
end
local function expired_msg(h, now, when)
  local f = redis.call('HMGET', h, 'created', 'deadline')
  local c, d = tonumber(f[1]), tonumber(f[2])
  return string.format('deadline of %.3g s passed %s (%.3g s after submission)', d - c, when, now - c)
end
"""

# ARGV: P id method model priority now deadline idem request max_queued maxlen prio10 owner idemkey
_SUBMIT = (
    _PRELUDE
    + r"""
local id, method, idem, request = ARGV[2], ARGV[3], ARGV[8], ARGV[9]
local now, deadline = ARGV[6], tonumber(ARGV[7])
local owner, idemk = ARGV[13], ARGV[14]
if redis.call('EXISTS', jk(id)) == 1 then return {'exists', id} end
if idem ~= '' then
  local existing = redis.call('GET', P .. ':idem:' .. idemk)
  if existing and redis.call('EXISTS', jk(existing)) == 1 then
    if redis.call('GET', P .. ':req:' .. existing) ~= request then return {'mismatch', existing} end
    return {'exists', existing}
  end
end
local total = 0
for _, m in ipairs(redis.call('SMEMBERS', P .. ':methods')) do
  total = total + redis.call('ZCARD', P .. ':q:' .. m)
end
if total >= tonumber(ARGV[10]) then return {'full', tostring(total)} end
local n = redis.call('INCR', P .. ':fifo')
local qm = ARGV[12] .. string.format('%016d', n) .. ':' .. id
redis.call('HSET', jk(id), 'id', id, 'method', method, 'model', ARGV[4], 'state', QUEUED, 'priority', ARGV[5],
           'progress', 0, 'error', '', 'last_error', '', 'created', now, 'queued_at', now, 'started', 0,
           'finished', 0, 'deadline', ARGV[7], 'idem', idem, 'attempts', 0, 'worker', '', 'entry', '',
           'seq', 0, 'qm', qm, 'heartbeat', 0, 'owner', owner, 'idemk', idemk)
redis.call('SET', P .. ':req:' .. id, request)
redis.call('ZADD', P .. ':q:' .. method, 0, qm)
redis.call('ZADD', P .. ':qtime', now, id)
redis.call('SADD', P .. ':methods', method)
if idem ~= '' then redis.call('SET', P .. ':idem:' .. idemk, id) end
if deadline > 0 then redis.call('ZADD', P .. ':deadlines', deadline, id) end
emit(id, now, 1, 0, '', ARGV[11])
wake(method)
return {'created', id}
"""
)

# ARGV: P worker now maxlen max_attempts ttl_ms method...
_CLAIM = (
    _PRELUDE
    + r"""
local worker, now = ARGV[2], tonumber(ARGV[3])
local expired = {}
-- The group must exist before anything is popped: a script that fails half-way keeps its writes.
redis.pcall('XGROUP', 'CREATE', P .. ':lease', 'workers', '0', 'MKSTREAM')
while true do
  local best, bestm = nil, nil
  for i = 7, #ARGV do
    local top = redis.call('ZRANGE', P .. ':q:' .. ARGV[i], 0, 0)
    if top[1] and (best == nil or top[1] < best) then best, bestm = top[1], ARGV[i] end
  end
  if best == nil then return {{}, expired} end
  redis.call('ZREM', P .. ':q:' .. bestm, best)
  local id = string.sub(best, 28)
  local h = jk(id)
  local f = redis.call('HMGET', h, 'state', 'deadline', 'attempts', 'created', 'queued_at', 'started')
  if f[1] == '1' then
    local deadline = tonumber(f[2])
    if deadline > 0 and now > deadline then
      terminate(id, 6, ARGV[3], expired_msg(h, now, 'before a worker started it'), ARGV[6], ARGV[4])
      table.insert(expired, id)
      table.insert(expired, bestm)
    else
      local attempt = tonumber(f[3]) + 1
      local entry = redis.call('XADD', P .. ':lease', '*', 'job', id, 'method', bestm, 'attempt', attempt)
      local got = redis.call('XREADGROUP', 'GROUP', 'workers', worker, 'COUNT', 1, 'STREAMS', P .. ':lease', '>')
      entry = got[1][2][1][1]
      redis.call('HSET', h, 'state', RUNNING, 'worker', worker, 'attempts', attempt, 'heartbeat', ARGV[3],
                 'progress', 0, 'entry', entry)
      -- the worker took `now` before this ran: a job submitted in between would start before its
      -- creation, so a start never precedes the creation (strings kept: Lua numbers print 14 digits)
      if f[6] == '0' then
        redis.call('HSET', h, 'started', (now < tonumber(f[4])) and f[4] or ARGV[3])
      end
      redis.call('ZREM', P .. ':qtime', id)
      redis.call('ZADD', P .. ':workers', now, worker)
      local msg = ''
      if attempt > 1 then msg = 'attempt ' .. attempt .. ' of ' .. ARGV[5] end
      emit(id, ARGV[3], 2, 0, msg, ARGV[4])
      local req = redis.call('GET', P .. ':req:' .. id)
      return {{id, bestm, attempt, f[4], f[5], f[2], entry, req}, expired}
    end
  end
end
"""
)

# ARGV: P id worker attempt now
_HEARTBEAT = (
    _PRELUDE
    + r"""
local h = jk(ARGV[2])
if not is_current(h, ARGV[3], ARGV[4]) then return 0 end
local entry = redis.call('HGET', h, 'entry')
redis.call('XCLAIM', P .. ':lease', 'workers', ARGV[3], 0, entry, 'JUSTID')
redis.call('HSET', h, 'heartbeat', ARGV[5])
redis.call('ZADD', P .. ':workers', ARGV[5], ARGV[3])
return 1
"""
)

# ARGV: P id worker attempt now progress maxlen pbdata
_PROGRESS = (
    _PRELUDE
    + r"""
local h = jk(ARGV[2])
if not is_current(h, ARGV[3], ARGV[4]) then return 0 end
redis.call('HSET', h, 'progress', ARGV[6])
emit(ARGV[2], ARGV[5], 3, ARGV[6], '', ARGV[7], ARGV[8])
return 1
"""
)

# ARGV: P id worker attempt now state error ttl_ms maxlen result
_FINISH = (
    _PRELUDE
    + r"""
local id = ARGV[2]
local h = jk(id)
if not is_current(h, ARGV[3], ARGV[4]) then return 0 end
if ARGV[10] ~= '' then
  -- The one place a result is written; NX makes a second write impossible even if a bug let two
  -- workers past the fence above.
  if not redis.call('SET', P .. ':res:' .. id, ARGV[10], 'NX') then return -1 end
end
terminate(id, tonumber(ARGV[6]), ARGV[5], ARGV[7], ARGV[8], ARGV[9])
return 1
"""
)

# ARGV: P id worker attempt now reason uncount maxlen
_REQUEUE = (
    _PRELUDE
    + r"""
local id = ARGV[2]
local h = jk(id)
if not is_current(h, ARGV[3], ARGV[4]) then return 0 end
if ARGV[7] == '1' then redis.call('HINCRBY', h, 'attempts', -1) end
to_queue(id, ARGV[5], ARGV[6], ARGV[8])
return 1
"""
)

# ARGV: P id now ttl_ms maxlen
_CANCEL = (
    _PRELUDE
    + r"""
local h = jk(ARGV[2])
local st = redis.call('HGET', h, 'state')
if not st then return 0 end
if st == '1' or st == '2' then terminate(ARGV[2], 5, ARGV[3], '', ARGV[4], ARGV[5]) end
return 1
"""
)

# ARGV: P reclaimer idle_ms now max_attempts ttl_ms maxlen idle_s
_RECOVER = (
    _PRELUDE
    + r"""
local now = tonumber(ARGV[4])
local res = redis.call('XAUTOCLAIM', P .. ':lease', 'workers', ARGV[2], ARGV[3], '0-0', 'COUNT', 100)
local out = {}
for _, e in ipairs(res[2]) do
  local eid, fields = e[1], e[2]
  local id = nil
  for i = 1, #fields, 2 do if fields[i] == 'job' then id = fields[i + 1] end end
  local h = jk(id or '')
  local f = redis.call('HMGET', h, 'state', 'worker', 'attempts', 'entry', 'deadline', 'method')
  if id and f[1] == '2' and f[4] == eid then
    local why = 'worker ' .. f[2] .. ' stopped heart-beating for more than ' .. ARGV[8] .. ' s'
    local deadline = tonumber(f[5])
    if deadline > 0 and now > deadline then
      terminate(id, 6, ARGV[4], expired_msg(h, now, 'while running (' .. why .. ')'), ARGV[6], ARGV[7])
      table.insert(out, id); table.insert(out, f[6]); table.insert(out, 'expired')
    elseif tonumber(f[3]) >= tonumber(ARGV[5]) then
      terminate(id, 4, ARGV[4], 'failed after ' .. f[3] .. ' attempts: ' .. why, ARGV[6], ARGV[7])
      table.insert(out, id); table.insert(out, f[6]); table.insert(out, 'failed')
    else
      to_queue(id, ARGV[4], why .. '; re-queued (attempt ' .. f[3] .. ' of ' .. ARGV[5] .. ' lost)', ARGV[7])
      table.insert(out, id); table.insert(out, f[6]); table.insert(out, 'requeued')
    end
  else
    -- a lease whose job already ended or moved on: drop it
    redis.call('XACK', P .. ':lease', 'workers', eid)
    redis.call('XDEL', P .. ':lease', eid)
  end
end
return out
"""
)

# ARGV: P now ttl_ms maxlen
_EXPIRE = (
    _PRELUDE
    + r"""
local now = tonumber(ARGV[2])
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. ':deadlines', '-inf', ARGV[2])) do
  local h = jk(id)
  local f = redis.call('HMGET', h, 'state', 'method')
  if f[1] == '1' then
    terminate(id, 6, ARGV[2], expired_msg(h, now, 'before a worker started it'), ARGV[3], ARGV[4])
    table.insert(out, id); table.insert(out, f[2])
  elseif f[1] ~= '2' then
    -- finished (or purged): nothing to expire. Running jobs stay: their worker ends them EXPIRED,
    -- or recover does if that worker died.
    redis.call('ZREM', P .. ':deadlines', id)
  end
end
return out
"""
)


def parse_redis_url(url: str) -> tuple[str, str]:
    """Split `redis://host:port/db?prefix=xai` into (url for redis-py, key prefix)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"queue URL {url!r} is not redis://host:port/db (or rediss://, unix://)")
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "prefix"), "xai") or "xai"
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisBackend(JobBackend):
    kind = "redis"
    transient_errors = (redis.ConnectionError, redis.TimeoutError)

    def __init__(self, url: str, options: JobOptions, *, prefix: str = "xai"):
        self.url, self.prefix, self.options = url, prefix, options
        self._client_kwargs: dict[str, Any] = dict(
            socket_timeout=30.0,
            socket_connect_timeout=5.0,
            health_check_interval=10,
            # A short outage (a Redis restart) is ridden out; a long one surfaces as Unavailable fast.
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 6),
        )
        self.r = redis.Redis.from_url(url, **self._client_kwargs)
        self._aclients: dict[int, tuple[asyncio.AbstractEventLoop, aredis.Redis]] = {}
        self._scripts = {
            name: self.r.register_script(src)
            for name, src in (
                ("submit", _SUBMIT),
                ("claim", _CLAIM),
                ("heartbeat", _HEARTBEAT),
                ("progress", _PROGRESS),
                ("finish", _FINISH),
                ("requeue", _REQUEUE),
                ("cancel", _CANCEL),
                ("recover", _RECOVER),
                ("expire", _EXPIRE),
            )
        }
        self._ensure_group()
        self._check_policy()
        self._epoch = self._read_epoch()

    # -- plumbing ------------------------------------------------------------------------------
    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.options.result_ttl_s * 1000))

    def _ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self._k("lease"), GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _check_policy(self) -> None:
        try:
            policy = _s(self.r.config_get("maxmemory-policy").get("maxmemory-policy", "noeviction"))
        except redis.ResponseError:  # CONFIG is often disabled on managed Redis
            return
        if policy != "noeviction":
            log.warning("redis maxmemory-policy is not noeviction: jobs may be evicted", extra={"policy": policy})

    def _read_epoch(self) -> str:
        """The store's epoch: a random value set once per Redis dataset; it vanishes with the data."""
        self.r.set(self._k("epoch"), uuid.uuid4().hex, nx=True)
        return _s(self.r.get(self._k("epoch")) or b"")

    def durability(self) -> tuple[bool, str]:
        try:
            aof = _s(self.r.config_get("appendonly").get("appendonly", "no"))
            save = _s(self.r.config_get("save").get("save", ""))
        except redis.ResponseError:  # CONFIG is disabled (managed Redis): ask INFO instead
            info = self.r.info("persistence")
            if int(info.get("aof_enabled", 0)):
                return True, "append-only file enabled (INFO persistence)"
            return False, (
                "CONFIG is disabled and INFO persistence shows no append-only file, so whether "
                "RDB snapshots are configured cannot be told"
            )
        if aof == "yes":
            return True, "appendonly yes"
        if save.strip():
            return True, f"RDB snapshots (save {save})"
        return False, 'appendonly is no and no RDB save policy is set (save "")'

    def check_integrity(self, *, now: float) -> str | None:
        current = _s(self.r.get(self._k("epoch")) or b"")
        if current and current == self._epoch:
            return None
        self._epoch = self._read_epoch()
        self.lost_at = now
        return (
            "the Redis job store lost its data (its epoch key is gone: a restart without persistence, "
            "a FLUSHALL or an eviction); jobs queued or running before now are lost"
        )

    def ping(self) -> None:
        self.r.ping()

    def _run(self, name: str, args: Sequence[Any]) -> Any:
        try:
            return self._scripts[name](keys=[], args=[self.prefix, *args])
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            # Redis lost the consumer group (restarted without persistence): recreate and retry once.
            self._ensure_group()
            return self._scripts[name](keys=[], args=[self.prefix, *args])

    def _hash(self, job_id: str) -> dict[str, str] | None:
        h = self.r.hgetall(self._k("job", job_id))
        return {_s(k): _s(v) for k, v in h.items()} if h else None

    def _position(self, row: dict[str, str]) -> int:
        if int(row["state"]) != pb.QUEUED:
            return 0
        rank = self.r.zrank(self._k("q", row["method"]), row["qm"])
        return int(rank) if rank is not None else 0

    def _event(self, job_id: str, entry_id: Any, fields: dict) -> pb.JobEvent:
        f = {_s(k): v for k, v in fields.items()}
        ev = pb.JobEvent()
        if f.get("pb"):
            ev.ParseFromString(f["pb"])
        ev.type = int(_s(f["t"]))
        ev.progress = float(_s(f.get("p", b"0")) or 0)
        if f.get("m"):
            ev.message = _s(f["m"])
        ev.unix_time = float(_s(f.get("ts", b"0")) or 0)
        ev.job_id = job_id
        ev.sequence = int(_s(entry_id).split("-", 1)[1])
        return ev

    # -- gateway side --------------------------------------------------------------------------
    def submit(self, request: pb.JobRequest, *, job_id: str, now: float, owner: str = ANONYMOUS) -> tuple[pb.Job, bool]:
        data = request.SerializeToString(deterministic=True)
        prio = int(request.priority)
        idem = request.idempotency_key
        idem_key = f"{len(owner)}:{owner}:{idem}" if idem else ""  # unambiguous whatever the owner holds
        status, ref = self._run(
            "submit",
            [
                job_id,
                request.method,
                request.model,
                prio,
                repr(now),
                repr(deadline_from(request, now)),
                idem,
                data,
                self.options.max_queued,
                self.options.events_per_job,
                f"{_PRIO_OFFSET - prio:010d}",
                owner,
                idem_key,
            ],
        )
        status, ref = _s(status), _s(ref)
        if status == "full":
            raise ResourceExhausted(
                f"the job queue is full ({ref} jobs queued, limit {self.options.max_queued}); retry later"
            )
        if status == "mismatch":
            raise InvalidArgument(
                f"idempotency key {quote(request.idempotency_key)} already names job {ref} with a different request; "
                "use a new key for a new job"
            )
        job = self.get(ref)
        if job is None:  # purged between the two calls: vanishingly rare; say so rather than lie
            raise RuntimeError(f"job {ref} disappeared right after submission")
        return job, status == "created"

    def get(self, job_id: str, *, include_result: bool = False) -> pb.Job | None:
        if not include_result:
            row = self._hash(job_id)
            return None if row is None else job_message(row, queue_position=self._position(row))
        pipe = self.r.pipeline(transaction=True)  # state and result read together: one round trip
        pipe.hgetall(self._k("job", job_id))
        pipe.get(self._k("res", job_id))
        h, result = pipe.execute()
        if not h:
            return None
        row = {_s(k): _s(v) for k, v in h.items()}
        result = result if int(row["state"]) == pb.SUCCEEDED else None
        return job_message(row, result=result, queue_position=self._position(row))

    def cancel(self, job_id: str, *, now: float) -> pb.Job | None:
        if not self._run("cancel", [job_id, repr(now), self._ttl_ms, self.options.events_per_job]):
            return None
        return self.get(job_id)

    def snapshot(self, job_id: str) -> tuple[pb.Job, int] | None:
        row = self._hash(job_id)
        if row is None:
            return None
        return job_message(row, queue_position=self._position(row)), int(row.get("seq") or 0)

    def events_after(self, job_id: str, seq: int, *, limit: int = 256) -> list[pb.JobEvent]:
        entries = self.r.xrange(self._k("ev", job_id), min=f"(0-{int(seq)}", max="+", count=limit)
        return [self._event(job_id, eid, fields) for eid, fields in entries]

    def _aclient(self) -> aredis.Redis:
        loop = asyncio.get_running_loop()
        got = self._aclients.get(id(loop))
        if got is None or got[0] is not loop:
            got = (loop, aredis.Redis.from_url(self.url, **self._client_kwargs))
            self._aclients[id(loop)] = got
        return got[1]

    async def wait_events(self, job_id: str, seq: int, timeout: float) -> list[pb.JobEvent]:
        key = self._k("ev", job_id)
        block_ms = max(1, int(min(timeout, 5.0) * 1000))  # below socket_timeout
        res = await self._aclient().xread({key: f"0-{int(seq)}"}, count=256, block=block_ms)
        out: list[pb.JobEvent] = []
        for _stream, entries in res or []:
            out.extend(self._event(job_id, eid, fields) for eid, fields in entries)
        return out

    async def aclose(self) -> None:
        """Close the async client of the running loop (call from JobService.stop)."""
        got = self._aclients.pop(id(asyncio.get_running_loop()), None)
        if got is not None:
            await got[1].aclose()

    # -- worker side ---------------------------------------------------------------------------
    def claim(self, worker_id: str, methods: Sequence[str], *, now: float) -> Claim | None:
        if not methods:
            return None
        got, expired = self._run(
            "claim",
            [
                worker_id,
                repr(now),
                self.options.events_per_job,
                self.options.max_attempts,
                self._ttl_ms,
                *methods,
            ],
        )
        if expired:
            self._observe([Recovered(_s(expired[i]), _s(expired[i + 1]), "expired") for i in range(0, len(expired), 2)])
        if not got:
            return None
        job_id, method, attempt, created, queued, deadline, entry, req = got
        request = pb.JobRequest()
        request.ParseFromString(req or b"")
        return Claim(
            job_id=_s(job_id),
            method=_s(method),
            request=request,
            attempt=int(attempt),
            worker_id=worker_id,
            created_unix=float(_s(created)),
            queued_unix=float(_s(queued)),
            deadline_unix=float(_s(deadline)),
            token=_s(entry),
        )

    def wait_for_work(self, methods: Sequence[str], timeout: float) -> None:
        if not methods:
            return
        self.r.blpop([self._k("wake", m) for m in methods], timeout=max(0.01, min(timeout, 5.0)))

    def wake_workers(self, methods: Sequence[str], n: int) -> None:
        # Spurious tokens only make some worker re-check the queue once.
        pipe = self.r.pipeline(transaction=False)
        for m in methods:
            pipe.rpush(self._k("wake", m), *(["1"] * n))
            pipe.ltrim(self._k("wake", m), -64, -1)
        pipe.execute()

    def heartbeat(self, claim: Claim, *, now: float) -> bool:
        return bool(self._run("heartbeat", [claim.job_id, claim.worker_id, claim.attempt, repr(now)]))

    def is_current(self, claim: Claim) -> bool:
        state, worker, attempts = self.r.hmget(self._k("job", claim.job_id), "state", "worker", "attempts")
        return (
            state is not None
            and int(state) == pb.RUNNING
            and _s(worker) == claim.worker_id
            and int(attempts) == claim.attempt
        )

    def progress(self, claim: Claim, event: pb.JobEvent) -> bool:
        return bool(
            self._run(
                "progress",
                [
                    claim.job_id,
                    claim.worker_id,
                    claim.attempt,
                    repr(event.unix_time),
                    repr(float(event.progress)),
                    self.options.events_per_job,
                    event.SerializeToString(),
                ],
            )
        )

    def finish(
        self, claim: Claim, state: int, *, now: float, result: pb.JobResult | None = None, error: str = ""
    ) -> bool:
        data = result.SerializeToString() if (result is not None and state == pb.SUCCEEDED) else b""
        res = self._run(
            "finish",
            [
                claim.job_id,
                claim.worker_id,
                claim.attempt,
                repr(now),
                int(state),
                error,
                self._ttl_ms,
                self.options.events_per_job,
                data,
            ],
        )
        if int(res) == -1:
            log.error(
                "a result was already stored for this job; the second one is dropped", extra={"job": claim.job_id}
            )
        return int(res) == 1

    def requeue(self, claim: Claim, *, now: float, reason: str, count_attempt: bool) -> bool:
        return bool(
            self._run(
                "requeue",
                [
                    claim.job_id,
                    claim.worker_id,
                    claim.attempt,
                    repr(now),
                    reason,
                    "0" if count_attempt else "1",
                    self.options.events_per_job,
                ],
            )
        )

    # -- housekeeping --------------------------------------------------------------------------
    def recover(self, *, now: float, reclaimer: str) -> list[Recovered]:
        flat = self._run(
            "recover",
            [
                reclaimer,
                int(self.options.claim_idle_s * 1000),
                repr(now),
                self.options.max_attempts,
                self._ttl_ms,
                self.options.events_per_job,
                f"{self.options.claim_idle_s:g}",
            ],
        )
        return [Recovered(_s(flat[i]), _s(flat[i + 1]), _s(flat[i + 2])) for i in range(0, len(flat), 3)]

    def expire_due(self, *, now: float) -> list[Recovered]:
        flat = self._run("expire", [repr(now), self._ttl_ms, self.options.events_per_job])
        return [Recovered(_s(flat[i]), _s(flat[i + 1]), "expired") for i in range(0, len(flat), 2)]

    def purge(self, *, now: float) -> int:
        # Finished jobs carry PEXPIRE result_ttl_s on all their keys: Redis deletes them itself.
        # Only the worker registry needs pruning here.
        horizon = max(self.options.result_ttl_s, 3600.0)
        self.r.zremrangebyscore(self._k("workers"), "-inf", now - horizon)
        # Every process that ever claimed or reclaimed left a consumer in the group; drop the idle
        # ones that hold no lease (XGROUP DELCONSUMER would discard the leases of a busy one).
        for c in self.r.xinfo_consumers(self._k("lease"), GROUP):
            if int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) > horizon * 1000:
                self.r.xgroup_delconsumer(self._k("lease"), GROUP, c["name"])
        return 0

    def stats(self, *, now: float) -> QueueStats:
        methods = sorted(_s(m) for m in self.r.smembers(self._k("methods")))
        pipe = self.r.pipeline(transaction=False)
        for m in methods:
            pipe.zcard(self._k("q", m))
        pipe.zrange(self._k("qtime"), 0, 0, withscores=True)
        pipe.xrange(self._k("lease"), count=10000)
        pipe.zcount(self._k("workers"), now - self.options.claim_idle_s, "+inf")
        res = pipe.execute()
        st = QueueStats(queued={m: int(n) for m, n in zip(methods, res[: len(methods)])})
        oldest, leases, alive = res[len(methods) :]
        st.oldest_queued_age_s = max(0.0, now - float(oldest[0][1])) if oldest else 0.0
        for _eid, fields in leases:
            m = _s(fields.get(b"method", b"?"))
            st.running[m] = st.running.get(m, 0) + 1
        st.workers_alive = int(alive)
        return st

    def touch_worker(self, worker_id: str, *, now: float) -> None:
        self.r.zadd(self._k("workers"), {worker_id: now})

    def close(self) -> None:
        self.r.close()
        self._aclients.clear()
