//! `cargo xtask dist`: the release tarball (binary, units, example config, manifests,
//! rules, dashboard, README) and the container image definition.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::setup;

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else {
            fs::copy(e.path(), &dst).with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Builds the release binary and the tarball; returns the tarball's path.
pub fn run() -> Result<PathBuf> {
    crate::build(true)?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("mcp-guard-{version}-{}-linux", std::env::consts::ARCH);
    let dist = target.join("dist");
    let stage = dist.join(&name);
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(stage.join("bin"))?;
    fs::copy(
        target.join("release/mcp-guard"),
        stage.join("bin/mcp-guard"),
    )
    .context("release binary")?;
    fs::create_dir_all(stage.join("etc/mcp-guard"))?;
    fs::copy(
        root.join("deploy/config.example.toml"),
        stage.join("etc/mcp-guard/config.toml"),
    )?;
    for d in ["systemd", "kubernetes", "prometheus", "grafana"] {
        copy_dir(&root.join("deploy").join(d), &stage.join(d))?;
    }
    fs::copy(
        root.join("deploy/container/Containerfile"),
        stage.join("Containerfile"),
    )?;
    fs::copy(root.join("README.md"), stage.join("README.md"))?;
    let tarball = dist.join(format!("{name}.tar.gz"));
    setup::status(
        Command::new("tar")
            .arg("czf")
            .arg(&tarball)
            .arg("-C")
            .arg(&dist)
            .arg(&name),
    )?;
    println!("tarball:          {}", tarball.display());
    println!(
        "container image:  {} (build context: the unpacked tarball)",
        stage.join("Containerfile").display()
    );
    Ok(tarball)
}
