//! Sandboxes through the library, as an embedder uses them: how soon a clone from a warm
//! [`Pool`] answers, how many sandboxes a second this host runs with a pool and without one,
//! and what an idle pooled clone costs in memory.
//!
//! ```text
//! SKIFF_SANDBOX_DIR=DIR cargo bench --bench sandbox
//! ```
//!
//! These are whole-VM figures with the guest's own time in them, so this is a plain program
//! printing a table, not criterion; tools/bench's `sandbox` scenario runs it (with
//! `SKIFF_SANDBOX_SAMPLES=FILE`, where it writes its samples as JSON for that table). Without
//! `SKIFF_SANDBOX_DIR` it prepares a sandbox into target/bench (the kernel and image from
//! resources/linux/build.sh and resources/sandbox/build.sh; a guest boot, minutes where the
//! guest kernel is emulated) and removes it at the end. `SKIFF_SANDBOX_RUNS` (10) samples per
//! latency row, `SKIFF_SANDBOX_COUNT` (8) sandboxes per throughput row. `cargo test
//! --all-targets` runs this without `--bench`: it then does nothing. No time is asserted.
//!
//! Anchors (other systems, other hosts; for scale, not compared here): zeroboot forks a
//! Firecracker snapshot in 0.8 ms (p50); E2B starts a sandbox in about 150 ms; CubeSandbox
//! creates one in 48 ms on bare metal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use skiff::sandbox::{self, ExecRequest, Pool, PrepareOptions, Sandbox};

/// How long a clone's agent may take to answer (an emulated guest kernel is slow).
const READY: Duration = Duration::from_secs(60);

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Samples per row, in the order rows were first added.
#[derive(Default)]
struct Rows(Vec<(String, Vec<f64>)>);

impl Rows {
    fn add(&mut self, row: &str, value: f64) {
        match self.0.iter_mut().find(|(r, _)| r == row) {
            Some((_, samples)) => samples.push(value),
            None => self.0.push((row.to_owned(), vec![value])),
        }
    }

    fn print(&self) {
        println!("| row | median [min-max] | n |");
        println!("|---|---|---|");
        for (row, samples) in &self.0 {
            let mut s = samples.clone();
            s.sort_by(f64::total_cmp);
            let median = if s.len() % 2 == 1 {
                s[s.len() / 2]
            } else {
                (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
            };
            println!(
                "| {row} | {median:.3} [{:.3}-{:.3}] | {} |",
                s[0],
                s[s.len() - 1],
                s.len()
            );
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn true_request() -> ExecRequest {
    ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    }
}

/// Runs `true` in a running clone; an error unless it exits 0.
fn run_true(sandbox: &Sandbox) -> Result<()> {
    let outcome = sandbox.agent().exec(
        &true_request(),
        None,
        &mut std::io::sink(),
        &mut std::io::sink(),
    )?;
    match outcome.exit_code() {
        0 => Ok(()),
        code => Err(format!("`true` in a sandbox exited {code}").into()),
    }
}

/// The last line a resources/*/build.sh prints: the directory of its outputs.
fn built(script: &str) -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join(script)).output()?;
    if !out.status.success() {
        return Err(format!("{script} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let stdout = String::from_utf8(out.stdout)?;
    let last = stdout
        .lines()
        .last()
        .ok_or(format!("{script} printed nothing"))?;
    Ok(PathBuf::from(last.trim()))
}

/// A sandbox prepared here for this run, removed when dropped.
struct Prepared(PathBuf);

impl Prepared {
    fn new() -> Result<Self> {
        let kernel = built("resources/linux/build.sh")?.join("vmlinux");
        let rootfs = built("resources/sandbox/build.sh")?.join("rootfs.ext4");
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
            PathBuf::from,
        );
        let out = target
            .join("bench")
            .join(format!("sandbox-{}", std::process::id()));
        eprintln!("sandbox bench: preparing {} (a guest boot)", out.display());
        let prepared = Self(out);
        let manifest = sandbox::prepare(&PrepareOptions::new(kernel, rootfs, &prepared.0))?;
        eprintln!(
            "sandbox bench: prepared; the agent answered {} ms after the boot started",
            manifest.boot_to_agent_ms
        );
        Ok(prepared)
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How many of this process's threads are vCPUs (a clone restored paused has its vCPU
/// threads already): a pool is full when every clone it holds has them.
fn vcpu_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("skiff-vcpu-"))
        .count()
}

/// Waits until `clones` clones' vCPU threads exist; the time that took.
fn wait_for_clones(clones: usize, vcpus: usize) -> Result<Duration> {
    let start = Instant::now();
    while vcpu_threads() < clones * vcpus {
        if start.elapsed() > READY {
            return Err(format!("the pool did not reach {clones} clones within {READY:?}").into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(start.elapsed())
}

/// `Rss`, `Pss` and `Private_Dirty` of this process, in KiB.
fn smaps_rollup() -> Result<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            let kib = value.trim().strip_suffix(" kB")?.parse().ok()?;
            Some((key.to_owned(), kib))
        })
        .collect())
}

/// (a) A clone restored without a pool, split into its steps, and one taken from a warm pool
/// of `size`: take() and take() to the agent's first answer.
fn latency(dir: &Path, vcpus: usize, runs: usize, size: usize, rows: &mut Rows) -> Result<()> {
    for _ in 0..runs {
        let t = Instant::now();
        let sandbox = Sandbox::restore(dir)?;
        let restored = t.elapsed();
        sandbox.agent().wait_ready(READY)?;
        let answered = t.elapsed();
        let t = Instant::now();
        run_true(&sandbox)?;
        let command = t.elapsed();
        let t = Instant::now();
        drop(sandbox);
        let dropped = t.elapsed();
        rows.add("no pool: Sandbox::restore (ms)", ms(restored));
        rows.add("no pool: restore to the agent's answer (ms)", ms(answered));
        rows.add("`true` through the agent (ms)", ms(command));
        rows.add(
            "drop of a clone, VM stopped, files removed (ms)",
            ms(dropped),
        );
    }
    let pool = Pool::new(dir, size)?;
    rows.add(
        &format!("pool of {size}: new to full, {size} clones restored (ms)"),
        ms(wait_for_clones(size, vcpus)?),
    );
    for _ in 0..runs {
        wait_for_clones(size, vcpus)?;
        let t = Instant::now();
        let sandbox = pool.take()?;
        let taken = t.elapsed();
        sandbox.agent().wait_ready(READY)?;
        let answered = t.elapsed();
        rows.add(
            &format!("pool of {size}: take() of a warm clone (ms)"),
            ms(taken),
        );
        rows.add(
            &format!("pool of {size}: take() to the agent's answer (ms)"),
            ms(answered),
        );
    }
    Ok(())
}

/// (b) `count` sandboxes, each running `true` and dropped, `workers` at a time, each new one
/// from a pool of `pool` (restored on the spot when `None`); sandboxes per second.
fn throughput(dir: &Path, count: usize, workers: usize, pool: Option<usize>) -> Result<f64> {
    let pool = pool.map(|size| Pool::new(dir, size)).transpose()?;
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> std::result::Result<(), String> {
                    while next.fetch_add(1, Ordering::Relaxed) < count {
                        let sandbox = match &pool {
                            Some(pool) => pool.take(),
                            None => Sandbox::restore(dir),
                        }
                        .map_err(|e| skiff::error_chain(&e))?;
                        sandbox
                            .agent()
                            .wait_ready(READY)
                            .map_err(|e| skiff::error_chain(&e))?;
                        run_true(&sandbox).map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| "a worker panicked".to_owned())?)
    })?;
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

/// (c) What `size` paused clones in a pool add to this process, per clone.
fn memory(dir: &Path, vcpus: usize, size: usize, rows: &mut Rows) -> Result<()> {
    let before = smaps_rollup()?;
    let pool = Pool::new(dir, size)?;
    wait_for_clones(size, vcpus)?;
    // The filler has restored its last clone; let it settle into its wait.
    std::thread::sleep(Duration::from_millis(200));
    let after = smaps_rollup()?;
    drop(pool);
    for key in ["Rss", "Pss", "Private_Dirty"] {
        let grown = after.get(key).copied().unwrap_or(0) as f64
            - before.get(key).copied().unwrap_or(0) as f64;
        rows.add(
            &format!("pool of {size}: {key} per idle pooled clone (MiB)"),
            grown / size as f64 / 1024.0,
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("sandbox bench: boots guests; run it with `cargo bench --bench sandbox`");
        return Ok(());
    }
    let prepared;
    let dir = match std::env::var_os("SKIFF_SANDBOX_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            prepared = Prepared::new()?;
            prepared.0.clone()
        }
    };
    let vcpus = usize::try_from(sandbox::read_manifest(&dir)?.vcpus)?;
    let runs = env_count("SKIFF_SANDBOX_RUNS", 10);
    let count = env_count("SKIFF_SANDBOX_COUNT", 8);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut rows = Rows::default();

    latency(&dir, vcpus, runs, 2, &mut rows)?;
    for (workers, pool) in [
        (1, None),
        (1, Some(2)),
        (cores, None),
        (cores, Some(2)),
        (cores, Some(4)),
    ] {
        let how = pool.map_or("no pool".to_owned(), |k| format!("pool of {k}"));
        let rate = throughput(&dir, count, workers, pool)?;
        rows.add(
            &format!("{count} x `true`, {workers} at a time, {how} (sandboxes/s)"),
            rate,
        );
    }
    for size in [4, 8] {
        memory(&dir, vcpus, size, &mut rows)?;
    }

    println!(
        "# sandbox bench: {cores} CPUs, {runs} runs per latency row; median [min-max]. \
         Anchors elsewhere (not compared): zeroboot 0.8 ms fork p50, E2B ~150 ms, \
         CubeSandbox 48 ms per create on bare metal."
    );
    rows.print();
    if let Some(path) = std::env::var_os("SKIFF_SANDBOX_SAMPLES") {
        // A list of [row, samples], in the printed order.
        std::fs::write(path, serde_json::to_vec(&rows.0)?)?;
    }
    Ok(())
}
