//! The oldest binary an upgrade is supported from, built from this repository's history.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The oldest supported upgrade source (docs/src/operations.md, "Upgrades"): the first
/// commit whose every pinned map has a versioned name and whose MCP instance map is
/// pinned.
pub const UPGRADE_FROM: &str = "23c56dc";

/// `mcp-guard` built from [`UPGRADE_FROM`] (under `target/upgrade-<commit>`, built once
/// and kept). Panics with what to do when the history is missing (a shallow clone):
/// an upgrade test that cannot get its old binary fails, it does not pass.
#[must_use]
pub fn old_binary() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let base = repo.join(format!("target/upgrade-{UPGRADE_FROM}"));
    let bin = base.join("debug/mcp-guard");
    let lock = base.join(".built");
    if lock.exists() && bin.exists() {
        return bin;
    }
    let src = base.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).expect("upgrade source directory");
    let archive = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "git -C '{}' archive --format=tar {UPGRADE_FROM} | tar -x -C '{}'",
            repo.display(),
            src.display()
        ))
        .status()
        .expect("git archive");
    assert!(
        archive.success() && src.join("Cargo.toml").exists(),
        "cannot extract commit {UPGRADE_FROM} from this repository's history (a shallow \
         clone? fetch it with `git fetch --unshallow`): the upgrade test needs the old \
         binary"
    );
    eprintln!("building mcp-guard at {UPGRADE_FROM} for the upgrade test (once)");
    let built = Command::new(env!("CARGO"))
        .args(["build", "--bins", "-p", "mcp-guard"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &base)
        .status()
        .expect("cargo build of the upgrade source");
    assert!(built.success(), "building commit {UPGRADE_FROM} failed");
    std::fs::write(&lock, UPGRADE_FROM).expect("mark built");
    bin
}
