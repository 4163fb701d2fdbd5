//! The wire protocol between Skiff's sandbox host side (`skiff::sandbox`) and its guest agent
//! (the `skiff-agent` binary of this crate, PID 1 in a sandbox guest).
//!
//! # Transport
//! One request per vsock stream connection: the host connects to the agent's port
//! ([`AGENT_PORT`] unless told otherwise; through Skiff's vsock device, `CONNECT <port>\n` on
//! the device's Unix socket), sends one request frame, then the frames that request takes,
//! and reads the answer frames until the last one ([`AgentFrame::Exited`], [`AgentFrame::Done`],
//! [`AgentFrame::Eof`] after file data, [`AgentFrame::Hello`] or [`AgentFrame::Error`]). Several
//! connections are served at once, each by its own agent thread.
//!
//! # Frames
//! A frame is a 4-byte little-endian length, then that many bytes: a [`HostFrame`] or an
//! [`AgentFrame`] in bincode's standard encoding (varint integers) of its serde form. A frame
//! is at most [`MAX_FRAME`] bytes; data travels in chunks of at most [`CHUNK`] bytes.
//!
//! # Conversations (host frames → agent frames)
//! - `Hello { version }` → `Hello { version, agent }`: the agent is up and speaks `version`
//!   ([`PROTOCOL_VERSION`]); a host that wants another version gets `Error` instead.
//! - `Exec(ExecRequest)` → `Started { pid }`, then `Stdout` / `Stderr` as the command writes,
//!   and finally `Exited`. Meanwhile the host may send `Stdin`, `StdinEof`, `Signal` (to the
//!   command's whole process group) and `Resize` (PTY only). The command runs in a session
//!   and process group of its own; when it exits, when its timeout passes, or when the host
//!   goes away, what is left of that group is killed with SIGKILL.
//! - `PutFile { path, mode }`, then `Data` chunks and `Eof` → `Done` (or `Error`). Parent
//!   directories are made; an existing file is replaced.
//! - `GetFile { path }` → `Data` chunks and `Eof` (or `Error`).
//! - Anything else, or a frame that does not decode → `Error`, and the connection closes.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The version [`HostFrame::Hello`] and [`AgentFrame::Hello`] carry; bumped by any change to
/// the frames below.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent listens on by default.
pub const AGENT_PORT: u32 = 1024;

/// The largest frame either side sends or accepts (length prefix excluded).
pub const MAX_FRAME: usize = 1 << 20;

/// The largest data chunk (command output, stdin, file contents) in one frame.
pub const CHUNK: usize = 64 << 10;

/// A terminal's size, for a command run on a PTY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// What to run and how.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The program (looked up in PATH when it has no slash) and its arguments.
    pub argv: Vec<String>,
    /// Variables added to the agent's environment (PATH, HOME, TERM, LANG), or replacing them.
    pub env: Vec<(String, String)>,
    /// The working directory; `/` when not given.
    pub cwd: Option<String>,
    /// Whether the host streams standard input (`Stdin`, `StdinEof`); without it the command
    /// reads /dev/null.
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size: stdin, stdout and stderr are its slave side, and
    /// all output comes back as `Stdout`.
    pub pty: Option<WinSize>,
    /// Kill the command's process group this many milliseconds after it started.
    pub timeout_ms: Option<u64>,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

/// Frames the host sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostFrame {
    Hello { version: u32 },
    Exec(ExecRequest),
    PutFile { path: String, mode: u32 },
    GetFile { path: String },
    Stdin(Vec<u8>),
    StdinEof,
    Signal(i32),
    Resize(WinSize),
    Data(Vec<u8>),
    Eof,
}

/// Frames the agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentFrame {
    Hello {
        version: u32,
        agent: String,
    },
    Started {
        pid: u32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command ended; `timed_out` when the agent killed it because its timeout passed.
    Exited {
        status: ExitStatus,
        timed_out: bool,
    },
    Data(Vec<u8>),
    Eof,
    Done,
    Error(String),
}

fn config() -> impl bincode::config::Config {
    // The limit keeps a hostile length inside a frame from asking for a huge allocation.
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, frame: &T) -> io::Result<()> {
    let body = bincode::serde::encode_to_vec(frame, config())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if body.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {} bytes is over {MAX_FRAME}", body.len()),
        ));
    }
    let len = u32::try_from(body.len()).expect("MAX_FRAME fits in u32");
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` when the stream ends cleanly before a frame starts.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over {MAX_FRAME}"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let (frame, used) = bincode::serde::decode_from_slice(&body, config())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad frame: {e}")))?;
    if used != len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad frame: {} bytes left over", len - used),
        ));
    }
    Ok(Some(frame))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frames = vec![
            HostFrame::Hello { version: 1 },
            HostFrame::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "exit 7".into()],
                env: vec![("A".into(), "b".into())],
                cwd: Some("/tmp".into()),
                stdin: true,
                pty: Some(WinSize { rows: 24, cols: 80 }),
                timeout_ms: Some(1000),
            }),
            HostFrame::Stdin(vec![7; CHUNK]),
            HostFrame::Eof,
        ];
        let mut wire = Vec::new();
        for f in &frames {
            write_frame(&mut wire, f).unwrap();
        }
        let mut r = &wire[..];
        for f in &frames {
            assert_eq!(read_frame::<HostFrame>(&mut r).unwrap().as_ref(), Some(f));
        }
        assert_eq!(read_frame::<HostFrame>(&mut r).unwrap(), None);
    }

    #[test]
    fn hostile_frames_are_errors() {
        // Over the size limit.
        let mut r = &((u32::try_from(MAX_FRAME).unwrap() + 1).to_le_bytes())[..];
        assert_eq!(
            read_frame::<AgentFrame>(&mut r).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        // A length cut short, a body cut short.
        let mut r = &[1u8, 0][..];
        assert!(read_frame::<AgentFrame>(&mut r).is_err());
        let mut r = &[9u8, 0, 0, 0, 1][..];
        assert!(read_frame::<AgentFrame>(&mut r).is_err());
        // An unknown variant, and a Vec claiming more bytes than the frame has.
        let mut r = &[1u8, 0, 0, 0, 200][..];
        assert!(read_frame::<AgentFrame>(&mut r).is_err());
        let mut wire = vec![6u8, 0, 0, 0, 2, 0xfc, 0xff, 0xff, 0xff, 0x7f];
        wire.truncate(10);
        let mut r = &wire[..];
        assert!(read_frame::<AgentFrame>(&mut r).is_err());
        // Garbage after a valid frame's body.
        let mut wire = Vec::new();
        write_frame(&mut wire, &AgentFrame::Eof).unwrap();
        wire[0] += 1;
        wire.push(0);
        let mut r = &wire[..];
        assert!(read_frame::<AgentFrame>(&mut r).is_err());
    }
}
