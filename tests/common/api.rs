//! A minimal HTTP/1.1 client over a Unix socket for the API tests, and a running Skiff whose
//! console lines can be awaited while the test talks to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Sends one request (with `Connection: close`) and returns the status and the body.
pub fn call(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = body {
        raw.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    raw.push_str("\r\n");
    raw.push_str(body.unwrap_or(""));
    send_raw(sock, raw.as_bytes())
}

/// Writes `raw` bytes and parses the answer.
pub fn send_raw(sock: &Path, raw: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(raw).expect("send the request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read the answer");
    parse_answer(&answer)
}

/// Sends a bodiless request on a connection that stays open, and reads its one answer
/// (which must carry a Content-Length, as all of Skiff's do).
pub fn call_on(s: &mut UnixStream, method: &str, path: &str) -> (u16, String) {
    let raw = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    s.write_all(raw.as_bytes()).expect("send the request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("read the answer's head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).expect("read the answer's body");
    parse_answer(&format!("{head}{}", String::from_utf8_lossy(&body)))
}

/// Status code and body of an HTTP answer.
pub fn parse_answer(answer: &str) -> (u16, String) {
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_owned())
}

/// The `fault_message` of an error body.
pub fn fault(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"));
    v["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_owned()
}

/// A Skiff process whose console lines arrive on a channel.
pub struct Running {
    pub child: Child,
    pub sock: PathBuf,
    lines: Receiver<String>,
    console: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    /// Starts `skiff --api-sock <fresh path> extra...` and waits for the socket.
    pub fn start(name: &str, extra: &[&str]) -> Self {
        Self::start_in(name, None, extra)
    }

    /// Like [`Running::start`], in the working directory `cwd` when given (relative paths
    /// in API requests are then taken from there).
    pub fn start_in(name: &str, cwd: Option<&Path>, extra: &[&str]) -> Self {
        let sock = Self::fresh_sock(name);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_skiff"));
        cmd.arg("--api-sock").arg(&sock).args(extra);
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        let me = Self::spawn(cmd, sock);
        me.wait_for_socket();
        me
    }

    /// The API socket path for `name`, with any leftover of an earlier run removed.
    pub fn fresh_sock(name: &str) -> PathBuf {
        let sock = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&sock);
        sock
    }

    /// Waits up to 10 s for the API socket to appear.
    pub fn wait_for_socket(&self) {
        let start = Instant::now();
        while !self.sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no API socket\nstderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Runs `cmd` with its output captured; `sock` is where its API is, if anywhere.
    pub fn spawn(mut cmd: Command, sock: PathBuf) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start skiff");
        let (tx, lines) = channel();
        let console = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().unwrap();
        let all = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                all.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let all_err = stderr.clone();
        std::thread::spawn(move || {
            // Appended as it comes, so a test can read the log of a Skiff still running.
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                all_err
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            child,
            sock,
            lines,
            console,
            stderr,
        }
    }

    /// A request to this Skiff's API.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        call(&self.sock, method, path, body)
    }

    /// Waits for a console line containing `text`; returns it.
    pub fn wait_for(&self, text: &str, limit: Duration) -> String {
        self.try_wait_for(text, limit).unwrap_or_else(|| {
            panic!(
                "no console line with {text:?} within {limit:?}\nconsole:\n{}\nstderr:\n{}",
                self.console(),
                self.stderr()
            )
        })
    }

    /// Waits for a console line containing `text`; returns it, or None when none came
    /// within `limit` (or the process ended first).
    pub fn try_wait_for(&self, text: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return Some(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Console lines that arrive within `window`.
    pub fn lines_within(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            got.push(line);
        }
        got
    }

    /// Everything the guest printed so far.
    pub fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    /// Skiff's stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the process to end; its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads drain.
                std::thread::sleep(Duration::from_millis(50));
                return status.code();
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("skiff did not end within {limit:?}\n{}", self.console());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
