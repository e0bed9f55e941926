//! `mcp-guard status`, and the files generated from the CLI's own definition (man pages).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use mcp_guard::{api::client, config};
use serde_json::{json, Value};

/// The control socket: `--socket`, else the config's, else the default.
///
/// # Errors
/// The config cannot be read.
pub fn control_socket(config: Option<PathBuf>, socket: Option<PathBuf>) -> Result<PathBuf> {
    Ok(match (socket, config) {
        (Some(a), _) => a,
        (None, Some(c)) => config::load(&c)?.control_socket,
        (None, None) => PathBuf::from(config::DEFAULT_CONTROL_SOCKET),
    })
}

/// One sample of the text exposition: (name, labels, value).
type Sample = (String, Vec<(String, String)>, f64);

fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            // Label values here never hold `",`: names, hooks and reasons only.
            let labels = labels
                .split("\",")
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            Some((name.to_string(), labels, value))
        })
        .collect()
}

/// The status document: the daemon's `/status` with what its `/metrics` says about
/// readiness, programs, BPF LSM, the container runtime, MCP, DNS and sticky identity.
fn document(status: &Value, metrics: &str) -> Value {
    let s = samples(metrics);
    let one = |name: &str| s.iter().find(|(n, _, _)| n == name).map(|(_, _, v)| *v);
    let sum = |name: &str| {
        s.iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| *v)
            .sum::<f64>()
    };
    let by_label = |name: &str, label: &str| -> Vec<(String, f64)> {
        s.iter()
            .filter(|(n, _, _)| n == name)
            .filter_map(|(_, l, v)| Some((l.iter().find(|(k, _)| k == label)?.1.clone(), *v)))
            .collect()
    };
    let of = |name: &str, workload: &str| {
        by_label(name, "workload")
            .into_iter()
            .find(|(w, _)| w == workload)
            .map_or(0.0, |(_, v)| v)
    };
    let version = s
        .iter()
        .find(|(n, _, _)| n == "mcp_guard_build_info")
        .and_then(|(_, l, _)| l.iter().find(|(k, _)| k == "version"))
        .map(|(_, v)| v.clone());
    let programs: serde_json::Map<String, Value> = by_label("mcp_guard_programs_attached", "hook")
        .into_iter()
        .map(|(hook, v)| (hook, json!(v >= 1.0)))
        .collect();
    let workloads: Vec<Value> = status["workloads"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|w| {
            let name = w["name"].as_str().unwrap_or("").to_string();
            json!({
                "name": name,
                "cgroup": w["cgroup"],
                "pods": w["pods"],
                "cgroups_registered": w["cgroup_ids"].as_array().map_or(0, Vec::len),
                "pods_placed": w["pod_list"].as_array().map(Vec::len),
                "rules": of("mcp_guard_policy_rules", &name) as u64,
                "privileged_processes": of("mcp_guard_workload_privileged_processes", &name) as u64,
                "denied_flows": by_label("mcp_guard_denied_flows_total", "workload").iter().filter(|(w, _)| *w == name).map(|(_, v)| v).sum::<f64>() as u64,
                "left_workload": of("mcp_guard_processes_left_workload_total", &name) as u64,
            })
        })
        .collect();
    json!({
        "ready": one("mcp_guard_ready") == Some(1.0),
        "version": version,
        "policy_generation": status["generation"],
        "programs": programs,
        "lsm_available": one("mcp_guard_lsm_available") == Some(1.0),
        "unix_hooks_available": one("mcp_guard_unix_hooks_available") == Some(1.0),
        "cri_up": one("mcp_guard_cri_up") == Some(1.0),
        "pods_pending": of("mcp_guard_pods", "pods-pending") as u64,
        "mcp_instances": one("mcp_guard_mcp_instances").unwrap_or(0.0) as u64,
        "dns_learned_addresses": sum("mcp_guard_dns_learned_addresses") as u64,
        "homes_tracked": one("mcp_guard_homes_tracked").unwrap_or(0.0) as u64,
        "workloads": workloads,
    })
}

fn yes_no(v: &Value) -> &'static str {
    if v.as_bool() == Some(true) {
        "yes"
    } else {
        "no"
    }
}

/// The document for people.
fn human(d: &Value) -> String {
    let mut out = Vec::new();
    out.push(format!(
        "mcp-guard {}: {}, policy generation {}",
        d["version"].as_str().unwrap_or("?"),
        if d["ready"].as_bool() == Some(true) {
            "ready (every program attached, a policy loaded)"
        } else {
            "NOT READY (a program is not attached or no policy is loaded)"
        },
        d["policy_generation"]
    ));
    let programs = d["programs"].as_object().cloned().unwrap_or_default();
    let detached: Vec<&String> = programs
        .iter()
        .filter(|(_, v)| v.as_bool() != Some(true))
        .map(|(k, _)| k)
        .collect();
    out.push(format!(
        "programs: {} attached{}",
        programs.len() - detached.len(),
        if detached.is_empty() {
            String::new()
        } else {
            format!(
                ", not attached: {}",
                detached
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    ));
    out.push(format!(
        "BPF LSM: {}{}",
        yes_no(&d["lsm_available"]),
        if d["lsm_available"].as_bool() == Some(true) {
            ""
        } else {
            " (AF_PACKET, AF_XDP and AF_VSOCK are refused only by exec's hardening)"
        }
    ));
    out.push(format!(
        "Unix-socket hooks: {}{}",
        yes_no(&d["unix_hooks_available"]),
        if d["unix_hooks_available"].as_bool() == Some(true) {
            ""
        } else {
            " (Linux 6.7+; meanwhile only exec's mount namespace hides local deputies)"
        }
    ));
    out.push(format!(
        "container runtime (CRI): {}, pods pending: {}",
        if d["cri_up"].as_bool() == Some(true) {
            "answering"
        } else {
            "NOT answering"
        },
        d["pods_pending"]
    ));
    out.push(format!(
        "MCP instances: {}; addresses learned from DNS: {}; guarded tasks tracked: {}",
        d["mcp_instances"], d["dns_learned_addresses"], d["homes_tracked"]
    ));
    out.push("workloads:".into());
    for w in d["workloads"].as_array().into_iter().flatten() {
        let place = match (w["cgroup"].as_str(), w["pods"].as_str()) {
            (Some(c), _) => format!("cgroup {c}"),
            (None, Some(p)) => format!("pods {p}"),
            _ => "-".into(),
        };
        let mut line = format!(
            "  {}: {place}, {} cgroup(s) registered",
            w["name"].as_str().unwrap_or("?"),
            w["cgroups_registered"]
        );
        if let Some(n) = w["pods_placed"].as_u64() {
            line.push_str(&format!(", {n} pod(s)"));
        }
        line.push_str(&format!(
            ", {} rule(s), {} denied flow(s)",
            w["rules"], w["denied_flows"]
        ));
        for (key, what) in [
            (
                "privileged_processes",
                "process(es) holding capabilities that go around the guard",
            ),
            ("left_workload", "process(es) left its cgroup"),
        ] {
            if w[key].as_u64().unwrap_or(0) > 0 {
                line.push_str(&format!(", {} {what}", w[key]));
            }
        }
        out.push(line);
    }
    out.join("\n")
}

/// Prints the status; returns whether the daemon is ready.
///
/// # Errors
/// No daemon answers on the control socket (or its answer is not a status document).
pub fn status(config: Option<PathBuf>, socket: Option<PathBuf>, as_json: bool) -> Result<bool> {
    let socket = control_socket(config, socket)?;
    let get = |path: &str| {
        client::control_body(&socket, path).with_context(|| {
            format!(
                "no mcp-guard daemon answers on {} (is it running? root only)",
                socket.display()
            )
        })
    };
    let status: Value =
        serde_json::from_str(&get("/status")?).context("the daemon's /status is not JSON")?;
    let d = document(&status, &get("/metrics")?);
    if as_json {
        println!("{d}");
    } else {
        println!("{}", human(&d));
    }
    Ok(d["ready"].as_bool() == Some(true))
}

/// Writes `mcp-guard.1` and `mcp-guard-<subcommand>.1` for every visible subcommand.
///
/// # Errors
/// The directory cannot be created or written.
pub fn man_pages(cmd: &clap::Command, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |c: clap::Command, file: String| -> Result<()> {
        let mut buf = Vec::new();
        clap_mangen::Man::new(c).render(&mut buf)?;
        let path = dir.join(&file);
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
        Ok(())
    };
    let mut root = cmd.clone();
    root.build();
    write(root.clone(), "mcp-guard.1".into())?;
    for sub in root
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("mcp-guard-{}", sub.get_name());
        write(sub.clone().name(name.clone()), format!("{name}.1"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_reads_the_metrics_it_needs() {
        let metrics = "# HELP x\nmcp_guard_ready 1\nmcp_guard_build_info{version=\"0.1.0\",kernel=\"6.18\"} 1\nmcp_guard_programs_attached{hook=\"connect4\"} 1\nmcp_guard_programs_attached{hook=\"tc\"} 0\nmcp_guard_lsm_available 0\nmcp_guard_cri_up 1\nmcp_guard_pods{workload=\"pods-pending\"} 2\nmcp_guard_policy_rules{workload=\"w\"} 3\nmcp_guard_denied_flows_total{workload=\"w\",reason=\"deny-internal\",dest_class=\"internal\",family=\"ipv4\",proto=\"tcp\",hook=\"connect4\"} 4\nmcp_guard_denied_flows_total{workload=\"w\",reason=\"baseline-metadata\",dest_class=\"metadata\",family=\"ipv4\",proto=\"tcp\",hook=\"connect4\"} 1\nmcp_guard_processes_left_workload_total{workload=\"w\"} 1\n";
        let status = json!({"generation": 7, "workloads": [{"name": "w", "cgroup": "/w", "cgroup_ids": [1, 2]}]});
        let d = document(&status, metrics);
        assert_eq!(d["ready"], true);
        assert_eq!(d["version"], "0.1.0");
        assert_eq!(d["programs"]["tc"], false);
        assert_eq!(d["pods_pending"], 2);
        assert_eq!(d["workloads"][0]["denied_flows"], 5);
        assert_eq!(d["workloads"][0]["cgroups_registered"], 2);
        let text = human(&d);
        assert!(text.contains("not attached: tc"), "{text}");
        assert!(text.contains("BPF LSM: no"), "{text}");
        assert!(text.contains("Unix-socket hooks: no (Linux 6.7+"), "{text}");
        assert!(text.contains("1 process(es) left its cgroup"), "{text}");
    }
}
