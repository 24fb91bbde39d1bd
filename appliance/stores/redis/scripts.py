"""The Lua scripts of the Redis broker, one per write, each run atomically in one round
trip. Every script starts with the key prelude of `keys.LUA_KEYS`; the writing
ones also get the shared helpers below.

The scripts a worker drains with (claim, settle, extend) are `allow-oom`: a Redis at
`maxmemory` with `noeviction` refuses every write that could grow memory, but acks free
the memory that claims and results take, so draining must always be possible. Enqueue
and replay are not: at `maxmemory` a producer gets a clear `BrokerFull` instead."""

from __future__ import annotations

from appliance.stores.redis import keys as rk

# Shared helpers of the writing scripts (after the key prelude).
LUA_HELPERS = """
-- A consumer's lease only grows: the supervisor renews each task at a third of its own
-- visibility timeout, so judging its entries by a shorter lease written by a later
-- claim would take a live task away from it (and run it twice).
local function raise_lease(consumer, lease)
  local held = tonumber(redis.call('HGET', k_consumers, consumer) or '0')
  if lease > held then redis.call('HSET', k_consumers, consumer, lease) end
end

-- A rate-limited message's limiter: {key, interval} or nil (`appliance.ratelimit`).
local function rate_of(rk, ri)
  if not rk or rk == '' then return nil end
  return {rk, ri}
end

-- `origin` names a message across the copies a release or retry makes (field 'o'; a
-- fresh entry is its own origin), so a late ACK or DEAD still finds the message.
local function append_ready(q, band, task, payload, base, origin, rate)
  if origin == '' and not rate then
    return redis.call('XADD', k_stream(q, band), '*', 'p', payload, 't', task, 'b', base)
  end
  local args = {'XADD', k_stream(q, band), '*', 'p', payload, 't', task, 'b', base}
  if origin ~= '' then args[#args + 1] = 'o'; args[#args + 1] = origin end
  if rate then
    args[#args + 1] = 'rk'; args[#args + 1] = rate[1]
    args[#args + 1] = 'ri'; args[#args + 1] = rate[2]
  end
  return redis.call(unpack(args))
end
local function add_ready(q, band, task, payload, base, origin, rate)
  local id = append_ready(q, band, task, payload, base, origin, rate)
  if task ~= '' then redis.call('HSET', k_tasks, task, loc_stream(q, band, id)) end
  return id
end
local function add_delayed(q, band, nonce, task, payload, score, rate)
  local member = band .. '|' .. nonce .. '|' .. task
  redis.call('ZADD', k_delayed(q), score, member)
  redis.call('HSET', k_delayed_payload(q), member, payload)
  if rate then redis.call('HSET', k_delayed_rate(q), member, rate[2] .. '|' .. rate[1]) end
  if task ~= '' then redis.call('HSET', k_tasks, task, loc_delayed(q, band, nonce)) end
end
-- The index keeps only the newest message of a task id: drop it only if it is ours.
local function forget_loc(task, loc)
  if redis.call('HGET', k_tasks, task) == loc then redis.call('HDEL', k_tasks, task) end
end
local function fields_of(id, flat)
  local p, t, b, o, rk, ri = false, '', '0', id, nil, nil
  for j = 1, #flat, 2 do
    local f = flat[j]
    if f == 'p' then p = flat[j + 1] elseif f == 't' then t = flat[j + 1]
    elseif f == 'b' then b = flat[j + 1] elseif f == 'o' then o = flat[j + 1]
    elseif f == 'rk' then rk = flat[j + 1] elseif f == 'ri' then ri = flat[j + 1] end
  end
  return p, t, b, o, rate_of(rk, ri)
end

-- A new message, ARGV[i .. i+7]: queue, band, task, payload, score or '' (ready),
-- nonce, limiter key or '', interval. Returns its queue.
local function store_message(i)
  local q, band, task, payload, score = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
                                        ARGV[i + 4]
  local rate = rate_of(ARGV[i + 6], ARGV[i + 7])
  if score == '' then add_ready(q, band, task, payload, 0, '', rate)
  else add_delayed(q, band, ARGV[i + 5], task, payload, score, rate) end
  return q
end

-- A task's record, ARGV[i .. i+3]: task, parent or '', root or '', canvas JSON or '';
-- kept `ttl` ms. The parent lists it among its children.
local function add_record(i, ttl)
  local task, parent, root, canvas = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local k = k_record(task)
  if parent ~= '' then
    redis.call('HSET', k, 'parent', parent)
    redis.call('RPUSH', k_children(parent), task)
    redis.call('PEXPIRE', k_children(parent), ttl)
  end
  if root ~= '' then redis.call('HSET', k, 'root', root) end
  if canvas ~= '' then redis.call('HSET', k, 'canvas', canvas) end
  redis.call('PEXPIRE', k, ttl)
end
-- New messages that differ only in task id and payload (`Copies`), from ARGV[i]: queue,
-- band, score or '' (ready), limiter key or '', interval, count n, then n times task
-- and payload (and a nonce, when delayed). Returns their queue and the index after them.
-- The task index is written with one HSET per 500 ready messages, not one each: a
-- batch of 1,000 spent about a third of its server time on those calls (measured).
local function store_copies(i)
  local q, band, score, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 5])
  local rate = rate_of(ARGV[i + 3], ARGV[i + 4])
  local step = score == '' and 2 or 3
  local first, last = i + 6, i + 5 + n * step
  if score ~= '' then
    for j = first, last, 3 do
      add_delayed(q, band, ARGV[j + 2], ARGV[j], ARGV[j + 1], score, rate)
    end
    return q, last + 1
  end
  local index = {}
  for j = first, last, 2 do
    local task = ARGV[j]
    local id = append_ready(q, band, task, ARGV[j + 1], 0, '', rate)
    if task ~= '' then
      index[#index + 1] = task; index[#index + 1] = loc_stream(q, band, id)
      if #index >= 1000 then redis.call('HSET', k_tasks, unpack(index)); index = {} end
    end
  end
  if #index > 0 then redis.call('HSET', k_tasks, unpack(index)) end
  return q, last + 1
end

-- `g` runs of copies from ARGV[first] (see store_copies), then their records (4
-- arguments each) to the end of ARGV, kept `ttl` ms; each queue that got a message is
-- listed and woken once. The wake-up names the bands that got ready messages ("b:0,5";
-- "*" when some were delayed: claim), so a worker parked on those streams need not
-- claim (`parking.note_woken`; every other script publishes "1": unknown, claim).
local function store_batch(first, g, ttl)
  local i, woken = first, {}
  for _ = 1, g do
    local q, band, score = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    q, i = store_copies(i)
    if not woken[q] then woken[q] = {}; redis.call('SADD', k_queues, q) end
    woken[q][score == '' and band or '*'] = true
  end
  for j = i, #ARGV, 4 do add_record(j, ttl) end
  for q, bands in pairs(woken) do
    local text = '*'
    if not bands['*'] then
      local names = {}
      for band in pairs(bands) do names[#names + 1] = band end
      text = 'b:' .. table.concat(names, ',')
    end
    redis.call('PUBLISH', k_wake(q), text)
  end
end
"""

ENQUEUE = """#!lua
-- ARGV: prefix, group, record TTL in ms, count g of runs of copies, then the g runs
-- (see store_copies), then the records (4 arguments each: see add_record)
store_batch(5, tonumber(ARGV[4]), ARGV[3])
return 0
"""

ENQUEUE_ONE = """#!lua
-- ARGV: prefix, group, queue, band, task, payload: one ready message without a limiter
-- or a record, what a plain `enqueue` stores. The same entry, index and wake-up as
-- `store_batch` writes, without its helpers and loops: they were 7 of its 26 us of
-- server time a call (measured), a single enqueue's most common case.
local q, band, task = ARGV[3], ARGV[4], ARGV[5]
local id = redis.call('XADD', k_stream(q, band), '*', 'p', ARGV[6], 't', task, 'b', 0)
if task ~= '' then redis.call('HSET', k_tasks, task, loc_stream(q, band, id)) end
redis.call('SADD', k_queues, q)
redis.call('PUBLISH', k_wake(q), 'b:' .. band)  -- its band: see store_batch
return 0
"""

ENQUEUE_GUARDED = """#!lua
-- ARGV: prefix, group, guard key (under kv:), guard TTL in ms, guard value, note the
-- duplicate 1|0, now, record TTL in ms, then one message (8 arguments from 9), then
-- its record (4 arguments from 17) if it has one. The guard and the message are taken
-- and stored together, or neither: returns {1} when stored, else {0, holder}.
local guard = P .. 'kv:' .. ARGV[3]
if not redis.call('SET', guard, ARGV[5], 'NX', 'PX', ARGV[4]) then
  local holder = redis.call('GET', guard)
  if ARGV[6] == '1' and holder then
    local k = k_record(holder)
    redis.call('HINCRBY', k, 'dups', 1)
    redis.call('HSET', k, 'dup_at', ARGV[7])
    redis.call('PEXPIRE', k, ARGV[8])
  end
  return {0, holder}
end
local q = store_message(9)
redis.call('SADD', k_queues, q)
redis.call('PUBLISH', k_wake(q), '1')
if #ARGV >= 20 then add_record(17, ARGV[8]) end
return {1}
"""

ENQUEUE_CHORD = """#!lua
-- ARGV: prefix, group, chord id, size, chord TTL in ms, record TTL in ms, the callback
-- (queue, band, task, payload, limiter key or '', interval), count g of runs of
-- copies, then the g runs (see store_copies), then the records (4 each). The chord's
-- record and its members are stored together: the settle that completes the count
-- stores the callback.
local kc = k_chord(ARGV[3])
redis.call('HSET', kc, 'size', ARGV[4], 'done', 0, 'q', ARGV[7], 'band', ARGV[8],
           'task', ARGV[9], 'payload', ARGV[10], 'rk', ARGV[11], 'ri', ARGV[12])
redis.call('PEXPIRE', kc, ARGV[5])
store_batch(14, tonumber(ARGV[13]), ARGV[6])
return 0
"""

BEAT_DISPATCH = """#!lua
-- ARGV: prefix, group, entry name, slot, guard key (under kv:), guard TTL in ms, now,
-- run JSON, runs kept, then one message (8 arguments from 10: queue, band, task, ...).
-- The slot's guard, the message, the entry's last slot and its run record: all, or
-- nothing when another instance holds the guard. Returns 1 when dispatched, else 0.
local name, slot, now = ARGV[3], ARGV[4], ARGV[7]
if not redis.call('SET', P .. 'kv:' .. ARGV[5], ARGV[12], 'NX', 'PX', ARGV[6]) then
  return 0
end
local q = store_message(10)
redis.call('SADD', k_queues, q)
redis.call('PUBLISH', k_wake(q), '1')
redis.call('HSET', k_schedule(name), 'last_slot', slot, 'last_run_at', now, 'last_error', '')
redis.call('LPUSH', k_schedule_runs(name), ARGV[8])
redis.call('LTRIM', k_schedule_runs(name), 0, tonumber(ARGV[9]) - 1)
return 1
"""

CLAIM = """#!lua flags=allow-oom
-- ARGV: prefix, group, now, consumer, limit, (unused), sweep 0|1, lease, queues...
local now, consumer, limit = ARGV[3], ARGV[4], tonumber(ARGV[5])
local sweep, lease = ARGV[7] == '1', ARGV[8]
local out = {}

local function promote(q)
  local due = redis.call('ZRANGEBYSCORE', k_delayed(q), '-inf', now, 'LIMIT', 0, 1000)
  if #due == 0 then return end
  local rates = redis.call('EXISTS', k_delayed_rate(q)) == 1
  for _, member in ipairs(due) do
    local band, nonce, task = string.match(member, '^(%d+)|([^|]*)|(.*)$')
    local payload = redis.call('HGET', k_delayed_payload(q), member)
    redis.call('ZREM', k_delayed(q), member)
    redis.call('HDEL', k_delayed_payload(q), member)
    local args = {'XADD', k_stream(q, band), '*', 'p', payload, 't', task, 'b', 0, 'o', nonce}
    if rates then
      local r = redis.call('HGET', k_delayed_rate(q), member)
      if r then
        redis.call('HDEL', k_delayed_rate(q), member)
        local ri, rk = string.match(r, '^([^|]*)|(.*)$')
        args[#args + 1] = 'rk'; args[#args + 1] = rk
        args[#args + 1] = 'ri'; args[#args + 1] = ri
      end
    end
    if payload then
      local was = redis.call('HGET', k_tasks, task)
      local id = redis.call(unpack(args))
      if was == loc_delayed(q, band, nonce) then
        redis.call('HSET', k_tasks, task, loc_stream(q, band, id))
      end
    end
  end
end

-- Rate limits (`appliance.ratelimit`): a limited message whose slot has not come is
-- booked into it: moved to the delayed set without its limiter, its claim given back.
local now_n = tonumber(now)
local tats = {}
local booked = 0
local function book(q, band, id, p, t, o, rate)
  local rk, ri = rate[1], tonumber(rate[2])
  local tat = tats[rk]
  if tat == nil then tat = tonumber(redis.call('HGET', k_rate, rk) or '0') end
  local start = now_n
  if tat > now_n then start = tat end
  tats[rk] = start + ri
  if start <= now_n then return false end
  redis.call('XACK', k_stream(q, band), GROUP, id)
  redis.call('XDEL', k_stream(q, band), id)
  add_delayed(q, band, o, t, p, start, nil)
  booked = booked + 1
  return true
end

local function push(q, band, id, flat, count, limit_it)
  local p, t, b, o, rate = fields_of(id, flat)
  if not p then return end
  if limit_it and rate and book(q, band, id, p, t, o, rate) then return end
  out[#out + 1] = {q, band, id, p, t, b, count, o}
end

-- An entry idle longer than its owner's lease (the lease that consumer last claimed or
-- extended with) was abandoned. XAUTOCLAIM cannot judge per owner, so walk each owner's
-- idle entries with XPENDING IDLE, page by page, and XCLAIM them (counter bumped: a
-- task that keeps killing its holder is still counted).
local function reclaim_owner(key, q, band, owner)
  local idle = math.floor(tonumber(redis.call('HGET', k_consumers, owner) or lease) * 1000)
  local start = '-'
  while #out < limit do
    local page = redis.call('XPENDING', key, GROUP, 'IDLE', idle, start, '+', 100, owner)
    for _, e in ipairs(page) do
      local got = redis.call('XCLAIM', key, GROUP, consumer, idle, e[1])
      -- Taken over, not new: its slot was granted when it was first claimed.
      if got[1] then push(q, band, e[1], got[1][2], e[4] + 1, false) end
      if #out >= limit then return end
    end
    if #page < 100 then return end
    start = '(' .. page[#page][1]
  end
end

local function reclaim(key, q, band)
  local owners = redis.pcall('XINFO', 'CONSUMERS', key, GROUP)
  if owners.err then return end
  for _, info in ipairs(owners) do
    local name, pending = false, 0
    for j = 1, #info, 2 do
      local field, value = info[j], info[j + 1]
      if field == 'name' then name = value elseif field == 'pending' then pending = value end
    end
    if name and pending > 0 and #out < limit then reclaim_owner(key, q, band, name) end
  end
end

local function read_new(key, q, band)
  -- Booked messages leave room: read again for it, a few times at most per stream.
  for _ = 1, 4 do
    local want = limit - #out
    if want <= 0 then return end
    local args = {'XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', want, 'STREAMS', key, '>'}
    local r = redis.pcall(unpack(args))
    if type(r) == 'table' and r.err then
      if not string.find(r.err, 'NOGROUP') then error(r.err) end
      -- Groups are made on first read at id 0, so nothing enqueued before is skipped.
      redis.call('XGROUP', 'CREATE', key, GROUP, '0')
      r = redis.call(unpack(args))
    end
    if not r then return end
    local before = booked
    for _, e in ipairs(r[1][2]) do push(q, band, e[1], e[2], 1, true) end
    if booked == before or #r[1][2] < want then return end
  end
end

for i = 9, #ARGV do promote(ARGV[i]) end
for band = BANDS - 1, 0, -1 do
  for i = 9, #ARGV do
    local q = ARGV[i]
    local key = k_stream(q, band)
    if #out < limit and redis.call('EXISTS', key) == 1 then
      if sweep then reclaim(key, q, band) end
      if #out < limit then read_new(key, q, band) end
    end
  end
end
if #out > 0 then raise_lease(consumer, tonumber(lease)) end
for rk, tat in pairs(tats) do redis.call('HSET', k_rate, rk, tat) end
return out
"""

SETTLE = """#!lua flags=allow-oom
-- ARGV: prefix, group, then one op per settlement, each starting with
-- kind, queue, band, entry id, origin, task id:
--   a (ack)                                                              6 args
--   d (dead): + dlq id, dead_at, JSON record, payload                   10 args
--   r (retry): + consumer, count, new queue, new band, new task id,
--               payload, score or '', limiter key or '', interval        15 args
--   l (release): + consumer, count, counted 1|0                          9 args
--   A, D: an ack or dead with follow-ups (`appliance.flow`): the 6 or 10 args, then
--         their count and each follow-up, applied only if this settle removes the
--         message:
--     e: a message (8 args), guard key or '', guard TTL ms, its record (4 args),
--        record TTL ms                                                  16 args
--     c: a chord member's success: chord id, index, value JSON            4 args
--     k: release a unique task's guard: key, value                        3 args
local woken = {}

local function held(key, id, consumer, count)
  local r = redis.pcall('XPENDING', key, GROUP, id, id, 1)
  if r.err or #r == 0 then return false end
  return r[1][2] == consumer and tostring(r[1][4]) == count
end

local function finish(key, q, band, id, task)
  redis.call('XACK', key, GROUP, id)
  local gone = redis.call('XDEL', key, id)
  forget_loc(task, loc_stream(q, band, id))
  return gone == 1
end

-- The copy of the same message (same origin) that a release or retry made after our
-- lease was lost, if the task index still points at it.
local function remove_copy(origin, task)
  local loc = redis.call('HGET', k_tasks, task)
  if not loc then return false end
  local kind, band, ref, q = string.match(loc, '^(%a)|(%d+)|([^|]*)|(.*)$')
  if kind == 'd' then
    if ref ~= origin then return false end
    local member = band .. '|' .. ref .. '|' .. task
    redis.call('HDEL', k_delayed_payload(q), member)
    redis.call('HDEL', k_tasks, task)
    return redis.call('ZREM', k_delayed(q), member) == 1
  end
  local key = k_stream(q, band)
  local entry = redis.call('XRANGE', key, ref, ref)
  if #entry == 0 then return false end
  local _, _, _, o = fields_of(ref, entry[1][2])
  if o ~= origin then return false end
  return finish(key, q, band, ref, task)
end

-- ACK and DEAD remove the message even when the lease was lost (the task did finish);
-- a message already gone is left alone.
local function remove(key, q, band, id, origin, task)
  return finish(key, q, band, id, task) or remove_copy(origin, task)
end

local function dead(key, q, band, id, origin, task, i)
  if not remove(key, q, band, id, origin, task) then return false end
  local dlq_id, dead_at = ARGV[i + 6], ARGV[i + 7]
  redis.call('HSET', k_dlq_entry, dlq_id, ARGV[i + 8])
  redis.call('HSET', k_dlq_payload, dlq_id, ARGV[i + 9])
  redis.call('ZADD', k_dlq, dead_at, dlq_id)
  redis.call('ZADD', k_dlq_queue(q), dead_at, dlq_id)
  return true
end

local function retry(key, q, band, id, origin, task, i)
  if not held(key, id, ARGV[i + 6], ARGV[i + 7]) then return end
  finish(key, q, band, id, task)
  local nq, nband, ntask, payload, score = ARGV[i + 8], ARGV[i + 9], ARGV[i + 10],
                                           ARGV[i + 11], ARGV[i + 12]
  local rate = rate_of(ARGV[i + 13], ARGV[i + 14])
  redis.call('SADD', k_queues, nq)
  if score == '' then add_ready(nq, nband, ntask, payload, 0, origin, rate); woken[nq] = true
  else add_delayed(nq, nband, origin, ntask, payload, score, rate) end
end

local function release(key, q, band, id, i)
  if not held(key, id, ARGV[i + 6], ARGV[i + 7]) then return end
  local entry = redis.call('XRANGE', key, id, id)
  local p, t, b, o, rate = false, '', '0', id, nil
  if #entry > 0 then p, t, b, o, rate = fields_of(id, entry[1][2]) end
  finish(key, q, band, id, t)
  if p then
    local base = tonumber(b) + tonumber(ARGV[i + 7])
    if ARGV[i + 8] ~= '1' then base = base - 1 end
    add_ready(q, band, t, p, base, o, rate)
    woken[q] = true
  end
end

-- A chord member's success counts once per index (HSETNX); the count that reaches the
-- size stores the callback. A chord whose record expired counts nothing.
local function count_member(id, index, value)
  local kc = k_chord(id)
  if redis.call('EXISTS', kc) == 0 then return end
  local kv = kc .. ':values'
  if redis.call('HSETNX', kv, index, value) == 0 then return end
  redis.call('PEXPIRE', kv, redis.call('PTTL', kc))
  local done = redis.call('HINCRBY', kc, 'done', 1)
  local f = redis.call('HMGET', kc, 'size', 'q', 'band', 'task', 'payload', 'rk', 'ri')
  if done ~= tonumber(f[1]) then return end
  add_ready(f[2], f[3], f[4], f[5], 0, '', rate_of(f[6], f[7]))
  redis.call('SADD', k_queues, f[2])
  woken[f[2]] = true
end

local function enqueue_follow(i)
  local guard = ARGV[i + 8]
  if guard ~= '' and not redis.call('SET', P .. 'kv:' .. guard, ARGV[i + 2], 'NX', 'PX',
                                    ARGV[i + 9]) then
    return  -- a duplicate of a live unique task: it stores nothing
  end
  local q = store_message(i)
  redis.call('SADD', k_queues, q)
  woken[q] = true
  add_record(i + 10, ARGV[i + 14])
end

-- The follow-ups from ARGV[j] (their count first); applied when `apply`. Returns the
-- index after them.
local function follow(j, apply)
  local n = tonumber(ARGV[j])
  j = j + 1
  for _ = 1, n do
    local op = ARGV[j]
    if op == 'e' then
      if apply then enqueue_follow(j + 1) end
      j = j + 16
    elseif op == 'c' then
      if apply then count_member(ARGV[j + 1], ARGV[j + 2], ARGV[j + 3]) end
      j = j + 4
    elseif op == 'k' then
      local guard = P .. 'kv:' .. ARGV[j + 1]
      if apply and redis.call('GET', guard) == ARGV[j + 2] then redis.call('DEL', guard) end
      j = j + 3
    else
      error('unknown follow-up ' .. tostring(op))
    end
  end
  return j
end

local i = 3
while i <= #ARGV do
  local kind, q, band, id = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local origin, task = ARGV[i + 4], ARGV[i + 5]
  local key = k_stream(q, band)
  if kind == 'a' then remove(key, q, band, id, origin, task); i = i + 6
  elseif kind == 'd' then dead(key, q, band, id, origin, task, i); i = i + 10
  elseif kind == 'A' then i = follow(i + 6, remove(key, q, band, id, origin, task))
  elseif kind == 'D' then i = follow(i + 10, dead(key, q, band, id, origin, task, i))
  elseif kind == 'r' then retry(key, q, band, id, origin, task, i); i = i + 15
  elseif kind == 'l' then release(key, q, band, id, i); i = i + 9
  else return redis.error_reply('unknown settle kind ' .. kind) end
end
for q in pairs(woken) do redis.call('PUBLISH', k_wake(q), '1') end
return 0
"""

EXTEND = """#!lua flags=allow-oom
-- ARGV: prefix, group, lease, then (queue, band, entry id, consumer, count) per delivery.
-- XCLAIM with min-idle 0 and JUSTID resets the idle time without bumping the counter;
-- only for entries still held by the same consumer with the same counter. Returns the
-- 1-based positions of the deliveries whose lease was lost (not extended).
local lost = {}
local consumer = nil
for i = 4, #ARGV, 5 do
  local key, id = k_stream(ARGV[i], ARGV[i + 1]), ARGV[i + 2]
  local r = redis.pcall('XPENDING', key, GROUP, id, id, 1)
  if not r.err and #r == 1 and r[1][2] == ARGV[i + 3] and tostring(r[1][4]) == ARGV[i + 4] then
    redis.call('XCLAIM', key, GROUP, ARGV[i + 3], 0, id, 'JUSTID')
    consumer = ARGV[i + 3]
  else
    lost[#lost + 1] = (i - 4) / 5 + 1
  end
end
if consumer then raise_lease(consumer, tonumber(ARGV[3])) end
return lost
"""

STATS = """#!lua flags=no-writes
-- ARGV: prefix, group, now, queues... -> per queue {ready, delayed, in flight, dead}
-- A delayed message already due counts as ready: the next claim promotes it.
local now = ARGV[3]
local out = {}
for i = 4, #ARGV do
  local q = ARGV[i]
  local ready, inflight = 0, 0
  for band = 0, BANDS - 1 do
    local key = k_stream(q, band)
    if redis.call('EXISTS', key) == 1 then
      local pend = redis.pcall('XPENDING', key, GROUP)
      local n = 0
      if not pend.err then n = pend[1] end
      ready = ready + redis.call('XLEN', key) - n
      inflight = inflight + n
    end
  end
  local due = redis.call('ZCOUNT', k_delayed(q), '-inf', now)
  out[#out + 1] = {ready + due, redis.call('ZCARD', k_delayed(q)) - due, inflight,
                   redis.call('ZCARD', k_dlq_queue(q))}
end
return out
"""

REPLAY = """#!lua
-- ARGV: prefix, group, dlq id, dead queue, new queue, band, task, payload, limiter key
-- or '', interval
local id, dq, q, band, task, payload = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
if redis.call('ZREM', k_dlq, id) == 0 then return 0 end
redis.call('ZREM', k_dlq_queue(dq), id)
redis.call('HDEL', k_dlq_entry, id)
redis.call('HDEL', k_dlq_payload, id)
redis.call('SADD', k_queues, q)
add_ready(q, band, task, payload, 0, '', rate_of(ARGV[9], ARGV[10]))
redis.call('PUBLISH', k_wake(q), '1')
return 1
"""

PURGE = """#!lua
-- ARGV: prefix, group, queue or '' (all) -> how many dead letters were deleted
local q = ARGV[3]
local index = k_dlq
if q ~= '' then index = k_dlq_queue(q) end
local ids = redis.call('ZRANGE', index, 0, -1)
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', k_dlq_entry, id)
  redis.call('ZREM', k_dlq, id)
  redis.call('HDEL', k_dlq_entry, id)
  redis.call('HDEL', k_dlq_payload, id)
  if raw then redis.call('ZREM', k_dlq_queue(cjson.decode(raw)['queue']), id) end
end
redis.call('DEL', index)
return #ids
"""


def source(body: str, *, helpers: bool = True) -> str:
    """A script's full source: its shebang line, the key prelude, the helpers."""
    shebang, _, rest = body.partition("\n")
    return "\n".join([shebang, rk.LUA_KEYS, LUA_HELPERS if helpers else "", rest])
