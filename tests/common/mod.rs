//! Helpers shared by the integration tests: building the guests and running `skiff` with a
//! time limit while reading what the guest prints.

#![allow(dead_code)]

pub mod api;
pub mod netns;
pub mod uffd;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn build_guest(flavour: &str) -> PathBuf {
    // One output per test binary, so parallel test binaries do not race on the file.
    let exe = std::env::current_exe().expect("test binary path");
    let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or("test");
    let out =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("testguest-{flavour}-{name}.elf"));
    let status = Command::new(root().join("resources/testguest/build.sh"))
        .arg(&out)
        .arg(flavour)
        .status()
        .expect("run resources/testguest/build.sh");
    assert!(status.success(), "building the test guest failed");
    out
}

/// The test guest ELF with its PVH note, built once per test binary.
pub fn test_guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| build_guest("pvh"))
}

/// The test guest without the PVH note, entered through the Linux 64-bit boot protocol.
pub fn test_guest_linux64() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| build_guest("linux64"))
}

/// `skiff --log-level info run` arguments for one VM.
pub fn run_args(
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u32,
    mem_mib: u64,
) -> Vec<String> {
    let mut args: Vec<String> = ["--log-level", "info", "run", "--kernel"]
        .map(String::from)
        .to_vec();
    args.push(kernel.to_string_lossy().into_owned());
    if let Some(initrd) = initrd {
        args.push("--initrd".into());
        args.push(initrd.to_string_lossy().into_owned());
    }
    args.extend([
        "--cmdline".into(),
        cmdline.into(),
        "--vcpus".into(),
        vcpus.to_string(),
    ]);
    args.extend(["--memory".into(), mem_mib.to_string()]);
    args
}

/// Borrows owned arguments for [`run_skiff`].
pub fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// What a finished `skiff` run left behind.
#[derive(Debug)]
pub struct Outcome {
    /// Exit status code (None when killed).
    pub code: Option<i32>,
    /// Guest console output.
    pub stdout: String,
    /// Skiff's log and errors.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl Outcome {
    /// Lines of the guest console, without carriage returns.
    pub fn lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .collect()
    }

    /// Lines of stderr that report an error.
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("skiff: error:"))
            .collect()
    }
}

/// Runs `skiff` with `args`, killing it after `limit`. When a console line contains the
/// `prompt`, `answer` is written to its stdin.
pub fn run_skiff(args: &[&str], limit: Duration, reply: Option<(&str, &str)>) -> Outcome {
    run_skiff_until(args, limit, reply, None)
}

/// Like [`run_skiff`], and also kills skiff once a console line contains `stop_at`.
pub fn run_skiff_until(
    args: &[&str],
    limit: Duration,
    reply: Option<(&str, &str)>,
    stop_at: Option<&str>,
) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_skiff"));
    cmd.args(args);
    run_command(cmd, limit, reply, stop_at)
}

/// The path of the skiff binary under test.
pub fn skiff_bin() -> &'static str {
    env!("CARGO_BIN_EXE_skiff")
}

/// Like [`run_skiff_until`] for any command that ends up running skiff (for instance through
/// `ip netns exec`).
pub fn run_command(
    mut cmd: Command,
    limit: Duration,
    reply: Option<(&str, &str)>,
    stop_at: Option<&str>,
) -> Outcome {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start skiff");
    let mut stdin = child.stdin.take();
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let (line_tx, line_rx) = mpsc::channel::<String>();
    let out_thread = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = line_tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut code = None;
    let mut stop = false;
    loop {
        while let Ok(line) = line_rx.try_recv() {
            if stop_at.is_some_and(|p| line.contains(p)) {
                stop = true;
            }
            if let Some((prompt, answer)) = reply {
                if line.contains(prompt) {
                    if let Some(w) = stdin.as_mut() {
                        let _ = w.write_all(answer.as_bytes());
                        let _ = w.flush();
                    }
                }
            }
        }
        if let Some(status) = child.try_wait().expect("wait") {
            code = status.code();
            break;
        }
        if stop || start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(stdin);
    Outcome {
        code,
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// The 512 bytes the test guest's `snapshot` check writes to its disk for `seed` (its
/// `snap_build_marker`): the text, the seed in decimal and a newline, then the byte
/// `i * 7 + seed` (mod 256) at every later offset `i`.
pub fn snapshot_marker(seed: u64) -> Vec<u8> {
    let mut marker = format!("SKIFF-SNAPSHOT-MARKER{seed}\n").into_bytes();
    let text = marker.len();
    marker.extend(
        (text..512).map(|i| (i as u64).wrapping_mul(7).wrapping_add(seed).to_le_bytes()[0]),
    );
    marker
}

/// Prints a figure into the test log, past libtest's output capture.
pub fn log_figure(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "[figure] {line}");
}

/// Milliseconds after process start of the first boot-progress write in Skiff's info log.
pub fn first_progress_ms(stderr: &str) -> Option<f64> {
    stderr.lines().find_map(|l| {
        let rest = l.split("boot progress ").nth(1)?;
        let ms = rest.split(" at ").nth(1)?.split(' ').next()?;
        ms.parse().ok()
    })
}

/// A pseudo-terminal pair: (master, slave).
pub fn pty() -> (File, File) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds into the provided ints; the null name, termios and
    // winsize pointers are allowed.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty failed");
    // SAFETY: both fds were just returned by openpty and are owned by nobody else.
    unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) }
}

/// A child process that is killed when this goes out of scope, so a failed check leaves no VM
/// running.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// Waits up to `limit` for the process to end; its exit code (None: killed, or still
    /// running at the limit, when it is killed).
    pub fn wait_for(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.0.try_wait().expect("wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The metrics file at `path`, its lines summed number by number: Firecracker's counters (and
/// so Skiff's metrics lines) count since the line before, so the sum is what was counted in
/// all. (Stored numbers, such as the timestamp, are summed too and mean nothing here.)
pub fn metrics_total(path: &Path) -> serde_json::Value {
    fn add(a: &mut serde_json::Value, b: &serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (key, value) in b {
                    let empty = if value.is_object() {
                        serde_json::json!({})
                    } else {
                        0.into()
                    };
                    add(a.entry(key.clone()).or_insert(empty), value);
                }
            }
            (a, serde_json::Value::Number(b)) => {
                *a = (a.as_u64().unwrap_or(0) + b.as_u64().unwrap_or(0)).into();
            }
            _ => {}
        }
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut total = serde_json::json!({});
    for line in text.lines() {
        let doc: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        add(&mut total, &doc);
    }
    total
}

/// The virtio transports the device tests run on: virtio-mmio (the default) and virtio-pci
/// (`--enable-pci`). The test guest finds its devices on either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// virtio-mmio, devices described on the kernel command line.
    Mmio,
    /// virtio-pci on PCI bus 0, MSI-X.
    Pci,
}

impl Transport {
    /// Both, MMIO first.
    pub const BOTH: [Transport; 2] = [Transport::Mmio, Transport::Pci];

    /// The `skiff run` flags that pick it.
    pub fn flags(self) -> &'static [&'static str] {
        match self {
            Transport::Mmio => &[],
            Transport::Pci => &["--enable-pci"],
        }
    }
}
