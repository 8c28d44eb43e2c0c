//! Image references: parsing per the distribution grammar and normalisation as the kubelet,
//! Docker and containerd do it (`busybox` -> `docker.io/library/busybox:latest`).
//!
//! Grammar (github.com/distribution/reference):
//! ```text
//! reference  := name [ ":" tag ] [ "@" digest ]
//! name       := [domain '/'] path-component ['/' path-component]*
//! domain     := host [':' port]        host: domain-name | IPv4 | '[' IPv6 ']'
//! path-component := [a-z0-9]+ (separator [a-z0-9]+)*   separator: '.' | '_' | '__' | '-'+
//! tag        := [\w][\w.-]{0,127}
//! ```
//! The first component is a domain when it contains `.` or `:`, is `localhost`, or has
//! upper-case letters; otherwise the name lives on Docker Hub.

use std::fmt;
use std::net::Ipv6Addr;

use crate::digest::{Digest, is_sha256_hex};
use crate::error::ImageError;

/// The registry of names without a domain.
pub const DEFAULT_DOMAIN: &str = "docker.io";
/// Docker Hub's old name, normalised to [`DEFAULT_DOMAIN`].
const LEGACY_DEFAULT_DOMAIN: &str = "index.docker.io";
/// Docker Hub's namespace for one-component names.
const OFFICIAL_REPO_PREFIX: &str = "library/";
/// The tag of a reference that names neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
/// Longest `domain/path` the grammar allows.
const NAME_TOTAL_LENGTH_MAX: usize = 255;
/// Longest tag.
const TAG_LENGTH_MAX: usize = 128;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageReference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl ImageReference {
    /// Parses and normalises `reference`. A reference with neither tag nor digest gets the tag
    /// `latest`; one with both keeps both (the digest decides what is pulled).
    pub fn parse(reference: &str) -> Result<Self, ImageError> {
        let invalid = |reason: &str| ImageError::InvalidReference {
            reference: reference.to_string(),
            reason: reason.to_string(),
        };
        if reference.is_empty() {
            return Err(invalid("empty reference"));
        }
        if is_sha256_hex(reference) {
            return Err(invalid("a 64-digit hex string is an image ID, not a name"));
        }
        let (rest, digest) = match reference.split_once('@') {
            Some((rest, digest)) => {
                (rest, Some(Digest::parse(digest).map_err(|reason| invalid(&reason))?))
            }
            None => (reference, None),
        };
        // A ':' after the last '/' starts the tag; one before it belongs to a port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(|reason| invalid(&reason))?;
        }
        if name.is_empty() {
            return Err(invalid("empty name"));
        }
        let (domain, path) = split_domain(name);
        validate_domain(domain).map_err(|reason| invalid(&reason))?;
        let domain = if domain == LEGACY_DEFAULT_DOMAIN { DEFAULT_DOMAIN } else { domain };
        let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
            format!("{OFFICIAL_REPO_PREFIX}{path}")
        } else {
            path.to_string()
        };
        validate_path(&path).map_err(|reason| invalid(&reason))?;
        if domain.len() + 1 + path.len() > NAME_TOTAL_LENGTH_MAX {
            return Err(invalid(&format!(
                "repository name is longer than {NAME_TOTAL_LENGTH_MAX} characters"
            )));
        }
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_string()),
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (None, Some(_)) => None,
        };
        Ok(Self { domain: domain.to_string(), path, tag, digest })
    }

    /// The registry host, with port (`docker.io`, `localhost:5000`, `[::1]:5000`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path inside the registry (`library/busybox`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `domain/path`: the name without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The tag, if the reference has one (always, unless it was given by digest only).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `name:tag`, the form listed in an image's `repo_tags`.
    pub fn tagged_name(&self) -> Option<String> {
        self.tag.as_ref().map(|tag| format!("{}:{tag}", self.name()))
    }

    /// `name@digest`, the form listed in an image's `repo_digests`.
    pub fn digested_name(&self, digest: &Digest) -> String {
        format!("{}@{digest}", self.name())
    }

    /// The key a local lookup uses: `name@digest` when there is a digest (it wins over a
    /// tag), else `name:tag`.
    pub fn lookup_key(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => self.digested_name(digest),
            (None, Some(tag)) => format!("{}:{tag}", self.name()),
            (None, None) => format!("{}:{DEFAULT_TAG}", self.name()),
        }
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Splits `name` into domain and path the way Docker does.
fn split_domain(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DEFAULT_DOMAIN, name),
    }
}

/// `tag := [\w][\w.-]{0,127}`.
fn validate_tag(tag: &str) -> Result<(), String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tag.chars();
    match chars.next() {
        None => return Err("empty tag".into()),
        Some(c) if !word(c) => {
            return Err(format!("tag {tag:?} must start with a letter, digit or '_'"));
        }
        Some(_) => {}
    }
    if tag.len() > TAG_LENGTH_MAX {
        return Err(format!("tag {tag:?} is longer than {TAG_LENGTH_MAX} characters"));
    }
    if !chars.all(|c| word(c) || c == '.' || c == '-') {
        return Err(format!("tag {tag:?} may only contain letters, digits, '_', '.' and '-'"));
    }
    Ok(())
}

/// `host[:port]` with host a DNS name, an IPv4 address or a bracketed IPv6 address.
pub(crate) fn validate_domain(domain: &str) -> Result<(), String> {
    let (host, port) = if let Some(bracketed) = domain.strip_prefix('[') {
        let Some((v6, after)) = bracketed.split_once(']') else {
            return Err(format!("domain {domain:?} has an unclosed '['"));
        };
        if v6.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{v6:?} is not an IPv6 address"));
        }
        match after {
            "" => (None, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Err(format!("domain {domain:?} has junk after ']'")),
            },
        }
    } else {
        match domain.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(domain), None),
        }
    };
    // A TCP port: 1..=65535. The grammar allows any digits, but the HTTP client cannot
    // address more (it failed with "could not clone request builder").
    if let Some(port) = port
        && (port.is_empty()
            || port.len() > 5
            || !port.bytes().all(|b| b.is_ascii_digit())
            || !port.parse::<u16>().is_ok_and(|p| p > 0))
    {
        return Err(format!("domain {domain:?} has an invalid port (want 1-65535)"));
    }
    if let Some(host) = host {
        let valid_component = |c: &str| {
            let bytes = c.as_bytes();
            !bytes.is_empty()
                && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
                && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        };
        if !host.split('.').all(valid_component) {
            return Err(format!("domain {domain:?} is not a valid host name"));
        }
    }
    Ok(())
}

/// Path components: lowercase alphanumeric runs joined by `.`, `_`, `__` or dashes.
fn validate_path(path: &str) -> Result<(), String> {
    for component in path.split('/') {
        validate_path_component(component)
            .map_err(|why| format!("repository path {path:?}: {why}"))?;
    }
    Ok(())
}

fn validate_path_component(component: &str) -> Result<(), String> {
    if component.is_empty() {
        return Err("empty path component".into());
    }
    if component.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("repository name must be lowercase".into());
    }
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !component.chars().all(|c| alnum(c) || matches!(c, '.' | '_' | '-')) {
        return Err(format!("component {component:?} may only contain a-z, 0-9, '.', '_' and '-'"));
    }
    let starts_and_ends_alnum = component.chars().next().is_some_and(alnum)
        && component.chars().next_back().is_some_and(alnum);
    if !starts_and_ends_alnum {
        return Err(format!("component {component:?} must start and end with a-z or 0-9"));
    }
    // Every run of separators must be '.', '_', '__' or one or more '-'.
    for separator in component.split(alnum).filter(|s| !s.is_empty()) {
        let ok = matches!(separator, "." | "_" | "__") || separator.chars().all(|c| c == '-');
        if !ok {
            return Err(format!("component {component:?} has the separator {separator:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "7b3ccabffc97de872a30dfd234fd972a66d247c8cfc69b0550f276481852627c";

    fn norm(s: &str) -> String {
        match ImageReference::parse(s) {
            Ok(r) => r.to_string(),
            Err(e) => panic!("{s}: {e}"),
        }
    }

    fn bad(s: &str) -> String {
        match ImageReference::parse(s) {
            Ok(r) => panic!("{s} parsed as {r}"),
            Err(ImageError::InvalidReference { reference, reason }) => {
                assert_eq!(reference, s);
                reason
            }
            Err(e) => panic!("{s}: unexpected error {e}"),
        }
    }

    #[test]
    fn docker_hub_names() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("user/img"), "docker.io/user/img:latest");
        assert_eq!(norm("user/img:v1"), "docker.io/user/img:v1");
        assert_eq!(norm("docker.io/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("docker.io/library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("index.docker.io/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("index.docker.io/user/img:t"), "docker.io/user/img:t");
        assert_eq!(norm("library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("a/b/c/d"), "docker.io/a/b/c/d:latest");
    }

    #[test]
    fn registries_with_ports_and_addresses() {
        assert_eq!(norm("localhost:5000/x"), "localhost:5000/x:latest");
        assert_eq!(norm("localhost/x"), "localhost/x:latest");
        assert_eq!(norm("127.0.0.1:5000/x:tag"), "127.0.0.1:5000/x:tag");
        assert_eq!(norm("[::1]:5000/x/y:tag"), "[::1]:5000/x/y:tag");
        assert_eq!(norm("[fe80::1]/x"), "[fe80::1]/x:latest");
        assert_eq!(norm("registry.k8s.io/pause:3.9"), "registry.k8s.io/pause:3.9");
        assert_eq!(norm("quay.io/a/b"), "quay.io/a/b:latest");
        assert_eq!(
            norm("my-reg.example.com:443/team/app"),
            "my-reg.example.com:443/team/app:latest"
        );
        // An upper-case first component is a domain, not a Hub user.
        assert_eq!(norm("Registry/x"), "Registry/x:latest");
        let r = ImageReference::parse("localhost:5000/x").unwrap();
        assert_eq!(r.domain(), "localhost:5000");
        assert_eq!(r.path(), "x");
        assert_eq!(r.tag(), Some("latest"));
    }

    #[test]
    fn digests() {
        let d = format!("sha256:{HEX}");
        let r = ImageReference::parse(&format!("host.example/x@{d}")).unwrap();
        assert_eq!(r.to_string(), format!("host.example/x@{d}"));
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().map(Digest::as_str), Some(d.as_str()));
        assert_eq!(r.tagged_name(), None);
        assert_eq!(r.lookup_key(), format!("host.example/x@{d}"));
        assert_eq!(norm(&format!("busybox@{d}")), format!("docker.io/library/busybox@{d}"));
        assert_eq!(norm(&format!("localhost:5000/x@{d}")), format!("localhost:5000/x@{d}"));
    }

    #[test]
    fn tag_and_digest_keeps_both_digest_wins() {
        let d = format!("sha256:{HEX}");
        let r = ImageReference::parse(&format!("x:tag@{d}")).unwrap();
        assert_eq!(r.to_string(), format!("docker.io/library/x:tag@{d}"));
        assert_eq!(r.tag(), Some("tag"));
        assert_eq!(r.tagged_name().as_deref(), Some("docker.io/library/x:tag"));
        assert_eq!(r.lookup_key(), format!("docker.io/library/x@{d}"));
        let r = ImageReference::parse(&format!("localhost:5000/x:1.0@{d}")).unwrap();
        assert_eq!(r.domain(), "localhost:5000");
        assert_eq!(r.tag(), Some("1.0"));
    }

    #[test]
    fn names_and_keys() {
        let r = ImageReference::parse("busybox").unwrap();
        assert_eq!(r.name(), "docker.io/library/busybox");
        assert_eq!(r.tagged_name().as_deref(), Some("docker.io/library/busybox:latest"));
        assert_eq!(r.lookup_key(), "docker.io/library/busybox:latest");
        let d = Digest::parse(&format!("sha256:{HEX}")).unwrap();
        assert_eq!(r.digested_name(&d), format!("docker.io/library/busybox@sha256:{HEX}"));
    }

    #[test]
    fn separators() {
        assert_eq!(norm("a.b/c_d/e__f/g-h/i---j"), "a.b/c_d/e__f/g-h/i---j:latest");
        assert_eq!(norm("foo/bar.baz_qux"), "docker.io/foo/bar.baz_qux:latest");
        assert!(bad("foo/a___b").contains("separator"));
        assert!(bad("foo/a..b").contains("separator"));
        assert!(bad("foo/a._b").contains("separator"));
        assert!(bad("foo/-a").contains("start and end"));
        assert!(bad("foo/a-").contains("start and end"));
        assert!(bad("foo/.a").contains("start and end"));
    }

    #[test]
    fn tags() {
        assert_eq!(norm("x:_t"), "docker.io/library/x:_t");
        assert_eq!(norm("x:V1.2-rc_3"), "docker.io/library/x:V1.2-rc_3");
        let long = "a".repeat(128);
        assert_eq!(norm(&format!("x:{long}")), format!("docker.io/library/x:{long}"));
        assert!(bad(&format!("x:{long}a")).contains("longer"));
        assert!(bad("x:.t").contains("start"));
        assert!(bad("x:-t").contains("start"));
        assert!(bad("x:").contains("empty tag"));
        assert!(bad("x:t+1").contains("may only"));
        assert!(bad("x:t/y").contains("port"));
    }

    #[test]
    fn invalid_references() {
        assert!(bad("").contains("empty"));
        assert!(bad("Busybox").contains("lowercase"));
        assert!(bad("docker.io/Library/busybox").contains("lowercase"));
        assert!(bad("user/IMG").contains("lowercase"));
        assert!(bad(HEX).contains("image ID"));
        assert!(bad("x@sha256:abc").contains("64"));
        assert!(bad(&format!("x@sha512:{HEX}")).contains("sha512"));
        assert!(bad(&format!("x@{HEX}")).contains("algorithm"));
        assert!(bad(&format!("x@sha256:{}", HEX.to_uppercase())).contains("64"));
        assert!(!bad("x@@sha256:1").is_empty());
        assert!(bad("/x").contains("empty"));
        assert!(bad("x/").contains("empty"));
        assert!(bad("x//y").contains("empty"));
        assert!(bad("host:port/x").contains("port"));
        assert!(bad("host:/x").contains("port"));
        assert!(bad("host:65536/x").contains("port"));
        assert!(bad("host:99999/x").contains("port"));
        assert!(bad("host:0/x").contains("port"));
        assert!(bad("host:000000000080/x").contains("port"));
        assert_eq!(norm("host.example:65535/x"), "host.example:65535/x:latest");
        assert_eq!(norm("[::1]:1/x"), "[::1]:1/x:latest");
        assert!(bad("[::1]:70000/x").contains("port"));
        assert!(bad("-host.com/x").contains("host name"));
        assert!(bad("ho_st.com/x").contains("host name"));
        assert!(bad("[::1/x").contains("unclosed"));
        assert!(bad("[zz::1]:5000/x").contains("IPv6"));
        assert!(bad("x y").contains("may only"));
        assert!(bad(":tag").contains("empty name"));
        assert!(bad("a b/c").contains("may only"));
        let long_path = "a/".repeat(130) + "a";
        assert!(bad(&long_path).contains("longer"));
    }
}
