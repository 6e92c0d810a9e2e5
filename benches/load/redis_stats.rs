//! Redis's work as Redis itself counts it: `INFO cpu commandstats` read over a raw connection
//! (a unix socket or a loopback port) and parsed from its text, so a cluster run can say how
//! many commands, and how much of Redis's CPU, each message cost. Commands run inside scripts
//! are counted there too, one by one; the CPU is in microseconds (the /proc figures are in
//! 10 ms ticks, too coarse for one message).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest wait for Redis to answer `INFO`.
const INFO_TIMEOUT: Duration = Duration::from_secs(5);
/// `INFO cpu commandstats` in RESP (several sections: Redis 7.0 and later).
const INFO: &[u8] = b"*3\r\n$4\r\nINFO\r\n$3\r\ncpu\r\n$12\r\ncommandstats\r\n";

/// One reading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    /// Calls per command so far (`cmdstat_<name>:calls=N,…`).
    pub calls: BTreeMap<String, u64>,
    /// `used_cpu_user` + `used_cpu_sys`, in microseconds.
    pub cpu_us: u64,
}

/// Where Redis listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// `redis://IP:PORT[/db]` (loopback only) or `unix:///path/to/socket`.
pub fn parse_url(url: &str) -> Result<Addr, String> {
    if let Some(path) = url.strip_prefix("unix://") {
        if path.is_empty() {
            return Err(format!("{url}: no socket path"));
        }
        return Ok(Addr::Unix(PathBuf::from(path)));
    }
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| format!("{url}: expected redis://IP:PORT or unix:///path"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| format!("{url}: the host must be an IP:port on loopback"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{addr}: Redis is only read on loopback addresses"));
    }
    Ok(Addr::Tcp(addr))
}

/// Redis's counts now.
pub async fn read(addr: &Addr) -> Result<Reading, String> {
    let text = tokio::time::timeout(INFO_TIMEOUT, async {
        match addr {
            Addr::Tcp(a) => info(tokio::net::TcpStream::connect(a).await?).await,
            Addr::Unix(p) => info(tokio::net::UnixStream::connect(p).await?).await,
        }
    })
    .await
    .map_err(|_| "Redis did not answer INFO in time".to_owned())?
    .map_err(|e| format!("Redis INFO: {e}"))?;
    Ok(parse_info(&text))
}

async fn info<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> std::io::Result<String> {
    s.write_all(INFO).await?;
    let mut buf = Vec::new();
    loop {
        if let Some(text) = bulk_string(&buf)? {
            return Ok(text);
        }
        if s.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "Redis closed the connection",
            ));
        }
    }
}

/// The text of a complete RESP bulk string reply (`$len\r\n…\r\n`), or `None` until all of it
/// has arrived.
fn bulk_string(buf: &[u8]) -> std::io::Result<Option<String>> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let Some(head_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let len: usize = match head.strip_prefix('$') {
        Some(n) => n.parse().map_err(|_| bad(format!("bad reply {head:?}")))?,
        None => return Err(bad(format!("Redis answered {head:?}"))),
    };
    let body = head_end + 2;
    if buf.len() < body + len {
        return Ok(None);
    }
    Ok(Some(
        String::from_utf8_lossy(&buf[body..body + len]).into_owned(),
    ))
}

fn parse_info(text: &str) -> Reading {
    let seconds = |key: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let cpu_us = ((seconds("used_cpu_user") + seconds("used_cpu_sys")) * 1e6).round() as u64;
    let calls = text
        .lines()
        .filter_map(|l| {
            let (name, stats) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect();
    Reading { calls, cpu_us }
}

/// Calls made between two readings, per command, without the first reading's own `INFO`
/// (Redis counts a command after it answers, so the second reading counts the first).
pub fn delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(name, &calls)| {
            let mut n = calls.saturating_sub(before.get(name).copied().unwrap_or(0));
            if name == "info" {
                n = n.saturating_sub(1);
            }
            (n > 0).then(|| (name.clone(), n))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_urls_loopback_only() {
        assert_eq!(
            parse_url("unix:///tmp/r/redis.sock").unwrap(),
            Addr::Unix("/tmp/r/redis.sock".into())
        );
        assert_eq!(
            parse_url("redis://127.0.0.1:6379/0").unwrap(),
            Addr::Tcp("127.0.0.1:6379".parse().unwrap())
        );
        assert!(parse_url("redis://10.0.0.1:6379").is_err());
        assert!(parse_url("redis://localhost:6379").is_err());
        assert!(parse_url("http://127.0.0.1:6379").is_err());
        assert!(parse_url("unix://").is_err());
    }

    #[test]
    fn parses_info_replies_and_counts_calls_between_readings() {
        let text = "# CPU\r\nused_cpu_sys:0.250000\r\nused_cpu_user:1.000001\r\nused_cpu_sys_children:9.0\r\n# Commandstats\r\ncmdstat_evalsha:calls=3,usec=90,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r\ncmdstat_info:calls=4,usec=1,usec_per_call=0.25,rejected_calls=0,failed_calls=0\r\ncmdstat_client|setname:calls=2,usec=1,usec_per_call=0.50,rejected_calls=0,failed_calls=0\r\n";
        let reply = format!("${}\r\n{text}\r\n", text.len());
        assert_eq!(bulk_string(&reply.as_bytes()[..20]).unwrap(), None);
        let parsed = bulk_string(reply.as_bytes()).unwrap().unwrap();
        let reading = parse_info(&parsed);
        assert_eq!(reading.cpu_us, 1_250_001);
        let before = reading.calls;
        assert_eq!(before["evalsha"], 3);
        assert_eq!(before["client|setname"], 2);
        assert!(bulk_string(b"-ERR unknown\r\n").is_err());

        let mut after = before.clone();
        *after.get_mut("evalsha").unwrap() += 1;
        *after.get_mut("info").unwrap() += 1;
        after.insert("xread".into(), 3);
        let d = delta(&before, &after);
        assert_eq!(
            d.into_iter().collect::<Vec<_>>(),
            [("evalsha".into(), 1), ("xread".into(), 3)]
        );
    }
}
