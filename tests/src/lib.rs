//! Harness for mcp-guard's kernel integration tests.
//!
//! Safety rule: every packet stays inside a network namespace a test created. The
//! metadata, internal and "public" addresses a test uses are bound to that namespace's
//! own `lo`; the namespace has no other interface, so nothing can leave the machine.
//! Every guard cleans up on drop, also when the test panics.

pub mod cri;
pub mod upgrade;

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: tests run in parallel.
#[must_use]
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Entries `PREFIX-PID-N` of `dir` whose test process is gone: a process killed outright
/// (SIGKILL, a CI timeout) never runs its guards' `Drop`. The next test run removes them.
fn stale(dir: &Path, prefix: &str) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid: u32 = name.strip_prefix(prefix)?.split('-').next()?.parse().ok()?;
            (!Path::new(&format!("/proc/{pid}")).exists()).then(|| (name, e.path()))
        })
        .collect()
}

fn reap_stale_namespaces() {
    for (name, _) in stale(Path::new("/run/netns"), "mcpg-") {
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh network namespace with only `lo`, up.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    #[must_use]
    pub fn new() -> Self {
        reap_stale_namespaces();
        let name = unique("mcpg");
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Binds an address to this namespace's `lo`.
    pub fn add_addr(&self, ip: &str) {
        let ip: IpAddr = ip.parse().expect("address");
        let cidr = if ip.is_ipv4() {
            format!("{ip}/32")
        } else {
            format!("{ip}/128")
        };
        let mut args = vec!["-n", &self.name, "addr", "add", &cidr, "dev", "lo"];
        if ip.is_ipv6() {
            args.push("nodad");
        }
        run("ip", &args);
    }

    /// Runs `f` on a thread that has entered this namespace (setns is per thread).
    pub fn in_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns_at(&self.path(), f)
    }

    /// Runs `ip -n NS ARGS...`.
    /// Sets a per-namespace sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        self.in_ns(move || {
            std::fs::write(&path, &value).unwrap_or_else(|e| panic!("{path} = {value}: {e}"));
        });
    }

    pub fn ip(&self, args: &str) {
        let mut v = vec!["-n", &self.name];
        v.extend(args.split_whitespace());
        run("ip", &v);
    }

    /// A veth pair between this namespace (`mine`) and `other` (`theirs`), both up.
    pub fn veth(&self, mine: &str, other: &NetNs, theirs: &str) {
        self.ip(&format!(
            "link add {mine} type veth peer name {theirs} netns {}",
            other.name
        ));
        self.ip(&format!("link set {mine} up"));
        other.ip(&format!("link set {theirs} up"));
    }

    /// Counts UDP datagrams arriving at `addr` inside the namespace.
    pub fn udp_counter(&self, addr: &str) -> Arc<std::sync::atomic::AtomicU64> {
        let sa: SocketAddr = addr.parse().expect("socket address");
        let sock = self.in_ns(move || {
            std::net::UdpSocket::bind(sa).unwrap_or_else(|e| panic!("bind {sa}: {e}"))
        });
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = count.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while sock.recv(&mut buf).is_ok() {
                c.fetch_add(1, Ordering::SeqCst);
            }
        });
        count
    }

    /// How many TCX programs named `name` run at `interface`'s egress in this namespace.
    /// A failed query fails the test, never reads as "nothing attached".
    #[must_use]
    pub fn tcx_programs(&self, interface: &'static str, name: &'static str) -> usize {
        self.in_ns(move || {
            aya::programs::SchedClassifier::query_tcx(
                interface,
                aya::programs::TcAttachType::Egress,
            )
            .map(|(_, progs)| {
                progs
                    .iter()
                    .filter(|p| p.name_as_str() == Some(name))
                    .count()
            })
            .unwrap_or_else(|e| panic!("querying the TCX programs of {interface}: {e}"))
        })
    }

    /// A TCP listener inside the namespace that accepts and closes connections forever.
    pub fn listen_tcp(&self, addr: &str) {
        self.serve_tcp(addr, "");
    }

    /// A TCP listener inside the namespace that answers every connection with `reply`
    /// (after reading what the client sent first, if anything, within 200 ms). It lives
    /// until the process exits; deleting the namespace does not stop it.
    pub fn serve_tcp(&self, addr: &str, reply: &'static str) {
        serve_tcp_at(&self.path(), addr, reply);
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The cgroup v2 mount, from mountinfo.
#[must_use]
/// Runs `f` on a thread that has entered the network namespace at `path` (setns is per
/// thread): a pod's namespace, made by its runtime.
pub fn in_netns_at<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns file");
        // SAFETY: valid netns fd; only this thread changes namespace.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        f()
    })
    .join()
    .expect("netns thread")
}

/// A TCP listener inside the network namespace at `path` that accepts and closes every
/// connection (see [`NetNs::serve_tcp`]).
pub fn listen_tcp_at(path: &Path, addr: &str) {
    serve_tcp_at(path, addr, "");
}

fn serve_tcp_at(path: &Path, addr: &str, reply: &'static str) {
    let sa: SocketAddr = addr.parse().expect("socket address");
    let listener = in_netns_at(path, move || {
        TcpListener::bind(sa).unwrap_or_else(|e| panic!("bind {sa}: {e}"))
    });
    // A deep accept queue: benchmarks connect thousands of times in a row, and a
    // queue that overflows turns into seconds of SYN retransmission.
    // SAFETY: listen(2) again on our own listening socket only resizes its queue.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
    std::thread::spawn(move || {
        for mut s in listener.incoming().map_while(Result::ok) {
            if !reply.is_empty() {
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let mut buf = [0u8; 512];
                let _ = std::io::Read::read(&mut s, &mut buf);
                let _ = s.write_all(reply.as_bytes());
            }
        }
    });
}

pub fn cgroup_mount() -> PathBuf {
    mcp_guard::host::cgroup::mount_point().expect("cgroup v2 must be mounted on this machine")
}

/// A fresh cgroup subtree below the v2 mount; removed (processes killed) on drop.
pub struct TestCgroup {
    /// Path below the mount, e.g. "/mcpg-123-0".
    pub rel: String,
    pub dir: PathBuf,
}

impl TestCgroup {
    #[must_use]
    pub fn new() -> Self {
        for (_, dir) in stale(&cgroup_mount(), "mcpg-test-") {
            remove_tree(&dir);
        }
        let rel = format!("/{}", unique("mcpg-test"));
        let dir = cgroup_mount().join(rel.trim_start_matches('/'));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Self { rel, dir }
    }

    /// Creates a child cgroup and returns its (relative path, directory).
    pub fn child(&self, name: &str) -> (String, PathBuf) {
        let rel = format!("{}/{name}", self.rel);
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir child cgroup");
        (rel, dir)
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

/// Kills a cgroup's processes and removes it with its children.
pub fn remove_cgroup_tree(dir: &Path) {
    remove_tree(dir);
}

fn remove_tree(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_tree(&self.dir);
    }
}

/// The mcp-guard binary of this build (target/<profile>/mcp-guard), or $MCP_GUARD_BIN.
#[must_use]
pub fn guard_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MCP_GUARD_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("mcp-guard");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build -p mcp-guard` first (`cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// The Python environment holding the official MCP SDK (`mcp`) and the reference fetch
/// server (`mcp-server-fetch`) from PyPI: $MCPG_MCP_VENV, or target/mcp-venv, which
/// `cargo xtask test` creates. Missing is a failure, never a skip.
#[must_use]
pub fn mcp_venv() -> PathBuf {
    let venv = std::env::var_os("MCPG_MCP_VENV").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/mcp-venv"),
        PathBuf::from,
    );
    assert!(
        venv.join("bin/mcp-server-fetch").exists() && venv.join("bin/python").exists(),
        "{}: no Python environment with the MCP SDK and mcp-server-fetch: `cargo xtask test` creates it (or set MCPG_MCP_VENV)",
        venv.display()
    );
    venv
}

/// A file of the tests' Python helpers (tests/mcp).
#[must_use]
pub fn mcp_helper(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp").join(name)
}

/// A command that runs what follows in `ns`'s network namespace; with `resolv`, also in
/// a mount namespace of its own where that file is /etc/resolv.conf, so lookups (glibc's
/// getaddrinfo) go where the caller says. Add the program and its arguments.
#[must_use]
pub fn in_netns(ns: &NetNs, resolv: Option<&Path>) -> Command {
    let mut c = match resolv {
        Some(r) => {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                .arg("mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"")
                .arg(r)
                .arg("nsenter");
            c
        }
        None => Command::new("nsenter"),
    };
    c.arg(format!("--net={}", ns.path().display()));
    c
}

/// Whether the running kernel is at least MAJOR.MINOR.
#[must_use]
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = rel
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0)) >= (major, minor)
}

/// What a test may need that some kernels of the matrix lack. A test skips only through
/// [`needs`], which checks the kernel itself: a skip on a kernel that has the feature
/// cannot happen, and every skip is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// TC links through TCX (Linux 6.6), which can be pinned.
    Tcx,
    /// Something judges AF_UNIX destinations: the cgroup unix hooks (Linux 6.7) or BPF
    /// LSM (as the daemon `d` reports it).
    UnixJudged,
}

/// Whether the running kernel has `feature` (`daemon`: the daemon that reports it, for
/// the features only a daemon can tell). When it does not, the test is recorded as
/// skipped: "NEEDS ..." on stdout (the kernel matrix prints it as NOT RUN) and a line in
/// `$MCPG_SKIPS` (`cargo xtask test` prints them at the end). The caller returns.
#[must_use]
pub fn needs(test: &str, feature: Feature, daemon: Option<&Daemon>) -> bool {
    let (present, why) = match feature {
        Feature::Tcx => (kernel_at_least(6, 6), "TCX (kernel 6.6+)"),
        Feature::UnixJudged => {
            let d = daemon.expect("Feature::UnixJudged is told by a running daemon");
            (
                d.get("/metrics")
                    .contains("mcp_guard_unix_hooks_available 1"),
                "cgroup unix hooks (kernel 6.7+) or BPF LSM",
            )
        }
    };
    if !present {
        println!("NEEDS {why}: {test} did not run its checks on this kernel");
        if let Some(f) = std::env::var_os("MCPG_SKIPS") {
            use std::io::Write as _;
            if let Ok(mut out) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)
            {
                let _ = writeln!(out, "{test}: needs {why}");
            }
        }
    }
    present
}

/// A free loopback port for a daemon's listener.
#[must_use]
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A running `mcp-guard run`, with its stdout (events) and stderr (logs) collected. Its
/// pinned state lives in a bpffs directory of its own, removed on drop (also after a
/// kill -9), so no test leaks attached programs.
pub struct Daemon {
    child: Child,
    /// The binary it runs (this tree's, or an older build for upgrade tests).
    bin: PathBuf,
    pub config: PathBuf,
    pub listen: SocketAddr,
    /// The control socket (/status, /events, /dns), in the test's own directory.
    pub control: PathBuf,
    pub pin_dir: PathBuf,
    events: mpsc::Receiver<String>,
    pub stderr: Arc<Mutex<String>>,
    _dir: TempDir,
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    #[must_use]
    pub fn new() -> Self {
        let p = std::env::temp_dir().join(unique("mcpg-tmp"));
        std::fs::create_dir_all(&p).expect("tempdir");
        Self(p)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Adds the test's own pin directory (and, unless the config says otherwise,
/// `on_exit = "detach"`) to a config's [daemon] table.
fn with_pin_dir(config: &str, pin_dir: &Path, control: &Path) -> String {
    let mut extra = format!(
        "pin_dir = \"{}\"\ncontrol_socket = \"{}\"\nmcp_socket = \"{}\"\n",
        pin_dir.display(),
        control.display(),
        control.with_file_name("mcp.sock").display()
    );
    if !config.contains("on_exit") {
        extra.push_str("on_exit = \"detach\"\n");
    }
    let config = if config.contains("[daemon]\n") {
        config.replacen("[daemon]\n", &format!("[daemon]\n{extra}"), 1)
    } else {
        format!("{config}\n[daemon]\n{extra}")
    };
    // The TC classifier would attach to this machine's interfaces: only the tests that
    // are about it turn it on, in their own namespace.
    if config.contains("[tc]") {
        config
    } else {
        format!("{config}\n[tc]\nenabled = false\n")
    }
}

type Spawned = (Child, mpsc::Receiver<String>, Arc<Mutex<String>>);

impl Daemon {
    /// Writes `config` (with its own pin directory and `[metrics] listen`) and starts
    /// the daemon, waiting for its `ready` log line.
    #[must_use]
    pub fn start(config: &str) -> Self {
        Self::start_with(&guard_bin(), config)
    }

    /// [`Daemon::start`] with another `mcp-guard` binary (an older build: upgrades).
    #[must_use]
    pub fn start_with(bin: &Path, config: &str) -> Self {
        let dir = TempDir::new();
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        // Pins of a daemon whose test process was killed stay attached: remove them.
        for (_, stale_pins) in stale(Path::new("/sys/fs/bpf"), "mcpg-test-") {
            let _ = mcp_guard::kernel::pins::Pins::new(&stale_pins).uninstall();
        }
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique("mcpg-test"));
        let path = dir.0.join("config.toml");
        let control = dir.0.join("control.sock");
        let (child, events, stderr) = {
            let text = with_pin_dir(config, &pin_dir, &control);
            std::fs::write(&path, format!("{text}\n[metrics]\nlisten = \"{listen}\"\n"))
                .expect("write config");
            Self::spawn(bin, &path)
        };
        let mut d = Self {
            child,
            bin: bin.to_path_buf(),
            config: path,
            listen,
            control,
            pin_dir,
            events,
            stderr,
            _dir: dir,
        };
        d.wait_ready();
        d
    }

    /// Rewrites the config file, keeping the test's listener and pin directory.
    pub fn write_config(&self, config: &str) {
        let text = with_pin_dir(config, &self.pin_dir, &self.control);
        std::fs::write(
            &self.config,
            format!("{text}\n[metrics]\nlisten = \"{}\"\n", self.listen),
        )
        .expect("write config");
    }

    /// kill -9: the daemon gets no chance to clean up; its pins stay.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the daemon again on the same config and pin directory.
    pub fn restart(&mut self) {
        let bin = self.bin.clone();
        self.restart_with(&bin);
    }

    /// Starts `bin` (another build: an upgrade) on the same config and pin directory.
    pub fn restart_with(&mut self, bin: &Path) {
        self.bin = bin.to_path_buf();
        self.respawn();
        self.wait_ready();
    }

    /// Starts the process again (same binary, config and pins), not waiting for ready.
    fn respawn(&mut self) {
        let (child, events, stderr) = Self::spawn(&self.bin, &self.config);
        self.child = child;
        self.events = events;
        self.stderr = stderr;
    }

    /// Restarts the daemon while sending it SIGHUP every few milliseconds from the moment
    /// its process has taken SIGHUP over (ignored or caught: `/proc/PID/status`) until it
    /// logs ready; returns how many it sent. A daemon that dies of one panics here.
    pub fn restart_under_sighup(&mut self) -> usize {
        self.respawn();
        let status = format!("/proc/{}/status", self.child.id());
        let takes_hup = || {
            std::fs::read_to_string(&status).is_ok_and(|s| {
                s.lines()
                    .filter(|l| l.starts_with("SigIgn:") || l.starts_with("SigCgt:"))
                    .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
                    .any(|mask| mask & (1 << (libc::SIGHUP - 1)) != 0)
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !takes_hup() && Instant::now() < deadline {
            std::thread::yield_now();
        }
        let mut sent = 0;
        while !self
            .stderr
            .lock()
            .expect("log")
            .contains("ready: enforcing")
            && matches!(self.child.try_wait(), Ok(None))
            && Instant::now() < deadline + Duration::from_secs(30)
        {
            self.signal(libc::SIGHUP);
            sent += 1;
            std::thread::sleep(Duration::from_millis(3));
        }
        // And through the instant ready is logged.
        for _ in 0..20 {
            self.signal(libc::SIGHUP);
            sent += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        self.wait_ready();
        sent
    }

    fn wait_ready(&mut self) {
        // Slow machines (software-emulated VMs: `cargo xtask vm-test`) say how long.
        let secs = std::env::var("MCPG_READY_TIMEOUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30);
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if self
                .stderr
                .lock()
                .expect("log")
                .contains("ready: enforcing")
            {
                return;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!(
            "mcp-guard never became ready:\n{}",
            self.stderr.lock().expect("log")
        );
    }

    fn spawn(bin: &Path, config: &Path) -> Spawned {
        let mut child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .env("MCP_GUARD_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mcp-guard");
        let (tx, events) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().expect("stderr");
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut l = log.lock().expect("log");
                l.push_str(&line);
                l.push('\n');
            }
        });
        (child, events, stderr)
    }

    /// Event JSON lines received so far, plus any arriving within `wait`.
    pub fn events(&self, wait: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(l) => out.push(
                    serde_json::from_str(&l)
                        .unwrap_or_else(|e| panic!("event is not JSON ({e}): {l}")),
                ),
                Err(_) => return out,
            }
        }
    }

    /// Whether the daemon process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// GET a path on the daemon's control socket (which serves every path).
    #[must_use]
    pub fn get(&self, path: &str) -> String {
        mcp_guard::api::client::control_body(&self.control, path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// GET a path on the daemon's TCP listener (/metrics, /healthz, /readyz only).
    ///
    /// # Errors
    /// The listener refused or answered with an error status.
    pub fn get_tcp(&self, path: &str) -> std::io::Result<String> {
        mcp_guard::api::client::get_body(&mcp_guard::api::client::Endpoint::Tcp(self.listen), path)
    }

    /// The daemon's /status document.
    #[must_use]
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/status")).expect("status is JSON")
    }

    #[must_use]
    /// The pods `/status` lists as placed in `workload`.
    pub fn placed_pods(&self, workload: &str) -> Vec<serde_json::Value> {
        self.status()["workloads"]
            .as_array()
            .expect("workloads")
            .iter()
            .find(|w| w["name"] == workload)
            .and_then(|w| w["pod_list"].as_array().cloned())
            .unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: i32) {
        // SAFETY: plain syscall on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM, then wait; returns whether it exited successfully.
    pub fn stop(mut self) -> bool {
        self.terminate()
    }

    /// SIGTERM and wait, keeping the guard (and its pin directory) alive.
    pub fn terminate(&mut self) -> bool {
        self.signal(libc::SIGTERM);
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = mcp_guard::kernel::pins::Pins::new(&self.pin_dir).uninstall();
    }
}
/// A probe process inside a cgroup and a namespace, answering one socket op per line.
pub struct Probe {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Probe {
    #[must_use]
    pub fn new(probe_bin: &str, cgroup_dir: &Path, ns: &NetNs) -> Self {
        Self::at(probe_bin, cgroup_dir, &ns.path())
    }

    /// Like [`Probe::new`], with the namespace given by its path (for other threads).
    #[must_use]
    pub fn at(probe_bin: &str, cgroup_dir: &Path, netns_path: &Path) -> Self {
        let mut child = Command::new(probe_bin)
            .arg("--cgroup")
            .arg(cgroup_dir)
            .arg("--netns")
            .arg(netns_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn probe");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// A probe started by `mcp-guard exec --config CONFIG --workload WORKLOAD [EXTRA...]`
    /// (which joins the cgroup and hardens the process). It stays in the host's network
    /// namespace (exec asks the daemon over its loopback listener, and a hardened
    /// process cannot enter a namespace): use it for socket creation only, never to send.
    #[must_use]
    pub fn exec(probe_bin: &str, config: &Path, workload: &str, extra: &[&str]) -> Self {
        Self::exec_in(probe_bin, config, workload, extra, None)
    }

    /// Like [`Probe::exec`], with `mcp-guard exec` itself started inside `ns` (through
    /// `nsenter --net`, which leaves the mounts, and so the cgroup tree, alone): exec
    /// decides from the kernel's pinned state, so it needs no network to the daemon.
    #[must_use]
    pub fn exec_in(
        probe_bin: &str,
        config: &Path,
        workload: &str,
        extra: &[&str],
        ns: Option<&NetNs>,
    ) -> Self {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.path().display()))
                    .arg(guard_bin());
                c
            }
            None => Command::new(guard_bin()),
        };
        let mut child = cmd
            .arg("exec")
            .arg("--config")
            .arg(config)
            .args(["--workload", workload])
            .args(extra)
            .arg("--")
            .arg(probe_bin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn mcp-guard exec");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// Performs one operation, e.g. `probe.op("tcp 169.254.169.254 80")`.
    pub fn op(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("probe stdin");
        self.stdin.flush().expect("probe stdin");
        let mut out = String::new();
        self.stdout.read_line(&mut out).expect("probe stdout");
        assert!(!out.is_empty(), "probe exited on {line:?}");
        out.trim().to_string()
    }

    /// Performs many operations, pipelined.
    pub fn ops(&mut self, lines: &[String]) -> Vec<String> {
        let mut input = String::new();
        for l in lines {
            input.push_str(l);
            input.push('\n');
        }
        let mut stdin = self.stdin.try_clone_writer();
        let writer = std::thread::spawn(move || {
            stdin.write_all(input.as_bytes()).expect("probe stdin");
            stdin.flush().expect("probe stdin");
        });
        let out = (0..lines.len())
            .map(|_| {
                let mut s = String::new();
                self.stdout.read_line(&mut s).expect("probe stdout");
                s.trim().to_string()
            })
            .collect();
        writer.join().expect("writer");
        out
    }
}

trait CloneWriter {
    fn try_clone_writer(&self) -> std::fs::File;
}

impl CloneWriter for ChildStdin {
    fn try_clone_writer(&self) -> std::fs::File {
        // SAFETY: dup of our own pipe fd; the File owns the duplicate.
        let fd = unsafe { libc::dup(self.as_raw_fd()) };
        assert!(fd >= 0, "dup");
        // SAFETY: fd is a fresh duplicate we own.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A finished command's stdout and stderr, together, for assertion messages.
#[must_use]
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls until `f` returns true or the timeout passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A real DNS server (dnsmasq, from Debian's packages) on 127.0.0.1:53 inside a test
/// namespace, answering from a hosts file it re-reads on [`Dnsmasq::set_hosts`], with one
/// TTL for everything it answers. Killed on drop.
pub struct Dnsmasq {
    child: Child,
    netns: String,
    hosts: PathBuf,
    extra: Vec<String>,
    log: PathBuf,
    _dir: TempDir,
}

impl Dnsmasq {
    /// Starts dnsmasq in `ns` with `hosts` (lines "ADDR NAME") and `--address` rules
    /// such as "/cdn.example.test/151.101.1.10" (a name and everything below it).
    #[must_use]
    pub fn start(ns: &NetNs, hosts: &str, addresses: &[&str], ttl: u32) -> Self {
        let extra: Vec<String> = addresses.iter().map(|a| format!("--address={a}")).collect();
        Self::start_args(ns, hosts, &extra, ttl)
    }

    /// Like [`Dnsmasq::start`] with raw dnsmasq options (`--cname=...`, `--address=...`).
    /// Every query dnsmasq receives is logged ([`Dnsmasq::queries`]).
    #[must_use]
    pub fn start_args(ns: &NetNs, hosts: &str, extra: &[String], ttl: u32) -> Self {
        let dir = TempDir::new();
        let path = dir.0.join("hosts");
        std::fs::write(&path, hosts).expect("write hosts");
        let log = dir.0.join("queries.log");
        let mut d = Self {
            child: Command::new("true").spawn().expect("placeholder"),
            netns: ns.name.clone(),
            hosts: path,
            extra: extra.to_vec(),
            log,
            _dir: dir,
        };
        d.spawn(ttl);
        d
    }

    fn spawn(&mut self, ttl: u32) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.netns,
            "dnsmasq",
            "--keep-in-foreground",
        ])
        .args([
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
        ])
        .args([
            "--listen-address=127.0.0.1",
            "--port=53",
            "--user=root",
            "--pid-file=",
        ])
        .arg(format!("--addn-hosts={}", self.hosts.display()))
        .arg(format!("--local-ttl={ttl}"))
        .arg("--log-queries")
        .arg(format!("--log-facility={}", self.log.display()))
        .args(&self.extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        self.child = cmd
            .spawn()
            .expect("spawn dnsmasq (apt-get install dnsmasq-base)");
        let ns = self.netns.clone();
        let up = wait_until(Duration::from_secs(10), || {
            Command::new("ip")
                .args(["netns", "exec", &ns, "ss", "-Hlun", "sport", "= :53"])
                .output()
                .is_ok_and(|o| !o.stdout.is_empty())
        });
        assert!(up, "dnsmasq did not start listening on 127.0.0.1:53");
    }

    /// Replaces the hosts file and makes dnsmasq re-read it (SIGHUP).
    pub fn set_hosts(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).expect("write hosts");
        // SAFETY: plain syscall on our child's pid.
        unsafe { libc::kill(self.pid(), libc::SIGHUP) };
    }

    /// dnsmasq's own pid (the child is `ip netns exec`, which execs it).
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The queries dnsmasq received so far: one `query[TYPE] NAME from ADDR` per line.
    /// An unreadable log fails the test (it would read as "nothing reached dnsmasq").
    #[must_use]
    pub fn queries(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| panic!("dnsmasq log {}: {e}", self.log.display()))
            .lines()
            .filter_map(|l| l.split_once("query[").map(|(_, q)| format!("query[{q}")))
            .collect()
    }

    /// Restarts dnsmasq answering with another TTL.
    pub fn set_ttl(&mut self, ttl: u32) {
        self.spawn(ttl);
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DNS query for `name`'s A record with id `id` (recursion desired).
#[must_use]
pub fn dns_query(name: &str, id: u16) -> Vec<u8> {
    dns_query_type(name, id, 1)
}

/// A DNS query for `name` of type `qtype` (1 A, 28 AAAA, 16 TXT, 5 CNAME, ...).
#[must_use]
pub fn dns_query_type(name: &str, id: u16, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, one question
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0); // root
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]); // class IN
    q
}

/// Checks an event against the published schema (mcp-guard/schema/event-v1.schema.json).
pub fn assert_event_schema(e: &serde_json::Value) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../mcp-guard/schema/event-v1.schema.json"
    ))
    .expect("schema file");
    let v = jsonschema::validator_for(&serde_json::from_str(&text).expect("schema is JSON"))
        .expect("schema compiles");
    let errors: Vec<String> = v
        .iter_errors(e)
        .map(|err| format!("{err} at {}", err.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "event does not match the schema: {errors:#?}\n{e:#}"
    );
}

/// An unguarded client inside `ns`: connects from source address `from` to `to`, sends
/// "ping", and returns what the server answered (within 5 s), or the error.
pub fn exchange_from(ns: &NetNs, from: IpAddr, to: SocketAddr) -> std::io::Result<String> {
    use std::os::fd::FromRawFd as _;
    ns.in_ns(move || {
        let domain = if to.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: socket(2); the fd is owned by the TcpStream below.
        let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd, owned from here on.
        let s = unsafe { TcpStream::from_raw_fd(fd) };
        let bind = sockaddr(SocketAddr::new(from, 0));
        // SAFETY: bind(2) with a valid sockaddr.
        if unsafe { libc::bind(fd, (&raw const bind.0).cast(), bind.1) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let dst = sockaddr(to);
        // SAFETY: connect(2) with a valid sockaddr (SO_SNDTIMEO bounds it).
        if unsafe { libc::connect(fd, (&raw const dst.0).cast(), dst.1) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut s = s;
        s.write_all(b"ping\n")?;
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out)?;
        Ok(out)
    })
}

/// `sa` as a C socket address and its length.
#[must_use]
pub fn sockaddr(sa: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: a zeroed sockaddr_storage is valid; the right variant is filled.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match sa {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut st).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut st).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (st, len as libc::socklen_t)
}

/// A command that runs what follows in cgroup `cgroup_dir` and `ns`'s network namespace
/// (the cgroup joined first, then the namespace entered with nsenter, which leaves the
/// mounts alone). Add the program and its arguments.
#[must_use]
pub fn in_cgroup(cgroup_dir: &Path, ns: &NetNs) -> Command {
    in_cgroup_at(cgroup_dir, &ns.path())
}

/// [`in_cgroup`] with the network namespace given by its path (a pod's).
#[must_use]
pub fn in_cgroup_at(cgroup_dir: &Path, netns: &Path) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && n=\"$1\" && shift && exec nsenter --net=\"$n\" \"$@\"")
        .arg(cgroup_dir)
        .arg(netns);
    c
}

/// A process started by a test, killed (and reaped) when the test ends, also on failure.
pub struct Running(pub Child);

impl Running {
    /// Spawns `c` with its output kept in `log` (read it with [`Running::log`]).
    #[must_use]
    pub fn spawn(c: &mut Command, log: &Path) -> Self {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        Self(
            c.stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {c:?}: {e}")),
        )
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// curl GET `url` inside `ns` (from source address `src` if given); (exit code, body).
#[must_use]
pub fn curl_in(ns: &NetNs, src: Option<&str>, url: &str) -> (i32, String) {
    let mut c = in_netns(ns, None);
    c.args(["curl", "-sS", "-m", "5"]);
    if let Some(s) = src {
        c.args(["--interface", s]);
    }
    let out = c.arg(url).output().expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

/// The official MCP SDK's Streamable HTTP client (tests/mcp/http_client.py) inside `ns`:
/// a session with `url`, the tool calls `calls` (JSON), what it got as JSON. Panics if
/// the client itself failed, so a test cannot mistake that for a refusal.
#[must_use]
pub fn mcp_http_session(ns: &NetNs, url: &str, calls: &str) -> serde_json::Value {
    let out = in_netns(ns, None)
        .arg(mcp_venv().join("bin/python"))
        .arg(mcp_helper("http_client.py"))
        .arg(url)
        .args(["--calls", calls])
        .output()
        .expect("MCP client");
    assert!(
        out.status.success(),
        "the SDK client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("client JSON")
}

/// `mcp-guard approvals ...` as `uid` with `groups` (setpriv), or as root.
pub fn approvals_cli(
    d: &Daemon,
    as_user: Option<(u32, &str)>,
    args: &[&str],
) -> std::process::Output {
    let mut c = match as_user {
        Some((uid, groups)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg(format!("--groups={groups}"))
                .arg(guard_bin());
            c
        }
        None => Command::new(guard_bin()),
    };
    c.arg("approvals")
        .arg("--socket")
        .arg(&d.control)
        .args(args)
        .output()
        .expect("mcp-guard approvals")
}

/// The pending request of the next held call.
pub fn next_pending(d: &Daemon) -> String {
    let mut id = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            let out = approvals_cli(d, None, &["list", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            match v.as_array().and_then(|a| a.first()) {
                Some(r) => {
                    id = r["id"].as_str().unwrap_or_default().to_string();
                    true
                }
                None => false,
            }
        }),
        "no approval request was raised"
    );
    id
}
