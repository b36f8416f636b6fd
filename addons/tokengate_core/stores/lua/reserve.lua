-- Decide a request and, if admitted, hold its reservation in every bucket (after window.lua).
-- ARGV after the shared three: reservation id, completion reserve, then per bucket: count,
-- seconds, and the request's terms there (limiter.Terms: base, rate per million completion
-- tokens, minimum). Reply: admitted, stamp ('-' = refused), completion, blocking (1-based,
-- 0 = none), retry_at ('-' = never), then per bucket: used, reserved, reset_at.

local id, completion = ARGV[4], tonumber(ARGV[5])
local PER_MILLION = 1000000
local field = 'rid:' .. id
local limits = {}
for i = 1, #KEYS do
    local at = 6 + (i - 1) * 5
    local lim = {key = KEYS[i], count = tonumber(ARGV[at]), seconds = tonumber(ARGV[at + 1]),
                 base = tonumber(ARGV[at + 2]), rate = tonumber(ARGV[at + 3]),
                 need = tonumber(ARGV[at + 4])}
    local h, held = head(lim.key, field)
    if held then return redis.error_reply('reservation id already held: ' .. id) end
    lim.h = prune(lim.key, h, lim.seconds)
    local used, reserved = lim.h and lim.h.used or 0, lim.h and lim.h.reserved or 0
    lim.remaining = math.max(0, lim.count - used - reserved)
    limits[i] = lim
end

-- limiter.fits_at: the earliest time >= now at which `need` fits, nil if never
local function fits_at(lim, need)
    if need > lim.count then return nil end
    local live = records(lim.key)
    table.sort(live, function(a, b) return a.stamp < b.stamp end)
    local held = 0
    for _, r in ipairs(live) do held = held + r.amount end
    if lim.count - held >= need then return now end
    for _, r in ipairs(live) do
        held = held - r.amount
        if lim.count - held >= need then return r.stamp + lim.seconds end
    end
    return now
end

-- limiter.decide_on: every window must have room for the request's minimum
local never, blocking, retry_at = nil, nil, nil
for i, lim in ipairs(limits) do
    if lim.remaining < lim.need then
        local at = fits_at(lim, lim.need)
        if at == nil then
            never = never or i
        elseif retry_at == nil or at > retry_at then
            blocking, retry_at = i, at
        end
    end
end

local out
if never or blocking then
    if never then blocking, retry_at = never, nil end
    out = {0, '-', 0, blocking, retry_at and exact(retry_at) or '-'}
    for _, lim in ipairs(limits) do status_reply(out, lim.h, lim.seconds) end
    return table.concat(out, ' ')
end

-- limiter.Terms.cap: the completion reserve, capped by what each window has left
for _, lim in ipairs(limits) do
    if lim.rate > 0 then
        completion = math.min(completion,
                              math.floor((lim.remaining - lim.base) * PER_MILLION / lim.rate))
    end
end
completion = math.max(0, completion)
local stamp = now  -- stamps never go backwards in a window, even if a clock does
for _, lim in ipairs(limits) do
    if lim.h and lim.h.newest > stamp then stamp = lim.h.newest end
end
out = {1, exact(stamp), exact(completion), 0, '-'}
for _, lim in ipairs(limits) do
    local h = lim.h or {used = 0, reserved = 0, oldest = stamp}
    -- limiter.Terms.amount
    local amount = lim.base + math.ceil(completion * lim.rate / PER_MILLION)
    h.reserved, h.newest, h.since = h.reserved + amount, stamp, h.since or stamp
    redis.call('HSET', lim.key, field, exact(stamp) .. ' ' .. exact(amount), 'used', h.used,
               'reserved', h.reserved, 'newest', exact(stamp), 'oldest', exact(h.oldest),
               'since', exact(h.since))
    redis.call('EXPIRE', lim.key, math.ceil(lim.seconds + stale))
    status_reply(out, h, lim.seconds)
end
return table.concat(out, ' ')
