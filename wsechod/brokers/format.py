"""What wsechod keeps and sends in Redis: key names, the envelope, the scripts. Instances of
two releases share these during a rolling upgrade, so the envelope carries a version.

Keys (a channel's keys and its Redis channel share the hash tag ``{<path>}``, so they live
on one Cluster shard)::

    wsechod:{<path>}      the channel's Redis channel (PUBLISH, or SPUBLISH in a Cluster)
    wsechod:{<path>}:m    HASH   e: the epoch, o: the last offset given (pe, pd, pn: how
                                 DIVERGE renumbered the epoch before, if it did)
    wsechod:{<path>}:h    STREAM the history: entry id <offset>-0, field d: type + payload

The envelope: ``MAGIC`` (marker and version), the publishing instance's random id, the
frame type (``t`` or ``b``), the publishing member (``origin``), then ``<offset> <epoch>\\n``
(``0 -`` without history) and the payload.
"""

import hashlib

PREFIX = "wsechod:"
CONTROL = PREFIX + "\0control"  # always subscribed: keeps a subscriber in pub/sub mode
MAGIC = b"WSE\x02"  # the envelope's marker and version
TEXT, BINARY = b"t", b"b"
ID_SIZE = 8
ORIGIN_SIZE = 8
HEAD = len(MAGIC) + ID_SIZE + 1 + ORIGIN_SIZE  # marker, instance id, frame type, origin
UNNUMBERED = b"0 -\n"
META_TTL = 86_400  # seconds a channel's position outlives its last message, at least

# KEYS: the channel's hash and stream. ARGV: the Redis channel, the frame type and payload,
# the stream's length, its ttl, the hash's ttl, a fresh epoch, the envelope's head, and the
# publishing command (PUBLISH; SPUBLISH in a Cluster).
APPEND = """
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[6]
  redis.call('HSET', KEYS[1], 'e', e)
  redis.call('DEL', KEYS[2])
end
local o = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], o .. '-0', 'd', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call(ARGV[8], ARGV[1], ARGV[7] .. o .. ' ' .. e .. '\\n' .. string.sub(ARGV[2], 2))
return {o, e}
"""
# KEYS: the hash and the stream. ARGV: a fresh epoch, the hash's ttl, the offset to read
# after ("": none), at most how many. Returns the epoch, the top offset, the entries.
READ = """
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e, 'o', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('DEL', KEYS[2])
end
local o = redis.call('HGET', KEYS[1], 'o') or '0'
local found = {}
if ARGV[3] ~= '' then
  found = redis.call('XRANGE', KEYS[2], '(' .. ARGV[3] .. '-0', '+', 'COUNT', ARGV[4])
end
return {e, o, found}
"""
# KEYS: the hash and the stream. ARGV: the epoch an instance delivered in, the first offset
# of the window it remembers, how many. Returns {} if the hash is gone; the epoch and last
# offset if the epoch is another (and not one DIVERGE replaced this one with); else those,
# the shift DIVERGE added to the offsets it kept (0: none), the first offset it kept, and
# the window's entries where they are now.
LOOK = """
local h = redis.call('HMGET', KEYS[1], 'e', 'o', 'pe', 'pd', 'pn')
if not h[1] then
  return {}
end
local o = h[2] or '0'
local shift, kept = 0, 0
if h[1] ~= ARGV[1] then
  if h[3] ~= ARGV[1] then
    return {h[1], o}
  end
  kept = tonumber(h[4])
  shift = tonumber(h[5]) + 1 - kept
end
local found = {}
if tonumber(ARGV[3]) > 0 then
  local from = (tonumber(ARGV[2]) + shift) .. '-0'
  found = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', ARGV[3])
end
return {h[1], o, shift, kept, found}
"""
# KEYS: the hash and the stream. ARGV: the epoch and offset an instance delivered up to,
# the first offset where Redis holds other messages than it delivered (or none any more),
# a fresh epoch, the hash's ttl. Redis lost messages (a restart from an older copy, a
# failover to a replica that lagged) and perhaps numbered others with their offsets: the
# channel gets a new epoch, its offsets going on from where they were, and the messages
# from the first that differs on are kept, renumbered after them (pe, pd, pn record how,
# for other instances: offset x >= pd of epoch pe is now x + pn + 1 - pd). Returns the new
# epoch and the offset before the first kept message, or {} if the epoch was no longer
# the one given (another instance did this first).
DIVERGE = """
local e = redis.call('HGET', KEYS[1], 'e')
if e ~= ARGV[1] then
  return {}
end
local o = tonumber(redis.call('HGET', KEYS[1], 'o') or '0')
local n = math.max(o, tonumber(ARGV[2]))
local shift = n + 1 - tonumber(ARGV[3])
local kept = redis.call('XRANGE', KEYS[2], ARGV[3] .. '-0', '+')
local ttl = redis.call('PTTL', KEYS[2])
redis.call('DEL', KEYS[2])
for _, entry in ipairs(kept) do
  local x = tonumber(string.match(entry[1], '^%d+'))
  redis.call('XADD', KEYS[2], (x + shift) .. '-0', 'd', entry[2][2])
end
if ttl > 0 and #kept > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call('HSET', KEYS[1], 'e', ARGV[4], 'o', math.max(n, o + shift))
redis.call('HSET', KEYS[1], 'pe', e, 'pd', ARGV[3], 'pn', n)
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {ARGV[4], n}
"""
SCRIPTS = (APPEND, READ, LOOK, DIVERGE)
APPEND_SHA, READ_SHA, LOOK_SHA, DIVERGE_SHA = (
    hashlib.sha1(s.encode()).hexdigest() for s in SCRIPTS
)


def channel_key(channel: str) -> str:
    """A channel's Redis channel, and the prefix of its keys (``:m``, ``:h``)."""
    return f"{PREFIX}{{{channel}}}"


def history_keys(channel: str) -> tuple[str, str]:
    """A channel's hash (epoch and offset) and stream (history)."""
    name = channel_key(channel)
    return name + ":m", name + ":h"


def channel_of(name: bytes) -> str:
    """The channel a Redis channel carries (``wsechod:{<path>}``)."""
    return name.decode()[len(PREFIX) + 1 : -1]
