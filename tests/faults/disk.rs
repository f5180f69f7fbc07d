//! The embedded store's own filesystem, for the disk-full fault: a tmpfs mounted over the
//! store's directory, made full at the fault's moment (its size cut to what it holds) and
//! grown again after. Mounting needs root, as the CI machine runs the tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Room the store has before and after the fault: far more than a schedule writes.
const ROOMY: &str = "size=256m";

/// A tmpfs mounted at a directory until dropped.
pub struct Disk {
    at: PathBuf,
}

impl Disk {
    /// Mounts a roomy tmpfs at `at` (created if missing).
    pub fn mount(at: &Path) -> Result<Disk, String> {
        std::fs::create_dir_all(at).map_err(|e| format!("create {}: {e}", at.display()))?;
        mount(&["-t", "tmpfs", "-o", ROOMY, "tmpfs"], at)?;
        Ok(Disk { at: at.to_owned() })
    }

    /// Makes it full: its size becomes the pages it holds now, so the next write that needs
    /// a page fails with ENOSPC (a file's last page may still take a few records).
    /// The writer goes on meanwhile, and a size below what the tmpfs holds is refused: tried
    /// again on a fresh reading, with a margin of 16 KiB more each time (a busy Redis can
    /// outgrow the exact reading twenty times in a row), which it soon fills as well.
    pub fn fill(&self) -> Result<(), String> {
        let mut last = String::new();
        for attempt in 0..20 {
            // tmpfs refuses a size of 0; a page is what an empty store would hold anyway.
            let used = used_bytes(&self.at)?.max(4096) + attempt * 16 * 1024;
            match mount(&["-o", &format!("remount,size={used}")], &self.at) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Gives it room again.
    pub fn grow(&self) -> Result<(), String> {
        mount(&["-o", &format!("remount,{ROOMY}")], &self.at)
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        // Lazily: a process of the schedule may still hold a file there.
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

fn mount(args: &[&str], at: &Path) -> Result<(), String> {
    let out = Command::new("mount")
        .args(args)
        .arg(at)
        .output()
        .map_err(|e| format!("mount {args:?}: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "mount {args:?} {} (the disk-full fault needs root): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Bytes in use on the filesystem holding `at`, as `df` counts them.
fn used_bytes(at: &Path) -> Result<u64, String> {
    let out = Command::new("df")
        .args(["-B1", "--output=used"])
        .arg(at)
        .output()
        .map_err(|e| format!("df {}: {e}", at.display()))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("df {}: no usage in {:?}", at.display(), out.stdout))
}
