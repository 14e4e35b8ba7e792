//! `cargo xtask fuzz`: the libFuzzer targets in `fuzz/` (cargo-fuzz, nightly, AddressSanitizer),
//! and the short replay-and-fuzz round `cargo xtask test` runs.
//!
//! Each run reads the target's seed corpus in `fuzz/corpus/<target>` (every crash fixed becomes
//! an entry there, so a regression fails the replay) and writes what it learns to a scratch
//! corpus outside the repository: `/var/cache/nodemesh/fuzz-corpus/<target>` for campaigns (it
//! grows from one to the next), a temporary folder for the test round.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{repo_root, run, show};

/// Build output, kept between clones: the sanitized dependencies take minutes to build.
const TARGET_DIR: &str = "/var/cache/nodemesh/fuzz-target";
/// Campaigns' corpora, kept between runs.
const CORPUS_CACHE: &str = "/var/cache/nodemesh/fuzz-corpus";
/// cargo-fuzz, installed by `cargo xtask setup`.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// How long one input may run before libFuzzer calls it a hang.
const INPUT_TIMEOUT_SECS: u32 = 10;

fn fuzz_dir() -> anyhow::Result<PathBuf> {
    Ok(repo_root()?.join("fuzz"))
}

/// `cargo +nightly fuzz <sub>` on our fuzz folder (`+nightly` works only through rustup).
fn cargo_fuzz(sub: &str) -> anyhow::Result<Command> {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz", sub, "--fuzz-dir"])
        .arg(fuzz_dir()?)
        // The fuzz targets never load the kernel programs: skip building them (and bpf-linker's
        // nightly build under sanitizer flags).
        .env("AYA_BUILD_SKIP", "1");
    Ok(cmd)
}

/// The targets, as `fuzz/Cargo.toml` declares them.
pub fn targets() -> anyhow::Result<Vec<String>> {
    let mut cmd = cargo_fuzz("list")?;
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", show(&cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}; run `cargo xtask setup` (it installs cargo-fuzz)",
            show(&cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Builds every target (sanitized, release with debug assertions).
pub fn build() -> anyhow::Result<()> {
    let mut cmd = cargo_fuzz("build")?;
    cmd.args(["--target-dir", TARGET_DIR]);
    run(&mut cmd)
}

/// What one run found.
struct Outcome {
    runs: u64,
    cov: u64,
    features: u64,
    corpus: u64,
}

/// Runs `target` for `secs` seconds over its seeds, learning into `scratch`; fails on a crash,
/// a hang or a leak, naming the input libFuzzer saved and what to do with it.
fn run_target(target: &str, secs: u64, scratch: &Path) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let seeds = fuzz_dir()?.join("corpus").join(target);
    let mut cmd = cargo_fuzz("run")?;
    cmd.arg(target)
        .arg(scratch)
        .arg(&seeds)
        .args(["--target-dir", TARGET_DIR, "--"])
        .arg(format!("-max_total_time={secs}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .args(["-rss_limit_mb=4096", "-print_final_stats=1"]);
    eprintln!("+ {}", show(&cmd));
    let start = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", show(&cmd)))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // What happened (the report's first lines), then where the input went; the rest of
        // libFuzzer's and cargo-fuzz's output is stack frames.
        let lines: Vec<&str> = log.lines().collect();
        let first = lines
            .iter()
            .position(|l| {
                [
                    "==ERROR",
                    "panicked at",
                    "ALARM:",
                    "Deadly signal",
                    "ERROR: libFuzzer",
                ]
                .iter()
                .any(|k| l.contains(k))
            })
            .unwrap_or(lines.len().saturating_sub(30));
        let mut tail: Vec<&str> = lines.iter().skip(first).take(20).copied().collect();
        tail.extend(
            lines
                .iter()
                .skip(first + 20)
                .filter(|l| {
                    l.contains("SUMMARY") || l.contains("artifact") || l.contains("Test unit")
                })
                .copied(),
        );
        bail!(
            "fuzz target {target} failed after {:.0?} ({}):\n{}\n\nlibFuzzer saved the input under \
             fuzz/artifacts/{target}/ (see above). Reproduce with `cargo +nightly fuzz run {target} \
             <file>`, fix the cause, add a regression test, and copy the file into \
             fuzz/corpus/{target}/ so every test run replays it.",
            start.elapsed(),
            out.status,
            tail.join("\n")
        );
    }
    // "#12345  DONE   cov: 85 ft: 323 corp: 196/4197b ..." and "stat::number_of_executed_units: N"
    let field = |line: &str, key: &str| -> u64 {
        line.split_whitespace()
            .skip_while(|w| *w != key)
            .nth(1)
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let done = log
        .lines()
        .rev()
        .find(|l| l.contains(" DONE ") || l.contains("\tDONE "))
        .unwrap_or("");
    let runs = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok(Outcome {
        runs,
        cov: field(done, "cov:"),
        features: field(done, "ft:"),
        corpus: field(done, "corp:"),
    })
}

fn report(target: &str, secs: u64, o: &Outcome) {
    eprintln!(
        "xtask fuzz: {target}: {} executions in {secs} s, coverage {} edges / {} features, corpus \
         {} inputs; no crash",
        o.runs, o.cov, o.features, o.corpus
    );
}

/// `cargo xtask fuzz [TARGET] [--secs N]`: every target (or one) for N seconds (default 60).
pub fn campaign(args: &[String]) -> anyhow::Result<()> {
    let mut secs = 60;
    let mut only = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => {
                secs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .context("--secs needs a number of seconds")?
            }
            t if !t.starts_with('-') => only = Some(t.to_string()),
            other => bail!("unknown option {other:?}; usage: cargo xtask fuzz [TARGET] [--secs N]"),
        }
    }
    let all = targets()?;
    let chosen: Vec<String> = match only {
        Some(t) if all.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t:?}; the targets are {}", all.join(", ")),
        None => all,
    };
    build()?;
    let mut lines = Vec::new();
    for t in &chosen {
        let o = run_target(t, secs, &Path::new(CORPUS_CACHE).join(t))?;
        report(t, secs, &o);
        lines.push(format!(
            "| {t} | {secs} s | {} | {} | {} | {} |",
            o.runs, o.cov, o.features, o.corpus
        ));
    }
    eprintln!(
        "\n| target | time | executions | coverage (edges) | features | corpus |\n|---|---|---|---|---|---|\n{}",
        lines.join("\n")
    );
    Ok(())
}

/// `cargo xtask test`'s round: every corpus replayed and every target fuzzed `secs` seconds
/// from it, learning into a temporary folder (the repository's corpora stay as committed).
pub fn smoke(secs: u64) -> anyhow::Result<()> {
    build()?;
    let scratch = std::env::temp_dir().join(format!("nodemesh-fuzz-{}", std::process::id()));
    let result = (|| {
        for t in targets()? {
            let o = run_target(&t, secs, &scratch.join(&t))?;
            report(&t, secs, &o);
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Lints and format of the fuzz crate (its own workspace, so the main checks do not see it).
pub fn lint() -> anyhow::Result<()> {
    let manifest = fuzz_dir()?.join("Cargo.toml");
    run(crate::cargo()
        .arg("fmt")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--check"))?;
    run(crate::cargo()
        .env("AYA_BUILD_SKIP", "1")
        .arg("clippy")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["--all-targets", "--target-dir"])
        .arg(Path::new(TARGET_DIR).join("clippy"))
        .args(["--", "-D", "warnings"]))
}
