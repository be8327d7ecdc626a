"""The Lua scripts of the job store: each change that must be all-or-nothing is one script.

Standalone Redis only (not Cluster): the scripts derive some keys from the job's record and
the store's prefix (the quota keys a job was admitted under, its request id, its tenant's open
set, its owner's lease) instead of declaring them.

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
# tenant's quota first. A request id whose job failed (or whose record expired) is bound to
# the new job (a client may retry it); one whose job's output expired is refused ('expired');
# the rate limit counts repeats too (a repeat is a request). The job joins the tenant's set
# of open jobs, which `max_concurrent_jobs` counts. KEYS: job, events, open_jobs, request
# ('' without a request id), quota day hash, quota month hash, rate sorted set, the
# tenant's open jobs.
# ARGV[1]: JSON {job_id, prefix, event, quota} (quota: null, or {reserve, day_limit,
# month_limit, rpm, now, window, day_retry, month_retry, max_concurrent, concurrent_retry});
# ARGV[2..]: field/value pairs. Returns {job_id, 1} when created, {the existing job id, 0}
# when known, {'', 0, limit, retry-after seconds} when refused, {'', 0, 'expired', job id}.
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
    local key = a.prefix .. ':job:' .. existing
    local bound = redis.call('HMGET', key, 'state', 'output')
    if bound[1] and bound[1] ~= 'failed' then
      if type(q) == 'table' and q.rpm > 0 then
        redis.call('ZADD', KEYS[7], q.now, a.job_id)
        redis.call('EXPIRE', KEYS[7], math.ceil(2 * q.window))
      end
      if bound[2] == '1' and redis.call('EXISTS', a.prefix .. ':job_output:' .. existing) == 0 then
        return {'', 0, 'expired', existing}
      end
      return {existing, 0}
    end
  end
end
if type(q) == 'table' then
  if q.max_concurrent > 0 and redis.call('SCARD', KEYS[8]) >= q.max_concurrent then
    return {'', 0, 'max_concurrent_jobs', tostring(q.concurrent_retry)}
  end
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
redis.call('SADD', KEYS[8], a.job_id)
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

# Settle a job once: final state, fields, event, its output (text, token ids: a key of its
# own, so that it can expire sooner), its bill (made by `billing.py`, split into usage
# entries by `ledger.increments`), its quota reservation swapped for the tokens billed, and
# the retention of what it leaves: record, events and request id expire after keep_jobs
# seconds, the output after keep_text (0: never); the ledger never. An orphan's settlement
# (orphan_of: the owner it was read under) lands only if the job still has that owner and
# the owner's lease is gone, so a live scheduler's job is never settled by another.
# KEYS: job, events, open_jobs, usage_days, output, then per usage entry its hash and its
# dimension's index set (the quota, lease, request and tenant-set keys are derived from the
# record and `prefix`: standalone Redis). ARGV[1]: JSON {job_id, prefix, state, tenant, event,
# final, allowed, day, quota_used, usage: [{member, incr}], output: [name, value, ...],
# orphan_of, keep_jobs, keep_text}; ARGV[2..]: field/value pairs. Returns {'ok'},
# {'missing'}, {'final', state}, {'refused', state}, {'tenant', the job's tenant}, {'owner',
# its owner} or {'live', its owner}; only 'ok' changes anything.
FINISH_JOB = """
local a = cjson.decode(ARGV[1])
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing'} end
for _, s in ipairs(a.final) do if s == state then return {'final', state} end end
local allowed = false
for _, s in ipairs(a.allowed) do if s == state then allowed = true end end
if not allowed then return {'refused', state} end
local job = redis.call('HMGET', KEYS[1], 'tenant', 'owner', 'request_id')
local tenant = job[1]
if a.tenant ~= '' and a.tenant ~= tenant then return {'tenant', tenant} end
if a.orphan_of ~= '' then
  if job[2] ~= a.orphan_of then return {'owner', job[2] or ''} end
  if redis.call('EXISTS', a.prefix .. ':scheduler:' .. job[2]) == 1 then return {'live', job[2]} end
end
redis.call('HSET', KEYS[1], 'state', a.state, unpack(ARGV, 2))
if #a.output > 0 then
  redis.call('HSET', KEYS[5], unpack(a.output))
  redis.call('HSET', KEYS[1], 'output', '1')
  if a.keep_text > 0 then redis.call('EXPIRE', KEYS[5], a.keep_text) end
end
redis.call('RPUSH', KEYS[2], a.event)
redis.call('SREM', KEYS[3], a.job_id)
redis.call('SREM', a.prefix .. ':tenant_open:' .. tenant, a.job_id)
local r = redis.call('HMGET', KEYS[1], 'reserved', 'quota_day', 'quota_month')
if r[1] then  -- the quota reservation becomes the tokens really billed
  for _, key in ipairs({r[2], r[3]}) do
    redis.call('HINCRBY', key, 'reserved', -tonumber(r[1]))
    redis.call('HINCRBY', key, 'used', a.quota_used)
  end
end
for i, u in ipairs(a.usage) do
  for field, amount in pairs(u.incr) do redis.call('HINCRBY', KEYS[4 + 2 * i], field, amount) end
  redis.call('SADD', KEYS[5 + 2 * i], u.member)
  redis.call('SADD', KEYS[4], a.day)
end
if a.keep_jobs > 0 then
  redis.call('EXPIRE', KEYS[1], a.keep_jobs)
  redis.call('EXPIRE', KEYS[2], a.keep_jobs)
  if job[3] and job[3] ~= '' then
    local request = a.prefix .. ':request:' .. tenant .. ':' .. job[3]
    if redis.call('GET', request) == a.job_id then redis.call('EXPIRE', request, a.keep_jobs) end
  end
end
return {'ok'}
"""

# Lift a worker's quarantine, keeping the period for the withheld payouts. KEYS: quarantine hash,
# withheld list. ARGV: worker, until. Returns the period as JSON, or false when not quarantined.
RELEASE_WORKER = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
local period = cjson.decode(raw)
period.worker = ARGV[1]
period['until'] = tonumber(ARGV[2])
local out = cjson.encode(period)
redis.call('RPUSH', KEYS[2], out)
return out
"""
