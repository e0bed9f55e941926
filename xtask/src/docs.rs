//! `cargo xtask docs`: the book under docs/ (mdBook) into target/book, after writing the
//! generated pages (the configuration reference, rendered by mcp-guard's own table), and
//! a check that every relative link in README.md and the book reaches a file that exists.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, setup};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Writes the generated pages, builds the book and checks the links.
pub fn run(regenerate: bool) -> Result<()> {
    setup::toolchain()?;
    setup::mdbook()?;
    if regenerate {
        setup::status(
            cargo()
                .args(["test", "-p", "mcp-guard", "--lib", "config::reference"])
                .env("MCPG_BLESS", "1"),
        )?;
    }
    let root = root();
    setup::status(Command::new("mdbook").arg("build").arg(root.join("docs")))?;
    let mut pages = vec![root.join("README.md")];
    for e in fs::read_dir(root.join("docs/src"))? {
        let p = e?.path();
        if p.is_dir() {
            for e in fs::read_dir(&p)? {
                pages.push(e?.path());
            }
        } else {
            pages.push(p);
        }
    }
    let broken: Vec<String> = pages
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .map(|p| broken_links(p))
        .collect::<Result<Vec<_>>>()?
        .concat();
    if !broken.is_empty() {
        bail!(
            "links to files that do not exist:\n  {}",
            broken.join("\n  ")
        );
    }
    let index = root.join("target/book/index.html");
    anyhow::ensure!(index.exists(), "mdbook wrote no {}", index.display());
    eprintln!("xtask: the book is in {}", index.display());
    Ok(())
}

/// Relative Markdown links (`[text](path)` or `[text](path#anchor)`) of `page` whose file
/// does not exist, as "page: target".
fn broken_links(page: &Path) -> Result<Vec<String>> {
    let text = fs::read_to_string(page).with_context(|| page.display().to_string())?;
    let dir = page.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if fenced {
            continue;
        }
        for target in links(line) {
            let file = target.split('#').next().unwrap_or_default();
            if file.is_empty() || file.contains("://") || file.starts_with("mailto:") {
                continue;
            }
            if !dir.join(file).exists() {
                out.push(format!("{}: {target}", page.display()));
            }
        }
    }
    Ok(out)
}

/// The targets of the inline links on one line.
fn links(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        let Some(end) = rest.find(')') else { break };
        out.push(rest[..end].trim());
        rest = &rest[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_relative_links_and_only_those_whose_file_is_missing() {
        assert_eq!(
            links("see [a](x.md#y) and [b](https://e.org) and `f(x)`"),
            ["x.md#y", "https://e.org"]
        );
        let dir = std::env::temp_dir().join(format!("xtask-links-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("there.md"), "").unwrap();
        let page = dir.join("page.md");
        fs::write(
            &page,
            "[ok](there.md#a) [web](https://x.org/y) [gone](gone.md)\n```\n[in a fence](nope.md)\n```\n",
        )
        .unwrap();
        let broken = broken_links(&page).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert!(broken[0].ends_with(": gone.md"));
    }
}
