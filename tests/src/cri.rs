//! A real containerd (Debian's package, with its CRI plugin and runc) for the pod tests,
//! driven over CRI the way the kubelet drives it. Everything is private to the test:
//! its own root, state and socket; the sandbox image is built here (a static `pause`
//! that doubles as a connect probe) and imported with `ctr`; the pod network is a CNI
//! plugin of ours that gives each pod a veth pair with both ends inside it, so nothing leaves the pod's
//! network namespace. Dropping it removes every pod, stops containerd and its shims,
//! and removes the cgroups runc made.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, ContainerConfig, ContainerMetadata,
    ContainerStatusRequest, CreateContainerRequest, ImageSpec, LinuxContainerConfig,
    LinuxPodSandboxConfig, Mount, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopPodSandboxRequest,
};
use tonic::transport::Channel;

use crate::TempDir;

pub const IMAGE: &str = "mcp-guard.test/pause:1";

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        crate::output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(path: &Path) -> String {
    run(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string()
}

/// Writes a blob into an OCI layout and returns (digest, size).
fn blob(layout: &Path, from: &Path) -> (String, u64) {
    let hex = sha256(from);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).expect("blobs");
    std::fs::copy(from, dir.join(&hex)).expect("copy blob");
    (
        format!("sha256:{hex}"),
        std::fs::metadata(from).expect("size").len(),
    )
}

/// Builds the test image (OCI layout tarball) in `dir` and returns its path.
fn build_image(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("pod/pause.c");
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).expect("rootfs");
    run(Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(rootfs.join("pause"))
        .arg(&src));
    let layer = dir.join("layer.tar");
    run(Command::new("tar")
        .args(["--owner=0", "--group=0", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("pause"));
    let layout = dir.join("oci");
    let (layer_digest, layer_size) = blob(&layout, &layer);
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Entrypoint": ["/pause"] },
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] }
        })
        .to_string(),
    )
    .expect("config");
    let (config_digest, config_size) = blob(&layout, &config);
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
            "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size }]
        })
        .to_string(),
    )
    .expect("manifest");
    let (manifest_digest, manifest_size) = blob(&layout, &manifest);
    std::fs::write(
        layout.join("index.json"),
        serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": { "io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "1" }
            }]
        })
        .to_string(),
    )
    .expect("index");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("layout");
    let tarball = dir.join("image.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tarball)
        .args(["oci-layout", "index.json", "blobs"]));
    tarball
}

pub struct Containerd {
    child: Option<Child>,
    pub socket: PathBuf,
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    /// Sandboxes made and not removed yet.
    sandboxes: Vec<String>,
    /// cgroup paths (below each hierarchy's mount) runc may have made for pods.
    pub pod_parents: Vec<String>,
    dir: TempDir,
}

/// One pod, as the kubelet would ask for it.
#[derive(Clone, Copy)]
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    pub annotations: &'a [(&'a str, &'a str)],
    /// The pod's cgroup (cgroupfs driver), below the cgroup mount.
    pub cgroup_parent: &'a str,
}

impl Containerd {
    /// Starts containerd with the CRI plugin and imports the test image.
    #[must_use]
    pub fn start() -> Self {
        let dir = TempDir::new();
        let d = &dir.0;
        let bin = d.join("cni-bin");
        let conf = d.join("cni-conf");
        std::fs::create_dir_all(&bin).expect("cni bin");
        std::fs::create_dir_all(&conf).expect("cni conf");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("pod/mcpg-dummy"),
            bin.join("mcpg-dummy"),
        )
        .expect("cni plugin");
        // containerd sets up each pod's loopback with the reference plugin.
        std::os::unix::fs::symlink("/usr/lib/cni/loopback", bin.join("loopback"))
            .expect("loopback plugin (Debian package containernetworking-plugins)");
        std::fs::write(
            conf.join("10-mcpg.conflist"),
            r#"{"cniVersion":"0.4.0","name":"mcpg","plugins":[{"type":"mcpg-dummy"}]}"#,
        )
        .expect("cni conflist");
        let socket = d.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  restrict_oom_score_adj = true  # this machine may not lower oom_score_adj (the pause container asks -998)
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
            bin = bin.display(),
            conf = conf.display(),
        );
        let config_path = d.join("containerd.toml");
        std::fs::write(&config_path, config).expect("containerd config");
        let log = std::fs::File::create(d.join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd (Debian package containerd) must be installed");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                std::fs::read_to_string(d.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let channel = rt
            .block_on(mcp_guard::pods::cri::channel(&socket))
            .expect("connect to containerd");
        let c = Self {
            child: Some(child),
            socket,
            rt,
            client: RuntimeServiceClient::new(channel),
            sandboxes: Vec::new(),
            pod_parents: Vec::new(),
            dir,
        };
        let image = build_image(&c.dir.0);
        run(Command::new("ctr")
            .arg("--address")
            .arg(&c.socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(&image));
        c
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) containerd: a runtime that hangs.
    pub fn freeze(&self, frozen: bool) {
        if let Some(c) = &self.child {
            let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// containerd's log so far, for assertion messages.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("containerd.log")).unwrap_or_default()
    }

    fn sandbox_config(&self, p: &PodSpec<'_>, uid: &str) -> PodSandboxConfig {
        let map = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect()
        };
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: p.name.into(),
                uid: uid.into(),
                namespace: p.namespace.into(),
                attempt: 0,
            }),
            hostname: p.name.into(),
            log_directory: self.dir.0.join("logs").join(uid).display().to_string(),
            labels: map(p.labels),
            annotations: map(p.annotations),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: p.cgroup_parent.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox; returns the sandbox id.
    pub fn run_pod(&mut self, p: &PodSpec<'_>) -> String {
        let uid = crate::unique("uid");
        let config = self.sandbox_config(p, &uid);
        self.pod_parents.push(p.cgroup_parent.to_string());
        let id = self
            .rt
            .block_on(self.client.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }))
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\ncontainerd log:\n{}", self.log()))
            .into_inner()
            .pod_sandbox_id;
        self.sandboxes.push(id.clone());
        id
    }

    /// The sandbox's network namespace (through its pause process).
    pub fn netns(&mut self, id: &str) -> PathBuf {
        let status = self
            .rt
            .block_on(self.client.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            }))
            .expect("PodSandboxStatus")
            .into_inner();
        let info: serde_json::Value =
            serde_json::from_str(status.info.get("info").expect("verbose info")).expect("json");
        let pid = info["pid"].as_u64().expect("sandbox pid");
        PathBuf::from(format!("/proc/{pid}/ns/net"))
    }

    /// StopPodSandbox and RemovePodSandbox.
    pub fn remove_pod(&mut self, id: &str) {
        let _ = self
            .rt
            .block_on(self.client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }));
        let _ = self
            .rt
            .block_on(self.client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }));
        self.sandboxes.retain(|s| s != id);
    }

    /// Creates and starts container `name` running `/pause ARGS...` in the pod, waits
    /// for it to exit and returns (container id, exit code).
    pub fn run_container(
        &mut self,
        sandbox: &str,
        p: &PodSpec<'_>,
        name: &str,
        args: &[&str],
    ) -> (String, i32) {
        let id = self.start_container(sandbox, p, name, &["/pause"], args, &[]);
        (id.clone(), self.wait_container(&id))
    }

    /// Creates and starts container `name` running `command ARGS...` with the host's
    /// directories `mounts` bound at the same paths (read-only, `rw` ones writable; the
    /// test image holds only `/pause`, so a program of the host needs `/usr` and its
    /// own files mounted). Returns its id without waiting.
    pub fn start_container(
        &mut self,
        sandbox: &str,
        p: &PodSpec<'_>,
        name: &str,
        command: &[&str],
        args: &[&str],
        mounts: &[(&Path, bool)],
    ) -> String {
        let status = self
            .rt
            .block_on(self.client.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: sandbox.into(),
                verbose: false,
            }))
            .expect("PodSandboxStatus")
            .into_inner();
        let uid = status
            .status
            .and_then(|s| s.metadata)
            .map(|m| m.uid)
            .expect("uid");
        let sandbox_config = self.sandbox_config(p, &uid);
        let strings = |v: &[&str]| v.iter().map(|a| (*a).to_string()).collect::<Vec<_>>();
        let id = self
            .rt
            .block_on(
                self.client.create_container(CreateContainerRequest {
                    pod_sandbox_id: sandbox.into(),
                    config: Some(ContainerConfig {
                        metadata: Some(ContainerMetadata {
                            name: name.into(),
                            attempt: 0,
                        }),
                        image: Some(ImageSpec {
                            image: IMAGE.into(),
                            ..Default::default()
                        }),
                        command: strings(command),
                        args: strings(args),
                        log_path: format!("{name}.log"),
                        mounts: mounts
                            .iter()
                            .map(|(m, rw)| Mount {
                                container_path: m.display().to_string(),
                                host_path: m.display().to_string(),
                                readonly: !rw,
                                ..Default::default()
                            })
                            .collect(),
                        linux: Some(LinuxContainerConfig::default()),
                        ..Default::default()
                    }),
                    sandbox_config: Some(sandbox_config),
                }),
            )
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\ncontainerd log:\n{}", self.log()))
            .into_inner()
            .container_id;
        self.rt
            .block_on(self.client.start_container(StartContainerRequest {
                container_id: id.clone(),
            }))
            .unwrap_or_else(|e| panic!("StartContainer: {e}\ncontainerd log:\n{}", self.log()));
        id
    }

    /// Waits (30 s at most) for container `id` to exit; returns its exit code.
    pub fn wait_container(&mut self, id: &str) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self
                .rt
                .block_on(self.client.container_status(ContainerStatusRequest {
                    container_id: id.into(),
                    verbose: false,
                }))
                .expect("ContainerStatus")
                .into_inner()
                .status
                .expect("status");
            // CONTAINER_EXITED
            if s.state == 2 {
                return s.exit_code;
            }
            assert!(Instant::now() < deadline, "container {id} did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// RemoveContainer (stopping it first if it runs).
    pub fn remove_container(&mut self, id: &str) {
        let _ = self
            .rt
            .block_on(self.client.remove_container(RemoveContainerRequest {
                container_id: id.into(),
            }));
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.freeze(false);
        for id in self.sandboxes.clone() {
            self.remove_pod(&id);
        }
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Shims of this containerd (they outlive it by design).
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(self.socket.display().to_string())
            .status();
        // runc's cgroups in every hierarchy (v1 controllers too, on a hybrid machine).
        // On v1 hierarchies the test's own top cgroup goes too (TestCgroup removes it
        // from the v2 tree only).
        for parent in &self.pod_parents {
            let top = parent
                .trim_start_matches('/')
                .split('/')
                .next()
                .unwrap_or_default();
            if let Ok(roots) = std::fs::read_dir("/sys/fs/cgroup") {
                for r in roots.flatten() {
                    let dir = r.path().join(parent.trim_start_matches('/'));
                    if dir.exists() {
                        crate::remove_cgroup_tree(&dir);
                    }
                    let v2 = r.path() == crate::cgroup_mount();
                    if !v2 && top.starts_with("mcpg-test") && r.path().join(top).exists() {
                        crate::remove_cgroup_tree(&r.path().join(top));
                    }
                }
            }
        }
    }
}

/// The destinations the pod tests put on a pod's own loopback.
pub const METADATA: &str = "169.254.169.254";
pub const INTERNAL: &str = "10.0.13.5";
pub const PUBLIC: &str = "93.184.216.34";

/// Puts the three destinations on the pod's own loopback.
pub fn addresses(netns: &Path) {
    for a in [METADATA, INTERNAL, PUBLIC] {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["ip", "addr", "add", &format!("{a}/32"), "dev", "lo"])
            .output()
            .expect("nsenter");
        assert!(out.status.success(), "adding {a}: {out:?}");
    }
}

/// A pod sandbox: its id, cgroup (below the mount, and its directory) and netns.
pub struct Pod {
    pub id: String,
    pub cgroup_rel: String,
    pub dir: PathBuf,
    pub netns: PathBuf,
}
/// Runs a pod sandbox with the three destinations on its loopback.
pub fn pod(c: &mut Containerd, cg: &crate::TestCgroup, spec: &PodSpec<'_>) -> Pod {
    let id = c.run_pod(spec);
    let netns = c.netns(&id);
    addresses(&netns);
    let cgroup_rel = spec.cgroup_parent.to_string();
    let dir = crate::cgroup_mount().join(cgroup_rel.trim_start_matches('/'));
    assert!(dir.exists(), "runc made no v2 cgroup {}", dir.display());
    let _ = cg;
    Pod {
        id,
        cgroup_rel,
        dir,
        netns,
    }
}

/// `ip ARGS` in the pod's network namespace.
pub fn in_pod(p: &Pod, args: &str) {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", p.netns.display()))
        .arg("ip")
        .args(args.split_whitespace())
        .output()
        .expect("nsenter");
    assert!(out.status.success(), "ip {args}: {out:?}");
}

/// A veth `vpod{i}` in the pod to `vnode{i}` in `node` (pod 10.200.0.(4i+2)/30, node
/// .(4i+1)), with routes in the pod to `routes` (addresses in `node`) over it.
pub fn link_to(p: &Pod, node: &crate::NetNs, i: usize, routes: &[&str]) {
    let (pod_if, node_if) = (format!("vpod{i}"), format!("vnode{i}"));
    in_pod(
        p,
        &format!(
            "link add {pod_if} type veth peer name {node_if} netns {}",
            node.name
        ),
    );
    in_pod(
        p,
        &format!("addr add 10.200.0.{}/30 dev {pod_if}", 4 * i + 2),
    );
    in_pod(p, &format!("link set {pod_if} up"));
    node.ip(&format!("addr add 10.200.0.{}/30 dev {node_if}", 4 * i + 1));
    node.ip(&format!("link set {node_if} up"));
    for a in routes {
        in_pod(
            p,
            &format!("route add {a}/32 via 10.200.0.{} dev {pod_if}", 4 * i + 1),
        );
    }
}

/// The pod tests' node config: a node-wide workload on the test's cgroup `rel` (like
/// `/kubepods`: every pod, baseline only), "github-mcp" selecting pods by namespace and
/// label (`github_rules` added to it), "locked" taking pods by annotation, the runtime's
/// socket, and `daemon_extra` lines at the end of `[daemon]`.
#[must_use]
pub fn node_config(
    rel: &str,
    c: &Containerd,
    pod_cgroups: &str,
    github_rules: &str,
    daemon_extra: &str,
) -> String {
    format!(
        r#"[baseline]
deny = ["metadata"]
[[workload]]
name = "node"
cgroup = "{rel}"
default = "allow"
[[workload]]
name = "github-mcp"
default = "deny-internal"
{github_rules}
[workload.pods]
namespace = "mcp"
labels = {{ "app.kubernetes.io/name" = "github-mcp" }}
[[workload]]
name = "locked"
default = "deny"
[workload.pods]
annotation = true
[daemon]
attach_cgroup = "{rel}"
cri_socket = "{sock}"
pod_cgroups = {pod_cgroups}
cri_poll_ms = 100
{daemon_extra}"#,
        sock = c.socket.display(),
    )
}
