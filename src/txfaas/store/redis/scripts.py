"""The Lua scripts that make the store's compound writes atomic.

Redis runs a script alone, so a status transition, a claim, a dead-letter write or a namespace
check cannot interleave with another client's commands: a cancel and a worker starting the call
cannot both win, nor two gateways take one lapsed claim.
"""

from __future__ import annotations

# KEYS[1] call key, KEYS[2] result key; ARGV[1] new JSON, ARGV[2] TTL, ARGV[3] "1" to create
# when missing, ARGV[4] the most attempts it may replace ("" = any), ARGV[5] the result's JSON to
# keep with it ("" = none), ARGV[6..] the statuses it may replace.
# -> {1} written, {0} missing, {0, current} refused.
TRANSITION = b"""
local function write()
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  if ARGV[5] ~= '' then
    redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[2])
  end
  return {1}
end
local raw = redis.call('GET', KEYS[1])
if not raw then
  if ARGV[3] == '1' then
    return write()
  end
  return {0}
end
local current = cjson.decode(raw)
if ARGV[4] ~= '' and tonumber(current['attempts'] or 0) > tonumber(ARGV[4]) then
  return {0, raw}
end
local status = current['status']
for i = 6, #ARGV do
  if ARGV[i] == status then
    return write()
  end
end
return {0, raw}
"""

# KEYS[1] call key; ARGV[1] the claim's JSON (with "acceptingUntil":null), ARGV[2] the window in
# seconds, ARGV[3] TTL, ARGV[4] the replays the replaced record must be below ("" = any), ARGV[5..]
# the statuses it may replace besides a lapsed claim.  The deadline is on Redis's own clock, so
# gateways with skewed clocks agree on it.  -> {1, deadline} claimed, {0, current} refused.
CLAIM = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local raw = redis.call('GET', KEYS[1])
if raw then
  local current = cjson.decode(raw)
  local status = current['status']
  local free = false
  if status == 'accepting' then
    local deadline = current['acceptingUntil']
    free = type(deadline) ~= 'number' or deadline <= now
  else
    for i = 5, #ARGV do
      if ARGV[i] == status then
        free = true
      end
    end
  end
  local replays = current['replays']
  if type(replays) ~= 'number' then
    replays = 0
  end
  if free and ARGV[4] ~= '' and replays >= tonumber(ARGV[4]) then
    free = false
  end
  if not free then
    return {0, raw}
  end
end
local deadline = string.format('%.6f', now + tonumber(ARGV[2]))
local claim = string.gsub(ARGV[1], '"acceptingUntil":null', '"acceptingUntil":' .. deadline, 1)
redis.call('SET', KEYS[1], claim, 'EX', ARGV[3])
return {1, deadline}
"""

# KEYS[1] call key; ARGV[1] the claim's deadline, ARGV[2] the JSON to put in its place ("" to
# delete it), ARGV[3] TTL.  A missing record counts as ours.  -> {1} done, {0, current} refused.
SETTLE = b"""
local raw = redis.call('GET', KEYS[1])
if raw then
  local current = cjson.decode(raw)
  local deadline = current['acceptingUntil']
  if current['status'] ~= 'accepting' or type(deadline) ~= 'number' or deadline ~= tonumber(ARGV[1]) then
    return {0, raw}
  end
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return {1}
"""

# KEYS: letter key, all index, function index; ARGV: JSON, score, call id.
PUT_DEAD = b"""
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
return 1
"""

# KEYS: letter key, all index; ARGV: call id, function index prefix, the default namespace.
# (A letter kept before namespaces has none: the default namespace's, indexed by bare name.)
REMOVE_DEAD = b"""
local raw = redis.call('GET', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if not raw then
  return 0
end
local letter = cjson.decode(raw)
local fn = letter['function']
local ns = letter['namespace']
if type(ns) == 'string' and ns ~= '' and ns ~= ARGV[3] then
  fn = fn .. '.' .. ns
end
redis.call('ZREM', ARGV[2] .. fn, ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""


# KEYS: functions, namespaces; ARGV: store key, JSON, namespace that must exist ('' = none).
# -> 1 created, 0 exists already, -1 no such namespace.
CREATE_FUNCTION = b"""
if ARGV[3] ~= '' and redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then
  return -1
end
return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
"""

# KEYS: namespaces, functions; ARGV: namespace.  -> 1 deleted, 0 missing, -1 holds functions.
DELETE_NAMESPACE = b"""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
local suffix = '.' .. ARGV[1]
for _, key in ipairs(redis.call('HKEYS', KEYS[2])) do
  if string.sub(key, -#suffix) == suffix then
    return -1
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1] a namespace's secrets; ARGV: name, sealed token.  -> 1 replaced, 0 missing.
UPDATE_SECRET = b"""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


# ARGV[1] the cap, ARGV[2] how many instance names follow, then the names; then one argument
# a line: "<its stream's index in KEYS> <its instance's index> <Unix time in us> <text>".
APPEND_LOGS = b"""
local cap = ARGV[1]
local first = 3 + tonumber(ARGV[2])
for i = first, #ARGV do
  local line = ARGV[i]
  local a = string.find(line, ' ', 1, true)
  local b = string.find(line, ' ', a + 1, true)
  local c = string.find(line, ' ', b + 1, true)
  redis.call('XADD', KEYS[tonumber(string.sub(line, 1, a - 1))], 'MAXLEN', '~', cap, '*',
             'ts', string.sub(line, b + 1, c - 1),
             'instance', ARGV[2 + tonumber(string.sub(line, a + 1, b - 1))],
             'text', string.sub(line, c + 1))
end
return 1
"""
#: Lines per script run: Redis runs a script alone, so a big batch is split.
LOG_BATCH = 500
