//! `mcp-guard check`: validate a config and show what it compiles to, for people or
//! (`--json`) for scripts and CI.

use std::{path::Path, process::ExitCode};

use anyhow::Result;
use mcp_guard::{config, daemon, host::cgroup};
use mcp_guard_common::{DEFAULT_ALLOW, DEFAULT_DENY, MODE_AUDIT};
use serde_json::{json, Value};

/// Exit code: 0 valid, 1 warnings with `--strict`, 2 invalid.
pub fn run(path: &Path, strict: bool, as_json: bool) -> ExitCode {
    if !as_json {
        return match check(path) {
            Ok(warnings) if strict && warnings > 0 => {
                eprintln!("error: {warnings} warning(s) and --strict: fix them or drop --strict");
                ExitCode::from(1)
            }
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let (doc, code) = document(path, strict);
    println!("{doc}");
    ExitCode::from(code)
}

/// A warning's text is `FILE:LINE: message` (or no place): as an object.
fn placed(text: &str, file: &Path) -> Value {
    let prefix = format!("{}:", file.display());
    if let Some((line, message)) = text
        .strip_prefix(&prefix)
        .and_then(|rest| rest.split_once(": "))
        .and_then(|(l, m)| Some((l.parse::<usize>().ok()?, m)))
    {
        return json!({"file": file, "line": line, "message": message});
    }
    json!({"file": file, "line": null, "message": text})
}

fn document(path: &Path, strict: bool) -> (Value, u8) {
    let cfg = match config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            let errors: Vec<Value> = errors
                .0
                .iter()
                .map(|e| json!({"file": e.file, "line": e.line, "column": e.column, "message": e.message}))
                .collect();
            return (
                json!({"file": path, "valid": false, "errors": errors, "warnings": []}),
                2,
            );
        }
    };
    let mut warnings: Vec<Value> = cfg.warnings.iter().map(|w| placed(w, path)).collect();
    let (cfg, compiled) = match daemon::compile(cfg) {
        Ok(c) => c,
        Err(e) => {
            let error =
                json!({"file": path, "line": null, "column": null, "message": format!("{e:#}")});
            return (
                json!({"file": path, "valid": false, "errors": [error], "warnings": warnings}),
                2,
            );
        }
    };
    let mount = cgroup::root(cfg.cgroup_root.as_deref()).ok();
    let workloads: Vec<Value> = compiled
        .workloads
        .iter()
        .map(|w| {
            let exists = match (&w.cgroup, &w.pods) {
                (Some(c), None) if !w.pending => {
                    mount.as_deref().is_some_and(|m| cgroup::id(m, c).is_ok())
                }
                _ => true,
            };
            if !exists {
                warnings.push(json!({"file": path, "line": null, "message": format!("workload {:?}: cgroup {} does not exist yet; it will be enforced when it appears", w.name, w.cgroup.as_deref().unwrap_or(""))}));
            }
            json!({
                "name": w.name,
                "id": w.id,
                "cgroup": w.cgroup,
                "pods": w.pods.as_ref().map(|p| p.describe()),
                "exists": exists,
                "default": match w.default {
                    DEFAULT_DENY => "deny",
                    DEFAULT_ALLOW => "allow",
                    _ => "deny-internal",
                },
                "mode": if w.mode == MODE_AUDIT { "audit" } else { "enforce" },
                "rules": w.rules,
            })
        })
        .collect();
    let rules: Vec<Value> = compiled
        .rules
        .iter()
        .map(|r| json!({"id": r.id, "rule": r.text}))
        .collect();
    let code = if strict && !warnings.is_empty() { 1 } else { 0 };
    (
        json!({
            "file": path,
            "valid": true,
            "errors": [],
            "warnings": warnings,
            "workloads": workloads,
            "rules": rules,
            "map_entries": {"prefix": compiled.lpm.len(), "exact": compiled.exact.len()},
        }),
        code,
    )
}

/// The human form; returns the number of warnings.
fn check(path: &Path) -> Result<usize> {
    let (cfg, compiled) = daemon::prepare(path)?;
    println!("{}: OK", path.display());
    println!("mode: {:?}", cfg.mode);
    let mount = cgroup::root(cfg.cgroup_root.as_deref()).ok();
    for w in &compiled.workloads {
        let default = match w.default {
            DEFAULT_DENY => "deny",
            DEFAULT_ALLOW => "allow",
            _ => "deny-internal",
        };
        let mode = if w.mode == MODE_AUDIT {
            "audit"
        } else {
            "enforce"
        };
        let (what, exists) = match (&w.cgroup, &w.pods) {
            (_, Some(p)) => (format!("pods {}", p.describe()), true),
            (Some(c), None) if w.pending => (
                format!("cgroup {c} (new pods until identified: all egress denied)"),
                true,
            ),
            (Some(c), None) => (
                format!("cgroup {c}"),
                mount.as_deref().is_some_and(|m| cgroup::id(m, c).is_ok()),
            ),
            (None, None) if w.name == crate::config::pods::PROXY => (
                String::from(
                    "the MCP proxy sidecar containers of pods (loopback and the MCP socket only)",
                ),
                true,
            ),
            (None, None) => (String::from("nothing"), true),
        };
        println!(
            "workload {} (id {}): {what}{} default={default} mode={mode}{}",
            w.name,
            w.id,
            if exists { "" } else { " [does not exist yet]" },
            if w.flags & mcp_guard_common::WL_DENY_DIRECT_DNS != 0 {
                " deny_direct_dns (ports 53, 853 only where allowed)"
            } else {
                ""
            }
        );
        if !exists {
            eprintln!("warning: workload {:?}: {what} does not exist yet; it will be enforced when it appears", w.name);
        }
    }
    println!("rules:");
    for r in &compiled.rules {
        println!("  #{} {}", r.id, r.text);
    }
    let hosts: Vec<String> = cfg
        .workloads
        .iter()
        .flat_map(|w| {
            w.hosts.iter().map(move |h| {
                format!(
                    "  workload {} allow host {} {} {}{} ({}:{})",
                    w.name,
                    h.pattern,
                    mcp_guard::policy::ports_text(&h.ports),
                    mcp_guard::policy::proto_text(h.proto),
                    if h.allow_internal {
                        " allow_internal"
                    } else {
                        ""
                    },
                    path.display(),
                    h.loc.line
                )
            })
        })
        .collect();
    if !hosts.is_empty() {
        println!("host rules (their addresses come from DNS answers at run time, behind the rebinding guard):");
        for h in &hosts {
            println!("{h}");
        }
    }
    match cfg.dns.proxy {
        Some(p) => {
            println!(
                "dns proxy: {p} (point the workloads' resolver at it); per workload at most {} queries/s and {} in flight",
                cfg.dns.workload_queries_per_sec, cfg.dns.workload_in_flight
            );
            for w in &cfg.workloads {
                let names: Vec<String> = w.hosts.iter().map(|h| h.pattern.to_string()).collect();
                if w.resolve_any {
                    println!("  workload {}: resolves ANY name through the proxy (resolve_any = true: DNS can carry data out of it)", w.name);
                } else if names.is_empty() {
                    println!("  workload {}: resolves no name through the proxy (no host rules; every query REFUSED)", w.name);
                } else {
                    println!("  workload {}: resolves only {} (and names their CNAMEs lead to); A, AAAA, CNAME", w.name, names.join(", "));
                }
            }
        }
        None if !hosts.is_empty() => {
            println!("dns proxy: off (exact names only; the daemon resolves them)");
        }
        None => {}
    }
    println!(
        "map entries: {} prefix, {} exact host, {} unix",
        compiled.lpm.len(),
        compiled.exact.len(),
        compiled.unix.len()
    );
    Ok(cfg.warnings.len())
}
