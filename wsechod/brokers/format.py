"""What wsechod keeps and sends in Redis: key names, the envelope, the scripts. Instances of
two releases share these during a rolling upgrade, so the envelope carries a version.

Keys (a channel's keys and its Redis channel share the hash tag ``{<path>}``, so they live
on one Cluster shard)::

    wsechod:{<path>}      the channel's Redis channel (PUBLISH, or SPUBLISH in a Cluster)
    wsechod:{<path>}:m    HASH   e: the epoch, o: the last offset given
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
# KEYS: the hash and the stream. ARGV: the epoch and offset an instance delivered up to,
# a fresh epoch, the hash's ttl. A hash behind what was delivered lost messages (Redis
# restarted from an older copy, or failed over to a replica that lagged): its offsets
# would be used again for other messages, so the channel gets a new epoch, and its
# offsets go on from where they were.
CHECK = """
local e = redis.call('HGET', KEYS[1], 'e')
local o = tonumber(redis.call('HGET', KEYS[1], 'o') or '0')
if e == ARGV[1] and o < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'e', ARGV[3], 'o', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""
SCRIPTS = (APPEND, READ, CHECK)
APPEND_SHA, READ_SHA, CHECK_SHA = (hashlib.sha1(s.encode()).hexdigest() for s in SCRIPTS)


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
