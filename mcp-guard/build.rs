use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Builds the eBPF programs (nightly, bpfel-unknown-none, release) into OUT_DIR.
fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .join("mcp-guard-ebpf");
    let root = root.to_str().context("workspace path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "mcp-guard-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
