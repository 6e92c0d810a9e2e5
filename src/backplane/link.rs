//! Connections to Redis: where to connect (a URL, or the master a Sentinel names), the shared
//! command connection that is opened again after any failure, and dedicated connections for
//! blocking reads. Every command has a deadline, so a connection that is open but answers
//! nothing (half-open) is found and replaced.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, RedisError, RedisResult};

use crate::config::{RedisConfig, sentinel_url};

/// How long a command (or a connect) may take before the connection is taken for dead.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a connection failed, as `backplane_reconnects_total` counts it.
pub fn reason(e: &RedisError) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.code() == Some("READONLY") {
        "readonly"
    } else {
        "error"
    }
}

/// Whether the connection that gave `e` must be replaced (rather than the command having
/// been refused by a healthy server). Sentinel naming no master is a failover under way.
pub fn connection_broken(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::MasterNameNotFoundBySentinel
        || e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.code() == Some("READONLY")
        || e.code() == Some("LOADING")
        || e.code() == Some("MASTERDOWN")
}

enum Target {
    Url(Client),
    /// Asked for the master's address at every connect, so a failover is followed.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

pub struct Link {
    target: Target,
    /// `CLIENT SETNAME` of every connection, so `CLIENT LIST` shows which node it is.
    name: String,
    current: Mutex<Option<MultiplexedConnection>>,
    connecting: tokio::sync::Mutex<()>,
}

impl Link {
    /// Nothing is connected yet; `config` was validated.
    pub fn new(config: &RedisConfig, node: &str) -> RedisResult<Link> {
        let target = match &config.sentinel {
            None => Target::Url(Client::open(config.url.as_str())?),
            Some(s) => {
                let master = config.url.as_str().into_connection_info()?;
                let mut node_info = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(master.redis_settings().clone());
                if config.url.starts_with("rediss://") {
                    node_info = node_info.set_tls_mode(redis::TlsMode::Secure);
                }
                let addrs: Vec<String> = s.addrs.iter().map(|a| sentinel_url(a)).collect();
                let client = SentinelClient::build(
                    addrs,
                    s.master.clone(),
                    Some(node_info),
                    SentinelServerType::Master,
                )?;
                Target::Sentinel(tokio::sync::Mutex::new(client))
            }
        };
        Ok(Link {
            target,
            name: format!("pollmux-{node}"),
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    /// The command connection, opened if there is none.
    pub async fn get(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let c = self.open(COMMAND_TIMEOUT).await?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }

    fn cached(&self) -> Option<MultiplexedConnection> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The command connection failed with `e`: the next command opens a new one if it must.
    /// True when a connection was dropped.
    pub fn failed(&self, e: &RedisError) -> bool {
        connection_broken(e)
            && self
                .current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .is_some()
    }

    /// A connection of its own (for a blocking read), whose commands may take
    /// `response_timeout`.
    pub async fn open(&self, response_timeout: Duration) -> RedisResult<MultiplexedConnection> {
        let client = match &self.target {
            Target::Url(c) => c.clone(),
            Target::Sentinel(s) => {
                let mut s = s.lock().await;
                tokio::time::timeout(COMMAND_TIMEOUT, s.async_get_client())
                    .await
                    .map_err(|_| timed_out("asking Sentinel for the master"))??
            }
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(response_timeout));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        // A demoted master still accepts connections: refuse to write to a replica.
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        if !matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
            return Err(RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                "the server is not a master",
            )));
        }
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(&self.name)
            .exec_async(&mut conn)
            .await?;
        Ok(conn)
    }
}

fn timed_out(what: &'static str) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}
