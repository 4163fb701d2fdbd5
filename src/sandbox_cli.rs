//! `skiff sandbox prepare|run|shell` and `skiff exec`: the command line over
//! [`skiff::sandbox`]. A command's exit code becomes Skiff's (128 + N for signal N, 124 for a
//! timeout); Skiff's own failures exit with 125, as container runners do, so the two never mix.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use skiff::sandbox::{
    self, Agent, ExecRequest, Outcome, PrepareOptions, Sandbox, SandboxError, WinSize,
};

/// Skiff's own failure, as opposed to the command's.
const FAILED: u8 = 125;

#[derive(Debug, clap::Subcommand)]
pub enum SandboxCommand {
    /// Boot a kernel with a sandbox root image (resources/sandbox/build.sh), wait until its
    /// agent answers, and snapshot it into a directory that `run` and `shell` clone.
    Prepare(PrepareArgs),
    /// Run a command in a fresh clone of a prepared sandbox: its output streams to ours, its
    /// exit code becomes ours, and nothing of the clone remains afterwards.
    Run(RunArgs),
    /// An interactive shell (or CMD) on a pseudo-terminal in a fresh clone.
    Shell(ShellArgs),
}

#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    /// The guest kernel (resources/linux/build.sh's vmlinux).
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// The root image, whose /usr/sbin/skiff-agent is Skiff's agent.
    #[arg(long, value_name = "PATH")]
    rootfs: PathBuf,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    memory: u64,
    /// Seconds the guest may take to boot and answer.
    #[arg(long, default_value_t = 300, value_name = "S")]
    boot_timeout: u64,
    /// The directory to make (it must not hold a sandbox already).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// What a command gets, shared by `sandbox run`, `sandbox shell` and `exec`.
#[derive(Debug, clap::Args)]
pub struct CommandArgs {
    /// Kill the command (and everything it started) after S seconds; exit code 124.
    #[arg(long, value_name = "S")]
    timeout: Option<f64>,
    /// Set a variable for the command. Repeatable.
    #[arg(long, value_name = "K=V", value_parser = key_value)]
    env: Vec<(String, String)>,
    /// The command's working directory (default /).
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, value_name = "CMD")]
    argv: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The prepared sandbox directory.
    dir: PathBuf,
    /// Copy a host file into the clone before the command: HOST:GUEST. Repeatable.
    #[arg(long, value_name = "HOST:GUEST", value_parser = colon_pair)]
    put: Vec<(String, String)>,
    /// Copy a guest file out after the command: GUEST:HOST. Repeatable.
    #[arg(long, value_name = "GUEST:HOST", value_parser = colon_pair)]
    get: Vec<(String, String)>,
    /// Stream our standard input to the command even when it is a terminal (it is streamed
    /// whenever it is not one).
    #[arg(short, long)]
    interactive: bool,
    /// Print the time each step took on stderr: restore, put, agent (connection and the
    /// command's start), command, get, clean-up.
    #[arg(long)]
    timings: bool,
    #[command(flatten)]
    cmd: CommandArgs,
}

#[derive(Debug, clap::Args)]
pub struct ShellArgs {
    /// The prepared sandbox directory.
    dir: PathBuf,
    #[command(flatten)]
    cmd: CommandArgs,
}

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The vsock device's Unix socket of a running VM whose guest runs the agent.
    #[arg(long, value_name = "PATH")]
    vsock: PathBuf,
    /// The agent's vsock port.
    #[arg(long, default_value_t = sandbox::AGENT_PORT, value_name = "N")]
    port: u32,
    /// Run the command on a pseudo-terminal (interactive programs, shells).
    #[arg(short, long)]
    tty: bool,
    /// Stream our standard input even when it is a terminal.
    #[arg(short, long)]
    interactive: bool,
    #[command(flatten)]
    cmd: CommandArgs,
}

fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

fn colon_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once(':') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_owned(), b.to_owned())),
        _ => Err(format!("'{text}' is not FROM:TO")),
    }
}

fn request(cmd: &CommandArgs, default_argv: &[&str]) -> Result<ExecRequest, String> {
    let argv = if cmd.argv.is_empty() {
        if default_argv.is_empty() {
            return Err("no command given: put it after --".into());
        }
        default_argv.iter().map(|s| s.to_string()).collect()
    } else {
        cmd.argv.clone()
    };
    let timeout_ms = match cmd.timeout {
        Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => {
            Some(u64::try_from(Duration::from_secs_f64(s).as_millis()).unwrap_or(u64::MAX))
        }
        Some(s) => return Err(format!("--timeout {s}: not a number of seconds above 0")),
        None => None,
    };
    Ok(ExecRequest {
        argv,
        env: cmd.env.clone(),
        cwd: cmd.cwd.clone(),
        stdin: false,
        pty: None,
        timeout_ms,
    })
}

fn fail(what: &str) -> ExitCode {
    eprintln!("skiff: error: {what}");
    ExitCode::from(FAILED)
}

fn exit_with(outcome: Outcome) -> ExitCode {
    if outcome.timed_out {
        eprintln!("skiff: the command timed out and was killed");
    }
    ExitCode::from(u8::try_from(outcome.exit_code()).unwrap_or(FAILED))
}

/// Our standard input, read through a descriptor of its own: std's `Stdin` would hold its
/// lock while the forwarding thread waits in `read`, and restoring the terminal needs that lock.
fn raw_stdin() -> Box<dyn Read + Send> {
    use std::os::fd::AsFd;
    match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(std::fs::File::from(fd)),
        Err(_) => Box::new(std::io::empty()),
    }
}

/// Standard input for the command: streamed when it is not a terminal, or when asked.
fn stdin_stream(force: bool) -> Option<Box<dyn Read + Send>> {
    (force || !std::io::stdin().is_terminal()).then(raw_stdin)
}

/// The terminal's size (24x80 when standard output is not a terminal).
fn window_size() -> WinSize {
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ on stdout with a valid winsize.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_row > 0 && ws.ws_col > 0 {
        WinSize {
            rows: ws.ws_row,
            cols: ws.ws_col,
        }
    } else {
        WinSize { rows: 24, cols: 80 }
    }
}

pub fn sandbox(cmd: SandboxCommand) -> ExitCode {
    match cmd {
        SandboxCommand::Prepare(args) => prepare(&args),
        SandboxCommand::Run(args) => run(&args),
        SandboxCommand::Shell(args) => shell(&args),
    }
}

fn prepare(args: &PrepareArgs) -> ExitCode {
    let mut opts = PrepareOptions::new(&args.kernel, &args.rootfs, &args.out);
    opts.vcpus = args.vcpus;
    opts.memory_mib = args.memory;
    opts.boot_timeout = Duration::from_secs(args.boot_timeout);
    match sandbox::prepare(&opts) {
        Ok(m) => {
            eprintln!(
                "skiff: sandbox prepared in {} ({}, agent answered {} ms after the boot started)",
                args.out.display(),
                m.agent,
                m.boot_to_agent_ms
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&skiff::error_chain(&e)),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run(args: &RunArgs) -> ExitCode {
    let mut req = match request(&args.cmd, &[]) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let stdin = stdin_stream(args.interactive);
    req.stdin = stdin.is_some();
    let t0 = Instant::now();
    let mut sandbox = match Sandbox::restore(&args.dir) {
        Ok(s) => s,
        Err(e) => return fail(&skiff::error_chain(&e)),
    };
    let result = run_in(&mut sandbox, args, &req, stdin, t0);
    let t_clean = Instant::now();
    drop(sandbox);
    let clean = t_clean.elapsed();
    match result {
        Ok((outcome, mut times)) => {
            if args.timings {
                times.push(("clean-up", clean));
                let line: Vec<String> = times
                    .iter()
                    .map(|(what, d)| format!("{what} {:.1} ms", ms(*d)))
                    .collect();
                eprintln!("skiff: timings: {}", line.join(", "));
            }
            exit_with(outcome)
        }
        Err(e) => fail(&skiff::error_chain(&e)),
    }
}

type Times = Vec<(&'static str, Duration)>;

fn run_in(
    sandbox: &mut Sandbox,
    args: &RunArgs,
    req: &ExecRequest,
    stdin: Option<Box<dyn Read + Send>>,
    t0: Instant,
) -> Result<(Outcome, Times), SandboxError> {
    let mut times = vec![("restore", t0.elapsed())];
    sandbox.vm().stop_on_signals()?;
    let t = Instant::now();
    for (host, guest) in &args.put {
        let mut file = std::fs::File::open(host)
            .map_err(|e| SandboxError::Io(format!("cannot open {host}"), e))?;
        let mode = file
            .metadata()
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
            .unwrap_or(0o644);
        sandbox.agent().put(&mut file, guest, mode)?;
    }
    if !args.put.is_empty() {
        times.push(("put", t.elapsed()));
    }
    let outcome = sandbox.agent().exec(
        req,
        stdin,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )?;
    // The agent's part: the connection through the guest's vsock and the command's start.
    times.push(("agent", outcome.started_after));
    times.push(("command", outcome.total - outcome.started_after));
    let t = Instant::now();
    for (guest, host) in &args.get {
        let mut file = std::fs::File::create(host)
            .map_err(|e| SandboxError::Io(format!("cannot create {host}"), e))?;
        sandbox.agent().get(guest, &mut file)?;
        file.flush()
            .map_err(|e| SandboxError::Io(format!("cannot write {host}"), e))?;
    }
    if !args.get.is_empty() {
        times.push(("get", t.elapsed()));
    }
    Ok((outcome, times))
}

/// Runs `req` on a PTY with our terminal in raw mode.
fn interactive(agent: &Agent, mut req: ExecRequest) -> Result<Outcome, SandboxError> {
    req.pty = Some(window_size());
    req.stdin = true;
    let _raw = crate::RawTerminal::enter();
    agent.exec(
        &req,
        Some(raw_stdin()),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )
}

fn shell(args: &ShellArgs) -> ExitCode {
    let req = match request(&args.cmd, &["bash", "-l"]) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let mut sandbox = match Sandbox::restore(&args.dir) {
        Ok(s) => s,
        Err(e) => return fail(&skiff::error_chain(&e)),
    };
    let result = sandbox
        .vm()
        .stop_on_signals()
        .map_err(SandboxError::from)
        .and_then(|()| interactive(sandbox.agent(), req));
    drop(sandbox);
    match result {
        Ok(outcome) => exit_with(outcome),
        Err(e) => fail(&skiff::error_chain(&e)),
    }
}

pub fn exec(args: &ExecArgs) -> ExitCode {
    let mut req = match request(&args.cmd, &[]) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let agent = Agent::new(&args.vsock, args.port);
    let result = if args.tty {
        interactive(&agent, req)
    } else {
        let stdin = stdin_stream(args.interactive);
        req.stdin = stdin.is_some();
        agent.exec(
            &req,
            stdin,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        )
    };
    match result {
        Ok(outcome) => exit_with(outcome),
        Err(e) => fail(&skiff::error_chain(&e)),
    }
}
