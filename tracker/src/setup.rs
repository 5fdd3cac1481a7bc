//! Making a runtime shaped like spfs's without spfs, for `spfs-changes run`, tests and
//! benchmarks: a tmpfs runtime dir holding `upper/`, `work/` and an empty `lower/`, and
//! an overlay over the given lower layers then that empty one, with spfs's options
//! (crates/spfs/src/env.rs: `index=off,metacopy=off,redirect_dir=follow`).

use crate::TrackerError;
use nix::mount::{MsFlags, mount};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The overlay options spfs mounts with, besides the layers.
pub const SPFS_OVERLAY_OPTIONS: &str = "index=off,metacopy=off,redirect_dir=follow";

/// An overlay runtime made by [`Overlay::create`].
#[derive(Debug, Clone)]
pub struct Overlay {
    /// Where the overlay is mounted (`/spfs` for `run`).
    pub mount_point: PathBuf,
    /// The tmpfs holding `upper/`, `work/` and `lower/`.
    pub runtime_dir: PathBuf,
    /// `<runtime_dir>/upper`.
    pub upper: PathBuf,
    /// `<runtime_dir>/work`.
    pub work: PathBuf,
    /// Top-most first, ending with the runtime dir's empty `lower/`, as spfs does.
    pub lowers: Vec<PathBuf>,
    /// The overlay's mount data (`lowerdir=...,upperdir=...,workdir=...,index=off,...`).
    pub options: String,
}

impl Overlay {
    /// Mounts a tmpfs (`noexec`, mode 0755) at `runtime_dir`, makes `upper/`, `work/`
    /// and `lower/` in it, and mounts the overlay at `mount_point` (both dirs made if
    /// missing). Acts in the caller's mount namespace: call it in a private one. Fails
    /// when a path cannot go into overlay options (`,`, `:`, `\`, non-UTF-8), or a
    /// mount fails (not root, no overlayfs).
    pub fn create(
        runtime_dir: &Path,
        mount_point: &Path,
        lowers: &[PathBuf],
    ) -> Result<Overlay, TrackerError> {
        let fail =
            |what: String| move |e: nix::errno::Errno| TrackerError::Setup(format!("{what}: {e}"));
        std::fs::create_dir_all(runtime_dir)
            .map_err(TrackerError::io("cannot create runtime dir", runtime_dir))?;
        mount(
            Some("tmpfs"),
            runtime_dir,
            Some("tmpfs"),
            MsFlags::MS_NOEXEC,
            Some("mode=0755"),
        )
        .map_err(fail(format!(
            "cannot mount a tmpfs at {}",
            runtime_dir.display()
        )))?;
        let upper = runtime_dir.join("upper");
        let work = runtime_dir.join("work");
        let empty = runtime_dir.join("lower");
        for d in [&upper, &work, &empty] {
            std::fs::create_dir(d).map_err(TrackerError::io("cannot create", d))?;
        }
        let mut all = lowers.to_vec();
        all.push(empty);
        let overlay = Overlay {
            mount_point: mount_point.to_path_buf(),
            runtime_dir: runtime_dir.to_path_buf(),
            options: options(&all, &upper, &work)?,
            upper,
            work,
            lowers: all,
        };
        std::fs::create_dir_all(mount_point)
            .map_err(TrackerError::io("cannot create mount point", mount_point))?;
        overlay.mount()?;
        Ok(overlay)
    }

    /// Mounts the overlay (a new superblock) at its mount point, as spfs does at every
    /// edit, commit and reset.
    pub fn mount(&self) -> Result<(), TrackerError> {
        mount(
            Some("overlay"),
            &self.mount_point,
            Some("overlay"),
            MsFlags::empty(),
            Some(self.options.as_str()),
        )
        .map_err(|e| {
            TrackerError::Setup(format!(
                "cannot mount the overlay at {}: {e}",
                self.mount_point.display()
            ))
        })
    }
}

/// The overlay's mount data for these layers.
pub fn options(lowers: &[PathBuf], upper: &Path, work: &Path) -> Result<String, TrackerError> {
    let mut all: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    all.push(upper);
    all.push(work);
    for p in &all {
        let b = p.as_os_str().as_bytes();
        if b.iter().any(|c| matches!(c, b',' | b':' | b'\\')) || std::str::from_utf8(b).is_err() {
            return Err(TrackerError::Setup(format!(
                "overlay layer path {} must not contain ',', ':', '\\' or non-UTF-8 bytes",
                p.display()
            )));
        }
    }
    let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    Ok(format!(
        "lowerdir={},upperdir={},workdir={},{SPFS_OVERLAY_OPTIONS}",
        lowerdir.join(":"),
        upper.display(),
        work.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::options;
    use std::path::{Path, PathBuf};

    #[test]
    fn options_are_spfs_ones_and_refuse_what_mount_cannot_take() {
        let lowers = [PathBuf::from("/r/a"), PathBuf::from("/r/lower")];
        assert_eq!(
            options(&lowers, Path::new("/r/upper"), Path::new("/r/work")).expect("valid"),
            "lowerdir=/r/a:/r/lower,upperdir=/r/upper,workdir=/r/work,index=off,metacopy=off,redirect_dir=follow"
        );
        for bad in ["/r/a,b", "/r/a:b", "/r/a\\b"] {
            assert!(options(&[PathBuf::from(bad)], Path::new("/u"), Path::new("/w")).is_err());
        }
    }
}
