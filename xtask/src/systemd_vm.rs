//! `cargo xtask vm-test`, the systemd part: README's quick start (docs/src/deploy-vm.md) run as
//! written on a real systemd. A Debian bookworm root filesystem is built from Debian's
//! packages (`mmdebstrap`, systemd as init, cached under target/vm), the release tarball
//! and a stand-in MCP server unit are put in, and the VM boots it with the newest
//! kernel of the matrix. Inside, a oneshot unit follows the walkthrough (install the
//! tarball, the units and the drop-in, `systemctl enable --now mcp-guard`, restart the
//! server), checks that the server's metadata requests are refused while its other
//! traffic flows and that the journal holds the event, then `systemctl restart
//! mcp-guard` and checks the server kept running (same main PID) and stayed guarded
//! throughout. The VM has no network device: the "metadata" and "public" addresses live
//! on the loopback of a namespace the test makes inside it.

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path, process::Command};

use anyhow::{Context as _, Result};

use crate::setup;

/// The packages of the root filesystem (minbase plus these).
const PACKAGES: &str = "systemd,systemd-sysv,iproute2,kmod,procps,curl,util-linux";

/// The stand-in MCP server: an existing unit the operator already runs (README's
/// `github-mcp`), which connects to the metadata service and to a public address in a
/// loop and writes each result (EPERM / OK) to its log, in that order.
const STANDIN_UNIT: &str = "\
[Unit]
Description=stand-in MCP server (connects out in a loop)

[Service]
ExecStart=/opt/mcpg/standin.sh
NetworkNamespacePath=/run/netns/lab
";

const STANDIN: &str = "#!/bin/sh
while :; do
  echo 'tcp 169.254.169.254 80'
  echo 'tcp 93.184.216.34 443'
  sleep 0.1
done | /opt/mcpg/mcpg-probe >> /var/log/standin.log
";

/// Runs the walkthrough at boot and reports on the serial console.
const TEST_UNIT: &str = "\
[Unit]
Description=mcp-guard systemd walkthrough (cargo xtask vm-test)

[Service]
Type=oneshot
ExecStart=/opt/mcpg/test.sh
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
";

const TEST: &str = r#"#!/bin/sh
set -u
echo "VMINFO systemd $(systemctl --version | head -1)"
pass() { echo "VMTEST systemd::$1 PASS"; }
fail() { echo "VMFAIL systemd::$1: $2"; echo "VMTEST systemd::$1 FAIL"; }
finish() {
  journalctl -u mcp-guard -o cat --no-pager | tail -30 | sed 's/^/VMLOG mcp-guard: /'
  echo VMDONE; sync; systemctl --force --force poweroff
}
# Loops that the standin log's lines alternate metadata (must be EPERM) and public (OK).
bad_lines() { awk -v from="$1" 'NR > from && NR % 2 == 1 && $0 != "EPERM" {b++} NR > from && NR % 2 == 0 && $0 != "OK" {b++} END {print b + 0}' /var/log/standin.log; }

# The lab: "metadata" and "public" on the loopback of a namespace of our own.
ip netns add lab
ip -n lab link set lo up
ip -n lab addr add 169.254.169.254/32 dev lo
ip -n lab addr add 93.184.216.34/32 dev lo
(echo "serve 169.254.169.254 80"; echo "serve 93.184.216.34 443"; sleep 100000) \
  | nsenter --net=/run/netns/lab /opt/mcpg/mcpg-probe >/dev/null &
sleep 1

# README's quick start (docs/src/deploy-vm.md), as written (the tarball is already built).
set -e
cd /tmp && tar xzf /opt/mcpg/mcp-guard-*.tar.gz && cd /tmp/mcp-guard-*-linux
install -m 0755 bin/mcp-guard /usr/local/bin/mcp-guard
install -D -m 0644 etc/mcp-guard/config.toml /etc/mcp-guard/config.toml
cp systemd/mcp-guard.service systemd/mcp.slice /etc/systemd/system/
mkdir -p /etc/systemd/system/github-mcp.service.d
cp systemd/github-mcp.service.d/mcp-guard.conf /etc/systemd/system/github-mcp.service.d/
systemctl daemon-reload && systemctl enable --now mcp-guard && systemctl restart github-mcp
set +e

if [ "$(systemctl is-active mcp-guard)" = active ] && [ "$(systemctl is-active github-mcp)" = active ] \
   && [ "$(cat /proc/$(systemctl show -p MainPID --value github-mcp)/cgroup)" = "0::/mcp.slice/github-mcp.service" ]; then
  pass walkthrough_starts_the_guard_and_the_server
else
  fail walkthrough_starts_the_guard_and_the_server "$(systemctl status mcp-guard github-mcp --no-pager 2>&1 | tr '\n' '|')"
fi

sleep 3
lines=$(wc -l < /var/log/standin.log)
if [ "$lines" -ge 10 ] && [ "$(bad_lines 0)" = 0 ]; then
  pass the_servers_metadata_requests_are_refused_and_its_other_traffic_flows
else
  fail the_servers_metadata_requests_are_refused_and_its_other_traffic_flows "$lines lines, $(bad_lines 0) wrong: $(head -6 /var/log/standin.log | tr '\n' ' ')"
fi

# README's proof: a command in the server's cgroup cannot reach the metadata service.
out=$(nsenter --net=/run/netns/lab mcp-guard exec --config /etc/mcp-guard/config.toml --workload github-mcp -- curl -vsSm2 http://169.254.169.254/ 2>&1)
rc=$?
if [ $rc -eq 7 ] && echo "$out" | grep -q "Operation not permitted"; then
  pass readme_exec_curl_to_metadata_is_refused
else
  fail readme_exec_curl_to_metadata_is_refused "exit $rc: $(echo "$out" | tr '\n' '|')"
fi

sleep 1
if journalctl -u mcp-guard -o cat --no-pager | grep baseline-metadata | grep -q '"workload":"github-mcp"'; then
  pass the_journal_holds_the_event
else
  fail the_journal_holds_the_event "no baseline-metadata event of github-mcp in the journal"
fi

# An upgrade or a restart of mcp-guard: the server keeps running and stays guarded.
pid=$(systemctl show -p MainPID --value github-mcp)
from=$(wc -l < /var/log/standin.log)
from=$((from - from % 2))
guard_before=$(systemctl show -p MainPID --value mcp-guard)
systemctl restart mcp-guard
sleep 3
to=$(wc -l < /var/log/standin.log)
pid_after=$(systemctl show -p MainPID --value github-mcp)
guard_after=$(systemctl show -p MainPID --value mcp-guard)
if [ "$pid" = "$pid_after" ] && [ "$(systemctl is-active github-mcp)" = active ] \
   && [ "$(systemctl is-active mcp-guard)" = active ] && [ "$guard_before" != "$guard_after" ] \
   && [ $((to - from)) -ge 10 ] && [ "$(bad_lines "$from")" = 0 ]; then
  pass restarting_mcp_guard_keeps_the_server_running_and_guarded
else
  fail restarting_mcp_guard_keeps_the_server_running_and_guarded "server pid $pid -> $pid_after, guard pid $guard_before -> $guard_after, $((to - from)) lines across the restart, $(bad_lines "$from") wrong"
fi
finish
"#;

/// Builds the root filesystem image (cached tarball, fresh tree) and its initramfs.
///
/// # Errors
/// mmdebstrap, tar or cpio failed.
pub fn initramfs(work: &Path, tarball: &Path) -> Result<std::path::PathBuf> {
    let cache = work.join("systemd-bookworm.tar");
    let stamp = work.join("systemd-bookworm.packages");
    if !cache.exists() || fs::read_to_string(&stamp).ok().as_deref() != Some(PACKAGES) {
        eprintln!("xtask: building a Debian bookworm root filesystem with systemd (mmdebstrap)");
        setup::status(Command::new("mmdebstrap").args([
            "--variant=minbase",
            &format!("--include={PACKAGES}"),
            "bookworm",
            &cache.to_string_lossy(),
            "http://deb.debian.org/debian",
        ]))?;
        fs::write(&stamp, PACKAGES)?;
    }
    let root = work.join("systemd-root");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    setup::status(
        Command::new("tar")
            .arg("-xf")
            .arg(&cache)
            .arg("-C")
            .arg(&root),
    )?;
    let opt = root.join("opt/mcpg");
    fs::create_dir_all(&opt)?;
    let file_name = tarball.file_name().context("tarball name")?;
    fs::copy(tarball, opt.join(file_name))?;
    let debug = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug");
    fs::copy(debug.join("mcpg-probe"), opt.join("mcpg-probe"))?;
    for (path, text, exec) in [
        ("opt/mcpg/test.sh", TEST, true),
        ("opt/mcpg/standin.sh", STANDIN, true),
        ("etc/systemd/system/github-mcp.service", STANDIN_UNIT, false),
        ("etc/systemd/system/mcpg-vmtest.service", TEST_UNIT, false),
    ] {
        let p = root.join(path);
        fs::write(&p, text)?;
        fs::set_permissions(
            &p,
            fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 }),
        )?;
    }
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    std::os::unix::fs::symlink(
        "/etc/systemd/system/mcpg-vmtest.service",
        wants.join("mcpg-vmtest.service"),
    )?;
    // The console is the test's: no login prompt on it.
    std::os::unix::fs::symlink(
        "/dev/null",
        root.join("etc/systemd/system/serial-getty@ttyS0.service"),
    )?;
    fs::write(root.join("etc/hostname"), "mcpg-systemd-vm\n")?;
    // The kernel runs /init from the initramfs: systemd, with this tree as its root.
    std::os::unix::fs::symlink("/lib/systemd/systemd", root.join("init"))?;
    let image = work.join("initrd-systemd.gz");
    setup::status(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}",
        root.display(),
        image.display()
    )))?;
    let _ = fs::remove_dir_all(&root);
    Ok(image)
}
