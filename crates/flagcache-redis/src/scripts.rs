//! The server-side scripts. Each runs atomically on the server holding the key.
//!
//! Versions are compared without converting them to Lua numbers (doubles, exact only
//! below 2^53): in the envelope layout they are the 8 big-endian bytes at offset 4,
//! compared byte by byte (not with Lua's `<` on strings, which goes through the
//! server's collation locale). In the JSON layout they are read with `cjson` and
//! compared as numbers, which is exact because that layout keeps versions below 2^53.
//! A gzip'd JSON entry cannot be read by a script (Redis' Lua has no zlib): the
//! scripts hand it to the client to judge, never treat it as unreadable.

use flagcache_core::{FLAG_GZIP, FORMAT, GZIP_MAGIC, HEADER_LEN, MAGIC, VERSION_OFFSET};
use redis::Script;

/// Shared Lua: `version_of(stored)` returns the stored version (8-byte string in the
/// envelope layout, a number in the JSON layout), `'gzip'` for a gzip'd JSON entry
/// (which the script cannot read), or `nil` for bytes that fail a check the script
/// can make cheaply; `cmp(a, b)` compares two versions (1, 0 or -1).
///
/// The checks are the reader's, but for those that need the payload decoded: in the
/// envelope layout the magic, the format byte, the flags and the length against the
/// header's; in the JSON layout, that `cjson` decodes it, `flagConfig` is present and
/// the version is an integral number in range or a string of its canonical decimal
/// digits (`JsonCodec`'s rule). The payload's checksum, its decompression and, in the
/// JSON layout, fields the script does not read are checked by the client (see
/// `RedisStore::put`).
fn prelude() -> String {
    let [m0, m1] = MAGIC;
    let [g0, g1] = GZIP_MAGIC;
    format!(
        r#"
local layout = ARGV[1]
local function version_of(v)
  if layout == 'json' then
    local z1, z2 = string.byte(v, 1, 2)
    if z1 == {g0} and z2 == {g1} then return 'gzip' end
    local ok, doc = pcall(cjson.decode, v)
    if ok and type(doc) == 'table' and doc['flagConfig'] ~= nil then
      local n = doc['version']
      -- A string of canonical decimal digits, at most 16 of them, names its number.
      if type(n) == 'string' and #n <= 16 and (n == '0' or string.find(n, '^[1-9]%d*$')) then
        n = tonumber(n)
      end
      -- The same versions the Rust decoder accepts: integral, 0 <= n < 2^53.
      if type(n) == 'number' and n >= 0 and n == math.floor(n) and n <= 9007199254740991 then
        return n
      end
    end
    return nil
  end
  if #v < {HEADER_LEN} then return nil end
  local b1, b2, format, flags = string.byte(v, 1, 4)
  if b1 ~= {m0} or b2 ~= {m1} or format ~= {FORMAT} or (flags ~= 0 and flags ~= {FLAG_GZIP}) then
    return nil
  end
  local l1, l2, l3, l4 = string.byte(v, 21, 24)
  if #v ~= {HEADER_LEN} + ((l1 * 256 + l2) * 256 + l3) * 256 + l4 then return nil end
  return string.sub(v, {v_from}, {v_to})
end
local function cmp(a, b)
  if layout == 'json' then
    a = tonumber(a); b = tonumber(b)
    if a > b then return 1 elseif a < b then return -1 else return 0 end
  end
  for i = 1, 8 do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x > y then return 1 elseif x < y then return -1 end
  end
  return 0
end
"#,
        v_from = VERSION_OFFSET + 1,
        v_to = VERSION_OFFSET + 8,
    )
}

/// `put`: KEYS[1] the entry, and for a fill's write KEYS[2] its fence; ARGV = layout,
/// new bytes, new version, ttl ms, and for a fill the fence it read ('' for none).
/// Returns `{2}` when the fence is not the one the fill read (nothing changed), `{1}`
/// when written; `{0, current}` when the stored version is equal or higher, and `{3}`
/// when the key holds gzip'd JSON, whose version the script cannot read (nothing
/// changed in either case). Absent entries, and entries that fail `version_of`'s
/// checks, are overwritten.
pub(crate) fn put() -> Script {
    let prelude = prelude();
    Script::new(&format!(
        "{prelude}
if KEYS[2] then
  local fence = redis.call('GET', KEYS[2])
  if fence and fence ~= ARGV[5] then return {{2}} end
end
local cur = redis.call('GET', KEYS[1])
if cur then
  local cv = version_of(cur)
  if cv == 'gzip' then return {{3}} end
  if cv and cmp(cv, ARGV[3]) >= 0 then
    return {{0, cv}}
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
return {{1}}
"
    ))
}

/// `get_checked`: KEYS[1] the entry; ARGV = layout, expected version.
/// Returns nil (miss), `{1, bytes}` (hit: the stored version equals the expected one),
/// `{0, current}` (stale: any other version), `{2}` (unreadable bytes), or
/// `{3, bytes}` (gzip'd JSON, for the client to compare).
pub(crate) fn get_checked() -> Script {
    let prelude = prelude();
    Script::new(&format!(
        "{prelude}
local cur = redis.call('GET', KEYS[1])
if not cur then return nil end
local cv = version_of(cur)
if not cv then return {{2}} end
if cv == 'gzip' then return {{3, cur}} end
if cmp(cv, ARGV[2]) == 0 then return {{1, cur}} end
return {{0, cv}}
"
    ))
}

/// A versionless invalidation: KEYS[1] the entry, KEYS[2] its fence, and KEYS[3] the
/// flag's absence marker when it has one; ARGV = the new fence, its ttl ms. Lays the
/// fence and drops the entry (and the marker) in one step.
pub(crate) fn fence() -> Script {
    Script::new(
        "redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]); \
         redis.call('DEL', KEYS[1]); \
         if KEYS[3] then redis.call('DEL', KEYS[3]) end; \
         return 1",
    )
}

/// Compare-and-delete: KEYS[1] the entry; ARGV[1] the exact bytes a client read there
/// and found unreadable. Deletes the key only if it still holds those bytes, so a
/// write that landed since is kept. Returns 1 when it deleted, 0 otherwise.
pub(crate) fn delete_if_same() -> Script {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
           return redis.call('DEL', KEYS[1]) \
         else return 0 end",
    )
}

/// [`release`] without the absence marker, for a key whose marker would not share
/// its lock's cluster slot: KEYS[1] the lock; ARGV[1] the token; ARGV[2] the channel.
pub(crate) fn release_plain() -> Script {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
           redis.call('DEL', KEYS[1]); redis.call('PUBLISH', ARGV[2], KEYS[1]); return 1 \
         else return 0 end",
    )
}

/// Lock take: KEYS[1] the lock, and KEYS[2] the flag's fence when it has one; ARGV[1]
/// the holder's token, ARGV[2] the lock's TTL (ms). Takes the lock if free (`SET NX
/// PX`) and answers the fence as it is then ('' for none) — the fence the holder's
/// answer must still find to be handed to others — or nil when the lock is taken.
pub(crate) fn lock() -> Script {
    Script::new(
        "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then \
           if KEYS[2] then return redis.call('GET', KEYS[2]) or '' end; \
           return '' \
         end; \
         return false",
    )
}

/// Lock release: KEYS[1] the lock, KEYS[2] the flag's absence marker, KEYS[3] its
/// fence; ARGV[1] the holder's token, ARGV[2] the channel to announce the release on,
/// ARGV[3] how long (ms) to mark the flag absent, or empty, ARGV[4] the fence when the
/// lock was taken. Deletes the lock only if this holder still holds it (it may have
/// expired and been taken by another), then sets the marker if the source has no such
/// flag — unless an invalidation fenced the key since the lock was taken: the holder's
/// "no such flag" may predate it — (and clears an older one otherwise), and publishes
/// the lock's key, so that waiters wake at once rather than at their next poll and find
/// the answer.
pub(crate) fn release() -> Script {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
           redis.call('DEL', KEYS[1]); \
           if ARGV[3] ~= '' and (redis.call('GET', KEYS[3]) or '') == ARGV[4] then \
             redis.call('SET', KEYS[2], '1', 'PX', ARGV[3]) \
           else redis.call('DEL', KEYS[2]) end; \
           redis.call('PUBLISH', ARGV[2], KEYS[1]); return 1 \
         else return 0 end",
    )
}
