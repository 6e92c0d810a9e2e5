//! What the load tool reads of the server under test from /proc: resident memory and CPU time
//! of a process and its children (nginx runs workers under a master), and the kernel's TCP
//! socket memory, which is not in any process's RSS.

use std::fs;

/// Resident set size in KiB of `pid` and its direct children.
pub fn rss_kib(pid: u32) -> u64 {
    family(pid).iter().map(|p| status_kib(*p, "VmRSS:")).sum()
}

/// The anonymous part of [`rss_kib`] (`RssAnon:`): the heap and stacks, without the pages of
/// mapped files such as the executable's code.
pub fn rss_anon_kib(pid: u32) -> u64 {
    family(pid).iter().map(|p| status_kib(*p, "RssAnon:")).sum()
}

/// User plus system CPU time in milliseconds of `pid` and its direct children.
pub fn cpu_ms(pid: u32) -> f64 {
    let ticks: u64 = family(pid).iter().map(|p| cpu_ticks(*p)).sum();
    ticks as f64 * 1000.0 / clock_ticks_per_sec()
}

/// Kernel slab memory in KiB (`Slab:` of /proc/meminfo): socket structures live there, not in
/// any process's RSS. Machine-wide, so a delta over N loopback connections counts both ends.
pub fn kernel_slab_kib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn family(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if stat_fields(child)
                .get(1)
                .and_then(|p| p.parse::<u32>().ok())
                == Some(pid)
            {
                pids.push(child);
            }
        }
    }
    pids
}

fn status_kib(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Fields of /proc/PID/stat after the command name: state, ppid, …
fn stat_fields(pid: u32) -> Vec<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    text.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn cpu_ticks(pid: u32) -> u64 {
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the command name.
    let f = stat_fields(pid);
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

fn getconf(name: &str) -> Option<f64> {
    let out = std::process::Command::new("getconf")
        .arg(name)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn clock_ticks_per_sec() -> f64 {
    getconf("CLK_TCK").unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_kib(me) > 0);
        assert!(rss_anon_kib(me) > 0 && rss_anon_kib(me) <= rss_kib(me));
        assert!(cpu_ms(me) >= 0.0);
        assert!(family(me).contains(&me));
        assert!(kernel_slab_kib() > 0);
    }
}
