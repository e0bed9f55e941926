//! First-use setup, idempotent: everything a fresh machine lacks to build and test.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// bpf-linker's LLVM must equal nightly rustc's (LLVM 22): 0.10.4 loads the nightly
/// toolchain's own LLVM at run time (see ../shared/TOOLCHAIN.md).
const BPF_LINKER_VERSION: &str = "0.10.4";

/// mdBook builds the docs book (`cargo xtask docs`, and `cargo xtask test`).
const MDBOOK_VERSION: &str = "0.5.4";

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// Rust side: the nightly toolchain with rust-src (for -Z build-std=core) and bpf-linker.
pub fn toolchain() -> Result<()> {
    // The CRI client's protobuf code is generated at build time (k8s-cri's build script).
    packages(&[("protoc", "protobuf-compiler")])?;
    if output("rustup", &["run", "nightly", "rustc", "--version"]).is_none() {
        eprintln!("xtask: installing the nightly toolchain");
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly");
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    cargo_install("bpf-linker", BPF_LINKER_VERSION, &[], "about a minute")
}

/// mdBook from crates.io (only the search feature: no server, no file watcher).
pub fn mdbook() -> Result<()> {
    cargo_install(
        "mdbook",
        MDBOOK_VERSION,
        &["--no-default-features", "--features", "search"],
        "a minute or two, once",
    )
}

/// `cargo install` of a crate's binary at a pinned version, unless `NAME --version`
/// already says that version.
fn cargo_install(name: &str, version: &str, extra: &[&str], takes: &str) -> Result<()> {
    let have = output(name, &["--version"]).unwrap_or_default();
    if !have.contains(version) {
        eprintln!("xtask: installing {name} {version} ({takes})");
        status(
            Command::new("cargo")
                .args(["install", name, "--version", version, "--locked", "--force"])
                .args(extra),
        )?;
    }
    Ok(())
}

/// Debian packages the tests use, installed only when a command is missing.
pub fn packages(needed: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(cmd, _)| output("sh", &["-c", &format!("command -v {cmd}")]).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    status(Command::new("apt-get").arg("update").arg("-q"))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}

/// PyPI packages of the MCP tests, the real-software tier and the demo, pinned: the
/// official MCP SDK, the reference fetch server and aioquic.
pub const MCP_PACKAGES: [&str; 3] = [
    "mcp==2.3.0",
    "mcp-server-fetch==2026.10.24",
    // HTTP/3 over QUIC for the real-software tier.
    "aioquic==1.7.2",
];

/// The Python environment (target/mcp-venv) with [`MCP_PACKAGES`], created when missing.
pub fn mcp_venv() -> Result<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join("target/mcp-venv");
    let pip = venv.join("bin/pip");
    let ready = venv.join(".mcpg-packages");
    if std::fs::read_to_string(&ready).ok().as_deref() == Some(&MCP_PACKAGES.join(" ")) {
        return Ok(venv);
    }
    if !pip.exists() {
        eprintln!(
            "xtask: creating the MCP test environment {}",
            venv.display()
        );
        status(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    eprintln!("xtask: installing {} from PyPI", MCP_PACKAGES.join(", "));
    status(
        Command::new(&pip)
            .args(["install", "-q"])
            .args(MCP_PACKAGES),
    )?;
    std::fs::write(&ready, MCP_PACKAGES.join(" "))?;
    Ok(venv)
}

/// Python command-line tools from PyPI, installed only when missing.
/// Installs each tool from PyPI unless its command is there: `command` or
/// `command=package` when the package has another name.
pub fn python_tools(tools: &[&str]) -> Result<()> {
    for t in tools {
        let (cmd, pkg) = t.split_once('=').unwrap_or((t, t));
        if output("sh", &["-c", &format!("command -v {cmd}")]).is_none() {
            eprintln!("xtask: installing {pkg} from PyPI");
            status(Command::new("python3").args(["-m", "pip", "install", "-q", pkg]))?;
        }
    }
    Ok(())
}

pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} loads eBPF programs and creates network namespaces and cgroups: run it as root (sudo -E cargo xtask ...)");
    }
    Ok(())
}
