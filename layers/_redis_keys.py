"""Idempotency records on Redis, written by the publishing Lua script itself.

A keyed publish passes, after the script's usual arguments, the record TTL and for each message
its record key (`<prefix>#key:<channel> <key>`; '' for an unkeyed message) and fingerprint. The
script looks up every record before publishing anything, so a fingerprint mismatch publishes
nothing, then publishes the rest and writes their records with the TTL, all in one atomic call:
concurrent duplicates in any process publish once. Unkeyed publishes pass nothing more and pay
nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._idempotency import Replayed, fingerprint, keyed, reused
from .event import Message

# `recall(t, n)`: ARGV[t] = record TTL in ms, ARGV[t + 2j - 1] = record key of message j
# ('' for none), ARGV[t + 2j] = its fingerprint. Returns the recorded id of each message seen
# before (by j), or nil and the reply for a fingerprint mismatch. `remember(t, j, id)` records.
# A record is '<id> <fingerprint>'. Without the arguments (#ARGV < t) neither does anything.
LUA_RECORDS = """
local function recall(t, n)
  local found = {}
  if #ARGV < t then
    return found
  end
  for j = 1, n do
    local record = ARGV[t + 2 * j - 1]
    if record ~= '' then
      local value = redis.call('GET', record)
      if value then
        local space = string.find(value, ' ', 1, true)
        local id = string.sub(value, 1, space - 1)
        if string.sub(value, space + 1) ~= ARGV[t + 2 * j] then
          return nil, {'!', tostring(j), id}
        end
        found[j] = '=' .. id
      end
    end
  end
  return found
end

local function remember(t, j, id)
  if #ARGV >= t then
    local record = ARGV[t + 2 * j - 1]
    if record ~= '' then
      redis.call('SET', record, id .. ' ' .. ARGV[t + 2 * j], 'PX', ARGV[t])
    end
  end
end
"""


def record_args(prefix: str, messages: Sequence[Message], ttl: float) -> list[str | bytes | int]:
    """The arguments that follow a publish script's own: none unless a message is keyed."""
    if not keyed(messages):
        return []
    args: list[str | bytes | int] = [max(1, int(ttl * 1000))]
    for message in messages:
        if message.idempotency_key is None:
            args += ("", "")
        else:
            args += (
                f"{prefix}#key:{message.channel} {message.idempotency_key}",
                fingerprint(message),
            )
    return args


def read_ids(reply: Any, messages: Sequence[Message]) -> list[str]:
    """The script's reply as ids (`Replayed` for those recorded before); raises on a mismatch."""
    if reply and reply[0] == b"!":
        raise reused(messages[int(reply[1]) - 1], reply[2].decode())
    return [Replayed(id[1:].decode()) if id[:1] == b"=" else id.decode() for id in reply]
