//! The environment's masks: paths that a layer of an spfs stack deletes from a layer
//! below it.
//!
//! spfs renders each layer as a plain dir, which cannot hold a deletion, so at every
//! mount and remount spfs writes a whiteout for each surviving mask of the stack's
//! merged manifest straight into the upper dir (spfs `crates/spfs/src/env.rs`
//! `mask_files`, called from `status_unix.rs` after the overlay is mounted). Those
//! whiteouts belong to the environment, not to the user: a reset must keep them and
//! validation must not blame a build for them. `spfs diff` compares against the same
//! merged manifest, so it lists them as removed, and so does `changes`.
//!
//! They are read from spfs itself, the same manifests spfs writes them from (the
//! renders cannot hold them, and a whiteout spfs wrote looks exactly like one a user's
//! `rm` made): `spfs runtime info NAME` gives the runtime's stack, and one `spfs info
//! -vv --follow DIGEST...` prints the layers, platforms and every manifest entry.

use crate::TrackerError;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A set of upper-relative paths (no leading `/`) that the environment masks. A masked
/// dir hides everything below it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Masks {
    paths: BTreeSet<Vec<u8>>,
}

impl Masks {
    /// The masks at `paths` (upper-relative, no leading `/`).
    pub fn new(paths: impl IntoIterator<Item = Vec<u8>>) -> Self {
        Masks {
            paths: paths.into_iter().collect(),
        }
    }

    /// True when the environment masks nothing.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// How many masks there are.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Whether `rel` itself is a mask.
    pub fn contains(&self, rel: &[u8]) -> bool {
        self.paths.contains(rel)
    }

    /// Whether `rel` or a dir above it is masked: the environment holds nothing there.
    pub fn hides(&self, rel: &[u8]) -> bool {
        let mut end = rel.len();
        loop {
            if self.paths.contains(&rel[..end]) {
                return true;
            }
            match rel[..end].iter().rposition(|&b| b == b'/') {
                Some(i) => end = i,
                None => return false,
            }
        }
    }

    /// The masks at `rel` and below it (`rel` empty: all of them), in path order.
    pub fn under<'a>(&'a self, rel: &'a [u8]) -> impl Iterator<Item = &'a Vec<u8>> + 'a {
        self.paths
            .range::<[u8], _>((std::ops::Bound::Included(rel), std::ops::Bound::Unbounded))
            .take_while(move |p| p.starts_with(rel))
            .filter(move |p| rel.is_empty() || p.len() == rel.len() || p[rel.len()] == b'/')
    }

    /// The masks, in path order.
    pub fn iter(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.paths.iter()
    }
}

/// One manifest entry as `spfs info -vv` prints it: ` 100644 file DIGEST /spfs/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub mode: u32,
    pub is_mask: bool,
    pub is_tree: bool,
    /// Upper-relative (the `/spfs/` prefix removed).
    pub path: Vec<u8>,
}

/// An object of an spfs repository, as far as masks need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Platform { stack_top_down: Vec<String> },
    Layer { manifest: Option<String> },
    Manifest { entries: Vec<ManifestEntry> },
}

/// Parses the text of `spfs info -vv --follow REF...` (colours off) into objects by
/// digest. Lines it does not understand are skipped: they carry nothing masks need.
pub fn parse_info(text: &str) -> HashMap<String, Object> {
    let mut out = HashMap::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        // A section starts with `DIGEST:` then its kind on the next line.
        let Some(digest) = line.strip_suffix(':').filter(|d| is_digest(d)) else {
            continue;
        };
        let kind = lines.next().unwrap_or_default().trim();
        let mut body = Vec::new();
        while let Some(l) = lines.peek() {
            if l.is_empty() {
                break;
            }
            body.push(*l);
            lines.next();
        }
        let object = match kind {
            "platform:" => Object::Platform {
                stack_top_down: body
                    .iter()
                    .filter_map(|l| l.trim().strip_prefix("- "))
                    .map(|d| d.trim().to_string())
                    .collect(),
            },
            "layer:" => Object::Layer {
                manifest: body
                    .iter()
                    .find_map(|l| l.trim().strip_prefix("manifest:"))
                    .map(str::trim)
                    .filter(|d| is_digest(d))
                    .map(str::to_string),
            },
            "manifest:" => Object::Manifest {
                entries: body.iter().filter_map(|l| parse_entry(l)).collect(),
            },
            _ => continue,
        };
        out.insert(digest.to_string(), object);
    }
    out
}

fn is_digest(s: &str) -> bool {
    s.len() >= 16
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'=')
}

fn parse_entry(line: &str) -> Option<ManifestEntry> {
    let mut parts = line.trim_start().splitn(4, ' ');
    let mode = u32::from_str_radix(parts.next()?, 8).ok()?;
    let kind = parts.next()?;
    let _digest = parts.next()?;
    let path = parts.next()?;
    let rel = path.strip_prefix("/spfs/")?;
    Some(ManifestEntry {
        mode,
        is_mask: kind == "mask",
        is_tree: kind == "tree",
        path: rel.as_bytes().to_vec(),
    })
}

/// The masks that survive merging `manifests` bottom-up (first = bottom-most), by
/// spfs's rule (`tracking/entry.rs` `Entry::update`): a mask replaces what is below it,
/// whole subtree included; a later entry at a masked path unmasks it; a later file or
/// mask at a path drops the masks below that path.
pub fn merge_bottom_up<'a>(manifests: impl IntoIterator<Item = &'a [ManifestEntry]>) -> Masks {
    let mut masks = Masks::default();
    for entries in manifests {
        for e in entries {
            if !e.is_tree {
                let below: Vec<Vec<u8>> = masks
                    .under(&e.path)
                    .filter(|p| p.len() > e.path.len())
                    .cloned()
                    .collect();
                for p in below {
                    masks.paths.remove(&p);
                }
            }
            if e.is_mask {
                masks.paths.insert(e.path.clone());
            } else {
                masks.paths.remove(&e.path);
            }
        }
    }
    masks
}

/// The layers' manifests of a stack given top-down (platforms expanded), bottom-most
/// first; a digest `objects` does not know is an error.
pub fn manifests_bottom_up<'a>(
    stack_top_down: &[String],
    objects: &'a HashMap<String, Object>,
) -> Result<Vec<&'a [ManifestEntry]>, String> {
    fn visit<'a>(
        digest: &str,
        objects: &'a HashMap<String, Object>,
        depth: usize,
        out: &mut Vec<&'a [ManifestEntry]>,
    ) -> Result<(), String> {
        if depth > 64 {
            return Err(format!("platform {digest} nests too deeply"));
        }
        match objects.get(digest) {
            Some(Object::Platform { stack_top_down }) => {
                for d in stack_top_down {
                    visit(d, objects, depth + 1, out)?;
                }
            }
            Some(Object::Layer { manifest: None }) => {}
            Some(Object::Layer {
                manifest: Some(m), ..
            }) => match objects.get(m) {
                Some(Object::Manifest { entries }) => out.push(entries),
                _ => return Err(format!("spfs did not print manifest {m}")),
            },
            Some(Object::Manifest { entries }) => out.push(entries),
            None => return Err(format!("spfs did not print object {digest}")),
        }
        Ok(())
    }
    let mut top_down = Vec::new();
    for d in stack_top_down {
        visit(d, objects, 0, &mut top_down)?;
    }
    top_down.reverse();
    Ok(top_down)
}

/// How to run the spfs of a runtime: its executable and the environment its user
/// runs it with (config comes from `$HOME` and `SPFS_*` variables).
#[derive(Debug, Clone)]
pub struct SpfsCli {
    pub program: PathBuf,
    pub env: Vec<(String, String)>,
    pub uid: u32,
    pub gid: u32,
}

impl SpfsCli {
    /// spfs as process `pid` of a runtime would run it: found on that process's
    /// `PATH` (else this one's), with its `HOME`, `USER`, `PATH` and `SPFS_*`
    /// variables, as its user. `None` when no `spfs` executable is found.
    pub fn of_process(pid: u32) -> Option<SpfsCli> {
        use std::os::unix::fs::MetadataExt;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let env: Vec<(String, String)> = environ
            .split(|&b| b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok()?.split_once('='))
            .filter(|(k, _)| {
                matches!(*k, "HOME" | "USER" | "PATH" | "XDG_CONFIG_HOME") || k.starts_with("SPFS_")
            })
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let theirs = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone());
        let ours = std::env::var("PATH").ok();
        let program = [theirs, ours]
            .into_iter()
            .flatten()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join("spfs"))
            .find(|p| is_executable(p))?;
        let owner = std::fs::metadata(format!("/proc/{pid}")).ok()?;
        Some(SpfsCli {
            program,
            env,
            uid: owner.uid(),
            gid: owner.gid(),
        })
    }

    fn run(&self, args: &[&str]) -> Result<String, String> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&self.program);
        cmd.args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .env("CLICOLOR", "0")
            .env("SPFS_SUPPRESS_OVERLAYFS_PARAMS_WARNING", "1")
            .current_dir("/")
            .stdin(std::process::Stdio::null());
        if self.uid != 0 {
            cmd.uid(self.uid).gid(self.gid);
        }
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.program.display()))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(format!(
                "`spfs {}` failed ({}): {}",
                args.join(" "),
                out.status,
                last.trim()
            ));
        }
        String::from_utf8(out.stdout).map_err(|_| format!("`spfs {}` printed non-UTF-8", args[0]))
    }

    /// What spfs records of the runtime called `name` (`spfs runtime info NAME`).
    pub fn runtime_info(&self, name: &str) -> Result<SpfsRuntime, String> {
        parse_runtime_info(name, &self.run(&["runtime", "info", name])?)
    }

    /// The masks of a stack (digests top-down), as spfs writes them into the upper dir
    /// of a runtime of that stack.
    pub fn masks_of_stack(&self, stack: &[String]) -> Result<Masks, String> {
        if stack.is_empty() {
            return Ok(Masks::default());
        }
        let mut args = vec!["info", "-vv", "--follow"];
        args.extend(stack.iter().map(String::as_str));
        let objects = parse_info(&self.run(&args)?);
        let manifests = manifests_bottom_up(stack, &objects)?;
        Ok(merge_bottom_up(manifests))
    }
}

/// The parts of spfs's runtime record (`spfs runtime info`, JSON of
/// `crates/spfs/src/runtime/storage.rs` `Data`) the tracker uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfsRuntime {
    /// Layer and platform digests, top-most first (`status.stack`).
    pub stack_top_down: Vec<String>,
    /// When spfs made the runtime (`author.created`, RFC 3339): with the name, what
    /// tells a runtime from a later one of the same name.
    pub created: String,
}

/// Parses `spfs runtime info NAME` output.
pub fn parse_runtime_info(name: &str, text: &str) -> Result<SpfsRuntime, String> {
    let info: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("`spfs runtime info {name}` is not JSON: {e}"))?;
    let stack = info
        .pointer("/status/stack")
        .and_then(|s| s.as_array())
        .ok_or_else(|| format!("`spfs runtime info {name}` has no status.stack"))?;
    let created = info
        .pointer("/author/created")
        .and_then(|c| c.as_str())
        .ok_or_else(|| format!("`spfs runtime info {name}` has no author.created"))?;
    Ok(SpfsRuntime {
        stack_top_down: stack
            .iter()
            .filter_map(|d| d.as_str().map(str::to_string))
            .collect(),
        created: created.to_string(),
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The spfs CLI as process `pid` of the spfs runtime `name` would run it.
fn cli_for(pid: u32, name: &str) -> Result<SpfsCli, TrackerError> {
    SpfsCli::of_process(pid).ok_or_else(|| {
        TrackerError::Attach(format!(
            "runtime {name} is an spfs runtime, but no `spfs` executable was found to ask about it"
        ))
    })
}

/// spfs's record of the runtime `name` that process `pid` is in, and the masks it
/// writes for that runtime's stack (one `spfs runtime info`, one `spfs info`).
pub fn spfs_runtime(pid: u32, name: &str) -> Result<(SpfsRuntime, Masks), TrackerError> {
    let cli = cli_for(pid, name)?;
    let record = cli
        .runtime_info(name)
        .map_err(|e| TrackerError::Attach(format!("cannot read spfs runtime {name}: {e}")))?;
    let masks = cli.masks_of_stack(&record.stack_top_down).map_err(|e| {
        TrackerError::Attach(format!("cannot read the masks of spfs runtime {name}: {e}"))
    })?;
    Ok((record, masks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: &str, path: &str) -> ManifestEntry {
        ManifestEntry {
            mode: 0,
            is_mask: kind == "mask",
            is_tree: kind == "tree",
            path: path.as_bytes().to_vec(),
        }
    }

    /// A named case: layers bottom-up as `kind path` entries, and the masks that
    /// survive.
    type MergeCase<'a> = (&'a str, &'a [&'a [&'a str]], &'a [&'a str]);

    #[test]
    fn merge_follows_spfs_update_rule() {
        let cases: &[MergeCase] = &[
            (
                "a mask survives",
                &[&["file etc/b"], &["tree etc", "mask etc/b"]],
                &["etc/b"],
            ),
            (
                "a higher layer adds the path back",
                &[&["file a"], &["mask a"], &["file a"]],
                &[],
            ),
            (
                "a mask with nothing below is still written",
                &[&["mask x"]],
                &["x"],
            ),
            (
                "a masked dir drops the masks below it",
                &[&["tree d", "mask d/x"], &["mask d"]],
                &["d"],
            ),
            (
                "a higher tree at a masked dir unmasks it",
                &[
                    &["tree d", "file d/x"],
                    &["mask d"],
                    &["tree d", "file d/y"],
                ],
                &[],
            ),
            (
                "a tree entry for the parent keeps masks below",
                &[
                    &["tree d", "file d/x"],
                    &["tree d", "mask d/x"],
                    &["tree d", "file d/z"],
                ],
                &["d/x"],
            ),
            (
                "a file replacing a dir drops the masks below it",
                &[&["tree d", "mask d/x"], &["file d"]],
                &[],
            ),
        ];
        for (name, layers, want) in cases {
            let layers: Vec<Vec<ManifestEntry>> = layers
                .iter()
                .map(|l| {
                    l.iter()
                        .map(|e| {
                            let (k, p) = e.split_once(' ').unwrap();
                            entry(k, p)
                        })
                        .collect()
                })
                .collect();
            let got = merge_bottom_up(layers.iter().map(Vec::as_slice));
            let want = Masks::new(want.iter().map(|p| p.as_bytes().to_vec()));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn hides_and_under() {
        let m = Masks::new([b"d".to_vec(), b"etc/b".to_vec(), b"etc/bb/c".to_vec()]);
        crate::test_support::table(
            &[
                (b"d", true),
                (b"d/x/y", true),
                (b"dd", false),
                (b"etc", false),
                (b"etc/b", true),
                (b"etc/bb", false),
                (b"etc/bb/c", true),
            ],
            |path| m.hides(path),
        );
        let under: Vec<&[u8]> = m.under(b"etc").map(Vec::as_slice).collect();
        assert_eq!(under, [&b"etc/b"[..], b"etc/bb/c"]);
        let under: Vec<&[u8]> = m.under(b"etc/b").map(Vec::as_slice).collect();
        assert_eq!(under, [&b"etc/b"[..]]);
        assert_eq!(m.under(b"").count(), 3);
    }

    /// What spfs 0.44 printed for a two-layer stack whose top layer removes etc/b.
    const INFO: &str = "\
OONE4LAGKPBYIQ6YXHZJ6IJHI6NAOZ3CMXBXTCZ3ATXLJQK7SBRQ====:
layer:
 refs: OONE4LAGKPBYIQ6YXHZJ6IJHI6NAOZ3CMXBXTCZ3ATXLJQK7SBRQ====
 manifest: TOBECKBW5XTUG5Y4MPILEQ5335S75M4GR6OU4JX4D5CMZRZCKJ6A====
 annotations: none

MHNCJFNAIPWZMT7AFU666GMWR2CVN3O6E2PHBX4LKGMXF7NQ7YJQ====:
layer:
 refs: MHNCJFNAIPWZMT7AFU666GMWR2CVN3O6E2PHBX4LKGMXF7NQ7YJQ====
 manifest: UFN7UL45QVGYQZN6GOOI5KFDGTOCFLQ45KG2TQDEMQX4A44IP7RQ====
 annotations: none

TOBECKBW5XTUG5Y4MPILEQ5335S75M4GR6OU4JX4D5CMZRZCKJ6A====:
manifest:
 040755 tree AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==== /spfs/etc
 020000 mask AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==== /spfs/etc/b

UFN7UL45QVGYQZN6GOOI5KFDGTOCFLQ45KG2TQDEMQX4A44IP7RQ====:
manifest:
 040755 tree AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==== /spfs/etc
 100644 file Q5BI7RJCQA6TCBS6PPHDZ4B74R2QSZRR4XQHXPL2B7PGBRGPEXDQ==== /spfs/etc/a
 100644 file AJRYFGMJW36ZKT3SXKXS7RSLYLRPAHLJFVG6OKMG5KAI63UZQE7Q==== /spfs/etc/b with space
";

    #[test]
    fn parses_spfs_info_and_merges_the_stack() {
        let objects = parse_info(INFO);
        assert_eq!(objects.len(), 4);
        let stack = [
            "OONE4LAGKPBYIQ6YXHZJ6IJHI6NAOZ3CMXBXTCZ3ATXLJQK7SBRQ====".to_string(),
            "MHNCJFNAIPWZMT7AFU666GMWR2CVN3O6E2PHBX4LKGMXF7NQ7YJQ====".to_string(),
        ];
        let manifests = manifests_bottom_up(&stack, &objects).unwrap();
        assert_eq!(manifests[0][2].path, b"etc/b with space");
        assert_eq!(
            manifests[1][1],
            ManifestEntry {
                mode: 0o20000,
                is_mask: true,
                is_tree: false,
                path: b"etc/b".to_vec(),
            }
        );
        assert_eq!(merge_bottom_up(manifests), Masks::new([b"etc/b".to_vec()]));
        let unknown = ["ZZZZZZZZZZZZZZZZZZZZ====".to_string()];
        assert!(manifests_bottom_up(&unknown, &objects).is_err());
    }

    #[test]
    fn platforms_expand_top_down() {
        let mut objects = parse_info(INFO);
        objects.insert(
            "PPPPPPPPPPPPPPPPPPPP====".into(),
            Object::Platform {
                stack_top_down: vec![
                    "OONE4LAGKPBYIQ6YXHZJ6IJHI6NAOZ3CMXBXTCZ3ATXLJQK7SBRQ====".into(),
                    "MHNCJFNAIPWZMT7AFU666GMWR2CVN3O6E2PHBX4LKGMXF7NQ7YJQ====".into(),
                ],
            },
        );
        let manifests =
            manifests_bottom_up(&["PPPPPPPPPPPPPPPPPPPP====".into()], &objects).unwrap();
        assert_eq!(merge_bottom_up(manifests), Masks::new([b"etc/b".to_vec()]));
    }
}
