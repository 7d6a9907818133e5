//! Where experiments may keep their records.
//!
//! A coordinator accepts experiment storage only under the prefixes its operator allows, so a
//! spec cannot make the coordinator and every worker write somewhere else on their disks or in
//! another bucket. The check is lexical, on a normalised form of the URI: percent-encoding is
//! decoded (an encoded `/` separates segments, as it does when a `file://` URI becomes a path),
//! empty and `.` segments dropped, `..` resolved (never above the root), and the result compared
//! segment by segment, so `s3://b/runs` allows `s3://b/runs/x` but not `s3://b/runs2`. The
//! normalised URI is what the experiment then uses, so what was checked is exactly what is
//! written to.
//!
//! Pure: no I/O. Nothing here resolves symbolic links: a link inside an allowed directory is the
//! operator's own doing.

use crate::error::CoreError;
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use std::fmt;
use url::Url;

const SCHEMES: &[&str] = &["file", "s3", "gs", "az", "abfs", "abfss", "memory"];

/// What a segment must have encoded to survive a round trip through a URL path: what URL
/// parsing would otherwise read as structure (`/`, `\` in `file:` URIs, `?`, `#`), `%` itself
/// (segments are held decoded), and what object stores advise against.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// A storage URI reduced to what names a place: the scheme, the authority (bucket, container
/// or in-memory store name; empty for `file`) and the decoded path segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageLocation {
    scheme: String,
    authority: String,
    segments: Vec<String>,
}

fn bad(uri: &str, reason: impl Into<String>) -> CoreError {
    CoreError::StorageUri {
        uri: uri.to_string(),
        reason: reason.into(),
    }
}

impl StorageLocation {
    /// Parses and normalises a storage URI.
    pub fn parse(uri: &str) -> Result<Self, CoreError> {
        let url = Url::parse(uri).map_err(|e| bad(uri, e.to_string()))?;
        let scheme = url.scheme().to_string();
        if !SCHEMES.contains(&scheme.as_str()) {
            return Err(bad(
                uri,
                format!("unsupported scheme {scheme:?} (use file, s3, gs, az or memory)"),
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad(uri, "a storage URI takes no query or fragment"));
        }
        if url.password().is_some() {
            return Err(bad(
                uri,
                "credentials do not belong in a storage URI (they come from the environment)",
            ));
        }
        let host = url.host_str().unwrap_or_default();
        if host.contains('%') {
            return Err(bad(uri, "the bucket or container name must not be percent-encoded"));
        }
        let authority = match scheme.as_str() {
            "file" => {
                if !(host.is_empty() || host == "localhost") || url.port().is_some() || !url.username().is_empty() {
                    return Err(bad(
                        uri,
                        "file URIs name a local absolute path, e.g. file:///var/lib/chorus",
                    ));
                }
                String::new()
            }
            "memory" => host.to_string(),
            _ => {
                if host.is_empty() {
                    return Err(bad(uri, "the URI must name a bucket or container"));
                }
                if url.port().is_some() {
                    return Err(bad(uri, "a bucket or container takes no port"));
                }
                match url.username() {
                    "" => host.to_string(),
                    // `abfs://container@account.dfs.core.windows.net/path`
                    user if scheme.starts_with("abfs") && !user.contains('%') => format!("{user}@{host}"),
                    _ => return Err(bad(uri, "only abfs URIs name a container before the host")),
                }
            }
        };
        let path = percent_decode_str(url.path())
            .decode_utf8()
            .map_err(|_| bad(uri, "the path is not valid UTF-8 once percent-decoded"))?;
        let mut segments: Vec<String> = Vec::new();
        for s in path.split('/') {
            match s {
                "" | "." => {}
                ".." => {
                    segments.pop();
                }
                s if s.contains('\0') => return Err(bad(uri, "the path contains a NUL byte")),
                s => segments.push(s.to_string()),
            }
        }
        Ok(StorageLocation {
            scheme,
            authority,
            segments,
        })
    }

    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    pub fn is_memory(&self) -> bool {
        self.scheme == "memory"
    }

    /// The decoded path segments.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// Whether this location is `prefix` or lies inside it (on segment boundaries).
    pub fn is_under(&self, prefix: &StorageLocation) -> bool {
        self.scheme == prefix.scheme
            && self.authority == prefix.authority
            && self.segments.starts_with(&prefix.segments)
    }

    /// This location with one more path segment (taken literally: `a/b` stays one segment).
    pub fn join(&self, segment: &str) -> StorageLocation {
        let mut segments = self.segments.clone();
        segments.push(segment.to_string());
        StorageLocation {
            scheme: self.scheme.clone(),
            authority: self.authority.clone(),
            segments,
        }
    }

    /// The canonical URI: each segment percent-encoded where needed, with a trailing `/`.
    pub fn to_uri(&self) -> String {
        let mut out = format!("{}://{}/", self.scheme, self.authority);
        for s in &self.segments {
            out.extend(utf8_percent_encode(s, SEGMENT));
            out.push('/');
        }
        out
    }
}

impl fmt::Display for StorageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_uri())
    }
}

/// The storage prefixes a coordinator lets experiments use.
#[derive(Debug, Clone)]
pub struct StoragePolicy {
    allowed: Vec<StorageLocation>,
    allow_memory: bool,
}

/// Why `memory://` is refused outside tests.
const MEMORY_REFUSED: &str = "memory:// storage lives inside one process, so the coordinator and each worker would \
                              keep their own copy: it is for tests only";

impl StoragePolicy {
    /// A policy allowing storage under each of `allowed`; `memory://` storage (anywhere) only
    /// when `allow_memory` is set.
    pub fn new<'a>(allowed: impl IntoIterator<Item = &'a str>, allow_memory: bool) -> Result<Self, CoreError> {
        let mut list: Vec<StorageLocation> = Vec::new();
        for a in allowed {
            let loc = StorageLocation::parse(a)?;
            if loc.is_memory() && !allow_memory {
                return Err(bad(a, MEMORY_REFUSED));
            }
            if !list.contains(&loc) {
                list.push(loc);
            }
        }
        Ok(StoragePolicy {
            allowed: list,
            allow_memory,
        })
    }

    pub fn allowed(&self) -> &[StorageLocation] {
        &self.allowed
    }

    /// The normalised location of `uri` when experiments may use it; otherwise an error that
    /// names the allowed prefixes.
    pub fn check(&self, uri: &str) -> Result<StorageLocation, CoreError> {
        let loc = StorageLocation::parse(uri)?;
        if loc.is_memory() {
            return if self.allow_memory {
                Ok(loc)
            } else {
                Err(bad(uri, MEMORY_REFUSED))
            };
        }
        if self.allowed.iter().any(|a| loc.is_under(a)) {
            return Ok(loc);
        }
        let list: Vec<String> = self.allowed.iter().map(StorageLocation::to_uri).collect();
        Err(bad(
            uri,
            format!(
                "{loc} is outside the storage this coordinator allows ({}); its operator can allow more \
                 with --allowed-storage",
                list.join(", ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::{Component, Path};

    fn loc(s: &str) -> StorageLocation {
        StorageLocation::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn normalises_dots_slashes_and_encoding() {
        for (input, want) in [
            ("file:///data/storage", "file:///data/storage/"),
            ("file://localhost/data//storage/./", "file:///data/storage/"),
            ("file:///data/storage/../../x", "file:///x/"),
            ("file:///data/storage/%2e%2e/%2E%2E/x", "file:///x/"),
            ("file:///data/storage/..%2F..%2Fx", "file:///x/"),
            ("file:///data/storage/a%2Fb", "file:///data/storage/a/b/"),
            ("file:///../../data", "file:///data/"),
            ("file:///data/a%20b", "file:///data/a%20b/"),
            ("s3://bucket/runs/../other/", "s3://bucket/other/"),
            ("s3://bucket", "s3://bucket/"),
            ("gs://b/x//y/./z", "gs://b/x/y/z/"),
            ("az://container/p", "az://container/p/"),
            (
                "abfss://c@acct.dfs.core.windows.net/p",
                "abfss://c@acct.dfs.core.windows.net/p/",
            ),
            ("memory://t", "memory://t/"),
        ] {
            assert_eq!(loc(input).to_uri(), want, "{input}");
        }
    }

    #[test]
    fn refuses_what_names_no_single_place() {
        for bad in [
            "relative/path",
            "ftp://host/x",
            "file://otherhost/x",
            "file://:8080/x",
            "s3:///no-bucket",
            "s3://bucket/x?versionId=3",
            "s3://bucket/x#frag",
            "s3://user:secret@bucket/x",
            "s3://bucket:9000/x",
            "file:///data/%00/x",
            "file:///data/%ff",
        ] {
            assert!(StorageLocation::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        let runs = loc("s3://b/runs");
        assert!(loc("s3://b/runs").is_under(&runs));
        assert!(loc("s3://b/runs/x/y").is_under(&runs));
        assert!(!loc("s3://b/runs2").is_under(&runs));
        assert!(!loc("s3://b/run").is_under(&runs));
        assert!(!loc("s3://other/runs/x").is_under(&runs));
        assert!(!loc("gs://b/runs/x").is_under(&runs));
        assert!(loc("s3://b/anything").is_under(&loc("s3://b")));
        assert!(loc("file:///data/storage/x").is_under(&loc("file:///data/storage/")));
        assert!(!loc("file:///data/storage-evil").is_under(&loc("file:///data/storage")));
    }

    #[test]
    fn policy_names_what_it_allows() {
        let p = StoragePolicy::new(["file:///data/storage", "s3://b/runs"], false).unwrap();
        assert_eq!(
            p.check("file:///data/storage/exp").unwrap().to_uri(),
            "file:///data/storage/exp/"
        );
        assert!(p.check("s3://b/runs/team-a").is_ok());
        let err = p.check("file:///data/storage/../../etc").unwrap_err().to_string();
        assert!(err.contains("file:///etc/ is outside"), "{err}");
        assert!(err.contains("file:///data/storage/, s3://b/runs/"), "{err}");
        assert!(err.contains("--allowed-storage"), "{err}");
        let mem = p.check("memory://x").unwrap_err().to_string();
        assert!(mem.contains("for tests only"), "{mem}");
        assert!(StoragePolicy::new(["memory://x"], false).is_err());
        let tests = StoragePolicy::new(["file:///data"], true).unwrap();
        assert!(tests.check("memory://anything").is_ok());
    }

    #[test]
    fn join_adds_one_literal_segment() {
        let l = loc("file:///data/storage").join("a/b");
        assert_eq!(l.to_uri(), "file:///data/storage/a%2Fb/");
        assert_eq!(
            l.segments(),
            ["data".to_string(), "storage".to_string(), "a/b".to_string()]
        );
    }

    /// Path pieces that try to leave a directory in every spelling this module knows of.
    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("..".to_string()),
            Just(".".to_string()),
            Just("".to_string()),
            Just("%2e%2e".to_string()),
            Just("%2E.".to_string()),
            Just("..%2F..".to_string()),
            Just("%2F".to_string()),
            Just("..\\..".to_string()),
            Just("%5C..".to_string()),
            Just("%25".to_string()),
            Just("storage".to_string()),
            Just("data".to_string()),
            "[a-z0-9 _.%-]{1,6}",
        ]
    }

    proptest! {
        /// Whatever the spelling, a `file://` location the policy accepts becomes a local path
        /// under the allowed directory with no `.` or `..` in it.
        #[test]
        fn accepted_file_locations_stay_inside(pieces in proptest::collection::vec(piece(), 0..8)) {
            let policy = StoragePolicy::new(["file:///data/storage"], false).unwrap();
            let uri = format!("file:///data/storage/{}", pieces.join("/"));
            if let Ok(l) = policy.check(&uri) {
                let path = Url::parse(&l.to_uri()).unwrap().to_file_path().unwrap();
                prop_assert!(path.starts_with(Path::new("/data/storage")), "{uri} -> {}", path.display());
                prop_assert!(
                    path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
                    "{uri} -> {}", path.display()
                );
                // The path the location names is the one its segments say.
                let want: std::path::PathBuf = std::iter::once("/".to_string()).chain(l.segments().iter().cloned()).collect();
                prop_assert_eq!(path, want);
            }
        }

        /// The canonical URI parses back to the same location, whatever the segments hold.
        #[test]
        fn canonical_uris_round_trip(
            scheme in prop_oneof![Just("file"), Just("s3"), Just("gs"), Just("memory")],
            segments in proptest::collection::vec("[^/\u{0}]{1,8}", 0..5),
        ) {
            let segments: Vec<String> = segments.into_iter().filter(|s| s != "." && s != "..").collect();
            let l = StorageLocation {
                scheme: scheme.to_string(),
                authority: if scheme == "file" { String::new() } else { "bkt".to_string() },
                segments,
            };
            prop_assert_eq!(StorageLocation::parse(&l.to_uri()).unwrap(), l.clone());
            let joined = l.join("c0ffee");
            prop_assert!(joined.is_under(&l));
            prop_assert_eq!(StorageLocation::parse(&joined.to_uri()).unwrap(), joined);
        }
    }
}
