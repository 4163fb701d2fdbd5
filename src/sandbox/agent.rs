//! The host's side of the agent protocol (see [`skiff_agent`] for the frames): one
//! connection per request through the vsock device's Unix socket, with Firecracker's
//! `CONNECT <port>` handshake.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use skiff_agent::{
    read_frame, write_frame, AgentFrame, ExecRequest, ExitStatus, HostFrame, CHUNK,
    PROTOCOL_VERSION,
};

use super::SandboxError;

/// How long the vsock device may take to answer `CONNECT` (it answers once the guest has
/// accepted or refused; a guest kernel that is emulated can take a while).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent of one VM, reached through the vsock device's Unix socket.
#[derive(Debug, Clone)]
pub struct Agent {
    uds: PathBuf,
    /// The vsock port, or `None` for an agent listening on `uds` itself (`skiff-agent
    /// --unix`, on the host: how its tests reach it without a VM).
    port: Option<u32>,
    /// How long a connection is tried again while nothing listens yet.
    patience: Duration,
}

/// How a command ended, as the agent saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub status: ExitStatus,
    /// The agent killed the command because its timeout passed.
    pub timed_out: bool,
    /// From the call to the agent's word that the command started (connection included).
    pub started_after: Duration,
    /// From the call to the command's exit status.
    pub total: Duration,
}

impl Outcome {
    /// The exit code a shell would give: the command's code, 128 + N for signal N, 124 for a
    /// timeout (as `timeout` gives).
    pub fn exit_code(&self) -> i32 {
        match self.status {
            _ if self.timed_out => 124,
            ExitStatus::Code(code) => code,
            ExitStatus::Signal(sig) => 128 + sig,
        }
    }
}

fn protocol(what: impl Into<String>) -> SandboxError {
    SandboxError::Agent(what.into())
}

/// Reads the agent's next frame; the connection ending is an error here.
fn next(conn: &mut impl Read, during: &str) -> Result<AgentFrame, SandboxError> {
    match read_frame::<AgentFrame>(conn) {
        Ok(Some(frame)) => Ok(frame),
        Ok(None) => Err(protocol(format!("closed the connection during {during}"))),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            Err(protocol(format!("sent a bad frame during {during}: {e}")))
        }
        Err(e) => Err(SandboxError::Io(
            format!("reading from the agent during {during}"),
            e,
        )),
    }
}

fn unexpected(frame: &AgentFrame, during: &str) -> SandboxError {
    match frame {
        AgentFrame::Error(why) => protocol(format!("refused {during}: {why}")),
        other => protocol(format!("sent {} during {during}", frame_name(other))),
    }
}

fn frame_name(frame: &AgentFrame) -> &'static str {
    match frame {
        AgentFrame::Hello { .. } => "Hello",
        AgentFrame::Started { .. } => "Started",
        AgentFrame::Stdout(_) => "Stdout",
        AgentFrame::Stderr(_) => "Stderr",
        AgentFrame::Exited { .. } => "Exited",
        AgentFrame::Data(_) => "Data",
        AgentFrame::Eof => "Eof",
        AgentFrame::Done => "Done",
        AgentFrame::Error(_) => "Error",
    }
}

impl Agent {
    /// The agent listening on vsock `port` of the VM whose vsock device serves `uds`.
    pub fn new(uds: impl Into<PathBuf>, port: u32) -> Self {
        Self {
            uds: uds.into(),
            port: Some(port),
            patience: Duration::ZERO,
        }
    }

    /// An agent listening on the Unix socket `path` itself (`skiff-agent --unix PATH`).
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self {
            uds: path.into(),
            port: None,
            patience: Duration::ZERO,
        }
    }

    /// The same agent, its connections tried again for up to `patience` while nothing
    /// listens (a guest whose vsock transport is still being reset after a restore).
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// The vsock device's socket.
    pub fn uds(&self) -> &Path {
        &self.uds
    }

    /// A new connection to the agent, tried again within the patience given.
    fn connect(&self) -> Result<UnixStream, SandboxError> {
        let start = Instant::now();
        loop {
            match self.connect_once() {
                Err(SandboxError::NotListening { .. }) if start.elapsed() < self.patience => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    /// A new connection to the agent: `CONNECT <port>` answered by `OK <port>`.
    fn connect_once(&self) -> Result<UnixStream, SandboxError> {
        let io = |what: &str, e| SandboxError::Io(format!("{what} {}", self.uds.display()), e);
        let stream = UnixStream::connect(&self.uds).map_err(|e| io("cannot connect to", e))?;
        let Some(port) = self.port else {
            return Ok(stream);
        };
        stream
            .set_read_timeout(Some(CONNECT_TIMEOUT))
            .map_err(|e| io("cannot set a timeout on", e))?;
        (&stream)
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(|e| io("cannot write to", e))?;
        // Byte by byte: what follows the line is the agent's, not ours to buffer.
        let mut line = Vec::new();
        let mut byte = [0u8];
        while line.len() < 64 {
            match (&stream).read(&mut byte) {
                Ok(0) => break,
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io("no answer to CONNECT from", e)),
            }
        }
        if !line.starts_with(b"OK ") {
            return Err(SandboxError::NotListening {
                port,
                uds: self.uds.clone(),
            });
        }
        stream
            .set_read_timeout(None)
            .map_err(|e| io("cannot clear the timeout on", e))?;
        Ok(stream)
    }

    /// Asks the agent who it is; its answer (`skiff-agent <version>`).
    pub fn hello(&self) -> Result<String, SandboxError> {
        let mut conn = self.connect()?;
        send(
            &mut conn,
            &HostFrame::Hello {
                version: PROTOCOL_VERSION,
            },
        )?;
        match next(&mut conn, "the greeting")? {
            AgentFrame::Hello { version, agent } if version == PROTOCOL_VERSION => Ok(agent),
            AgentFrame::Hello { version, .. } => Err(protocol(format!(
                "speaks protocol version {version}, not {PROTOCOL_VERSION}"
            ))),
            other => Err(unexpected(&other, "the greeting")),
        }
    }

    /// Greets the agent until it answers or `timeout` passes (a guest still booting has no
    /// listener yet: its vsock device refuses the connection).
    pub fn wait_ready(&self, timeout: Duration) -> Result<String, SandboxError> {
        let start = Instant::now();
        loop {
            match self.hello() {
                Ok(agent) => return Ok(agent),
                Err(e @ SandboxError::Agent(_)) => return Err(e),
                Err(e) if start.elapsed() >= timeout => {
                    return Err(SandboxError::NotReady(timeout, Box::new(e)))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Runs `req`, writing its output to `stdout` and `stderr` as it comes and, when `stdin`
    /// is given (and `req.stdin` set), streaming that to it from a thread of its own.
    pub fn exec(
        &self,
        req: &ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<Outcome, SandboxError> {
        let start = Instant::now();
        let mut conn = self.connect()?;
        send(&mut conn, &HostFrame::Exec(req.clone()))?;
        match next(&mut conn, "the command's start")? {
            AgentFrame::Started { .. } => {}
            other => return Err(unexpected(&other, "the command's start")),
        }
        let started_after = start.elapsed();
        let writer = Arc::new(Mutex::new(conn.try_clone().map_err(|e| {
            SandboxError::Io("cannot clone the agent connection".into(), e)
        })?));
        if let (Some(mut input), true) = (stdin, req.stdin) {
            let writer = writer.clone();
            std::thread::Builder::new()
                .name("sandbox-stdin".into())
                .spawn(move || {
                    let mut buf = vec![0u8; CHUNK];
                    loop {
                        let frame = match input.read(&mut buf) {
                            Ok(0) | Err(_) => HostFrame::StdinEof,
                            Ok(n) => HostFrame::Stdin(buf[..n].to_vec()),
                        };
                        let end = frame == HostFrame::StdinEof;
                        let mut w = writer.lock().unwrap_or_else(PoisonError::into_inner);
                        // The command may be over and the connection gone: nothing to do.
                        if write_frame(&mut *w, &frame).is_err() || end {
                            return;
                        }
                    }
                })
                .map_err(|e| SandboxError::Io("cannot start the stdin thread".into(), e))?;
        }
        let io = |e| SandboxError::Io("cannot write the command's output".into(), e);
        loop {
            match next(&mut conn, "the command")? {
                AgentFrame::Stdout(data) => {
                    stdout.write_all(&data).map_err(io)?;
                    stdout.flush().map_err(io)?;
                }
                AgentFrame::Stderr(data) => {
                    stderr.write_all(&data).map_err(io)?;
                    stderr.flush().map_err(io)?;
                }
                AgentFrame::Exited { status, timed_out } => {
                    return Ok(Outcome {
                        status,
                        timed_out,
                        started_after,
                        total: start.elapsed(),
                    })
                }
                other => return Err(unexpected(&other, "the command")),
            }
        }
    }

    /// Writes `data` to the guest file `path` (made with `mode`, parents made as needed).
    pub fn put(&self, data: &mut dyn Read, path: &str, mode: u32) -> Result<u64, SandboxError> {
        let mut conn = self.connect()?;
        let during = format!("the upload of {path}");
        send(
            &mut conn,
            &HostFrame::PutFile {
                path: path.to_owned(),
                mode,
            },
        )?;
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = match data.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SandboxError::Io(format!("reading the data for {path}"), e)),
            };
            if n == 0 {
                break;
            }
            total += n as u64;
            send(&mut conn, &HostFrame::Data(buf[..n].to_vec()))?;
        }
        send(&mut conn, &HostFrame::Eof)?;
        match next(&mut conn, &during)? {
            AgentFrame::Done => Ok(total),
            other => Err(unexpected(&other, &during)),
        }
    }

    /// Reads the guest file `path` into `out`; returns its length.
    pub fn get(&self, path: &str, out: &mut dyn Write) -> Result<u64, SandboxError> {
        let mut conn = self.connect()?;
        let during = format!("the download of {path}");
        send(
            &mut conn,
            &HostFrame::GetFile {
                path: path.to_owned(),
            },
        )?;
        let mut total = 0u64;
        loop {
            match next(&mut conn, &during)? {
                AgentFrame::Data(bytes) => {
                    out.write_all(&bytes)
                        .map_err(|e| SandboxError::Io(format!("writing {path}'s data"), e))?;
                    total += bytes.len() as u64;
                }
                AgentFrame::Eof => return Ok(total),
                other => return Err(unexpected(&other, &during)),
            }
        }
    }
}

fn send(conn: &mut UnixStream, frame: &HostFrame) -> Result<(), SandboxError> {
    write_frame(conn, frame).map_err(|e| SandboxError::Io("cannot write to the agent".into(), e))
}
