"""What wsechod keeps and sends in Redis: key names, the envelope, the scripts. Instances of
two releases share these during a rolling upgrade, so the envelope carries a version.

Keys (a channel's keys and its Redis channel share the hash tag ``{<path>}``, so they live
on one Cluster shard)::

    wsechod:{<path>}      the channel's Redis channel (PUBLISH, or SPUBLISH in a Cluster)
    wsechod:{<path>}:m    HASH   e: the epoch, o: the last offset given, pe: the epochs this
                                 one replaced (DIVERGE, APPEND), newest first, each with
                                 the first offset that differed: "<epoch> <offset> ...",
                                 r: the run id of the server of the last APPEND
    wsechod:{<path>}:h    STREAM the history: entry id <offset>-0, fields d: type + payload,
                                 i: the message's id

The envelope: ``MAGIC`` (marker and version), the publishing instance's random id, the
frame type (``t`` or ``b``), the publishing member (``origin``), the message's id (unique:
the publishing instance's random start plus a count), then ``<offset> <epoch>\\n`` (``0 -``
without history) and the payload.
"""

import hashlib

from wsechod.history import Position

PREFIX = "wsechod:"
CONTROL = PREFIX + "\0control"  # always subscribed: keeps a subscriber in pub/sub mode
MAGIC = b"WSE\x03"  # the envelope's marker and version
TEXT, BINARY = b"t", b"b"
ID_SIZE = 8
ORIGIN_SIZE = 8
MESSAGE_ID_SIZE = 8
MESSAGE_ID_MASK = 2 ** (8 * MESSAGE_ID_SIZE) - 1
HEAD = len(MAGIC) + ID_SIZE + 1 + ORIGIN_SIZE + MESSAGE_ID_SIZE  # all the above
UNNUMBERED = b"0 -\n"
META_TTL = 86_400  # seconds a channel's position outlives its last message, at least
CHAIN = 8  # epochs a hash remembers having replaced

# Lua shared by the scripts that write a channel's hash: ``chained`` is its "pe" with
# ``epoch`` (replaced from offset ``from`` on) in front, at most ``keep`` entries;
# ``ran_on`` records the run id of the server that wrote (the hash's "r"; none if the
# writer could not read it, so that no one takes the server for known).
HASH_LUA = """
local function chained(epoch, from, keep)
  local chain, n = epoch .. ' ' .. from, 1
  for pair in string.gmatch(redis.call('HGET', KEYS[1], 'pe') or '', '%S+ %d+') do
    if n < tonumber(keep) then
      chain, n = chain .. ' ' .. pair, n + 1
    end
  end
  return chain
end
local function ran_on(recorded, run_id)
  if run_id == '' then
    if recorded then
      redis.call('HDEL', KEYS[1], 'r')
    end
  elseif recorded ~= run_id then
    redis.call('HSET', KEYS[1], 'r', run_id)
  end
end
"""
# KEYS: the channel's hash and stream. ARGV: the Redis channel, the frame type and payload,
# the stream's length, its ttl, the hash's ttl, a fresh epoch, the envelope's head, the
# publishing command (PUBLISH; SPUBLISH in a Cluster), the message's id, the run id of the
# server this runs on ('': unknown), how many replaced epochs to remember. The hash keeps
# the run id of the last append's server ("r"): when it is another server's (a replica
# promoted after a failover, a restart), this one may have lost a tail of the channel
# that other instances delivered; the channel goes on in a new epoch from the offset
# after the last this server holds, so that nothing published here takes an offset
# another instance delivered another message at, whatever that instance remembers.
APPEND = (
    HASH_LUA
    + """
local h = redis.call('HMGET', KEYS[1], 'e', 'r')
local e = h[1]
if not e then
  e = ARGV[6]
  redis.call('HSET', KEYS[1], 'e', e)
  redis.call('DEL', KEYS[2])
elseif h[2] and ARGV[10] ~= '' and h[2] ~= ARGV[10] then
  local after = tonumber(redis.call('HGET', KEYS[1], 'o') or '0') + 1
  redis.call('HSET', KEYS[1], 'e', ARGV[6], 'pe', chained(e, after, ARGV[11]))
  e = ARGV[6]
end
ran_on(h[2], ARGV[10])
local o = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], o .. '-0', 'd', ARGV[2], 'i', ARGV[9])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call(ARGV[8], ARGV[1], ARGV[7] .. o .. ' ' .. e .. '\\n' .. string.sub(ARGV[2], 2))
return {o, e}
"""
)
# KEYS: the hash and the stream. ARGV: a fresh epoch, the hash's ttl, the offset to read
# after ("": none), at most how many. Returns the epoch, the top offset, the entries, and
# the epochs it replaced ("pe").
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
return {e, o, found, redis.call('HGET', KEYS[1], 'pe') or ''}
"""
# KEYS: the hash and the stream. ARGV: the epoch an instance delivered in, the last offset
# it delivered, the first offset it remembers the message id of, those ids (8 bytes each,
# in order), the epochs it saw replaced by its own (space-separated), and the run id of
# the server ('': unknown). Does Redis still hold those messages at their offsets, in
# that epoch, in one that replaced it, or in one it replaced (Redis went back to before
# the replacement)? Returns {} if the hash is gone; the epoch and last offset if the
# epoch is unrelated; else those, the first offset that differs (another message, or
# none though the counter went past it: lost), the offset after the last delivered if
# only the counter is behind, or 0; whether that offset is known to be the first (1) or
# only the first among the ids remembered (0); and the epochs of the chain between the
# hash's and the instance's. The last delivered is looked at first: a failover loses a
# tail, so when it is there, so is all before it. Two things tell what differs below the
# ids remembered: where the epoch was replaced from an offset on (the chain, least on
# the way, entries of unknown offset left out), what differs starts there at the latest;
# and where the last append was on another server (nothing was numbered here since, see
# APPEND), what is past the stream's end is lost, so what differs starts right after it.
LOOK = """
local h = redis.call('HMGET', KEYS[1], 'e', 'o', 'pe', 'r')
if not h[1] then
  return {}
end
local mine = {[ARGV[1]] = true}
for epoch in string.gmatch(ARGV[5], '%S+') do
  mine[epoch] = true
end
local top = tonumber(h[2] or '0')
local related, since, least, passed = mine[h[1]] or false, 0, math.huge, {}
for epoch, from in string.gmatch(h[3] or '', '(%S+) (%d+)') do
  if not related then
    if tonumber(from) > 0 then
      least = math.min(least, tonumber(from))
    end
    if mine[epoch] then
      related, since = true, least < math.huge and least or 0
    else
      table.insert(passed, epoch)
    end
  end
end
if not related then
  return {h[1], top}
end
local last, first, ids = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local function differs(x)
  local found = redis.call('XRANGE', KEYS[2], x .. '-0', x .. '-0')
  if #found == 0 then
    return x > top
  end
  local fields, at = found[1][2], (x - first) * 8
  for k = 1, #fields, 2 do
    if fields[k] == 'i' then
      return fields[k + 1] ~= string.sub(ids, at + 1, at + 8)
    end
  end
  return false
end
local d = 0
if last >= first and differs(last) then
  d = last
  for x = first, last - 1 do
    if differs(x) then
      d = x
      break
    end
  end
elseif top < last then
  d = last + 1
end
local sure = 0
if d > top and h[4] and ARGV[6] ~= '' and h[4] ~= ARGV[6] then
  d, sure = top + 1, 1
end
if since > 0 and since <= last and (d == 0 or since <= d) then
  d, sure = since, 1
end
return {h[1], top, d, sure, table.concat(passed, ' ')}
"""
# KEYS: the hash and the stream. ARGV: the channel's epoch as LOOK saw it, the first offset
# from which a client resuming in it cannot go on (where Redis holds other messages than
# an instance delivered, or none; 0 if that may be earlier than the instance can tell), a
# fresh epoch, the hash's ttl, how many replaced epochs to remember, the run id of the
# server ('': unknown). Redis lost messages (a restart from an older copy, a failover to
# a replica that lagged) and may have numbered others with their offsets: the channel
# goes on in a new epoch, at the same offsets (clients that resume from the old one
# before that offset go on; from it on, they are told), and the counter is past every
# entry the stream ever had. Returns 0 if the epoch was no longer the one given (another
# instance did this first), else 1.
DIVERGE = (
    HASH_LUA
    + """
local h = redis.call('HMGET', KEYS[1], 'e', 'o', 'r')
if h[1] ~= ARGV[1] then
  return 0
end
local o = tonumber(h[2] or '0')
if redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for k = 1, #info, 2 do
    if info[k] == 'last-generated-id' then
      o = math.max(o, tonumber(string.match(info[k + 1], '^%d+')))
    end
  end
end
redis.call('HSET', KEYS[1], 'e', ARGV[3], 'o', o, 'pe', chained(ARGV[1], ARGV[2], ARGV[5]))
ran_on(h[3], ARGV[6])
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return 1
"""
)
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


def went_on(replaced: bytes, since: Position) -> bool:
    """Whether a position goes on at the same offset in the epoch that replaced its own:
    its epoch is in the hash's ``pe`` (newest first), and it is before the first offset
    that differed there and in every replacement since."""
    words = replaced.split()
    for epoch, differed in zip(words[::2], words[1::2], strict=True):
        if since.offset >= int(differed):
            return False
        if epoch.decode() == since.epoch:
            return True
    return False
