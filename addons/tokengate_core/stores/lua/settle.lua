-- Settle, release or read a reservation's windows (after window.lua).
-- ARGV after the shared three: reservation id, mode (settle | release | status), then per
-- bucket: the amount it is charged (limiter.charged), seconds. Reply per bucket: used,
-- reserved, reset_at.
-- Only a pending reservation changes, so a second settle or release does nothing.

local id, mode = ARGV[4], ARGV[5]
local field = 'rid:' .. id
local out = {}
for i = 1, #KEYS do
    local key = KEYS[i]
    local settled, seconds = tonumber(ARGV[6 + (i - 1) * 2]), tonumber(ARGV[7 + (i - 1) * 2])
    local read, held = head(key, field)
    local h = prune(key, read, seconds)
    if h ~= read and held then  -- pruned: the reservation may have left or gone stale since
        held = redis.call('HGET', key, field)
    end
    if h and held and mode ~= 'status' then
        local stamp, amount = pair(held)
        redis.call('HDEL', key, field)
        if mode == 'release' then
            h = rebuild(key)  -- the newest stamp may go back, or the window empty
        else
            h.used, h.reserved = h.used + settled, h.reserved - amount
            local slot, value = merged(key, seconds, stamp, settled)
            redis.call('HSET', key, slot, value, 'used', h.used, 'reserved', h.reserved)
        end
        if h then redis.call('EXPIRE', key, math.ceil(seconds + stale)) end
    end
    status_reply(out, h, seconds)
end
return table.concat(out, ' ')
