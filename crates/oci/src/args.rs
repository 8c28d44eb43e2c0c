//! The process's argv and working directory, with Kubernetes semantics over the image config.

use crate::SpecError;

/// The container's argv.
///
/// Kubernetes semantics (as containerd and the kubelet document them): `command` replaces the
/// image `Entrypoint` and drops the image `Cmd`; `args` replaces `Cmd`; with only `args`, the
/// result is `Entrypoint + args`. An image `Entrypoint` of `[""]` counts as no entrypoint
/// (Docker writes that for `ENTRYPOINT []`).
pub fn process_args(
    command: &[String],
    args: &[String],
    image_entrypoint: &[String],
    image_cmd: &[String],
) -> Result<Vec<String>, SpecError> {
    let mut out: Vec<String> = Vec::new();
    if command.is_empty() {
        let no_entrypoint = image_entrypoint.len() == 1 && image_entrypoint[0].is_empty();
        if !no_entrypoint {
            out.extend(image_entrypoint.iter().cloned());
        }
        if args.is_empty() {
            out.extend(image_cmd.iter().cloned());
        } else {
            out.extend(args.iter().cloned());
        }
    } else {
        out.extend(command.iter().cloned());
        out.extend(args.iter().cloned());
    }
    match out.first() {
        None => Err(SpecError::NoCommand),
        // runc would only fail at start, looking up "" as the executable.
        Some(exe) if exe.is_empty() => Err(SpecError::EmptyExecutable),
        Some(_) => Ok(out),
    }
}

/// The working directory: the config's, else the image's, else `/`.
pub fn working_dir(config_dir: &str, image_dir: Option<&str>) -> String {
    if !config_dir.is_empty() {
        return config_dir.to_string();
    }
    match image_dir {
        Some(d) if !d.is_empty() => d.to_string(),
        _ => "/".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn args_table() {
        // (command, args, entrypoint, cmd, expected)
        type Case<'a> = (&'a [&'a str], &'a [&'a str], &'a [&'a str], &'a [&'a str], &'a [&'a str]);
        let cases: &[Case] = &[
            (&[], &[], &["/ep"], &["c1", "c2"], &["/ep", "c1", "c2"]),
            (&[], &[], &[], &["sh"], &["sh"]),
            (&["/cmd"], &[], &["/ep"], &["c1"], &["/cmd"]),
            (&["/cmd"], &["a"], &["/ep"], &["c1"], &["/cmd", "a"]),
            (&[], &["a", "b"], &["/ep"], &["c1"], &["/ep", "a", "b"]),
            (&[], &["a"], &[], &["c1"], &["a"]),
            (&[], &[], &[""], &["c1"], &["c1"]),
            (&[], &["x"], &[""], &[], &["x"]),
        ];
        for (command, args, ep, cmd, want) in cases {
            let got = process_args(&v(command), &v(args), &v(ep), &v(cmd)).unwrap();
            assert_eq!(got, v(want), "command={command:?} args={args:?}");
        }
    }

    #[test]
    fn empty_is_error() {
        assert!(matches!(process_args(&[], &[], &[], &[]), Err(SpecError::NoCommand)));
        assert!(matches!(process_args(&[], &[], &v(&[""]), &[]), Err(SpecError::NoCommand)));
        assert!(matches!(
            process_args(&v(&[""]), &v(&["x"]), &[], &[]),
            Err(SpecError::EmptyExecutable)
        ));
        assert!(matches!(
            process_args(&[], &[], &[], &v(&["", "x"])),
            Err(SpecError::EmptyExecutable)
        ));
    }

    #[test]
    fn cwd() {
        assert_eq!(working_dir("/w", Some("/img")), "/w");
        assert_eq!(working_dir("", Some("/img")), "/img");
        assert_eq!(working_dir("", Some("")), "/");
        assert_eq!(working_dir("", None), "/");
    }
}
