//! Whether a known_hosts path can hold host keys. A path that cannot (`/dev/null`, any other
//! device, a directory, or under `accept-new` a file the launcher cannot write) turns host key
//! verification off in effect: every key reads as first-seen, is "recorded" nowhere, and a
//! changed key is trusted again on the next run. The cluster checks refuse such a path when
//! the file is loaded, and the SSH layer asks again before it trusts a key.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use nix::unistd::{access, AccessFlags};

/// Why `path` cannot serve as known_hosts, or None when it can. `must_record`: the file must
/// take new keys (`accept-new`); otherwise reading it is enough, and a missing file is left to
/// the launcher's own check (strict mode refuses every host it lacks anyway).
pub fn unfit(path: &Path, must_record: bool) -> Option<String> {
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        // ENOTDIR: a file stands where a folder of the path should be; the walk names it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {
            return if must_record { unfit_folder(path) } else { None };
        }
        Err(e) => return Some(format!("`{shown}` cannot be examined: {e}")),
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        return Some(format!("`{shown}` is a directory, not a known_hosts file"));
    }
    if ft.is_char_device() || ft.is_block_device() {
        return Some(format!(
            "`{shown}` is a device: keys written there are not kept, so every host would be trusted \
             on first sight on every run and a changed host key would go unnoticed"
        ));
    }
    if !ft.is_file() {
        return Some(format!("`{shown}` is not a regular file (a pipe or socket keeps no keys)"));
    }
    if access(path, AccessFlags::R_OK).is_err() {
        return Some(format!("`{shown}` cannot be read"));
    }
    if must_record && access(path, AccessFlags::W_OK).is_err() {
        return Some(format!(
            "`{shown}` is not writable, so `accept-new` could not record the keys it trusts and a \
             changed host key would go unnoticed"
        ));
    }
    None
}

/// A known_hosts file that does not exist yet: `accept-new` creates it, with any missing
/// folders, so the nearest existing ancestor must be a writable directory.
fn unfit_folder(path: &Path) -> Option<String> {
    let shown = path.display();
    let mut dir = path.parent();
    while let Some(d) = dir {
        let d = if d.as_os_str().is_empty() { Path::new(".") } else { d };
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => {
                return access(d, AccessFlags::W_OK | AccessFlags::X_OK).is_err().then(|| {
                    format!(
                        "`{shown}` does not exist and its folder `{}` is not writable, so `accept-new` \
                         could not record the keys it trusts",
                        d.display()
                    )
                });
            }
            Ok(_) => {
                return Some(format!("`{shown}` cannot be created: `{}` is not a directory", d.display()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => dir = d.parent(),
            Err(e) => return Some(format!("`{shown}` cannot be created: `{}`: {e}", d.display())),
        }
    }
    None
}

/// The fix, for messages.
pub const FIX: &str = "point `ssh.known_hosts` at a regular file the launcher can read and, with \
                       `accept-new`, write (the default is ~/.ssh/known_hosts); host key verification \
                       cannot be turned off";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_directories_hold_no_keys() {
        for must_record in [true, false] {
            let e = unfit(Path::new("/dev/null"), must_record).expect("/dev/null refused");
            assert!(e.contains("`/dev/null` is a device") && e.contains("changed host key"), "{e}");
            let dir = tempfile::tempdir().unwrap();
            let e = unfit(dir.path(), must_record).expect("a directory refused");
            assert!(e.contains("is a directory"), "{e}");
        }
    }

    #[test]
    fn regular_and_creatable_files_are_fit() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("known_hosts");
        std::fs::write(&f, "").unwrap();
        assert_eq!(unfit(&f, true), None);
        assert_eq!(unfit(&f, false), None);
        // accept-new creates a missing file, folders included.
        assert_eq!(unfit(&dir.path().join("a/b/known_hosts"), true), None);
        // Strict mode leaves a missing file to the launcher's check row.
        assert_eq!(unfit(&dir.path().join("missing"), false), None);
    }

    #[test]
    fn a_file_under_a_file_cannot_be_created() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("plain");
        std::fs::write(&f, "").unwrap();
        let e = unfit(&f.join("known_hosts"), true).expect("refused");
        assert!(e.contains("is not a directory"), "{e}");
    }

    #[test]
    fn unwritable_files_cannot_record() {
        // Root writes through permission bits: a read-only file only stops others.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("known_hosts");
        std::fs::write(&f, "").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o444)).unwrap();
        assert!(unfit(&f, true).unwrap().contains("is not writable"));
        assert_eq!(unfit(&f, false), None);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
        assert!(unfit(&dir.path().join("new"), true).unwrap().contains("is not writable"));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}
