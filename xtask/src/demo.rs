//! `cargo xtask demo`: runs the lab's demo driver (tests/src/bin/demo.rs), which sets up
//! a throw-away namespace and cgroup, starts mcp-guard on the built-in example config and
//! lets a simulated compromised MCP server try its luck.

use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::setup;

pub fn run() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let bin_dir = target.join("debug");
    let venv = setup::mcp_venv()?;
    setup::status(
        Command::new(bin_dir.join("mcpg-demo"))
            .env("MCPG_MCP_VENV", venv)
            .env("MCP_GUARD_BIN", bin_dir.join("mcp-guard"))
            .env("MCPG_BIN_DIR", &bin_dir),
    )
}
