//! Reads `/proc/<pid>/mountinfo` to find an overlay and its layers, so attaching to a
//! runtime needs no configuration: the kernel already knows upper, work and lowers.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u64,
    /// `major:minor` of the filesystem.
    pub dev: (u32, u32),
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`ro`, `nosuid`, `relatime`, ...).
    pub mount_options: Vec<String>,
    pub fs_type: String,
    pub source: String,
    pub super_options: Vec<(String, Option<Vec<u8>>)>,
}

/// The layers of an overlay as its super options name them, in the namespace of the
/// process whose mountinfo was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayLayers {
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Top-most first.
    pub lowers: Vec<PathBuf>,
}

/// Parses a whole mountinfo file; lines that do not parse are skipped.
pub fn parse(text: &[u8]) -> Vec<MountEntry> {
    text.split(|&b| b == b'\n').filter_map(parse_line).collect()
}

fn parse_line(line: &[u8]) -> Option<MountEntry> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let sep = fields.iter().position(|f| *f == b"-")?;
    if sep < 6 || fields.len() < sep + 4 {
        return None;
    }
    let id = std::str::from_utf8(fields[0]).ok()?.parse().ok()?;
    let dev = std::str::from_utf8(fields[2]).ok()?;
    let (major, minor) = dev.split_once(':')?;
    Some(MountEntry {
        id,
        dev: (major.parse().ok()?, minor.parse().ok()?),
        root: path(&unescape(fields[3])),
        mount_point: path(&unescape(fields[4])),
        mount_options: String::from_utf8_lossy(fields[5])
            .split(',')
            .map(str::to_string)
            .collect(),
        fs_type: String::from_utf8_lossy(&unescape(fields[sep + 1])).into_owned(),
        source: String::from_utf8_lossy(&unescape(fields[sep + 2])).into_owned(),
        super_options: fields[sep + 3]
            .split(|&b| b == b',')
            .map(|opt| match opt.iter().position(|&b| b == b'=') {
                Some(eq) => (
                    String::from_utf8_lossy(&opt[..eq]).into_owned(),
                    Some(unescape(&opt[eq + 1..])),
                ),
                None => (String::from_utf8_lossy(opt).into_owned(), None),
            })
            .collect(),
    })
}

fn path(b: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(b.to_vec()))
}

/// Undoes the kernel's `\ooo` octal escapes (space, tab, newline, backslash, comma).
fn unescape(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

impl MountEntry {
    fn option(&self, name: &str) -> Option<&[u8]> {
        self.super_options
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// The layers of an overlay mount; `None` for other filesystems or an overlay
    /// without an upper dir (read-only).
    pub fn overlay_layers(&self) -> Option<OverlayLayers> {
        if self.fs_type != "overlay" {
            return None;
        }
        let upper = path(self.option("upperdir")?);
        let work = path(self.option("workdir")?);
        let mut lowers: Vec<PathBuf> = Vec::new();
        if let Some(l) = self.option("lowerdir") {
            lowers.extend(split_lowers(l).into_iter().map(|p| path(&p)));
        }
        // Newer kernels may list layers one by one (`lowerdir+=`).
        for (k, v) in &self.super_options {
            if k == "lowerdir+"
                && let Some(v) = v
            {
                lowers.push(path(v));
            }
        }
        Some(OverlayLayers {
            upper,
            work,
            lowers,
        })
    }
}

/// Splits `lowerdir=` on unescaped `:`.
fn split_lowers(v: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new()];
    let mut escaped = false;
    for &b in v {
        match (escaped, b) {
            (false, b'\\') => escaped = true,
            (false, b':') => out.push(Vec::new()),
            (_, b) => {
                escaped = false;
                if let Some(last) = out.last_mut() {
                    last.push(b);
                }
            }
        }
    }
    out.retain(|p| !p.is_empty());
    out
}

/// The last (top-most) mount at `mount_point` in a mountinfo listing.
pub fn find_mount<'a>(entries: &'a [MountEntry], mount_point: &Path) -> Option<&'a MountEntry> {
    entries
        .iter()
        .rev()
        .find(|e| e.mount_point.as_os_str().as_bytes() == mount_point.as_os_str().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_overlay_line_with_escapes() {
        let text = b"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
66 43 0:39 / /tmp/mi/m rw,relatime shared:5 - overlay overlay rw,lowerdir=/l/a\\0403:/l/b,upperdir=/r/upper,workdir=/r/work,uuid=on\n\
garbage line\n";
        let entries = parse(text);
        assert_eq!(entries.len(), 2);
        let m = find_mount(&entries, Path::new("/tmp/mi/m")).expect("overlay found");
        assert_eq!(m.dev, (0, 39));
        let layers = m.overlay_layers().expect("an overlay with an upper dir");
        assert_eq!(layers.upper, PathBuf::from("/r/upper"));
        assert_eq!(layers.work, PathBuf::from("/r/work"));
        assert_eq!(
            layers.lowers,
            vec![PathBuf::from("/l/a 3"), PathBuf::from("/l/b")]
        );
        assert!(entries[0].overlay_layers().is_none());
    }

    #[test]
    fn read_only_overlay_has_no_layers_to_track() {
        let text = b"70 1 0:50 / /spfs ro - overlay none ro,lowerdir=/a:/b\n";
        let entries = parse(text);
        assert_eq!(entries[0].overlay_layers(), None);
    }

    #[test]
    fn unescape_leaves_lone_backslashes() {
        assert_eq!(unescape(b"a\\134b\\"), b"a\\b\\");
        assert_eq!(unescape(b"x\\012y"), b"x\ny");
    }
}
