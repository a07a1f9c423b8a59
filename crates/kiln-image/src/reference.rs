//! Image references: registry names, OCI layout directories, `docker save` archives.

use std::fmt;
use std::path::PathBuf;

/// The registry used when a reference names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag used when a registry reference names neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageRef {
    /// An image in a registry.
    Registry(RegistryRef),
    /// An OCI image layout directory (`oci:PATH[:TAG]`).
    OciLayout {
        /// The layout directory.
        path: PathBuf,
        /// The `org.opencontainers.image.ref.name` to select; `None` = the only image.
        tag: Option<String>,
    },
    /// A `docker save` tar file (`docker-archive:FILE`).
    DockerArchive {
        /// The archive.
        path: PathBuf,
    },
}

/// A fully qualified registry reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryRef {
    /// `host[:port]`, e.g. `docker.io` or `127.0.0.1:5000`.
    pub registry: String,
    /// The repository path, e.g. `library/busybox`.
    pub repository: String,
    /// The tag; `None` only when `digest` is set.
    pub tag: Option<String>,
    /// `sha256:<64 hex>`; when set it wins over the tag.
    pub digest: Option<String>,
}

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseImageRefError {
    /// Empty input.
    #[error("image reference is empty")]
    Empty,
    /// `oci:` or `docker-archive:` with no path.
    #[error("image reference {input:?} names no path")]
    NoPath {
        /// The input.
        input: String,
    },
    /// A bad registry host.
    #[error("image reference {input:?}: registry {registry:?} is not a valid host[:port]")]
    Registry {
        /// The input.
        input: String,
        /// The registry part.
        registry: String,
    },
    /// A bad repository path. The message names the input once (the
    /// repository only when it is not just the input, perhaps with
    /// `library/` in front), so callers need not repeat it.
    #[error(
        "image reference {input:?}: {} is not valid (lowercase letters, digits, and . _ - separators)",
        repository_part(.input, .repository)
    )]
    Repository {
        /// The input.
        input: String,
        /// The repository part.
        repository: String,
    },
    /// A bad tag.
    #[error("image reference {input:?}: tag {tag:?} is not valid")]
    Tag {
        /// The input.
        input: String,
        /// The tag part.
        tag: String,
    },
    /// A bad or unsupported digest.
    #[error("image reference {input:?}: digest {digest:?} is not sha256:<64 lowercase hex digits>")]
    Digest {
        /// The input.
        input: String,
        /// The digest part.
        digest: String,
    },
}

/// How a repository error names the repository: not at all when it is
/// the input itself.
fn repository_part(input: &str, repository: &str) -> String {
    let bare = repository.strip_prefix("library/").unwrap_or(repository);
    if input.trim() == repository || input.trim() == bare || input.trim().starts_with(bare) {
        "the repository name".into()
    } else {
        format!("repository {repository:?}")
    }
}

impl ImageRef {
    /// Parses `NAME[:TAG][@DIGEST]`, `oci:PATH[:TAG]` or `docker-archive:FILE`.
    pub fn parse(input: &str) -> Result<ImageRef, ParseImageRefError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(ParseImageRefError::Empty);
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            let (path, tag) = match rest.rsplit_once(':') {
                Some((p, t)) if !t.contains('/') && !p.is_empty() => {
                    if !valid_tag(t) {
                        return Err(ParseImageRefError::Tag {
                            input: input.to_owned(),
                            tag: t.to_owned(),
                        });
                    }
                    (p, Some(t.to_owned()))
                }
                _ => (rest, None),
            };
            if path.is_empty() {
                return Err(ParseImageRefError::NoPath {
                    input: input.to_owned(),
                });
            }
            return Ok(ImageRef::OciLayout {
                path: PathBuf::from(path),
                tag,
            });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            if rest.is_empty() {
                return Err(ParseImageRefError::NoPath {
                    input: input.to_owned(),
                });
            }
            return Ok(ImageRef::DockerArchive {
                path: PathBuf::from(rest),
            });
        }
        RegistryRef::parse(s).map(ImageRef::Registry)
    }

    /// The registry reference, if this is one.
    pub fn as_registry(&self) -> Option<&RegistryRef> {
        match self {
            ImageRef::Registry(r) => Some(r),
            _ => None,
        }
    }
}

impl std::str::FromStr for ImageRef {
    type Err = ParseImageRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageRef::parse(s)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Registry(r) => r.fmt(f),
            ImageRef::OciLayout { path, tag: None } => write!(f, "oci:{}", path.display()),
            ImageRef::OciLayout { path, tag: Some(t) } => write!(f, "oci:{}:{t}", path.display()),
            ImageRef::DockerArchive { path } => write!(f, "docker-archive:{}", path.display()),
        }
    }
}

impl RegistryRef {
    fn parse(input: &str) -> Result<RegistryRef, ParseImageRefError> {
        let (name_tag, digest) = match input.split_once('@') {
            Some((n, d)) => {
                if !valid_digest(d) {
                    return Err(ParseImageRefError::Digest {
                        input: input.to_owned(),
                        digest: d.to_owned(),
                    });
                }
                (n, Some(d.to_owned()))
            }
            None => (input, None),
        };
        // The tag follows the last ':' after the last '/'.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                (&name_tag[..i], Some(name_tag[i + 1..].to_owned()))
            }
            None => (name_tag, None),
        };
        if let Some(t) = &tag
            && !valid_tag(t)
        {
            return Err(ParseImageRefError::Tag {
                input: input.to_owned(),
                tag: t.clone(),
            });
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
        };
        if !valid_registry(&registry) {
            return Err(ParseImageRefError::Registry {
                input: input.to_owned(),
                registry,
            });
        }
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if !valid_repository(&repository) {
            return Err(ParseImageRefError::Repository {
                input: input.to_owned(),
                repository,
            });
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            _ => tag,
        };
        Ok(RegistryRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `repository:tag` or `repository@digest`, as it appears in messages.
    pub fn name(&self) -> String {
        match (&self.tag, &self.digest) {
            (_, Some(d)) => format!("{}@{d}", self.repository),
            (Some(t), None) => format!("{}:{t}", self.repository),
            (None, None) => self.repository.clone(),
        }
    }

    /// Whether the host is loopback, which is always spoken to over plain HTTP.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
            _ => self.registry.as_str(),
        };
        host == "localhost" || host == "127.0.0.1" || host == "[::1]"
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// `sha256:` followed by 64 lowercase hex digits.
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_registry(r: &str) -> bool {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit()))
    {
        return false;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn valid_repository(r: &str) -> bool {
    r.len() <= 255
        && r.split('/').all(|comp| {
            let b = comp.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
                })
                && !comp.contains("..")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &str) -> RegistryRef {
        match ImageRef::parse(s).expect("parses") {
            ImageRef::Registry(r) => r,
            other => panic!("not a registry ref: {other:?}"),
        }
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn short_names_go_to_docker_hub_library() {
        let r = reg("busybox");
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(reg("user/app:v1").to_string(), "docker.io/user/app:v1");
        assert!(!r.is_loopback());
    }

    #[test]
    fn host_port_repo_tag() {
        let r = reg("127.0.0.1:5000/team/busybox:1.36");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/busybox");
        assert_eq!(r.tag.as_deref(), Some("1.36"));
        assert!(r.is_loopback());
        assert!(reg("localhost/x").is_loopback());
        assert_eq!(reg("localhost:5000/x").registry, "localhost:5000");
        assert_eq!(reg("ghcr.io/a/b").tag.as_deref(), Some("latest"));
    }

    #[test]
    fn digests() {
        let r = reg(&format!("127.0.0.1:5000/busybox@{D}"));
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.tag, None);
        let r = reg(&format!("busybox:1@{D}"));
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.to_string(), format!("docker.io/library/busybox:1@{D}"));
        assert!(matches!(
            ImageRef::parse("busybox@sha256:abc"),
            Err(ParseImageRefError::Digest { .. })
        ));
        assert!(matches!(
            ImageRef::parse(&format!("busybox@sha512:{}", &D[7..])),
            Err(ParseImageRefError::Digest { .. })
        ));
    }

    #[test]
    fn layouts_and_archives() {
        assert_eq!(
            ImageRef::parse("oci:/tmp/x:v1").expect("parses"),
            ImageRef::OciLayout {
                path: "/tmp/x".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci:/tmp/x").expect("parses"),
            ImageRef::OciLayout {
                path: "/tmp/x".into(),
                tag: None
            }
        );
        assert_eq!(
            ImageRef::parse("oci:rel/dir").expect("parses").to_string(),
            "oci:rel/dir"
        );
        assert_eq!(
            ImageRef::parse("docker-archive:/tmp/a.tar").expect("parses"),
            ImageRef::DockerArchive {
                path: "/tmp/a.tar".into()
            }
        );
        assert!(matches!(
            ImageRef::parse("oci:"),
            Err(ParseImageRefError::NoPath { .. })
        ));
        assert!(matches!(
            ImageRef::parse("docker-archive:"),
            Err(ParseImageRefError::NoPath { .. })
        ));
    }

    #[test]
    fn malformed() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "busybox:-x",
            "a//b",
            "bad_host:99999999/x",
            "-host.io/x",
            "x/../y",
            "busy box",
            "host.io/",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn errors_name_the_reference_once() {
        for bad in [
            "Bad Reference!!",
            "UPPER/case:v1",
            "reg.example:5000/Bad Name",
        ] {
            let e = ImageRef::parse(bad).unwrap_err().to_string();
            assert_eq!(e.matches(bad).count(), 1, "{e}");
        }
    }
}
