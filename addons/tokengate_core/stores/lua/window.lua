-- The window rules the Redis store's scripts share; redis.py runs each script as this file
-- followed by the script's own file (reserve.lua, settle.lua), one EVALSHA per call.
-- KEYS hold one hash per bucket. Every script's ARGV starts with the same three values:
-- now ('' = the server's TIME), stale_after (seconds), and limiter.SLOTS (slots per duration).

local function clock(arg)
    if arg ~= '' then return tonumber(arg) end
    local t = redis.call('TIME')
    return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local now, stale, SLOTS = clock(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

local function exact(x) return string.format('%.17g', x) end

local function pair(value)
    local stamp, amount = string.match(value, '^(%S+) (%S+)$')
    return tonumber(stamp), tonumber(amount)
end

-- limiter.slot_of and limiter.merged: the slot a settled charge joins, and the slot's value
-- after (the newest stamp merged into it, the sum of the amounts), as field and value
local function merged(key, seconds, stamp, amount)
    local slot = math.floor(stamp * SLOTS / seconds)
    local field = 'slot:' .. seconds .. ':' .. string.format('%.0f', slot)
    local held = redis.call('HGET', key, field)
    if held then
        local was, sum = pair(held)
        if was > stamp then stamp = was end
        amount = amount + sum
    end
    return field, exact(stamp) .. ' ' .. exact(amount)
end

-- used, reserved, newest, oldest, since (nil when the window is empty), and the value of
-- one more field read in the same call
local function head(key, field)
    local h = redis.call('HMGET', key, 'used', 'reserved', 'newest', 'oldest', 'since', field)
    if not h[3] then return nil, h[6] end
    return {used = tonumber(h[1]), reserved = tonumber(h[2]), newest = tonumber(h[3]),
            oldest = tonumber(h[4]), since = tonumber(h[5])}, h[6]
end

-- every slot and reservation of a window
local function records(key)
    local all, out = redis.call('HGETALL', key), {}
    for i = 1, #all, 2 do
        local field = all[i]
        local settled = string.sub(field, 1, 5) == 'slot:'
        if settled or string.sub(field, 1, 4) == 'rid:' then
            local stamp, amount = pair(all[i + 1])
            out[#out + 1] = {field = field, stamp = stamp, amount = amount, settled = settled}
        end
    end
    return out
end

-- the head written anew from the records; nil (and the key deleted) when nothing is left
local function rebuild(key)
    local h = {used = 0, reserved = 0}
    for _, r in ipairs(records(key)) do
        if r.settled then
            h.used = h.used + r.amount
        else
            h.reserved = h.reserved + r.amount
            if not h.since or r.stamp < h.since then h.since = r.stamp end
        end
        if not h.newest or r.stamp > h.newest then h.newest = r.stamp end
        if not h.oldest or r.stamp < h.oldest then h.oldest = r.stamp end
    end
    if not h.newest then
        redis.call('DEL', key)
        return nil
    end
    redis.call('HSET', key, 'used', h.used, 'reserved', h.reserved,
               'newest', exact(h.newest), 'oldest', exact(h.oldest))
    if h.since then
        redis.call('HSET', key, 'since', exact(h.since))
    else
        redis.call('HDEL', key, 'since')
    end
    return h
end

-- window.Window.prune: drop what left the window (stamp + seconds <= now), then count stale
-- reservations (stamp + stale <= now) as settled; only when the head's bounds say one is due
local function prune(key, h, seconds)
    if not h or (h.oldest + seconds > now and not (h.since and h.since + stale <= now)) then
        return h
    end
    local live = {}
    for _, r in ipairs(records(key)) do
        if r.stamp + seconds <= now then
            redis.call('HDEL', key, r.field)
        elseif not r.settled then
            live[#live + 1] = r
        end
    end
    for _, r in ipairs(live) do
        if r.stamp + stale <= now then
            redis.call('HDEL', key, r.field)
            redis.call('HSET', key, merged(key, seconds, r.stamp, r.amount))
        end
    end
    return rebuild(key)
end

local function status_reply(out, h, seconds)
    out[#out + 1] = exact(h and h.used or 0)
    out[#out + 1] = exact(h and h.reserved or 0)
    out[#out + 1] = exact(h and h.newest + seconds or now)
end

-- Replies are one string of space-separated words: one bulk reply is cheaper for the client to
-- read than an array of them.
