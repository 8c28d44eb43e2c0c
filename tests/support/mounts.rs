//! Finding and removing mounts a test's daemon left behind.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, umount2};

/// Undoes the octal escapes (`\040` for space, ...) of /proc/self/mountinfo.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(o) if b[i] == b'\\' => {
                out.push(o.iter().fold(0u8, |acc, c| acc.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points in `mountinfo` text (the fifth field of each line).
pub fn parse_mountinfo(text: &str) -> Vec<PathBuf> {
    text.lines().filter_map(|l| l.split(' ').nth(4)).map(|m| PathBuf::from(unescape(m))).collect()
}

/// Mount points at or below `prefix`, deepest first.
pub fn mounts_under(prefix: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> =
        parse_mountinfo(&text).into_iter().filter(|m| m.starts_with(prefix)).collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    v.dedup();
    v
}

/// Lazily unmounts everything at or below `prefix`, deepest first; returns what it unmounted.
pub fn unmount_all_under(prefix: &Path) -> Vec<PathBuf> {
    let mut done = Vec::new();
    // Stacked mounts on one point need one umount each: loop until nothing is left.
    for _ in 0..16 {
        let left = mounts_under(prefix);
        if left.is_empty() {
            break;
        }
        for m in left {
            if umount2(&m, MntFlags::MNT_DETACH).is_ok() {
                done.push(m);
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mount_points_with_escapes() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    90 22 0:50 / /tmp/berth\\040x/rootfs rw - overlay overlay rw,lowerdir=/a\n";
        assert_eq!(
            parse_mountinfo(text),
            vec![PathBuf::from("/"), PathBuf::from("/tmp/berth x/rootfs")]
        );
    }
}
