//! Renders answers for people (`spfs diff` style) and for programs (JSON).
//!
//! Paths are bytes. In text, bytes that are not printable UTF-8 are escaped (`\n`,
//! `\xff`, `\\`) so one line is always one path. In JSON, `path` is the path as a
//! string (invalid UTF-8 replaced) and `path_bytes` carries the exact bytes whenever
//! the string alone would not be exact.

use serde_json::{Value, json};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use store::{FreshReason, LogRecord, NetKind};
use tracker::Status;
use tracker::diff::{DiffEntry, DiffSet, Node, NodeKind, Sign};
use tracker::service::Listed;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Diff,
    Json,
    JsonLines,
}

/// How the listing is printed.
#[derive(Clone, Copy)]
pub struct Listing {
    pub format: Format,
    /// Also the paths equal in spfs's model that the changelog holds as changed.
    pub all: bool,
    /// Colours as `spfs diff` prints them on a terminal.
    pub color: bool,
}

pub fn write_changes(
    out: &mut impl Write,
    set: &DiffSet,
    mount: &Path,
    how: Listing,
) -> io::Result<()> {
    match how.format {
        Format::Diff => {
            for e in &set.entries {
                if e.sign == Sign::Touched && !how.all {
                    continue;
                }
                out.write_all(diff_line(e, mount, how.all, how.color).as_bytes())?;
                out.write_all(b"\n")?;
            }
        }
        Format::Json => {
            let (recorded, implied): (Vec<_>, Vec<_>) =
                set.entries.iter().partition(|e| e.change.is_some());
            let doc = json!({
                "token": set.token.to_string(),
                "fresh": set.fresh.as_ref().map(fresh_reason),
                "ended": set.ended.as_ref().map(ended_note),
                "mount": mount.to_string_lossy(),
                "changes": recorded.iter().map(|e| entry_json(e, mount)).collect::<Vec<_>>(),
                "implied": implied.iter().map(|e| entry_json(e, mount)).collect::<Vec<_>>(),
            });
            serde_json::to_writer_pretty(&mut *out, &doc)?;
            writeln!(out)?;
        }
        Format::JsonLines => {
            for e in &set.entries {
                serde_json::to_writer(&mut *out, &entry_json(e, mount))?;
                writeln!(out)?;
            }
            let trailer = json!({
                "token": set.token.to_string(),
                "fresh": set.fresh.as_ref().map(fresh_reason),
                "ended": set.ended.as_ref().map(ended_note),
            });
            serde_json::to_writer(&mut *out, &trailer)?;
            writeln!(out)?;
        }
    }
    out.flush()
}

/// One line as `spfs diff` prints it (crates/spfs/src/io.rs `format_diffs`): the sign,
/// the path, the details; on a terminal the sign bold, the details dim and the line
/// green (added), red (removed) or bright blue (changed). (spfs pads the sign to 8
/// columns with `{:>8}`, which its `Display` ignores: no padding.)
pub fn diff_line(e: &DiffEntry, mount: &Path, all: bool, color: bool) -> String {
    let path = escape(&full_path(mount, &e.path));
    let sign = e.sign.symbol().to_string();
    let details = e.details(all);
    if !color {
        return format!("{sign}{path}{details}");
    }
    let style = |code: &str, text: &str| format!("\x1b[{code}m{text}\x1b[0m");
    let details = if details.is_empty() {
        details
    } else {
        style("2", &details)
    };
    let line = format!("{}{path}{details}", style("1", &sign));
    let code = match e.sign {
        Sign::Added => "32",
        Sign::Removed => "31",
        Sign::Changed => "94",
        Sign::Touched => "2",
    };
    style(code, &line)
}

fn mode_text(n: Option<Node>) -> Value {
    n.map(|n| json!(format!("{:06o}", n.mode)))
        .unwrap_or(Value::Null)
}

fn entry_json(e: &DiffEntry, mount: &Path) -> Value {
    let full = full_path(mount, &e.path);
    let c = e.change.as_ref();
    let node_type = |n: Option<Node>| n.map(|n| n.kind);
    let file_type = match c {
        Some(c) => c.file_type.name(),
        None => match node_type(e.after).or(node_type(e.before)) {
            Some(NodeKind::Dir) => "dir",
            Some(NodeKind::Symlink) => "symlink",
            Some(NodeKind::Mask) => "whiteout",
            _ => "file",
        },
    };
    let mut v = json!({
        "path": String::from_utf8_lossy(&full),
        "kind": c.and_then(|c| c.kind).map(NetKind::name),
        "before": c.and_then(|c| c.before).map(NetKind::name),
        "type": file_type,
        "pid": c.and_then(|c| c.origin.as_ref()).map(|o| o.pid),
        "command": c.and_then(|c| c.origin.as_ref()).map(|o| String::from_utf8_lossy(&o.command).into_owned()),
        "seq": c.map(|c| c.seq),
        "diff": e.sign.name(),
        "mode_before": mode_text(e.before),
        "mode_after": mode_text(e.after),
        "size_before": e.before.map(|n| n.size),
        "size_after": e.after.map(|n| n.size),
        "changed": e.fields.iter().map(|f| f.name()).collect::<Vec<_>>(),
        "before_known": e.before_known,
    });
    if c.is_none() {
        v["implied"] = json!(true);
    }
    if std::str::from_utf8(&full).is_err() {
        v["path_bytes"] = json!(full);
    }
    v
}

/// A changelog path (relative to the upper dir) as seen under the mount.
pub fn full_path(mount: &Path, rel: &[u8]) -> Vec<u8> {
    let mut p = mount.as_os_str().as_bytes().to_vec();
    if !p.ends_with(b"/") {
        p.push(b'/');
    }
    p.extend_from_slice(rel);
    p
}

/// A path on one line of text: printable UTF-8 as is (backslashes included, as spfs
/// prints it), control characters and bytes that are not UTF-8 escaped (`\n`,
/// `\x1b`, `\xff`) so that one line is one path. JSON output keeps the exact bytes.
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for ch in chunk.valid().chars() {
            match ch {
                '\n' => s.push_str("\\n"),
                '\t' => s.push_str("\\t"),
                '\r' => s.push_str("\\r"),
                c if c.is_control() => s.push_str(&format!("\\x{:02x}", c as u32)),
                c => s.push(c),
            }
        }
        for b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

/// One line per record: `seq time action type path pid command`.
pub fn write_history(
    out: &mut impl Write,
    records: &[LogRecord],
    mount: &Path,
    as_json: bool,
) -> io::Result<()> {
    for r in records {
        let path = full_path(mount, &r.path);
        if as_json {
            let mut v = json!({
                "seq": r.seq,
                "time_ns": r.time_ns,
                "action": r.action.name(),
                "path": String::from_utf8_lossy(&path),
                "type": r.file_type.name(),
                "before": r.before.map(NetKind::name),
                "link": r.link,
                "pid": r.origin.as_ref().map(|o| o.pid),
                "command": r.origin.as_ref().map(|o| String::from_utf8_lossy(&o.command).into_owned()),
            });
            if std::str::from_utf8(&path).is_err() {
                v["path_bytes"] = json!(path);
            }
            serde_json::to_writer(&mut *out, &v)?;
            writeln!(out)?;
        } else {
            let who = match &r.origin {
                Some(o) => format!("pid {} {}", o.pid, escape(&o.command)),
                None => String::new(),
            };
            writeln!(
                out,
                "{:>8} {:<13} {:<8} {} {who}",
                r.seq,
                r.action.name(),
                r.file_type.name(),
                escape(&path)
            )?;
        }
    }
    out.flush()
}

/// `list`: a line per state dir (name, runtime pid, mount, tracker pid, changed
/// paths, state dir), or JSON.
pub fn write_list(out: &mut impl Write, listed: &[Listed], as_json: bool) -> io::Result<()> {
    if as_json {
        let doc: Vec<Value> = listed
            .iter()
            .map(|l| {
                let r = l.record.as_ref();
                json!({
                    "name": r.and_then(|r| r.name.clone()),
                    "pid": r.map(|r| r.pid),
                    "mount": r.map(|r| r.mount_point.to_string_lossy().into_owned()),
                    "mount_ns": r.map(|r| r.mount_ns),
                    "owner_uid": r.map(|r| r.owner_uid),
                    "tracker_pid": l.tracker.as_ref().and_then(|p| p.parse::<u32>().ok()),
                    "live": l.tracker.is_some(),
                    "changed": l.changed,
                    "state": l.state.to_string_lossy(),
                })
            })
            .collect();
        serde_json::to_writer_pretty(&mut *out, &doc)?;
        writeln!(out)?;
        return out.flush();
    }
    writeln!(
        out,
        "{:<36} {:>8} {:<10} {:>8} {:>8}  STATE",
        "NAME", "PID", "MOUNT", "TRACKER", "CHANGED"
    )?;
    for l in listed {
        let r = l.record.as_ref();
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:<36} {:>8} {:<10} {:>8} {:>8}  {}",
            or_dash(r.and_then(|r| r.name.clone())),
            or_dash(r.map(|r| r.pid.to_string())),
            or_dash(r.map(|r| r.mount_point.display().to_string())),
            l.tracker.clone().unwrap_or_else(|| "ended".into()),
            or_dash(l.changed.map(|c| c.to_string())),
            l.state.display()
        )?;
    }
    out.flush()
}

/// Why an answer lacks what changed after some moment (`ChangeSet::ended`).
pub fn ended_note(e: &store::Ended) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(e.time_ns);
    format!(
        "the tracker stopped on {} at {} while the runtime went on: what changed after that is not in this changelog (a tracker started on the runtime again rescans it)",
        e.why,
        humantime::format_rfc3339_seconds(at)
    )
}

pub fn fresh_reason(r: &FreshReason) -> String {
    match r {
        FreshReason::OtherInstance { asked, current } => format!(
            "the token or mark is from tracker instance {asked:016x}, history since then is incomplete (now {current:016x})"
        ),
        FreshReason::Expired { asked, oldest } => {
            format!("position {asked} is older than the retained history (oldest {oldest})")
        }
    }
}

pub fn write_status(out: &mut impl Write, s: &Status, as_json: bool) -> io::Result<()> {
    if as_json {
        let doc = json!({
            "live": s.live,
            "token": s.token.map(|t| t.to_string()),
            "mount": s.mount.to_string_lossy(),
            "upper": s.upper.to_string_lossy(),
            "events": s.events,
            "batches": s.batches,
            "records": s.records,
            "overflows": s.overflows,
            "rescans": s.rescans,
            "gaps": s.gaps,
            "net_paths": s.net_paths,
            "db_bytes": s.db_bytes,
            "last_batch_us": s.last_batch_us,
            "watch": s.watch,
            "degraded": s.degraded,
        });
        serde_json::to_writer_pretty(&mut *out, &doc)?;
        writeln!(out)?;
        return out.flush();
    }
    let token = s.token.map(|t| t.to_string()).unwrap_or_default();
    writeln!(
        out,
        "tracker:    {}",
        if s.live { "running" } else { "not running" }
    )?;
    writeln!(out, "token:      {token}")?;
    writeln!(out, "mount:      {}", s.mount.display())?;
    writeln!(out, "upper:      {}", s.upper.display())?;
    writeln!(out, "watch:      {}", s.watch)?;
    writeln!(out, "changed:    {} paths", s.net_paths)?;
    writeln!(
        out,
        "events:     {} in {} batches, {} records",
        s.events, s.batches, s.records
    )?;
    writeln!(
        out,
        "overflows:  {} (rescans {}, gaps {})",
        s.overflows, s.rescans, s.gaps
    )?;
    writeln!(out, "lag:        last batch took {} us", s.last_batch_us)?;
    writeln!(out, "db size:    {} bytes", s.db_bytes)?;
    for d in &s.degraded {
        writeln!(out, "degraded:   {d}")?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::{Change, FileType};

    fn recorded(c: Change) -> DiffEntry {
        DiffEntry {
            path: c.path.clone(),
            sign: Sign::Added,
            before: None,
            after: None,
            before_known: true,
            fields: Vec::new(),
            change: Some(c),
        }
    }

    #[test]
    fn lines_are_printed_as_spfs_prints_them() {
        let e = recorded(Change {
            path: b"a/b".to_vec(),
            kind: Some(NetKind::Added),
            before: None,
            file_type: FileType::File,
            origin: None,
            seq: 1,
        });
        assert_eq!(
            diff_line(&e, Path::new("/spfs"), false, false),
            "+/spfs/a/b"
        );
        assert_eq!(
            diff_line(&e, Path::new("/spfs"), false, true),
            "\x1b[32m\x1b[1m+\x1b[0m/spfs/a/b\x1b[0m"
        );
    }

    #[test]
    fn escape_keeps_one_path_per_line() {
        assert_eq!(escape(b"a/b c"), "a/b c");
        assert_eq!(escape(b"new\nline"), "new\\nline");
        // Printable: as spfs prints it.
        assert_eq!(escape(b"back\\slash"), "back\\slash");
        assert_eq!(escape(b"bad\xff\xfe"), "bad\\xff\\xfe");
        assert_eq!(escape("caf\u{e9}".as_bytes()), "caf\u{e9}");
        assert_eq!(escape(b"\x1b[31m"), "\\x1b[31m");
    }

    #[test]
    fn json_is_lossless_for_non_utf8() {
        let c = Change {
            path: b"x\xff\n".to_vec(),
            kind: Some(NetKind::Added),
            before: None,
            file_type: FileType::File,
            origin: None,
            seq: 3,
        };
        let v = entry_json(&recorded(c.clone()), Path::new("/spfs"));
        let bytes: Vec<u8> = serde_json::from_value(v["path_bytes"].clone()).expect("byte array");
        assert_eq!(bytes, b"/spfs/x\xff\n");
        assert_eq!(v["kind"], "added");
        let ok = entry_json(
            &recorded(Change {
                path: b"a\nb".to_vec(),
                ..c
            }),
            Path::new("/spfs"),
        );
        assert_eq!(ok["path"], "/spfs/a\nb");
        assert!(ok.get("path_bytes").is_none());
    }
}
