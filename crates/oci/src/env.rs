//! The process environment: defaults, then the image's `Env`, then the config's `envs`, each
//! later one replacing an earlier one of the same key in place.

/// The `PATH` runc and containerd use when the image sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The key of a `KEY=value` entry (the whole entry when it has no `=`).
fn key_of(entry: &str) -> &str {
    entry.split_once('=').map_or(entry, |(k, _)| k)
}

/// Sets `entry` in `env`: replaces the entry with the same key where it is, else appends.
pub fn replace_or_append(env: &mut Vec<String>, entry: String) {
    let key = key_of(&entry);
    match env.iter().position(|e| key_of(e) == key) {
        Some(i) => env[i] = entry,
        None => env.push(entry),
    }
}

/// The container's environment.
///
/// Order as containerd builds it: `PATH` default and `HOSTNAME` (and `TERM=xterm` with a tty)
/// first, so that the image and then the config can override them; then the image `Env`; then
/// the config `envs`.
pub fn build_env(
    image_env: &[String],
    config_env: &[(String, String)],
    hostname: &str,
    tty: bool,
) -> Vec<String> {
    let mut env = vec![DEFAULT_PATH.to_string()];
    if !hostname.is_empty() {
        env.push(format!("HOSTNAME={hostname}"));
    }
    if tty {
        env.push("TERM=xterm".to_string());
    }
    for e in image_env {
        replace_or_append(&mut env, e.clone());
    }
    for (k, v) in config_env {
        replace_or_append(&mut env, format!("{k}={v}"));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_order_and_override() {
        let image = vec!["PATH=/img/bin".to_string(), "A=1".to_string(), "B=2".to_string()];
        let config = vec![
            ("B".to_string(), "3".to_string()),
            ("C".to_string(), "4=5".to_string()),
            ("HOSTNAME".to_string(), "mine".to_string()),
        ];
        let env = build_env(&image, &config, "pod-host", false);
        assert_eq!(env, vec!["PATH=/img/bin", "HOSTNAME=mine", "A=1", "B=3", "C=4=5"]);
    }

    #[test]
    fn default_path_and_tty() {
        let env = build_env(&[], &[], "h", true);
        assert_eq!(env, vec![DEFAULT_PATH, "HOSTNAME=h", "TERM=xterm"]);
        let env = build_env(&[], &[], "", false);
        assert_eq!(env, vec![DEFAULT_PATH]);
    }

    #[test]
    fn entry_without_equals_is_a_key() {
        let mut env = vec!["FOO".to_string()];
        replace_or_append(&mut env, "FOO=bar".to_string());
        assert_eq!(env, vec!["FOO=bar"]);
    }
}
