use std::{
    io::{BufRead, Write as _},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use mcp_guard::{api::client, config, daemon, policy::Verdict, telemetry::events::JsonEvent};

mod approvals;
mod check;
mod explain;
mod status;
use explain::explain;

/// Where every subcommand looks for the config unless given `--config` or
/// `MCP_GUARD_CONFIG`.
const DEFAULT_CONFIG: &str = "/etc/mcp-guard/config.toml";

/// Egress guard for MCP servers: per-workload allowlists enforced in the kernel.
#[derive(Parser)]
#[command(
    name = "mcp-guard",
    version,
    about,
    after_help = "Environment:\n  MCP_GUARD_CONFIG      the config file (default /etc/mcp-guard/config.toml)\n  MCP_GUARD_LOG         log filter, tracing's EnvFilter syntax (default info), e.g. debug or mcp_guard::dns=debug\n  MCP_GUARD_LOG_FORMAT  text or json (as --log-format)\n\nLogs go to stderr; colours only when stderr is a terminal."
)]
struct Cli {
    /// Log lines on stderr as text (colours only on a terminal) or as JSON objects.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MCP_GUARD_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load and attach the programs, enforce the policy, report denials; stays in the foreground.
    Run {
        #[arg(long, short, env = "MCP_GUARD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a config and print the compiled policy.
    Check {
        #[arg(long, short, env = "MCP_GUARD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Fail (exit 1) when the config draws a warning (a dangerous or meaningless
        /// policy), not only when it is invalid.
        #[arg(long)]
        strict: bool,
        /// One JSON document on stdout: valid, errors and warnings (file, line, message),
        /// workloads, rules, map entries. Same exit codes.
        #[arg(long)]
        json: bool,
    },
    /// Show the verdict for one destination and the rule that decided. Exit code: 0 ALLOW,
    /// 1 DENY, 2 a bad config, workload or destination.
    Explain {
        #[arg(long, short, env = "MCP_GUARD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long, short)]
        workload: String,
        /// ADDR:PORT[/tcp|/udp], IPv6 as [ADDR]:PORT, NAME:PORT, or an AF_UNIX address
        /// (/path, @abstract-name)
        dest: String,
        /// One JSON document on stdout (verdict, each address judged with its reason and
        /// rule, notes); the same exit codes. Errors stay on stderr.
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a workload's cgroup (created if needed), once a running daemon enforces it.
    Exec {
        #[arg(long, short, env = "MCP_GUARD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long, short)]
        workload: String,
        /// Run even if no daemon is enforcing the workload (the command is NOT guarded).
        #[arg(long)]
        unguarded: bool,
        /// Do not harden the command (by default it loses every capability, runs in a
        /// mount namespace where the cgroup tree and bpffs are read-only and local
        /// deputies' sockets are covered, and a seccomp filter refuses AF_PACKET, AF_XDP
        /// and AF_VSOCK sockets and io_uring).
        #[arg(long)]
        no_hardening: bool,
        /// A capability the command keeps (repeatable; by default it keeps none, root
        /// included), e.g. CAP_NET_BIND_SERVICE. Those that go around the guard are refused.
        #[arg(
            long = "keep-cap",
            value_name = "NAME",
            conflicts_with = "no_hardening"
        )]
        keep_cap: Vec<String>,
        /// Run the command as this user (a name or a numeric UID), with the user's
        /// primary and supplementary groups: a non-root command cannot write the cgroup
        /// tree or reach root-only sockets at all.
        #[arg(long, value_name = "USER", conflicts_with = "no_hardening")]
        user: Option<String>,
        /// Run the command with this primary group (a name or a numeric GID).
        #[arg(long, value_name = "GROUP", conflicts_with = "no_hardening")]
        group: Option<String>,
        /// The command is an MCP server on the stdio transport: relay its messages, run it
        /// in a cgroup of its own below the workload's, and tell the daemon about every
        /// tools/call (events name the tool; `tools = [...]` rules apply during calls).
        #[arg(long, conflicts_with = "mcp_http")]
        mcp: bool,
        /// The command is an MCP server on the Streamable HTTP transport listening on
        /// --upstream: serve its clients on this address through a proxy outside its
        /// guard that tells the daemon about every tools/call, as --mcp does for stdio.
        #[arg(long, value_name = "LISTEN", requires = "upstream")]
        mcp_http: Option<std::net::SocketAddr>,
        /// With --mcp-http: where the server listens (e.g. 127.0.0.1:8001).
        #[arg(long, value_name = "ADDR", requires = "mcp_http")]
        upstream: Option<std::net::SocketAddr>,
        /// With --mcp or --mcp-http: a call with no answer after this many seconds counts
        /// as ended (its tools are no longer active).
        #[arg(long, default_value_t = 300)]
        call_timeout: u64,
        #[arg(required = true, last = true)]
        cmd: Vec<String>,
    },
    /// A Streamable HTTP proxy in front of an MCP server started elsewhere (a systemd
    /// unit, say) whose processes run in INSTANCE, a cgroup below the workload's: tells
    /// the daemon about every tools/call, as `exec --mcp-http` does.
    McpProxy {
        #[arg(long, short, env = "MCP_GUARD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long, short, required_unless_present = "container")]
        workload: Option<String>,
        /// The server's cgroup, below the mount (e.g. /mcp.slice/fetch.service/server).
        #[arg(long, value_name = "CGROUP", required_unless_present = "container")]
        instance: Option<String>,
        /// In a pod: the proxy is the pod's sidecar container (its workload's
        /// pods.mcp_proxy) and the server is container NAME of the same pod; the daemon
        /// finds both from the sidecar's peer credentials. No config file is read.
        #[arg(long, value_name = "NAME", conflicts_with_all = ["workload", "instance"])]
        container: Option<String>,
        /// With --container: the daemon's MCP socket, as mounted in the sidecar.
        #[arg(long, value_name = "PATH", requires = "container", default_value = mcp_guard::mcp::wire::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Where the proxy serves the server's clients.
        #[arg(long, value_name = "LISTEN")]
        listen: std::net::SocketAddr,
        /// Where the server listens.
        #[arg(long, value_name = "ADDR")]
        upstream: std::net::SocketAddr,
        /// A call with no answer after this many seconds counts as ended.
        #[arg(long, default_value_t = 300)]
        call_timeout: u64,
    },
    /// Wait until the kernel enforces a workload's cgroup (read from the pinned state, as
    /// exec does); exit 0 then, 1 after --wait seconds. For a systemd unit's
    /// `ExecStartPre=+`, so an MCP server never starts unguarded.
    Enforced {
        #[arg(long, short, env = "MCP_GUARD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long, short)]
        workload: String,
        /// Seconds to wait for the daemon to enforce the workload.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// (Internal: the server side of `exec --mcp`.) Joins a cgroup, hardens, runs the command.
    #[command(hide = true)]
    ExecInstance {
        #[arg(long)]
        cgroup_dir: PathBuf,
        #[arg(long)]
        no_hardening: bool,
        /// A socket to cover in the command's mount namespace (repeatable).
        #[arg(long)]
        hide: Vec<PathBuf>,
        /// A capability the command keeps (repeatable).
        #[arg(long = "keep-cap")]
        keep_cap: Vec<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        group: Option<String>,
        #[arg(required = true, last = true)]
        cmd: Vec<String>,
    },
    /// Detach every program and remove every pinned map and link (stop the daemon first).
    Uninstall {
        /// Config whose [daemon] pin_dir to clean; or give --pin-dir.
        #[arg(long, short, env = "MCP_GUARD_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// What the running daemon enforces: readiness, programs, policy generation, BPF LSM,
    /// the container runtime, MCP instances, DNS and each workload. Exit code: 0 ready,
    /// 1 not ready, 2 no daemon answers.
    Status {
        /// Config of the daemon (its daemon.control_socket is used); or give --socket.
        #[arg(long, short, env = "MCP_GUARD_CONFIG")]
        config: Option<PathBuf>,
        /// The daemon's control socket (default /run/mcp-guard/control.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The status document as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (mcp-guard.1 and one per subcommand) into a directory.
    Man {
        /// Directory to write into (created if needed).
        dir: PathBuf,
    },
    /// Follow denied-flow events of a running daemon.
    Events {
        /// Config of the daemon (its daemon.control_socket is used); or give --socket.
        #[arg(long, short, env = "MCP_GUARD_CONFIG")]
        config: Option<PathBuf>,
        /// The daemon's control socket (default /run/mcp-guard/control.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        workload: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        /// Also show recent events (the daemon keeps the last 10,000): 30s, 5m, 2h, 1d.
        #[arg(long, value_parser = parse_since)]
        since: Option<Duration>,
        /// One JSON object per line instead of the human-readable form.
        #[arg(long)]
        json: bool,
    },
    /// Tool calls held for approval (`[workload.mcp] approval_tools`): list, approve,
    /// deny. Needs the control socket (root, or daemon.control_group); only members of
    /// the workload's `approvers` groups (and root) may decide.
    Approvals {
        /// Config of the daemon (its daemon.control_socket is used); or give --socket.
        #[arg(long, short, env = "MCP_GUARD_CONFIG", global = true)]
        config: Option<PathBuf>,
        /// The daemon's control socket (default /run/mcp-guard/control.sock).
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
        #[command(subcommand)]
        action: approvals::Action,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("MCP_GUARD_LOG")
            .unwrap_or_else(|_| "info".into())
    };
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter());
    match cli.log_format {
        // Colours only for a person at a terminal, never into journald or a file.
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => fmt.json().flatten_event(true).init(),
    }
    let result = match cli.cmd {
        Cmd::Run { config } => {
            // A reload asked for while the daemon boots must not end it (SIGHUP's default
            // action) nor interrupt the verifier (a caught signal does: EAGAIN). Ignored
            // until the daemon's handler takes over just before ready; a config change
            // during boot is seen by the file check.
            // SAFETY: setting a signal's disposition to SIG_IGN before any thread starts.
            unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(daemon::run(config)))
        }
        Cmd::Check {
            config,
            strict,
            json,
        } => return check::run(&config, strict, json),
        Cmd::Explain {
            config,
            workload,
            dest,
            json,
        } => match explain(&config, &workload, &dest, json) {
            Ok(Verdict::Deny) => return ExitCode::from(1),
            other => other.map(|_| ()),
        },
        Cmd::McpProxy {
            config,
            workload,
            instance,
            container,
            socket,
            listen,
            upstream,
            call_timeout,
        } => {
            let target = match (container, workload, instance) {
                (Some(c), _, _) => mcp_guard::exec::ProxyTarget::Container { name: c, socket },
                (None, Some(w), Some(i)) => mcp_guard::exec::ProxyTarget::Cgroup {
                    config,
                    workload: w,
                    instance: i,
                },
                _ => unreachable!("clap requires --container or --workload and --instance"),
            };
            return match mcp_guard::exec::mcp_proxy(
                target,
                listen,
                upstream,
                Duration::from_secs(call_timeout),
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Cmd::Enforced {
            config,
            workload,
            wait,
        } => {
            return match mcp_guard::exec::wait_enforced(
                &config,
                &workload,
                Duration::from_secs(wait),
            ) {
                Ok(()) => {
                    println!("workload {workload:?} is enforced by the kernel");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Exec {
            config,
            workload,
            unguarded,
            no_hardening,
            keep_cap,
            user,
            group,
            mcp,
            mcp_http,
            upstream,
            call_timeout,
            cmd,
        } => {
            let h = mcp_guard::exec::Harden {
                keep_cap: &keep_cap,
                user: user.as_deref(),
                group: group.as_deref(),
            };
            let harden = (!no_hardening).then_some(&h);
            if mcp || mcp_http.is_some() {
                let transport = match (mcp_http, upstream) {
                    (Some(listen), Some(upstream)) => {
                        mcp_guard::exec::Transport::Http { listen, upstream }
                    }
                    _ => mcp_guard::exec::Transport::Stdio,
                };
                return match mcp_guard::exec::exec_mcp(
                    &config,
                    &workload,
                    unguarded,
                    harden,
                    Duration::from_secs(call_timeout),
                    &transport,
                    &cmd,
                ) {
                    Ok(code) => ExitCode::from(code),
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        ExitCode::from(2)
                    }
                };
            }
            mcp_guard::exec::exec(&config, &workload, unguarded, harden, &cmd)
        }
        Cmd::ExecInstance {
            cgroup_dir,
            no_hardening,
            hide,
            keep_cap,
            user,
            group,
            cmd,
        } => mcp_guard::exec::exec_in(
            &cgroup_dir,
            (!no_hardening).then_some(&mcp_guard::exec::Harden {
                keep_cap: &keep_cap,
                user: user.as_deref(),
                group: group.as_deref(),
            }),
            &hide,
            &cmd,
        ),
        Cmd::Uninstall { config, pin_dir } => uninstall(config, pin_dir),
        Cmd::Status {
            config,
            socket,
            json,
        } => {
            return match status::status(config, socket, json) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "mcp-guard",
                &mut script,
            );
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => other.map_err(Into::into),
            }
        }
        Cmd::Man { dir } => status::man_pages(&<Cli as clap::CommandFactory>::command(), &dir),
        Cmd::Events {
            config,
            socket,
            workload,
            reason,
            since,
            json,
        } => events(config, socket, workload, reason, since, json),
        Cmd::Approvals {
            config,
            socket,
            action,
        } => status::control_socket(config, socket).and_then(|s| approvals::run(&s, action)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn uninstall(config: Option<PathBuf>, pin_dir: Option<PathBuf>) -> Result<()> {
    let dir = match (pin_dir, config) {
        (Some(d), _) => d,
        (None, Some(c)) => config::load(&c)?.pin_dir,
        (None, None) => PathBuf::from(config::DEFAULT_PIN_DIR),
    };
    if !dir.exists() {
        println!("nothing pinned under {}", dir.display());
        return Ok(());
    }
    let removed = mcp_guard::kernel::pins::Pins::new(&dir)
        .uninstall()
        .with_context(|| format!("removing {}", dir.display()))?;
    for r in &removed {
        println!("removed {r}");
    }
    println!(
        "mcp-guard uninstalled from {}: no program, link or map of it remains pinned",
        dir.display()
    );
    Ok(())
}

/// Returns how many warnings the config drew.
pub(crate) fn parse_since(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: use a number and a unit, e.g. 30s, 5m, 2h, 1d"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

fn events(
    config: Option<PathBuf>,
    socket: Option<PathBuf>,
    workload: Option<String>,
    reason: Option<String>,
    since: Option<Duration>,
    json: bool,
) -> Result<()> {
    let addr = client::Endpoint::Control(status::control_socket(config, socket)?);
    let mut q = Vec::new();
    if let Some(w) = &workload {
        q.push(format!("workload={w}"));
    }
    if let Some(r) = &reason {
        q.push(format!("reason={r}"));
    }
    if let Some(d) = since {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        q.push(format!("since={}", now.saturating_sub(d).as_secs()));
    }
    let path = if q.is_empty() {
        "/events".to_string()
    } else {
        format!("/events?{}", q.join("&"))
    };
    let stream = client::get(&addr, &path)
        .with_context(|| format!("no mcp-guard daemon answers on {addr}"))?;
    let mut out = std::io::stdout().lock();
    for line in stream.lines() {
        let line = line?;
        let text = if json {
            line
        } else {
            let Ok(e) = serde_json::from_str::<JsonEvent>(&line) else {
                continue;
            };
            human_event(&e)
        };
        // A reader that went away (`| head`) ends the stream quietly.
        match writeln!(out, "{text}").and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One event as a line for people.
fn human_event(e: &JsonEvent) -> String {
    let suppressed = if e.suppressed > 0 {
        format!(" (+{} suppressed)", e.suppressed)
    } else {
        String::new()
    };
    if e.hook == "dns" && e.dns_type.is_some() {
        return format!(
            "{} REFUSED {} DNS query {} {} from {}:{} over {} reason={}{suppressed}",
            e.time,
            e.workload.as_deref().unwrap_or("(no workload)"),
            e.name.as_deref().unwrap_or("?"),
            e.dns_type.as_deref().unwrap_or("?"),
            e.src.as_deref().unwrap_or("?"),
            e.sport,
            e.proto,
            e.reason,
        );
    }
    if e.hook == "dns" {
        return format!(
            "{} REFUSED {} DNS answer {} = {} via the {} reason={}{suppressed}",
            e.time,
            e.workload.as_deref().unwrap_or("?"),
            e.name.as_deref().unwrap_or("?"),
            e.dst,
            e.dns_source.as_deref().unwrap_or("?"),
            e.reason,
        );
    }
    let mcp = e
        .mcp
        .as_ref()
        .map_or_else(String::new, |m| match (&m.tool, &m.request_id) {
            (Some(t), Some(id)) => format!(" tool={t} request={id}"),
            _ => " tool=(none: no call in flight)".to_string(),
        });
    let pod = e.pod.as_ref().map_or_else(String::new, |p| {
        format!(
            " pod={}/{}{}",
            p.namespace,
            p.name,
            p.container
                .as_deref()
                .map_or_else(String::new, |c| format!(" container={c}"))
        )
    });
    format!(
        "{} {} {} {} pid={} comm={} -> {}/{} reason={} hook={}{pod}{mcp}{suppressed}",
        e.time,
        e.verdict.to_uppercase(),
        e.workload.as_deref().unwrap_or("?"),
        e.cgroup.as_deref().unwrap_or(""),
        e.tgid,
        e.comm,
        e.dst.parse::<IpAddr>().map_or_else(
            |_| "(socket creation)".to_string(),
            |ip| SocketAddr::new(ip, e.dport).to_string()
        ),
        e.proto,
        e.reason,
        e.hook,
    )
}
