//! Helpers for the networking integration tests: temp netns, unique names, cleanup guards.
//! These tests need root; without it they print `SKIPPED <test>: <reason>` and pass.

#![allow(dead_code)]

use std::io::Read;
use std::process::Command;

/// Whether we may create namespaces, bridges and nft tables.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Says on stderr that the running test is skipped, and why: `SKIPPED <test>: <reason>`.
/// Written to the stderr file itself, past the test harness's capture, so a `cargo test`
/// run shows it although the test then returns as passed.
pub fn skipped(reason: &str) {
    use std::io::Write;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

/// `n` random bytes as hex.
pub fn rand_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut buf).unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Random byte.
pub fn rand_byte() -> u8 {
    u8::from_str_radix(&rand_hex(1), 16).unwrap()
}

/// Runs a command, returns (success, stdout+stderr).
pub fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program).args(args).output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A named netns (`ip netns add`), deleted on drop.
pub struct TempNetns {
    pub name: String,
}

impl TempNetns {
    pub fn new() -> Self {
        let name = format!("berth-test-{}", rand_hex(4));
        let (ok, out) = run("ip", &["netns", "add", &name]);
        assert!(ok, "ip netns add {name}: {out}");
        TempNetns { name }
    }

    pub fn path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs a command inside the netns.
    pub fn exec(&self, args: &[&str]) -> (bool, String) {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }
}

impl Drop for TempNetns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "delete", &self.name]);
    }
}

/// Deletes a link and an nft table on drop (even when the test panics).
pub struct HostCleanup {
    pub links: Vec<String>,
    pub nft_table: Option<String>,
}

impl Drop for HostCleanup {
    fn drop(&mut self) {
        for l in &self.links {
            let _ = run("ip", &["link", "del", l]);
        }
        if let Some(t) = &self.nft_table {
            let _ = run("nft", &["delete", "table", "inet", t]);
        }
    }
}
