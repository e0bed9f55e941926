//! `cargo xtask vm-test`: the kernel tests on Debian's kernels in qemu (the way aya's
//! own `xtask integration-test vm` runs its tests on Debian kernels): each kernel package
//! is fetched from the package registry (cached under target/vm), booted with an
//! initramfs holding busybox, the test binaries, the daemon, the probe, the tools the
//! tests call (ip, nsenter, bpftool) with their libraries, and the kernel modules they
//! need, with BPF LSM on the command line. One result line per kernel and test; any
//! failure on any kernel fails the command.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::setup;

/// The kernels: a series and what it proves. Each resolves to the newest package of the
/// series the registry serves.
const KERNELS: [(&str, &str); 2] = [
    (
        r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$",
        "6.1 (bookworm): TC through netlink (clsact), BPF LSM",
    ),
    (
        r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$",
        "6.12 (bookworm-backports): TCX, BPF LSM",
    ),
];

/// The kernel tests that run inside the VMs: (test binary, test name).
const TESTS: [(&str, &str); 18] = [
    ("enforcement", "socket_hooks_enforce_the_policy"),
    (
        "enforcement",
        "a_guarded_server_answers_its_clients_and_connected_sends_judge_the_peer",
    ),
    ("enforcement", "audit_mode_allows_but_reports"),
    (
        "below_sockets",
        "raw_and_packet_sockets_are_refused_where_configured",
    ),
    ("below_sockets", "cgroup_skb_backstop_judges_every_packet"),
    (
        "below_sockets",
        "vm_mode_tc_drops_raw_packets_to_denied_destinations",
    ),
    (
        "below_sockets",
        "tc_links_are_pinned_and_adopted_after_kill_9",
    ),
    ("below_sockets", "exec_hardens_the_command"),
    (
        "below_sockets",
        "an_exec_hardened_root_command_cannot_leave_its_cgroup_or_reach_deputies",
    ),
    (
        "fail_closed",
        "kill_9_never_opens_a_window_and_restart_adopts",
    ),
    ("attack_matrix", "every_socket_and_send_path_is_stopped"),
    (
        "no_window",
        "recreated_workload_cgroups_are_guarded_before_anyone_joins",
    ),
    ("no_window", "tampering_is_repaired_within_two_seconds"),
    (
        "sticky_identity",
        "a_root_process_that_leaves_its_cgroup_keeps_its_workloads_policy",
    ),
    (
        "sticky_identity",
        "a_process_that_moves_into_another_workload_keeps_the_one_it_left",
    ),
    (
        "sticky_identity",
        "homes_predate_the_daemon_and_survive_kill_9_and_restart",
    ),
    // 6.12: the cgroup unix hooks and BPF LSM judge; 6.1: BPF LSM alone.
    ("unix_sockets", "unix_destinations_are_judged_per_workload"),
    (
        "unix_sockets",
        "unix_rules_survive_kill_and_restart_and_follow_reloads",
    ),
];

/// Modules the tests need that Debian builds as modules.
const MODULES: [&str; 9] = [
    "veth",
    "sch_ingress",
    "cls_bpf",
    "tun",
    "sctp",
    "vsock",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
];

const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
    ("depmod", "kmod"),
    ("xz", "xz-utils"),
    ("objcopy", "binutils"),
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("bpftool", "bpftool"),
    ("curl", "curl"),
    ("mmdebstrap", "mmdebstrap"),
];

fn out(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !o.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The newest package matching `pattern` (apt-cache's regex), downloaded and unpacked
/// under `dir`; returns the unpacked root.
fn fetch_kernel(pattern: &str, dir: &Path) -> Result<PathBuf> {
    let names = out(Command::new("apt-cache").args(["search", "--names-only", pattern]))?;
    let mut pkgs: Vec<String> = names
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    pkgs.sort_by_key(|a| version_key(a));
    let Some(pkg) = pkgs.pop() else {
        bail!("no kernel package matches {pattern} (apt-get update?)");
    };
    let root = dir.join(&pkg);
    if root.join("boot").exists() {
        return Ok(root);
    }
    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    if !fs::read_dir(&debs)?.flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .starts_with(&format!("{pkg}_"))
    }) {
        eprintln!("xtask: downloading {pkg}");
        setup::status(
            Command::new("apt-get")
                .args(["download", "-q", &pkg])
                .current_dir(&debs),
        )?;
    }
    let deb = fs::read_dir(&debs)?
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{pkg}_"))
        })
        .context("downloaded package")?
        .path();
    fs::create_dir_all(&root)?;
    setup::status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    Ok(root)
}

/// Numbers in a package name, for "newest".
fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Every shared library an ELF needs (ldd), with the loader.
fn libraries(elf: &Path) -> Vec<PathBuf> {
    let Ok(text) = out(Command::new("ldd").arg(elf)) else {
        return Vec::new(); // static
    };
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = l
                .split("=>")
                .nth(1)
                .unwrap_or(l)
                .split_whitespace()
                .next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Copies `src` into the image at the same absolute path (what the test binaries were
/// compiled to find), stripping debug info from ELF files to keep the image small.
fn install(root: &Path, src: &Path, strip: bool) -> Result<()> {
    // The path as given (ldd's /lib64/ld-linux-x86-64.so.2, not where a symlink leads):
    // that is where the loader and the binaries look.
    let dst = root.join(src.strip_prefix("/").unwrap_or(src));
    fs::create_dir_all(dst.parent().context("parent")?)?;
    if strip {
        setup::status(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(src)
                .arg(&dst),
        )?;
    } else {
        fs::copy(src, &dst)?;
    }
    Ok(())
}

/// The kernel test binaries (built now), by test target name.
fn test_binaries() -> Result<Vec<(String, PathBuf)>> {
    test_executables(&["mcp-guard-tests"], false)
}

/// The test binaries of `packages` (built now), by target name: integration tests only,
/// or (`units`) every test harness, unit tests of libraries and binaries included.
pub fn test_executables(packages: &[&str], units: bool) -> Result<Vec<(String, PathBuf)>> {
    let mut c = crate::cargo();
    c.args(["test", "--no-run", "--message-format=json"]);
    for p in packages {
        c.args(["-p", p]);
    }
    let o = c.stderr(Stdio::inherit()).output()?;
    if !o.status.success() {
        bail!("building the test binaries failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        // Without a JSON dependency: the fields we need are plain strings.
        let harness = if units {
            // Built with the test profile (a harness), not a binary the tests run.
            line.split("\"profile\":{")
                .nth(1)
                .and_then(|p| p.split('}').next())
                .is_some_and(|p| p.contains("\"test\":true"))
        } else {
            line.contains("\"kind\":[\"test\"]")
        };
        if !line.contains("\"reason\":\"compiler-artifact\"") || !harness {
            continue;
        }
        let field = |key: &str| {
            line.split(&format!("\"{key}\":\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .map(str::to_string)
        };
        if let (Some(name), Some(exe)) = (field("name"), field("executable")) {
            found.push((name, PathBuf::from(exe)));
        }
    }
    Ok(found)
}

/// Builds the initramfs for one kernel; returns its path.
fn initramfs(
    kernel_root: &Path,
    release: &str,
    work: &Path,
    bins: &[(String, PathBuf)],
) -> Result<PathBuf> {
    let root = work.join(format!("root-{release}"));
    let _ = fs::remove_dir_all(&root);
    for d in [
        "bin", "sbin", "proc", "sys", "dev", "run", "tmp", "etc", "var", "root",
    ] {
        fs::create_dir_all(root.join(d))?;
    }
    std::os::unix::fs::symlink("/run", root.join("var/run"))?;
    // Users and groups as a Debian system has them, for `exec --user nobody` (glibc
    // reads these files without any NSS module).
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    )?;
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    // busybox and its applets.
    let busybox = which("busybox")?;
    fs::copy(&busybox, root.join("bin/busybox"))?;
    for applet in [
        "sh", "mount", "mkdir", "insmod", "poweroff", "cat", "echo", "sleep", "grep", "uname",
        "ln", "rm", "true", "hostname", "sync", "dmesg", "sed", "cut", "tail", "head",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    // Tools and their libraries, at their own paths (PATH covers them).
    let mut elves: BTreeSet<PathBuf> = BTreeSet::new();
    // curl: software nobody here wrote, for the tests that use it as the client.
    for tool in ["ip", "nsenter", "bpftool", "curl"] {
        elves.insert(which(tool)?);
    }
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/debug")
        .canonicalize()?;
    let mut ours: Vec<PathBuf> = vec![target.join("mcp-guard"), target.join("mcpg-probe")];
    let wanted: BTreeSet<&str> = TESTS.iter().map(|(b, _)| *b).collect();
    for (name, exe) in bins {
        if wanted.contains(name.as_str()) {
            ours.push(exe.clone());
        }
    }
    let needed: Vec<PathBuf> = ours
        .iter()
        .chain(elves.iter())
        .flat_map(|e| libraries(e))
        .collect();
    elves.extend(needed);
    for e in &elves {
        install(&root, e, false)?;
    }
    for e in &ours {
        install(&root, e, true)?;
    }
    // The event schema the tests validate against (a path compiled into them).
    let schema =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../mcp-guard/schema/event-v1.schema.json");
    install(&root, &schema, false)?;
    // Paths the tests resolve at run time: `tests/../mcp-guard/...` needs `tests`.
    let tests_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests")
        .canonicalize()?;
    fs::create_dir_all(root.join(tests_dir.strip_prefix("/").unwrap_or(&tests_dir)))?;
    // Kernel modules, dependencies first, decompressed for busybox insmod. The package
    // carries no modules.dep (its postinst makes one): make it.
    setup::status(
        Command::new("depmod")
            .arg("-b")
            .arg(kernel_root)
            .arg(release),
    )?;
    let mut insmods = Vec::new();
    for m in MODULES {
        let deps = out(Command::new("modprobe").arg("-d").arg(kernel_root).args([
            "-S",
            release,
            "--show-depends",
            m,
        ]))
        .with_context(|| format!("module {m} of kernel {release}"))?;
        for line in deps.lines().filter_map(|l| l.strip_prefix("insmod ")) {
            let src = PathBuf::from(line.trim());
            let rel = src.strip_prefix(kernel_root).unwrap_or(&src).to_path_buf();
            let name = rel.to_string_lossy().trim_end_matches(".xz").to_string();
            let dst = root.join(name.trim_start_matches('/'));
            if insmods.contains(&name) {
                continue;
            }
            fs::create_dir_all(dst.parent().context("parent")?)?;
            if src.extension().is_some_and(|e| e == "xz") {
                let data = Command::new("xz").arg("-dc").arg(&src).output()?.stdout;
                fs::write(&dst, data)?;
            } else {
                fs::copy(&src, &dst)?;
            }
            insmods.push(name);
        }
    }
    // /init: mount what the tests expect, load the modules, run each test, power off.
    // /tmp stays the image's own (a writable initramfs): the checkout, and so the test
    // binaries, may live under /tmp.
    let mut init = String::from(
        "#!/bin/sh\nexport PATH=/bin:/sbin:/usr/bin:/usr/sbin\nexport RUST_BACKTRACE=0 HOME=/root MCPG_READY_TIMEOUT=180\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
         mount -t tmpfs run /run\nchmod 1777 /tmp\n\
         mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         mount -t bpf bpf /sys/fs/bpf\nmount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null\n\
         mount -t securityfs securityfs /sys/kernel/security 2>/dev/null\n\
         echo 1 > /proc/sys/net/ipv4/ip_forward\n",
    );
    for m in &insmods {
        let _ = writeln!(init, "insmod {m} 2>/dev/null");
    }
    init.push_str("ip link set lo up\nhostname vm\necho \"VMINFO kernel $(uname -r) lsm $(cat /sys/kernel/security/lsm 2>/dev/null)\"\n");
    let only = std::env::var("MCPG_VM_TEST").unwrap_or_default();
    for (bin, test) in TESTS.iter().filter(|t| selected(t, &only)) {
        let exe = bins
            .iter()
            .find(|(n, _)| n == bin)
            .map(|(_, e)| fs::canonicalize(e))
            .transpose()?
            .with_context(|| format!("test binary {bin}"))?;
        let _ = writeln!(
            init,
            "out=$({exe} --exact {test} --test-threads=1 --nocapture 2>&1); rc=$?\n\
             echo \"$out\" | grep -E 'NEEDS|attack matrix|^  ' | sed 's/^/VMLOG {test}: /'\n\
             need=$(echo \"$out\" | grep -o 'NEEDS .*' | head -1 | cut -c7-)\n\
             if [ $rc -ne 0 ]; then echo \"$out\" | tail -40 | sed 's/^/VMFAIL {test}: /'; echo \"VMTEST {bin}::{test} FAIL\";\n\
             elif [ -n \"$need\" ]; then echo \"VMTEST {bin}::{test} NOT RUN: needs $need\";\n\
             else echo \"VMTEST {bin}::{test} PASS\"; fi",
            exe = exe.display()
        );
    }
    init.push_str("echo VMDONE\nsync\npoweroff -f\n");
    let init_path = root.join("init");
    fs::write(&init_path, init)?;
    fs::set_permissions(
        &init_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let image = work.join(format!("initrd-{release}.gz"));
    setup::status(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}",
        root.display(),
        image.display()
    )))?;
    Ok(image)
}

fn which(cmd: &str) -> Result<PathBuf> {
    let p = out(Command::new("sh").args(["-c", &format!("command -v {cmd}")]))?;
    Ok(fs::canonicalize(p.trim())?)
}

/// Whether KVM works here (the device exists and a VM can be created); else TCG.
fn kvm_usable() -> bool {
    Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "kvm",
            "-machine",
            "none",
            "-nographic",
            "-S",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "none",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut c| {
            std::thread::sleep(Duration::from_millis(1500));
            let alive = c.try_wait()?.is_none();
            let _ = c.kill();
            let _ = c.wait();
            Ok(alive)
        })
        .unwrap_or(false)
}

/// Boots one kernel; returns (test, result) lines.
fn boot(
    kernel: &Path,
    initrd: &Path,
    accel: &str,
    log: &Path,
    append: &str,
) -> Result<Vec<String>> {
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            // No network device: nothing a test sends can leave the VM.
            "-nic",
            "none",
            "-accel",
            accel,
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "3072",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 lsm=lockdown,capability,landlock,yama,bpf panic=-1 quiet {append}"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let deadline = Instant::now() + Duration::from_secs(20 * 60);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut all = String::new();
    let mut results = Vec::new();
    let mut done = false;
    let started = Instant::now();
    let mut booted = false;
    while Instant::now() < deadline {
        if !booted && accel.starts_with("kvm") && started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            bail!(KVM_STALLED);
        }
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(l) => {
                let l = l.trim_end_matches('\r').to_string();
                if l.starts_with("VMTEST ") || l.starts_with("VMINFO ") || l.starts_with("VMFAIL ")
                {
                    eprintln!("  {l}");
                }
                booted |= l.starts_with("VMINFO ");
                if let Some(r) = l.strip_prefix("VMTEST ") {
                    results.push(r.to_string());
                }
                if l == "VMDONE" {
                    done = true;
                }
                all.push_str(&l);
                all.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if child.try_wait()?.is_some() {
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    fs::write(log, &all)?;
    // KVM that fails at once ("KVM internal error") exits before the guest says
    // anything: retried under TCG like a stalled one.
    if !booted && accel.starts_with("kvm") {
        bail!(KVM_STALLED);
    }
    if !done {
        results.push(format!(
            "(boot) FAIL: the VM did not finish; serial log in {}",
            log.display()
        ));
    }
    Ok(results)
}

/// [`boot`], retried under TCG (for this and every later boot) when KVM stalls.
fn boot_or_fall_back(
    kernel: &Path,
    initrd: &Path,
    accel: &mut &'static str,
    log: &Path,
    append: &str,
) -> Result<Vec<String>> {
    match boot(kernel, initrd, accel, log, append) {
        Err(e) if e.to_string() == KVM_STALLED => {
            eprintln!("xtask: {KVM_STALLED}: falling back to TCG (software emulation)");
            *accel = "tcg,thread=multi";
            boot(kernel, initrd, accel, log, append)
        }
        r => r,
    }
}

/// Adds one boot's result lines to the summary; whether any failed or went missing.
fn record(
    summary: &mut Vec<String>,
    what: &str,
    results: Vec<String>,
    wanted: usize,
    log: &Path,
) -> bool {
    let mut failed = results.len() < wanted;
    if failed {
        summary.push(format!(
            "{what}: only {} of {wanted} results reported (serial log: {})",
            results.len(),
            log.display()
        ));
    }
    for r in results {
        failed |= r.contains("FAIL");
        summary.push(format!("{what} {r}"));
    }
    failed
}

/// The checks the systemd VM reports (systemd_vm.rs `TEST`).
const SYSTEMD_TESTS: usize = 5;

const KVM_STALLED: &str = "the VM said nothing under KVM (stalled for a minute or exited)";

/// Whether `MCPG_VM_TEST` selects a test: a part of "binary::test".
fn selected((bin, test): &&(&str, &str), filter: &str) -> bool {
    format!("{bin}::{test}").contains(filter)
}

pub fn run() -> Result<()> {
    setup::require_root("cargo xtask vm-test")?;
    setup::packages(PACKAGES)?;
    crate::build(false)?;
    let bins = test_binaries()?;
    let work = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/vm")
        .canonicalize()
        .or_else(|_| {
            let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/vm");
            fs::create_dir_all(&p)?;
            p.canonicalize()
        })?;
    // KVM when it works (here it hangs before the kernel prints anything, so a boot
    // that says nothing within a minute is retried under TCG).
    let mut accel = if kvm_usable() {
        "kvm"
    } else {
        "tcg,thread=multi"
    };
    eprintln!("xtask: vm-test with qemu accel {accel}");
    let mut summary = Vec::new();
    let mut failed = false;
    let mut newest = None;
    let only = std::env::var("MCPG_VM_KERNEL").unwrap_or_default();
    let filter = std::env::var("MCPG_VM_TEST").unwrap_or_default();
    let wanted_tests = TESTS.iter().filter(|t| selected(t, &filter)).count();
    // The systemd walkthrough: selected by an empty filter or one naming "systemd".
    let systemd = filter.is_empty() || filter.starts_with("systemd");
    // A filter that selects nothing would "pass" without running anything.
    if wanted_tests == 0 && !systemd {
        bail!("MCPG_VM_TEST={filter:?} selects none of the VM tests (it matches \"binary::test\", or \"systemd\")");
    }
    for (pattern, what) in KERNELS
        .iter()
        .filter(|(_, w)| only.is_empty() || w.split(' ').next() == Some(only.as_str()))
    {
        let root = fetch_kernel(pattern, &work)?;
        let vmlinuz = fs::read_dir(root.join("boot"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .context("vmlinuz in the kernel package")?;
        let release = vmlinuz
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("vmlinuz-")
            .to_string();
        newest = Some(vmlinuz.clone());
        if wanted_tests == 0 {
            continue;
        }
        eprintln!("xtask: kernel {release}: {what}");
        let initrd = initramfs(&root, &release, &work, &bins)?;
        let log = work.join(format!("serial-{release}.log"));
        let results = boot_or_fall_back(&vmlinuz, &initrd, &mut accel, &log, "")?;
        failed |= record(&mut summary, &release, results, wanted_tests, &log);
    }
    // README's quick start (docs/src/deploy-vm.md) on a real systemd, on the newest kernel.
    if systemd {
        let vmlinuz = newest.context("no kernel booted for the systemd VM")?;
        let tarball = crate::dist::run()?;
        let initrd = crate::systemd_vm::initramfs(&work, &tarball)?;
        let log = work.join("serial-systemd.log");
        eprintln!("xtask: systemd VM (Debian bookworm, systemd as init)");
        let append = "systemd.show_status=0 systemd.log_level=warning";
        let results = boot_or_fall_back(&vmlinuz, &initrd, &mut accel, &log, append)?;
        failed |= record(&mut summary, "systemd VM", results, SYSTEMD_TESTS, &log);
    }
    println!("\nkernel matrix:");
    for s in &summary {
        println!("  {s}");
    }
    // Tests a kernel's missing feature kept from running (tests/src `needs`: never on a
    // kernel that has it), counted apart from the passes.
    let not_run: Vec<&String> = summary.iter().filter(|s| s.contains("NOT RUN")).collect();
    println!(
        "vm-test: {} passed, {} not run (the kernel lacks the feature)",
        summary.iter().filter(|s| s.ends_with(" PASS")).count(),
        not_run.len()
    );
    for s in not_run {
        println!("  not run: {s}");
    }
    if failed {
        bail!("vm-test: a test failed on some kernel (serial logs under target/vm)");
    }
    println!("vm-test: every test passed on every kernel");
    Ok(())
}
