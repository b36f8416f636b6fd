-- Learned estimates: compare-and-set on one hash (KEYS[1]), so the rule stays in Python.
-- ARGV: the hash's TTL in seconds, then (field, expected, new) triples; expected '' = absent.
-- Returns the whole hash once every field still held what was expected and is replaced,
-- false (nil to the client) when one changed meanwhile: the client reads again and retries.
for i = 2, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[i]) or ''
  if current ~= ARGV[i + 1] then
    return false
  end
end
for i = 2, #ARGV, 3 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return redis.call('HGETALL', KEYS[1])
