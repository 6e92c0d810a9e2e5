//! The backplane's key layout and its Lua scripts: each runs atomically in Redis, so a
//! topic's sequence, its log, its announcement and its de-duplication key change together.
//!
//! Keys (the topic's share one hash tag, `{route/topic}`):
//! - `<p>:{r/t}:m`: hash `e` (epoch), `s` (last position), `u` (last upstream id: where a
//!   new owner of the topic's source resumes)
//!   and, while the topic's upstream fails, `uf` (since when, the backplane's ms), `uc`
//!   (its last definitive refusal) and `ud` (1: down, past `upstream_grace`)
//! - `<p>:{r/t}:lease`: `<node>:<fence>`, the node that runs the topic's upstream source, with
//!   a time to live; `<p>:{r/t}:fence` counts acquisitions
//! - `<p>:{r/t}:s`: stream, entry id `<seq>-0`; fields `d` payload, `ct` content type, `m`
//!   message id, `ts` the backplane's time (ms), `g` = 1 for a gap
//! - `<p>:{r/t}:mid:<id>`: `<epoch>:<seq>` of the message published with that id
//! - `<p>:{r/t}:req:<token>`: the same for one publish request without an id, while it may
//!   be retried
//! - `<p>:fh:<k>`: the announcement streams, every message of every topic hashed to `k`:
//!   fields `r` route, `t` topic, `e`, `s` and the entry's own fields; or, with `k` = `u`, the
//!   topic's upstream state (`uf`, `uc`, `ud`: empty while healthy)

use redis::Script;

/// A topic's keys.
pub struct Keys {
    pub meta: String,
    pub log: String,
    pub lease: String,
    pub fence: String,
    base: String,
}

impl Keys {
    pub fn new(prefix: &str, route: &str, topic: &str) -> Keys {
        let base = format!("{prefix}:{{{route}/{topic}}}");
        Keys {
            meta: format!("{base}:m"),
            log: format!("{base}:s"),
            lease: format!("{base}:lease"),
            fence: format!("{base}:fence"),
            base,
        }
    }

    pub fn message_id(&self, id: &str) -> String {
        format!("{}:mid:{id}", self.base)
    }

    /// The key of one publish request without a `Message-Id`, so that retrying it after an
    /// answer that never came cannot log it twice.
    pub fn request(&self, token: u64) -> String {
        format!("{}:req:{token:016x}", self.base)
    }
}

/// The announcement stream `shard`.
pub fn firehose(prefix: &str, shard: u16) -> String {
    format!("{prefix}:fh:{shard}")
}

/// Appends one message (or gap) to a topic's log and announces it.
///
/// KEYS: meta, log, announcement stream, de-duplication key (message id, or the request's),
/// lease.
/// ARGV: payload, content type, message id ('' none), gap ('1'/'0'), log length, log ttl ms,
/// meta ttl ms, announcement retention ms, route, topic, a fresh epoch, the de-duplication
/// key's ttl ms, the lease's token ('' for a publish), the upstream id to resume from ('').
/// A source's append whose token is not the lease's (its owner lost it) fails `NOTOWNER`:
/// an owner paused past its lease cannot write.
/// Returns {epoch, seq, duplicate (0/1), ts}.
///
/// A missing meta hash (a new topic, or Redis forgot it) starts a new epoch and drops any log
/// left from an older one. A log whose last id is not below the next position (the meta was
/// rolled back under it) starts a new epoch too, so a position never names two messages.
pub const PUBLISH: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[13] ~= '' and redis.call('GET', KEYS[5]) ~= ARGV[13] then
  return redis.error_reply('NOTOWNER the lease of this topic is held by another node')
end
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[11]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', e, 's', 0)
end
local seen = redis.call('GET', KEYS[4])
if seen then
  local se, ss = string.match(seen, '^(%d+):(%d+)$')
  if se == e then
    return {e, ss, 1, now}
  end
end
local s = redis.call('HINCRBY', KEYS[1], 's', 1)
local fields
if ARGV[4] == '1' then
  fields = {'g', '1', 'ts', now}
else
  fields = {'d', ARGV[1], 'ct', ARGV[2], 'm', ARGV[3], 'ts', now}
end
local ok = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], s .. '-0', unpack(fields))
if type(ok) == 'table' and ok.err then
  e = ARGV[11]
  s = 1
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', e, 's', s)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], s .. '-0', unpack(fields))
end
if ARGV[14] ~= '' then
  redis.call('HSET', KEYS[1], 'u', ARGV[14])
elseif ARGV[13] ~= '' and ARGV[4] == '1' then
  -- A source's gap without a resume point: the upstream refused the one recorded.
  redis.call('HDEL', KEYS[1], 'u')
end
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('XADD', KEYS[3], 'MINID', '~', now - tonumber(ARGV[8]), '*',
  'r', ARGV[9], 't', ARGV[10], 'e', e, 's', s, unpack(fields))
redis.call('SET', KEYS[4], e .. ':' .. s, 'PX', ARGV[12])
return {e, tostring(s), 0, now}
"#;

/// A topic's state and the log entries a node needs to load it or catch up.
///
/// KEYS: meta, log. ARGV: a fresh epoch, count, meta ttl ms, the node's head (-1: none), the
/// node's epoch ('' none): the entries from the node's head are only for a node of this epoch.
/// Returns {epoch, head, entries (ascending), upstream failing since ('' healthy), refusal,
/// down}: from the node's head on (itself included, so
/// the node can tell whether it is the same message) when at most `count` follow it, else the
/// newest `count`. A topic nobody published to yet gets its epoch here, so that every node
/// names the same one.
pub const LOAD: &str = r#"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', e, 's', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
local s = tonumber(redis.call('HGET', KEYS[1], 's')) or 0
local up = redis.call('HMGET', KEYS[1], 'uf', 'uc', 'ud')
local n = tonumber(ARGV[2])
local after = tonumber(ARGV[4])
if after >= 0 and ARGV[5] == e and s >= after and s - after <= n then
  return {e, tostring(s), redis.call('XRANGE', KEYS[2], after .. '-0', '+', 'COUNT', n + 1),
    up[1] or '', up[2] or '', up[3] or ''}
end
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', n)
local entries = {}
for i = #newest, 1, -1 do
  entries[#entries + 1] = newest[i]
end
return {e, tostring(s), entries, up[1] or '', up[2] or '', up[3] or ''}
"#;

/// Retires an epoch whose log lost positions clients had seen, unless another node did first.
/// The log stays, its positions now of the new epoch: what was logged since the loss was
/// acknowledged to its publishers. A meta hash without a position starts the log again.
///
/// KEYS: meta, log. ARGV: the epoch to retire, a fresh one. Returns the epoch in force.
pub const RETIRE_EPOCH: &str = r#"
if redis.call('HGET', KEYS[1], 'e') == ARGV[1] then
  local s = redis.call('HGET', KEYS[1], 's')
  if s and string.match(s, '^%d+$') then
    redis.call('HSET', KEYS[1], 'e', ARGV[2])
  else
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[1], 'e', ARGV[2], 's', 0)
  end
end
return redis.call('HGET', KEYS[1], 'e')
"#;

/// Takes a topic's lease if nobody holds it.
///
/// KEYS: lease, fence, meta. ARGV: node, ttl ms, the fence counter's ttl ms (the meta's).
/// Returns {token, upstream id to resume from ('' none)}, or nil when another node holds it.
pub const ACQUIRE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return false
end
local token = ARGV[1] .. ':' .. redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return {token, redis.call('HGET', KEYS[3], 'u') or ''}
"#;

/// Records and announces a topic's upstream state, from the node holding its lease.
///
/// KEYS: meta, announcement stream, lease. ARGV: token, route, topic, failing for ms ('' for
/// healthy), refusal status (''), announcement retention ms, down ('1' or '').
pub const UPSTREAM: &str = r#"
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return redis.error_reply('NOTOWNER the lease of this topic is held by another node')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local since = ''
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[1], 'uf', 'uc', 'ud')
else
  since = tostring(now - tonumber(ARGV[4]))
  redis.call('HSET', KEYS[1], 'uf', since, 'uc', ARGV[5], 'ud', ARGV[7])
end
redis.call('XADD', KEYS[2], 'MINID', '~', now - tonumber(ARGV[6]), '*',
  'r', ARGV[2], 't', ARGV[3], 'k', 'u', 'uf', since, 'uc', ARGV[5], 'ud', ARGV[7])
return 1
"#;

/// Extends a lease while it is still the caller's. KEYS: lease. ARGV: token, ttl ms. 1 or 0.
pub const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Gives a lease up if it is still the caller's. KEYS: lease. ARGV: token. 1 or 0.
pub const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The scripts, hashed once.
pub struct Scripts {
    pub publish: Script,
    pub load: Script,
    pub retire_epoch: Script,
    pub acquire: Script,
    pub upstream: Script,
    pub renew: Script,
    pub release: Script,
}

impl Default for Scripts {
    fn default() -> Scripts {
        Scripts {
            publish: Script::new(PUBLISH),
            load: Script::new(LOAD),
            retire_epoch: Script::new(RETIRE_EPOCH),
            acquire: Script::new(ACQUIRE),
            upstream: Script::new(UPSTREAM),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
        }
    }
}

/// A fresh epoch: random, never 0, as text (the meta hash stores it so).
pub fn fresh_epoch() -> String {
    fastrand::u64(1..).to_string()
}
