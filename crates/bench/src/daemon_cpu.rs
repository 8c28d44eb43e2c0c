//! CPU time a daemon spends, from the kernel's scheduler statistics: summed over its threads,
//! in nanoseconds. Unlike wall-clock latency it is not inflated by other load on the machine,
//! so it shows what one call costs the server.

use std::path::Path;

use anyhow::{Context, Result};

/// CPU time (user + system) all current threads of `pid` have run, in nanoseconds.
pub fn cpu_ns(pid: u32) -> Result<u64> {
    let tasks = Path::new("/proc").join(pid.to_string()).join("task");
    let mut total = 0u64;
    for entry in
        std::fs::read_dir(&tasks).with_context(|| format!("reading {}", tasks.display()))?
    {
        let path = entry?.path().join("schedstat");
        // A thread may exit between the listing and the read: it simply no longer counts.
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        total += parse_schedstat(&text)
            .with_context(|| format!("unexpected {}: {text:?}", path.display()))?;
    }
    Ok(total)
}

/// The first field of `/proc/<pid>/task/<tid>/schedstat`: time spent on the CPU, ns.
fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_first_field() {
        assert_eq!(parse_schedstat("123456 789 10\n"), Some(123_456));
        assert_eq!(parse_schedstat(""), None);
    }

    #[test]
    fn own_cpu_time_is_readable() {
        assert!(cpu_ns(std::process::id()).is_ok());
    }
}
