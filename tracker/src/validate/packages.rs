//! Which spk package each lower layer installs, and which package is being built.
//!
//! spk writes each package's metadata under `/spfs/spk/pkg/<name>/<version>/<build>/`
//! (`data_path` in spk's foundation crate): every layer spk publishes for a package
//! (one per component) holds that dir, so a layer's render names its package. The
//! build in progress has written its own there too, before its build script runs
//! (`build_artifacts` in crates/spk-build/src/build/binary.rs), and spk gives the
//! script its ident as `SPK_PKG`.

use crate::TrackerError;
use crate::classify::Classifier;
use serde::{Deserialize, Serialize};
use std::io;
use store::{NetKind, Store};

/// The dir spk keeps package metadata in, relative to the mount.
pub const METADATA_ROOT: &[u8] = b"spk/pkg";

/// An spk package build: `name/version/build` (`build` is a digest, or `src` for a
/// source package).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub build: String,
}

impl std::fmt::Display for Package {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.name, self.version)?;
        if !self.build.is_empty() {
            write!(f, "/{}", self.build)?;
        }
        Ok(())
    }
}

impl Package {
    /// `name/version/build` as spk prints an ident (`SPK_PKG`); `name/version` leaves
    /// the build empty. `None` for anything else.
    pub fn parse(ident: &str) -> Option<Package> {
        let mut parts = ident.split('/');
        let name = parts.next().filter(|n| valid(n))?;
        // spk's versions: dot-separated numbers, `-pre` and `+post` tags.
        let version = parts.next().filter(|v| {
            valid(v)
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-' | '_' | ','))
        })?;
        let build = parts.next().unwrap_or("");
        if parts.next().is_some() || (!build.is_empty() && !valid(build)) {
            return None;
        }
        Some(Package {
            name: name.to_string(),
            version: version.to_string(),
            build: build.to_string(),
        })
    }

    /// `spk/pkg/<name>/<version>/<build>`, relative to the mount.
    pub fn metadata_dir(&self) -> Vec<u8> {
        format!("spk/pkg/{}/{}/{}", self.name, self.version, self.build).into_bytes()
    }
}

/// A path component spk could have written: no separators, not `.`/`..`, printable.
fn valid(part: &str) -> bool {
    !part.is_empty() && part != "." && part != ".." && part.chars().all(|c| c.is_ascii_graphic())
}

/// The packages of each lower layer (top-most first), from its own
/// `spk/pkg/<name>/<version>/<build>/` dirs. A layer with none is no spk package's;
/// one with several (a layer merged by hand) is named by none of them.
pub fn of_layers(layers: &Classifier, count: usize) -> io::Result<Vec<Vec<Package>>> {
    (0..count).map(|i| of_layer(layers, i)).collect()
}

fn of_layer(layers: &Classifier, layer: usize) -> io::Result<Vec<Package>> {
    let mut out = Vec::new();
    for (name, dir) in layers.layer_listing(layer, METADATA_ROOT)? {
        if !dir {
            continue;
        }
        let name_rel = [METADATA_ROOT, b"/", &name].concat();
        for (version, dir) in layers.layer_listing(layer, &name_rel)? {
            if !dir {
                continue;
            }
            let version_rel = [&name_rel[..], b"/", &version].concat();
            for (build, dir) in layers.layer_listing(layer, &version_rel)? {
                let ident = [&name[..], b"/", &version, b"/", &build].concat();
                if let (true, Some(p)) = (
                    dir,
                    std::str::from_utf8(&ident).ok().and_then(Package::parse),
                ) {
                    out.push(p);
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The package whose build is in progress: `given` (as `SPK_PKG` or `--package`
/// spell it; a missing build is looked up), else the one build whose metadata dir the
/// changelog records as added (spk writes it before the build script runs).
pub fn building(
    store: &Store,
    given: Option<&Package>,
) -> Result<Option<Package>, store::StoreError> {
    let prefix = match given {
        Some(p) if !p.build.is_empty() => return Ok(Some(p.clone())),
        Some(p) => format!("spk/pkg/{}/{}", p.name, p.version).into_bytes(),
        None => METADATA_ROOT.to_vec(),
    };
    let entries = store.net_under(&prefix)?;
    Ok(building_among(
        entries.iter().map(|(path, e)| (path.as_slice(), e.kind)),
        given,
    ))
}

/// `building` over net changes `(path relative to the mount, kind)`, as a client
/// reads them from a tracker's answer (`METADATA_ROOT` and below is enough).
pub fn building_among<'a>(
    changes: impl IntoIterator<Item = (&'a [u8], NetKind)>,
    given: Option<&Package>,
) -> Option<Package> {
    if let Some(p) = given
        && !p.build.is_empty()
    {
        return Some(p.clone());
    }
    let mut found: Vec<Package> = Vec::new();
    for (path, kind) in changes {
        if kind != NetKind::Added {
            continue;
        }
        let Some(rest) = path
            .strip_prefix(METADATA_ROOT)
            .and_then(|r| r.strip_prefix(b"/"))
        else {
            continue;
        };
        let parts: Vec<&[u8]> = rest.split(|&b| b == b'/').collect();
        // The build script spk wrote: spk/pkg/<name>/<version>/<build>/build.sh.
        if let [name, version, build, b"build.sh"] = parts[..]
            && build != b"src"
            && given.is_none_or(|g| g.name.as_bytes() == name && g.version.as_bytes() == version)
        {
            let ident = [name, b"/", version, b"/", build].concat();
            if let Some(p) = std::str::from_utf8(&ident).ok().and_then(Package::parse)
                && !found.contains(&p)
            {
                found.push(p);
            }
        }
    }
    match found.len() {
        1 => found.pop(),
        _ => given.cloned(),
    }
}

/// The recipe `spk build` published for `package` before building it (the spfs blob
/// tagged `spk/spec/<name>/<version>`, as crates/spk-storage stores recipes), read with
/// `spfs read` in the caller's environment (its spfs config and repository).
/// `Ok(None)` when spfs or the tag is not there; an error when spfs fails otherwise.
pub fn stored_recipe(package: &Package) -> Result<Option<String>, TrackerError> {
    let tag = format!("spk/spec/{}/{}", package.name, package.version);
    let out = match std::process::Command::new("spfs")
        .args(["read", &tag])
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(TrackerError::Validate(format!(
                "cannot run spfs read {tag}: {e}"
            )));
        }
    };
    if out.status.success() {
        return Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    let said = String::from_utf8_lossy(&out.stderr);
    if said.contains("Unknown") || said.contains("not found") {
        return Ok(None);
    }
    Err(TrackerError::Validate(format!(
        "spfs read {tag} failed: {}",
        said.lines().last().unwrap_or("").trim()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idents() {
        // An ident, and its name, version and build when it is one.
        type Parts<'a> = Option<(&'a str, &'a str, &'a str)>;
        let rows: &[(&str, Parts)] = &[
            ("base/1.0.0/3I42H3S6", Some(("base", "1.0.0", "3I42H3S6"))),
            ("probe/1.0.0/src", Some(("probe", "1.0.0", "src"))),
            ("probe/1.0.0", Some(("probe", "1.0.0", ""))),
            ("probe", None),
            ("a/b/c/d", None),
            ("a/../c", None),
            ("a//c", None),
            ("a/1 0/c", None),
        ];
        for (ident, want) in rows {
            let got = Package::parse(ident);
            let want = want.map(|(n, v, b)| Package {
                name: n.into(),
                version: v.into(),
                build: b.into(),
            });
            assert_eq!(got, want, "{ident}");
        }
    }
}
