-- Envoy RLS: check and count the counted descriptors of one request as one step (a port of
-- check_and_count in src/domain/rls.rs). Not an account function: it starts with init(), not
-- begin(), and uses only the prelude's standard-function locals.
--
-- KEYS[1]  HASH  PREFIX:rl:{DOMAIN}: counter key -> its sliding window, "bucket:count" pairs
--                joined by ",", oldest first (the same sparse buckets as the plan windows)
-- ARGV: 1 now (ms), 2 n, then for each of the n counters: key, window length (ms), bucket
-- length (ms), limit, hits.
-- Returns a JSON array of n {"over":0/1,"remaining":r,"reset_in":ms}. A request is counted only
-- if every counter fits; counters shared by several descriptors are added up.
local K = KEYS[1]
local now, n = tonumber(ARGV[1]), tonumber(ARGV[2])

local function load(field)
  local text = call('HGET', K, field)
  local w = { buckets = {}, total = 0 }
  if text then
    for b, c in string.gmatch(text, '(%-?%d+):(%d+)') do
      local bucket, count = tonumber(b), tonumber(c)
      w.buckets[#w.buckets + 1] = { bucket, count }
      w.total = w.total + count
    end
  end
  return w
end

local checks, windows, wanted, longest = {}, {}, {}, 0
for i = 1, n do
  local base = 2 + (i - 1) * 5
  local c = { key = ARGV[base + 1], len = tonumber(ARGV[base + 2]), bucket = tonumber(ARGV[base + 3]),
              limit = tonumber(ARGV[base + 4]), hits = tonumber(ARGV[base + 5]) }
  checks[i] = c
  if c.len + c.bucket > longest then longest = c.len + c.bucket end
  if not windows[c.key] then
    local w = load(c.key)
    w.len, w.bucket = c.len, c.bucket
    -- Advance: drop the buckets that have left the window.
    local keep, total = {}, 0
    for _, b in ipairs(w.buckets) do
      if (b[1] + 1) * w.bucket + w.len > now then
        keep[#keep + 1] = b
        total = total + b[2]
      end
    end
    w.buckets, w.total = keep, total
    windows[c.key] = w
    wanted[c.key] = { counted = total, hits = 0 }
  end
  wanted[c.key].hits = wanted[c.key].hits + c.hits
end

local all_fit = true
for _, c in ipairs(checks) do
  local w = wanted[c.key]
  if w.counted + w.hits > c.limit then all_fit = false end
end

for key, w in pairs(windows) do
  if all_fit and wanted[key].hits > 0 then
    local bucket = floor(now / w.bucket)
    local last = w.buckets[#w.buckets]
    if last and last[1] >= bucket then
      last[2] = last[2] + wanted[key].hits
    else
      w.buckets[#w.buckets + 1] = { bucket, wanted[key].hits }
    end
    w.total = w.total + wanted[key].hits
  end
  if #w.buckets == 0 then
    call('HDEL', K, key)
  else
    local parts = {}
    for i, b in ipairs(w.buckets) do parts[i] = format('%d:%d', b[1], b[2]) end
    call('HSET', K, key, concat(parts, ','))
  end
end
-- (the lifetime as text: redis.call would format a number as a double, at a cost)
if call('PTTL', K) < longest then call('PEXPIRE', K, format('%d', longest)) end

local out = {}
for i, c in ipairs(checks) do
  local want, w = wanted[c.key], windows[c.key]
  local after = want.counted
  if all_fit then after = after + want.hits end
  local over = want.counted + want.hits > c.limit
  -- Over: when the count is down to limit - hits (the request would fit again). Under: when
  -- everything counted has left.
  local target, remaining, reset_in = c.limit - c.hits, w.total, nil
  if not over then
    local last = w.buckets[#w.buckets]
    reset_in = last and ((last[1] + 1) * w.bucket + w.len - now) or 0
  elseif target >= 0 then
    if remaining <= target then
      reset_in = 0
    else
      for _, b in ipairs(w.buckets) do
        remaining = remaining - b[2]
        if remaining <= target then
          reset_in = (b[1] + 1) * w.bucket + w.len - now
          break
        end
      end
    end
  end
  if not reset_in then reset_in = c.len end
  out[i] = format('{"over":%d,"remaining":%d,"reset_in":%d}',
    over and 1 or 0, max(c.limit - after, 0), max(reset_in, 0))
end
return '[' .. concat(out, ',') .. ']'
