//! Per-client-IP limits: connections open at once and new connections per second. A direct
//! peer is counted per connection; clients behind a trusted proxy (whose own address is exempt)
//! are counted per request by their `X-Forwarded-For` address instead. Beyond either limit the
//! client gets 429 with `Retry-After`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use dashmap::DashMap;

/// The rate window: new connections are counted per second.
const WINDOW: Duration = Duration::from_secs(1);

/// Counters per client address.
pub struct PerIp {
    max_open: usize,
    max_per_second: u32,
    clients: DashMap<IpAddr, Client>,
}

struct Client {
    open: usize,
    window: Instant,
    started: u32,
}

/// Why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// `max_connections_per_ip` open already.
    Open,
    /// `new_connections_per_ip_per_second` used up this second.
    Rate,
}

/// One admitted connection (or request) of a client, given back on drop.
pub struct IpSlot {
    limits: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// `max_open` or `max_per_second` of 0 turns that limit off.
    pub fn new(max_open: usize, max_per_second: u32) -> PerIp {
        PerIp {
            max_open,
            max_per_second,
            clients: DashMap::new(),
        }
    }

    /// Whether any limit is on.
    pub fn enabled(&self) -> bool {
        self.max_open > 0 || self.max_per_second > 0
    }

    /// Admits one more connection (or request) from `ip`, or says which limit it is over.
    /// IPv6 clients are counted per /64: one host usually has a whole /64 to pick from.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<IpSlot, OverLimit> {
        let ip = match ip {
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
            v4 => v4,
        };
        let mut client = self.clients.entry(ip).or_insert_with(|| Client {
            open: 0,
            window: now,
            started: 0,
        });
        if now.duration_since(client.window) >= WINDOW {
            client.window = now;
            client.started = 0;
        }
        if self.max_open > 0 && client.open >= self.max_open {
            return Err(OverLimit::Open);
        }
        if self.max_per_second > 0 && client.started >= self.max_per_second {
            return Err(OverLimit::Rate);
        }
        client.open += 1;
        client.started += 1;
        Ok(IpSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// Forgets clients with nothing open whose rate window has passed; returns how many are
    /// remembered.
    pub fn sweep(&self, now: Instant) -> usize {
        self.clients
            .retain(|_, c| c.open > 0 || now.duration_since(c.window) < WINDOW);
        crate::shrink::after_sweep(&self.clients);
        self.clients.len()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some(mut client) = self.limits.clients.get_mut(&self.ip) {
            client.open = client.open.saturating_sub(1);
        }
    }
}

/// IPv4-mapped IPv6 peers (dual-stack listeners) compare as IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_and_rate_limits() {
        let limits = Arc::new(PerIp::new(2, 3));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        let a = limits.admit(ip, t0).unwrap();
        let b = limits.admit(ip, t0).unwrap();
        assert_eq!(limits.admit(ip, t0).err(), Some(OverLimit::Open));
        assert!(limits.admit(other, t0).is_ok(), "per address");
        drop(a);
        let c = limits.admit(ip, t0).unwrap();
        drop((b, c));
        // Three started this second: the fourth waits for the next one.
        assert_eq!(limits.admit(ip, t0).err(), Some(OverLimit::Rate));
        assert!(limits.admit(ip, t0 + WINDOW).is_ok());
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let limits = Arc::new(PerIp::new(1, 0));
        let t0 = Instant::now();
        let _held = limits
            .admit("2001:db8:1:2::1".parse().unwrap(), t0)
            .unwrap();
        let same_64 = limits.admit("2001:db8:1:2:ffff::9".parse().unwrap(), t0);
        assert_eq!(same_64.err(), Some(OverLimit::Open));
        assert!(limits.admit("2001:db8:1:3::1".parse().unwrap(), t0).is_ok());
    }

    #[test]
    fn sweep_forgets_idle_clients_only() {
        let limits = Arc::new(PerIp::new(0, 10));
        let t0 = Instant::now();
        let held = limits.admit("192.0.2.1".parse().unwrap(), t0).unwrap();
        drop(limits.admit("192.0.2.2".parse().unwrap(), t0).unwrap());
        assert_eq!(limits.sweep(t0), 2, "within the window both are kept");
        assert_eq!(
            limits.sweep(t0 + WINDOW),
            1,
            "the one with a connection open stays"
        );
        drop(held);
        assert_eq!(limits.sweep(t0 + WINDOW), 0);
    }

    #[test]
    fn sweep_gives_the_table_back_once_clients_are_gone() {
        let limits = Arc::new(PerIp::new(0, 10));
        let t0 = Instant::now();
        let mut slots: Vec<IpSlot> = (0..20_000u32)
            .map(|i| limits.admit(IpAddr::from((0x0a00_0000 + i).to_be_bytes()), t0))
            .collect::<Result<_, _>>()
            .unwrap();
        let full = limits.clients.capacity();
        drop(slots.split_off(100));
        assert_eq!(limits.sweep(t0 + WINDOW), 100);
        assert!(
            limits.clients.capacity() < full / 10,
            "{} of {full} kept for 100 clients",
            limits.clients.capacity()
        );
        drop(slots);
        assert_eq!(limits.sweep(t0 + WINDOW), 0);
        assert_eq!(limits.clients.capacity(), 0);
    }
}
