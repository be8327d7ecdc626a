"""The Lua scripts of the job store: each change that must be all-or-nothing is one script.

Standalone Redis only (not Cluster): the finishing script reads the quota keys a job was
admitted under from the job's own record.

Knows: the key layout of `redis_store.py`. Does not know: Python types, gRPC, Ray.
"""

# Add a key unless its id is taken. KEYS: key hash, tenant's key set, tenants set.
# ARGV: key_id, tenant, hash, created_at. Returns 1, or 0 when the id is taken.
CREATE_KEY = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'tenant', ARGV[2], 'hash', ARGV[3], 'created_at', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
return 1
"""

# Revoke a known, unrevoked key. KEYS: key hash. ARGV: revoked_at. Returns 1 or 0.
REVOKE_KEY = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'revoked_at') == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'revoked_at', ARGV[1])
return 1
"""

# Create a job unless its request id (or its job id) is known, admitting it against the
# tenant's quota first. A request id whose job failed is bound to the new job (a client may
# retry it); the rate limit counts repeats too (a repeat is a request). KEYS: job, events,
# open_jobs, request ('' without a request id), quota day hash, quota month hash, rate
# sorted set. ARGV[1]: JSON {job_id, event, quota}
# (quota: null, or {reserve, day_limit, month_limit, rpm, now, window, day_retry,
# month_retry}); ARGV[2..]: field/value pairs. Returns {job_id, 1} when created, {the
# existing job id, 0} when known, {'', 0, limit, retry-after seconds} when refused.
CREATE_JOB = """
local a = cjson.decode(ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then return {a.job_id, 0} end
local q = a.quota
if type(q) == 'table' and q.rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', q.now - q.window)
  if redis.call('ZCARD', KEYS[7]) >= q.rpm then
    local oldest = redis.call('ZRANGE', KEYS[7], 0, 0, 'WITHSCORES')
    return {'', 0, 'requests_per_minute', tostring(tonumber(oldest[2]) + q.window - q.now)}
  end
end
if KEYS[4] ~= '' then
  local existing = redis.call('GET', KEYS[4])
  if existing then
    -- the bound job's key: this job's key with the other id at its end (same layout)
    local key = string.sub(KEYS[1], 1, #KEYS[1] - #a.job_id) .. existing
    if redis.call('HGET', key, 'state') ~= 'failed' then
      if type(q) == 'table' and q.rpm > 0 then
        redis.call('ZADD', KEYS[7], q.now, a.job_id)
        redis.call('EXPIRE', KEYS[7], math.ceil(2 * q.window))
      end
      return {existing, 0}
    end
  end
end
if type(q) == 'table' then
  local function over(key, limit)
    if limit <= 0 then return false end
    local h = redis.call('HMGET', key, 'used', 'reserved')
    return tonumber(h[1] or 0) + tonumber(h[2] or 0) + q.reserve > limit
  end
  if over(KEYS[5], q.day_limit) then return {'', 0, 'tokens_per_day', tostring(q.day_retry)} end
  if over(KEYS[6], q.month_limit) then
    return {'', 0, 'tokens_per_month', tostring(q.month_retry)}
  end
  if q.rpm > 0 then
    redis.call('ZADD', KEYS[7], q.now, a.job_id)
    redis.call('EXPIRE', KEYS[7], math.ceil(2 * q.window))
  end
  redis.call('HINCRBY', KEYS[5], 'reserved', q.reserve)
  redis.call('HINCRBY', KEYS[6], 'reserved', q.reserve)
  redis.call('EXPIRE', KEYS[5], 40 * 86400)
  redis.call('EXPIRE', KEYS[6], 400 * 86400)
end
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], a.job_id) end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if type(q) == 'table' then
  redis.call('HSET', KEYS[1], 'reserved', q.reserve, 'quota_day', KEYS[5], 'quota_month', KEYS[6])
end
redis.call('SADD', KEYS[3], a.job_id)
redis.call('RPUSH', KEYS[2], a.event)
return {a.job_id, 1}
"""

# Dispatch a job to a worker (again, on failover). KEYS: job, events. ARGV: worker, at, event,
# then the states it may be in. Returns {'ok'}, {'missing'} or {'refused', state}.
START_JOB = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing'} end
local allowed = false
for i = 4, #ARGV do if ARGV[i] == state then allowed = true end end
if not allowed then return {'refused', state} end
local workers = cjson.decode(redis.call('HGET', KEYS[1], 'workers') or '[]')
table.insert(workers, ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'running', 'workers', cjson.encode(workers))
if state == 'queued' then redis.call('HSET', KEYS[1], 'started_at', ARGV[2]) end
redis.call('RPUSH', KEYS[2], ARGV[3])
return {'ok'}
"""

# Note progress of an open job; a final record never changes. KEYS: job.
# ARGV: completion tokens, at, then the final states. Returns 1 (noted), 0 (missing), 2 (final).
PROGRESS = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
for i = 3, #ARGV do if ARGV[i] == state then return 2 end end
redis.call('HSET', KEYS[1], 'progress_completion_tokens', ARGV[1], 'progress_at', ARGV[2])
return 1
"""

# Settle a job once: final state, fields, event, its bill (made by `billing.py`, split into
# usage entries by `ledger.increments`), and its quota reservation swapped for the tokens
# billed. KEYS: job, events, open_jobs, usage_days, then per usage entry its hash and its
# dimension's index set (the quota keys come from the job's record: standalone Redis).
# ARGV[1]: JSON {job_id, state, tenant, event, final, allowed, day, quota_used,
# usage: [{member, incr}]}; ARGV[2..]: field/value pairs. Returns {'ok'}, {'missing'},
# {'final', state}, {'refused', state} or {'tenant', the job's tenant}; only 'ok' changes
# anything.
FINISH_JOB = """
local a = cjson.decode(ARGV[1])
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing'} end
for _, s in ipairs(a.final) do if s == state then return {'final', state} end end
local allowed = false
for _, s in ipairs(a.allowed) do if s == state then allowed = true end end
if not allowed then return {'refused', state} end
local tenant = redis.call('HGET', KEYS[1], 'tenant')
if a.tenant ~= '' and a.tenant ~= tenant then return {'tenant', tenant} end
redis.call('HSET', KEYS[1], 'state', a.state, unpack(ARGV, 2))
redis.call('RPUSH', KEYS[2], a.event)
redis.call('SREM', KEYS[3], a.job_id)
local r = redis.call('HMGET', KEYS[1], 'reserved', 'quota_day', 'quota_month')
if r[1] then  -- the quota reservation becomes the tokens really billed
  for _, key in ipairs({r[2], r[3]}) do
    redis.call('HINCRBY', key, 'reserved', -tonumber(r[1]))
    redis.call('HINCRBY', key, 'used', a.quota_used)
  end
end
for i, u in ipairs(a.usage) do
  for field, amount in pairs(u.incr) do redis.call('HINCRBY', KEYS[3 + 2 * i], field, amount) end
  redis.call('SADD', KEYS[4 + 2 * i], u.member)
  redis.call('SADD', KEYS[4], a.day)
end
return {'ok'}
"""
