//! `mcp-guard run`: load (or adopt) the pinned programs, enforce, report, reload on
//! SIGHUP and on config file changes, and on SIGTERM/SIGINT keep or detach.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tracing::warn;

use crate::{
    config,
    host::cgroup,
    policy::{self, Compiled},
};

mod approvals;
mod boot;
mod mcp;
mod mcp_policy;
mod ops;
mod pods;
mod serve;
mod state;

/// How often workload cgroups are re-resolved, so a cgroup created after start (a
/// systemd unit starting, a pod scheduled) is enforced without a reload.
const CGROUP_RESCAN: Duration = Duration::from_millis(100);
/// How often the daemon verifies with the kernel that its programs are still attached.
const ATTACH_CHECK: Duration = Duration::from_secs(1);
/// How often the config file is checked for changes (edits, ConfigMap symlink swaps).
const CONFIG_CHECK: Duration = Duration::from_secs(1);
/// How often the capabilities of guarded processes are read from /proc.
const POSTURE_CHECK: Duration = Duration::from_secs(2);
/// How often tasks of guarded workloads without a home are looked for (and exited
/// ones swept).
const HOMES_PASS: Duration = Duration::from_secs(2);

/// Loads and compiles a config, logging warnings. Nothing touches the kernel here.
///
/// # Errors
/// The config is invalid or cannot be compiled.
pub fn prepare(path: &Path) -> Result<(config::Config, Compiled)> {
    compile(config::load(path)?)
}

/// [`prepare`] for a config already loaded (its warnings logged, the policy compiled and
/// checked against the map sizes).
///
/// # Errors
/// The policy does not compile or does not fit the kernel maps.
pub fn compile(cfg: config::Config) -> Result<(config::Config, Compiled)> {
    compile_config(cfg, &[])
}

/// Compiles a validated config with the addresses learned for its host rules.
fn compile_config(
    cfg: config::Config,
    learned: &[policy::Learned],
) -> Result<(config::Config, Compiled)> {
    for w in &cfg.warnings {
        warn!("{w}");
    }
    let compiled = policy::compile_with(&cfg, learned)?;
    compiled
        .fits_the_maps()
        .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.path.display()))?;
    Ok((cfg, compiled))
}

/// Reads a config for a reload, refusing a file caught mid-write: a truncated file can
/// be a valid config that guards less (an empty file has no workloads at all). The
/// content must read the same twice, 50 ms apart, and must not be empty.
fn read_settled(path: &Path) -> Result<String> {
    let read = || {
        std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the config file", path.display()))
    };
    let mut text = read()?;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(50));
        let again = read()?;
        if again == text {
            anyhow::ensure!(
                !text.trim().is_empty(),
                "{}: the config file is empty (being written?); an empty config would guard nothing",
                path.display()
            );
            return Ok(text);
        }
        text = again;
    }
    anyhow::bail!(
        "{}: the config file keeps changing; trying again at the next change",
        path.display()
    )
}

/// Like [`prepare`], for a reload: from settled content only.
fn prepare_reload(path: &Path, learned: &[policy::Learned]) -> Result<(config::Config, Compiled)> {
    compile_config(config::parse(path, &read_settled(path)?)?, learned)
}

/// The content of the config file, following symlinks (a Kubernetes ConfigMap volume
/// swaps a `..data` symlink), or `None` if it cannot be read.
fn config_fingerprint(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

pub async fn run(config_path: PathBuf) -> Result<()> {
    // SIGHUP is ignored while the daemon boots (main sets it: a caught signal would
    // interrupt the verifier) and caught from just before "ready". The file is
    // fingerprinted before it is read, so a change during boot is reloaded at once.
    let fingerprint = config_fingerprint(&config_path);
    let cfg = config::load(&config_path)?;
    let learned = boot::learned_before(&cfg);
    // The policy is compiled once, before anything touches the kernel.
    let (cfg, compiled) = compile_config(cfg, &learned)?;
    let mount = cgroup::root(cfg.cgroup_root.as_deref())?;
    boot::warn_missing_cgroups(&compiled, &mount);
    let listeners = boot::Listeners::bind(&cfg, &config_path).await?;
    let kernel = boot::kernel(&cfg, &compiled, &mount, &config_path).await?;
    let mut running = serve::Running::start(cfg, compiled, learned, kernel, listeners)?;
    let outcome = running.serve(&config_path, fingerprint).await;
    running.stop(outcome).await
}
