//! Sandboxes on the real path: the Linux guest's kernel (resources/linux/build.sh) with the
//! sandbox root image (resources/sandbox/build.sh), whose PID 1 is Skiff's agent. One
//! directory is prepared through `skiff sandbox prepare`; every test then runs commands in
//! fresh clones of it, through `skiff sandbox run` or the library, and checks what came back
//! byte for byte, that clones see only their own files, that nothing is left behind, and that a
//! guest speaking garbage or closing on the host gives a clear error, never a hang.
//!
//! On KVM PVM hosts the guest kernel is emulated: a command costs about a second there, so the
//! limits are generous (speed is measured by tools/bench, not here).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{root, skiff_bin};
use skiff::sandbox::{Agent, ExecRequest, Outcome, Pool, Sandbox, SandboxError};

const LIMIT: Duration = Duration::from_secs(300);

fn skip() -> bool {
    if std::env::var_os("SKIFF_SKIP_LINUX").is_some() {
        common::log_figure(
            "sandbox tests skipped: SKIFF_SKIP_LINUX is set (tools/test.sh --quick)",
        );
        return true;
    }
    false
}

/// The last line of a build script's stdout: its output directory.
fn build(script: &str, env: &str) -> PathBuf {
    if let Some(d) = std::env::var_os(env) {
        return PathBuf::from(d);
    }
    let out = Command::new(root().join(script))
        .output()
        .expect("run a build script");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("an output line"),
    )
}

/// The sandbox prepared once for this test binary, through the CLI.
fn prepared() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let kernel = build("resources/linux/build.sh", "SKIFF_LINUX_DIR").join("vmlinux");
        let rootfs = build("resources/sandbox/build.sh", "SKIFF_SANDBOX_DIR").join("rootfs.ext4");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("sandbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (code, _, err) = cli(
            &[
                "sandbox".as_ref(),
                "prepare".as_ref(),
                "--kernel".as_ref(),
                kernel.as_os_str(),
                "--rootfs".as_ref(),
                rootfs.as_os_str(),
                "--out".as_ref(),
                dir.as_os_str(),
            ],
            None,
        );
        assert_eq!(code, Some(0), "prepare failed: {err}");
        common::log_figure(err.trim());
        dir
    })
}

/// Runs `skiff ARGS` with `stdin` (else /dev/null) within LIMIT: (exit code, stdout, stderr).
fn cli(args: &[&std::ffi::OsStr], stdin: Option<&Path>) -> (Option<i32>, Vec<u8>, String) {
    let mut child = Command::new(skiff_bin())
        .args(args)
        .stdin(match stdin {
            Some(p) => Stdio::from(std::fs::File::open(p).unwrap()),
            None => Stdio::null(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).unwrap();
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let start = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("skiff {args:?} did not end within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (reader.join().unwrap(), err_reader.join().unwrap());
    // Nothing of the clone remains: its directory (vsock socket, console) is gone.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("skiff-sandbox-{pid}-"))
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "clone files left behind: {leftovers:?}"
    );
    (code, out, err)
}

fn run_args<'a>(extra: &'a [&'a str], argv: &'a [&'a str]) -> Vec<&'a std::ffi::OsStr> {
    let mut v: Vec<&std::ffi::OsStr> =
        vec!["sandbox".as_ref(), "run".as_ref(), prepared().as_os_str()];
    v.extend(extra.iter().map(|s| std::ffi::OsStr::new(*s)));
    v.push("--".as_ref());
    v.extend(argv.iter().map(|s| std::ffi::OsStr::new(*s)));
    v
}

/// Runs `f` on a thread of its own and fails the test if it takes longer than LIMIT (a
/// panic inside comes out as it is).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(worker.join().expect_err("the worker panicked"))
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not end within {LIMIT:?}")
        }
    }
}

fn exec(agent: &Agent, argv: &[&str], timeout_ms: Option<u64>) -> (String, String, Outcome) {
    let req = ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout_ms,
        ..Default::default()
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let o = agent.exec(&req, None, &mut out, &mut err).unwrap();
    (
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
        o,
    )
}

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn run_streams_output_and_exits_with_the_commands_code() {
    if skip() {
        return;
    }
    let dir = prepared();
    let before = [mtime(&dir.join("memory")), mtime(&dir.join("rootfs.ext4"))];
    let (code, out, err) = cli(
        &run_args(
            &["--timings"],
            &[
                "sh",
                "-c",
                "echo out; echo err >&2; touch /etc/written; exit 7",
            ],
        ),
        None,
    );
    assert_eq!(code, Some(7), "{err}");
    assert_eq!(out, b"out\n");
    assert!(err.starts_with("err\n"), "{err}");
    let timings = err
        .lines()
        .find(|l| l.starts_with("skiff: timings:"))
        .expect("a timings line");
    common::log_figure(&format!("sandbox run `sh -c ...`: {timings}"));
    // A signal: 128 + N.
    let (code, _, err) = cli(&run_args(&[], &["sh", "-c", "kill -KILL $$"]), None);
    assert_eq!(code, Some(137), "{err}");
    // The clone wrote into its own overlay: the prepared files are as they were, and a new
    // clone does not see the first one's file.
    assert_eq!(
        before,
        [mtime(&dir.join("memory")), mtime(&dir.join("rootfs.ext4"))]
    );
    let (code, out, _) = cli(
        &run_args(&[], &["sh", "-c", "ls /etc/written 2>&1; true"]),
        None,
    );
    assert_eq!(code, Some(0));
    assert!(String::from_utf8(out).unwrap().contains("No such file"));
    // Skiff's own failures exit 125 with one line.
    let (code, _, err) = cli(&run_args(&[], &["/no/such/program"]), None);
    assert_eq!(code, Some(125));
    assert!(err.contains("cannot run \"/no/such/program\""), "{err}");
    let (code, _, err) = cli(
        &[
            "sandbox".as_ref(),
            "run".as_ref(),
            "/nonexistent".as_ref(),
            "--".as_ref(),
            "true".as_ref(),
        ],
        None,
    );
    assert_eq!(code, Some(125));
    assert!(
        err.contains("/nonexistent is not a prepared sandbox"),
        "{err}"
    );
}

#[test]
fn stdin_large_output_and_files_arrive_intact() {
    if skip() {
        return;
    }
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sandbox-io-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let input: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11).to_le_bytes()[0])
        .collect();
    let file: Vec<u8> = (0..(3u32 << 19) + 7)
        .map(|i| (i % 253).to_le_bytes()[0])
        .collect();
    std::fs::write(tmp.join("stdin"), &input).unwrap();
    std::fs::write(tmp.join("in.bin"), &file).unwrap();
    let put = format!("{}:/data/in.bin", tmp.join("in.bin").display());
    let get = format!("/data/out.bin:{}", tmp.join("out.bin").display());
    let script = "sha256sum; cp /data/in.bin /data/out.bin; sha256sum /data/in.bin; seq 1 170000";
    let (code, out, err) = cli(
        &run_args(&["--put", &put, "--get", &get], &["sh", "-c", script]),
        Some(&tmp.join("stdin")),
    );
    assert_eq!(code, Some(0), "{err}");
    let out = String::from_utf8(out).unwrap();
    let mut lines = out.splitn(3, '\n');
    assert_eq!(lines.next().unwrap(), format!("{}  -", sha256(&input)));
    assert_eq!(
        lines.next().unwrap(),
        format!("{}  /data/in.bin", sha256(&file))
    );
    let seq: String = (1..=170_000).map(|i| format!("{i}\n")).collect();
    let rest = lines.next().unwrap();
    assert!(
        rest.len() > 1 << 20 && rest == seq,
        "seq's {} bytes differ",
        rest.len()
    );
    assert!(
        std::fs::read(tmp.join("out.bin")).unwrap() == file,
        "the file got back differs"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn a_timeout_kills_the_command_and_its_children() {
    if skip() {
        return;
    }
    let (code, _, err) = cli(
        &run_args(&["--timeout", "3"], &["sh", "-c", "while :; do :; done"]),
        None,
    );
    assert_eq!(code, Some(124), "{err}");
    assert!(err.contains("timed out"), "{err}");
    within("timeout check", || {
        let sandbox = Sandbox::restore(prepared()).unwrap();
        let agent = sandbox.agent();
        agent.wait_ready(Duration::from_secs(60)).unwrap();
        let (out, _, o) = exec(
            agent,
            &["sh", "-c", "sleep 1000 & echo $!; while :; do :; done"],
            Some(3000),
        );
        assert!(o.timed_out);
        assert_eq!(o.exit_code(), 124);
        let pid = out.trim();
        let (out, _, _) = exec(
            agent,
            &[
                "sh",
                "-c",
                &format!("test -e /proc/{pid} && echo alive || echo gone"),
            ],
            None,
        );
        assert_eq!(
            out, "gone\n",
            "the busy loop's child {pid} outlived the timeout"
        );
    });
}

#[test]
fn eight_clones_at_once_each_see_only_their_own_files() {
    if skip() {
        return;
    }
    let dir = prepared();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let sandbox = Sandbox::restore(dir).unwrap();
                let agent = sandbox.agent();
                agent.wait_ready(Duration::from_secs(120)).unwrap();
                let mine = format!("clone {i}\n");
                agent
                    .put(&mut mine.as_bytes(), &format!("/root/mine-{i}"), 0o600)
                    .unwrap();
                let (out, _, o) = exec(agent, &["sh", "-c", "cat /root/mine-*; ls /root"], None);
                assert_eq!(o.exit_code(), 0);
                assert_eq!(out, format!("clone {i}\nmine-{i}\n"));
                let work = sandbox.work_dir().to_owned();
                drop(sandbox);
                assert!(!work.exists(), "{} left behind", work.display());
            })
        })
        .collect();
    within("eight clones", move || {
        for t in threads {
            t.join().unwrap();
        }
    });
}

#[test]
fn a_pool_hands_out_ready_clones() {
    if skip() {
        return;
    }
    within("pool", || {
        let pool = Pool::new(prepared(), 2).unwrap();
        for i in 0..3 {
            let sandbox = pool.take().unwrap();
            let (out, _, o) = exec(
                sandbox.agent(),
                &["sh", "-c", &format!("echo {i} > /tmp/n; cat /tmp/n /tmp/n")],
                None,
            );
            assert_eq!((out, o.exit_code()), (format!("{i}\n{i}\n"), 0));
        }
        drop(pool);
        assert!(matches!(
            Pool::new(Path::new("/nonexistent"), 1),
            Err(SandboxError::NotPrepared { .. })
        ));
    });
}

/// A guest program listening on each vsock port of `fakes` that answers the host's first
/// frame there with its reply, port after port (perl: minbase has perl-base; AF_VSOCK is 40,
/// sockaddr_vm is 16 bytes). One perl for all: starting it is slow under emulation.
fn fake_agents_script(fakes: &[(u32, &str, &str)]) -> String {
    let ports: Vec<String> = fakes.iter().map(|f| f.0.to_string()).collect();
    let replies: Vec<String> = fakes.iter().map(|f| format!("\"{}\"", f.1)).collect();
    format!(
        "setsid perl -e 'my @p = ({}); my @r = ({}); my @s; \
         for my $p (@p) {{ socket(my $s, 40, 1, 0) or die \"socket: $!\"; \
           bind($s, pack(\"S S L L x4\", 40, 0, $p, 0xffffffff)) or die \"bind: $!\"; \
           listen($s, 4) or die; push @s, $s; }} \
         open(my $f, \">\", \"/tmp/fakes-ready\"); close $f; \
         for my $i (0..$#s) {{ accept(my $c, $s[$i]); sysread($c, my $b, 4096); \
           syswrite($c, $r[$i]); close $c; }} sleep 600' </dev/null >/dev/null 2>&1 & \
         while ! test -e /tmp/fakes-ready; do sleep 0.2; done",
        ports.join(", "),
        replies.join(", ")
    )
}

#[test]
fn a_guest_that_sends_garbage_or_closes_gives_a_clear_error() {
    if skip() {
        return;
    }
    within("hostile guest", || {
        let sandbox = Sandbox::restore(prepared()).unwrap();
        let agent = sandbox.agent();
        agent.wait_ready(Duration::from_secs(60)).unwrap();
        let fakes = [
            (1025, "\\x03\\x00\\x00\\x00\\xff\\xff\\xff", "bad frame"),
            (1026, "", "closed the connection"),
            (1027, "\\xff\\xff\\xff\\xff", "bad frame"),
        ];
        let (_, err, o) = exec(
            agent,
            &["sh", "-c", &fake_agents_script(&fakes)],
            Some(240_000),
        );
        assert_eq!(o.exit_code(), 0, "{err}");
        for (port, _, want) in fakes {
            let fake = Agent::new(sandbox.agent().uds(), port);
            let req = ExecRequest {
                argv: vec!["true".into()],
                ..Default::default()
            };
            let e = fake.exec(&req, None, &mut Vec::new(), &mut Vec::new());
            let e = e.unwrap_err().to_string();
            assert!(e.contains(want), "port {port}: {e}");
        }
        // Nobody on a port: refused at once.
        let e = Agent::new(sandbox.agent().uds(), 4444).hello().unwrap_err();
        assert!(
            matches!(e, SandboxError::NotListening { port: 4444, .. }),
            "{e}"
        );
        // The real agent still answers.
        assert!(agent.hello().is_ok());
    });
}

#[test]
fn shell_on_a_terminal_and_exec_into_a_running_clone() {
    if skip() {
        return;
    }
    let dir = prepared();
    // `sandbox shell` on a pseudo-terminal: what is typed reaches the guest's shell, its
    // output comes back, its exit code becomes ours, and the terminal is canonical again.
    let (mut master, slave) = common::pty();
    let mut child = common::KillOnDrop(
        Command::new(skiff_bin())
            .args(["sandbox", "shell"])
            .arg(dir)
            .args(["--", "sh"])
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave.try_clone().unwrap()))
            .spawn()
            .unwrap(),
    );
    let mut reader = master.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    master
        .write_all(b"tty; echo in-the-$((6 * 7))-shell; exit 3\n")
        .unwrap();
    assert_eq!(child.wait_for(LIMIT), Some(3));
    let mut seen = Vec::new();
    while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(500)) {
        seen.extend(chunk);
    }
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.contains("/dev/pts/"), "{seen:?}");
    assert!(seen.contains("in-the-42-shell"), "{seen:?}");
    // SAFETY: termios is plain data; tcgetattr fills it for the open pty slave.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&slave);
    // SAFETY: tcgetattr on the open pty slave with a valid termios.
    let rc = unsafe { libc::tcgetattr(fd, &mut t) };
    assert_eq!(rc, 0);
    assert!(t.c_lflag & libc::ICANON != 0, "the terminal was left raw");

    // `skiff exec` into a clone the library runs.
    within("exec", || {
        let sandbox = Sandbox::restore(prepared()).unwrap();
        let uds = sandbox.agent().uds().to_owned();
        let out = Command::new(skiff_bin())
            .arg("exec")
            .arg("--vsock")
            .arg(&uds)
            .args(["--", "sh", "-c", "echo via-exec; exit 5"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(5));
        assert_eq!(out.stdout, b"via-exec\n");
        let out = Command::new(skiff_bin())
            .args(["exec", "--vsock", "/nonexistent.sock", "--", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot connect to /nonexistent.sock"), "{err}");
    });
}
