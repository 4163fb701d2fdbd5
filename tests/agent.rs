//! The sandbox agent on the host: `skiff-agent --unix PATH` served through `skiff::sandbox`'s
//! client, so every request kind, concurrency, timeouts, signals, PTYs and hostile frames
//! (both ways) are checked in milliseconds, without a VM. tests/sandbox.rs runs the same agent
//! as PID 1 of a Linux guest.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use skiff::sandbox::{Agent, ExecRequest, ExitStatus, SandboxError, WinSize};

/// The agent binary, built for this test run.
fn agent_bin() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "skiff-agent"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(status.success(), "cannot build skiff-agent");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    target.join("debug/skiff-agent")
}

/// An agent on a socket of its own, killed with the test.
struct Running {
    child: Child,
    sock: PathBuf,
    dir: PathBuf,
}

impl Running {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ska-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let child = Command::new(agent_bin())
            .arg("--unix")
            .arg(&sock)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while UnixStream::connect(&sock).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "agent never listened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, sock, dir }
    }

    fn agent(&self) -> Agent {
        Agent::unix(&self.sock)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Runs `r` and returns (stdout, stderr, outcome).
fn run(
    agent: &Agent,
    r: &ExecRequest,
    stdin: Option<Vec<u8>>,
) -> (Vec<u8>, Vec<u8>, skiff::sandbox::Outcome) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let stdin = stdin.map(|v| Box::new(std::io::Cursor::new(v)) as Box<dyn Read + Send>);
    let outcome = agent.exec(r, stdin, &mut out, &mut err).unwrap();
    (out, err, outcome)
}

#[test]
fn output_streams_and_exit_code() {
    let a = Running::start("basic");
    let agent = a.agent();
    assert!(agent.hello().unwrap().starts_with("skiff-agent "));
    let (out, err, o) = run(
        &agent,
        &req(&["sh", "-c", "echo out; echo err >&2; exit 7"]),
        None,
    );
    assert_eq!(out, b"out\n");
    assert_eq!(err, b"err\n");
    assert_eq!(
        (o.status, o.timed_out, o.exit_code()),
        (ExitStatus::Code(7), false, 7)
    );
    // env and cwd
    let mut r = req(&["sh", "-c", "echo $GREETING; pwd"]);
    r.env = vec![("GREETING".into(), "hi there".into())];
    r.cwd = Some(a.dir.to_string_lossy().into_owned());
    let (out, _, o) = run(&agent, &r, None);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("hi there\n{}\n", a.dir.display())
    );
    assert_eq!(o.exit_code(), 0);
    // A program that does not exist: a refusal, and the agent goes on.
    let e = agent
        .exec(
            &req(&["/no/such/program"]),
            None,
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .unwrap_err();
    assert!(
        matches!(e, SandboxError::Agent(ref m) if m.contains("cannot run")),
        "{e}"
    );
    assert!(agent.hello().is_ok());
}

#[test]
fn signals_and_timeouts_end_the_whole_group() {
    let a = Running::start("sig");
    let agent = a.agent();
    let (_, _, o) = run(&agent, &req(&["sh", "-c", "kill -TERM $$"]), None);
    assert_eq!(
        (o.status, o.exit_code()),
        (ExitStatus::Signal(libc::SIGTERM), 143)
    );

    // A busy loop with a child: both die at the timeout.
    let mut r = req(&["sh", "-c", "sleep 1000 & echo $!; while :; do :; done"]);
    r.timeout_ms = Some(300);
    let (out, _, o) = run(&agent, &r, None);
    assert!(o.timed_out);
    assert_eq!(
        (o.status, o.exit_code()),
        (ExitStatus::Signal(libc::SIGKILL), 124)
    );
    let child: i32 = String::from_utf8(out).unwrap().trim().parse().unwrap();
    assert!(gone(child), "the loop's child {child} outlived the timeout");

    // A command that exits leaving a child behind: the child goes too.
    let (out, _, o) = run(&agent, &req(&["sh", "-c", "sleep 1000 & echo $!"]), None);
    assert_eq!(o.exit_code(), 0);
    let child: i32 = String::from_utf8(out).unwrap().trim().parse().unwrap();
    assert!(gone(child), "{child} outlived its command");
}

/// Whether `pid` is gone (reaped) within a few seconds.
fn gone(pid: i32) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn large_output_and_stdin_arrive_intact_and_in_order() {
    let a = Running::start("big");
    let agent = a.agent();
    let (out, _, o) = run(&agent, &req(&["seq", "1", "200000"]), None);
    let expected: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(o.exit_code(), 0);
    assert!(out.len() > 1 << 20);
    assert!(out == expected.as_bytes(), "output differs");

    // 3 MiB through cat and back: stdin and stdout under back-pressure both ways.
    let data: Vec<u8> = (0..3 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect();
    let mut r = req(&["cat"]);
    r.stdin = true;
    let (out, _, o) = run(&agent, &r, Some(data.clone()));
    assert_eq!(o.exit_code(), 0);
    assert!(
        out == data,
        "cat's output differs ({} bytes of {})",
        out.len(),
        data.len()
    );
    // Without stdin the command reads end of file at once.
    let (out, _, _) = run(&agent, &req(&["wc", "-c"]), None);
    assert_eq!(String::from_utf8(out).unwrap().trim(), "0");
}

#[test]
fn files_go_in_and_out() {
    let a = Running::start("files");
    let agent = a.agent();
    let data: Vec<u8> = (0..(2 << 20) + 123).map(|i: u32| (i % 251) as u8).collect();
    let path = a.dir.join("made/by/put/file.bin");
    let path = path.to_str().unwrap();
    assert_eq!(
        agent.put(&mut &data[..], path, 0o640).unwrap(),
        data.len() as u64
    );
    let (out, _, _) = run(&agent, &req(&["stat", "-c", "%a %s", path]), None);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("640 {}\n", data.len())
    );
    let mut back = Vec::new();
    assert_eq!(agent.get(path, &mut back).unwrap(), data.len() as u64);
    assert!(back == data);
    let e = agent.get("/no/such/file", &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("cannot open /no/such/file"), "{e}");
    let e = agent.get("/", &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    let e = agent
        .put(&mut &b"x"[..], "/proc/no/such", 0o644)
        .unwrap_err();
    assert!(e.to_string().contains("cannot create"), "{e}");
}

#[test]
fn requests_are_served_at_once() {
    let a = Running::start("conc");
    let agent = a.agent();
    // A cat that waits for input holds one connection open...
    let (mut feed, reader) = UnixStream::pair().unwrap();
    let slow = {
        let agent = agent.clone();
        std::thread::spawn(move || {
            let mut r = req(&["cat"]);
            r.stdin = true;
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let o = agent
                .exec(&r, Some(Box::new(reader)), &mut out, &mut err)
                .unwrap();
            (out, o)
        })
    };
    // ...while eight others come and go.
    let others: Vec<_> = (0..8)
        .map(|i| {
            let agent = agent.clone();
            std::thread::spawn(move || run(&agent, &req(&["echo", &i.to_string()]), None).0)
        })
        .collect();
    for (i, t) in others.into_iter().enumerate() {
        assert_eq!(t.join().unwrap(), format!("{i}\n").as_bytes());
    }
    feed.write_all(b"last\n").unwrap();
    drop(feed);
    let (out, o) = slow.join().unwrap();
    assert_eq!((out, o.exit_code()), (b"last\n".to_vec(), 0));
}

#[test]
fn a_pty_when_asked() {
    let a = Running::start("pty");
    let agent = a.agent();
    let mut r = req(&[
        "sh",
        "-c",
        "tty; stty size; echo $TERM; read x; echo got $x; exit 3",
    ]);
    r.pty = Some(WinSize {
        rows: 33,
        cols: 101,
    });
    r.stdin = true;
    let (out, err, o) = run(&agent, &r, Some(b"typed\n".to_vec()));
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(out.contains("33 101"), "{out:?}");
    assert!(out.contains("xterm-256color"), "{out:?}");
    assert!(out.contains("got typed"), "{out:?}");
    assert!(err.is_empty());
    assert_eq!(o.exit_code(), 3);
    // An interactive shell (job control on the terminal), ended by what is typed.
    let mut r = req(&["sh", "-i"]);
    r.pty = Some(WinSize { rows: 24, cols: 80 });
    r.stdin = true;
    let (out, _, o) = run(
        &agent,
        &r,
        Some(b"echo in-the-$((6 * 7))-shell; exit 4\n".to_vec()),
    );
    assert!(String::from_utf8_lossy(&out).contains("in-the-42-shell"));
    assert_eq!(o.exit_code(), 4);
}

#[test]
fn hostile_hosts_get_an_error_and_the_agent_goes_on() {
    let a = Running::start("hostile");
    // Garbage, an oversized length, a frame that cannot start a request, a wrong version.
    let garbage: [&[u8]; 4] = [
        b"\x05\x00\x00\x00\xff\xff\xff\xff\xff",
        b"\xff\xff\xff\x7f",
        b"\x01\x00\x00\x00\x09",
        b"\x02\x00\x00\x00\x00\x63",
    ];
    for g in garbage {
        let mut s = UnixStream::connect(&a.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(g).unwrap();
        let frame = skiff_agent::read_frame::<skiff_agent::AgentFrame>(&mut s).unwrap();
        assert!(
            matches!(frame, Some(skiff_agent::AgentFrame::Error(_))),
            "{g:?}: {frame:?}"
        );
    }
    // A host that goes away mid-command: the command is killed.
    let mut s = UnixStream::connect(&a.sock).unwrap();
    skiff_agent::write_frame(
        &mut s,
        &skiff_agent::HostFrame::Exec(req(&["sh", "-c", "echo $$; exec sleep 1000"])),
    )
    .unwrap();
    let mut pid = None;
    while pid.is_none() {
        match skiff_agent::read_frame::<skiff_agent::AgentFrame>(&mut s).unwrap() {
            Some(skiff_agent::AgentFrame::Stdout(o)) => {
                pid = String::from_utf8(o).unwrap().trim().parse::<i32>().ok();
            }
            Some(_) => {}
            None => panic!("closed"),
        }
    }
    drop(s);
    assert!(gone(pid.unwrap()), "the command outlived its host");
    assert!(a.agent().hello().is_ok());
}

/// A fake agent that answers every request with `reply`, then closes.
fn fake_agent(name: &str, reply: &'static [u8]) -> (Agent, std::thread::JoinHandle<()>, PathBuf) {
    let dir = std::env::temp_dir().join(format!("ska-fake-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("fake.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = skiff_agent::read_frame::<skiff_agent::HostFrame>(&mut s);
        let _ = s.write_all(reply);
    });
    (Agent::unix(&sock), t, dir)
}

#[test]
fn hostile_agents_give_clear_errors_never_a_hang() {
    let cases: [(&str, &[u8], &str); 4] = [
        ("close", b"", "closed the connection"),
        ("garbage", b"\x03\x00\x00\x00\xff\xff\xff", "bad frame"),
        ("huge", b"\xff\xff\xff\xff", "bad frame"),
        // Started, then nothing: the connection closes mid-command.
        (
            "midway",
            b"\x02\x00\x00\x00\x01\x05",
            "closed the connection during the command",
        ),
    ];
    for (name, reply, want) in cases {
        let (agent, t, dir) = fake_agent(name, reply);
        let e = agent
            .exec(&req(&["true"]), None, &mut Vec::new(), &mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains(want), "{name}: {e}");
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The agent_frames fuzz target's seeds are whole streams of valid frames (so the fuzzer
/// starts past the decoder's first checks); a change to the protocol must update them
/// (fuzz/seeds/generate.py).
#[test]
fn fuzz_seeds_are_valid_frame_streams() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/agent_frames");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let (selector, mut rest) = bytes.split_first().unwrap();
        let mut frames = 0;
        loop {
            let next = if selector & 1 == 1 {
                skiff_agent::read_frame::<skiff_agent::AgentFrame>(&mut rest).map(|f| f.is_some())
            } else {
                skiff_agent::read_frame::<skiff_agent::HostFrame>(&mut rest).map(|f| f.is_some())
            };
            match next {
                Ok(true) => frames += 1,
                Ok(false) => break,
                Err(e) => panic!("{}: frame {frames}: {e}", path.display()),
            }
        }
        assert!(frames >= 4, "{}", path.display());
        seen += 1;
    }
    assert_eq!(seen, 4);
}
