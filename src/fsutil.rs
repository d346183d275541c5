//! File writes that never leave a torn file behind.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it into place, so
/// that a crash leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the folder is synced.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// The writing process's id in a temporary file name: `.<name>.tmp-<pid>` from [`write_atomic`]
/// or `.<stem>-<pid>-tmp.nii[.gz]` from the NIfTI writer.
fn temp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    if let Some((_, pid)) = rest.rsplit_once(".tmp-") {
        return pid.parse().ok();
    }
    let stem = rest.strip_suffix(".nii.gz").or_else(|| rest.strip_suffix(".nii"))?;
    let (before, _) = stem.rsplit_once("-tmp").filter(|(_, after)| after.is_empty())?;
    before.rsplit_once('-')?.1.parse().ok()
}

/// Whether a process is running. Without /proc (not Linux) every other process counts as
/// running unless its file is over a day old.
fn process_alive(pid: u32, modified: Option<std::time::SystemTime>) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if Path::new("/proc/self").exists() {
        return Path::new("/proc").join(pid.to_string()).exists();
    }
    let day = std::time::Duration::from_secs(24 * 3600);
    modified.and_then(|m| m.elapsed().ok()).is_none_or(|age| age < day)
}

/// Removes the temporary files that writers killed mid-write left in `dir` (those whose process is
/// no longer running) and returns their paths. A missing folder holds none.
pub fn remove_stale_temps(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(temp_owner) else { continue };
        let Ok(meta) = e.metadata() else { continue };
        if !meta.is_file() || process_alive(pid, meta.modified().ok()) {
            continue;
        }
        let path = e.path();
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot remove the stale temporary file {}", path.display()))?;
        removed.push(path);
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_give_their_writer() {
        assert_eq!(temp_owner(".checkpoint.safetensors.tmp-4242"), Some(4242));
        assert_eq!(temp_owner(".log.csv.tmp-7"), Some(7));
        assert_eq!(temp_owner(".synth_000-31337-tmp.nii.gz"), Some(31337));
        assert_eq!(temp_owner(".a_b-9-tmp.nii"), Some(9));
        for other in
            ["checkpoint.safetensors", ".hidden", ".x.tmp-abc", ".a-tmp.nii.gz", "a.tmp-5", ".a-5-tmp.txt"]
        {
            assert_eq!(temp_owner(other), None, "{other}");
        }
    }

    #[test]
    fn stale_temps_of_dead_writers_are_removed_and_live_ones_kept() {
        let tmp = tempfile::Builder::new().prefix("caml-fsutil-stale-").tempdir().unwrap();
        let dir = tmp.path();
        // A process that has exited, and one that is running.
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        dead.wait().unwrap();
        let mut live = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let names = [
            format!(".checkpoint.safetensors.tmp-{}", dead.id()),
            format!(".case_1-{}-tmp.nii.gz", dead.id()),
            format!(".log.csv.tmp-{}", live.id()),
            format!(".mine.tmp-{}", std::process::id()),
            "keep.nii.gz".to_string(),
        ];
        for n in &names {
            std::fs::write(dir.join(n), b"partial").unwrap();
        }
        let removed = remove_stale_temps(dir).unwrap();
        live.kill().unwrap();
        live.wait().unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        let mut want = names[2..].to_vec();
        want.sort();
        assert_eq!(left, want);
        assert_eq!(removed, vec![dir.join(&names[1]), dir.join(&names[0])]);
        assert!(remove_stale_temps(&dir.join("absent")).unwrap().is_empty());
    }
}
