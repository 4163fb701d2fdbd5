//! `skiff-jailer`: Firecracker's `jailer` command for Skiff. It takes the same flags, makes
//! the same jail and execs the VMM in it with the same arguments, so a tool that runs
//! `jailer --id ... --exec-file firecracker ...` can run this with `--exec-file skiff`.
//! The work is [`skiff::jailer::run`]; this file parses the command line and prints errors.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use log::LevelFilter;
use skiff::jailer::{
    CgroupSetting, CgroupVersion, InstanceId, JailConfig, ResourceLimit, DEFAULT_CHROOT_BASE,
};

/// Jails a microVM monitor and execs it: a chroot at
/// <chroot-base-dir>/<exec-file name>/<id>/root entered by pivot_root, its own cgroup, a
/// network namespace, resource limits, and the given uid and gid.
#[derive(Debug, Parser)]
#[command(
    name = "skiff-jailer",
    version,
    after_help = "Arguments after -- are passed to the jailed binary, after --id <ID> and the \
                  start-time arguments the jailer adds."
)]
struct Cli {
    /// VM id: 1 to 64 ASCII letters, digits and '-'. Names the jail and the cgroup.
    #[arg(long, value_name = "ID")]
    id: InstanceId,
    /// The VMM binary, copied into the jail and exec'd there.
    #[arg(long, value_name = "PATH")]
    exec_file: PathBuf,
    /// The user ID the VMM runs as.
    #[arg(long, value_name = "UID")]
    uid: u32,
    /// The group ID the VMM runs as.
    #[arg(long, value_name = "GID")]
    gid: u32,
    /// Where jails are made.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CHROOT_BASE)]
    chroot_base_dir: PathBuf,
    /// Network namespace to join: a name made by `ip netns add`, or the path of a namespace
    /// file (such as /var/run/netns/NAME).
    #[arg(long, value_name = "NAME|PATH")]
    netns: Option<String>,
    /// A cgroup file of the VM's cgroup and its value, such as cpu.weight=100 or
    /// memory.max=256M. Repeatable.
    #[arg(long = "cgroup", value_name = "FILE=VALUE")]
    cgroups: Vec<CgroupSetting>,
    /// Which cgroup interface the --cgroup settings are for: 1 or 2.
    #[arg(long, value_name = "1|2", default_value = "1")]
    cgroup_version: CgroupVersion,
    /// Where the VM's cgroup goes below the hierarchy's root (default: the exec file's
    /// name). Without --cgroup, under cgroup v2, the VMM joins this cgroup if it exists.
    #[arg(long, value_name = "PATH")]
    parent_cgroup: Option<String>,
    /// fsize=BYTES or no-file=N (default no-file=2048). Repeatable.
    #[arg(long = "resource-limit", value_name = "RESOURCE=VALUE")]
    resource_limits: Vec<ResourceLimit>,
    /// Start a new session and point stdin, stdout and stderr at /dev/null.
    #[arg(long)]
    daemonize: bool,
    /// Exec the VMM as PID 1 of a new PID namespace.
    #[arg(long)]
    new_pid_ns: bool,
    /// Arguments for the jailed binary.
    #[arg(last = true, value_name = "ARGS")]
    exec_args: Vec<OsString>,
}

/// Prints one error line.
fn fail(line: &str, code: u8) -> ExitCode {
    eprintln!("skiff-jailer: error: {line}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // clap's first line says what is wrong; the rest is usage advice.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            return fail(first.trim_start_matches("error: "), 2);
        }
    };
    skiff::logger::init(LevelFilter::Warn);
    let parent_cgroup = match cli
        .parent_cgroup
        .as_deref()
        .map(skiff::jailer::parent_cgroup_path)
    {
        Some(Err(e)) => return fail(&e.to_string(), 2),
        Some(Ok(path)) => Some(path),
        None => None,
    };
    let config = JailConfig {
        id: cli.id,
        exec_file: cli.exec_file,
        uid: cli.uid,
        gid: cli.gid,
        chroot_base_dir: cli.chroot_base_dir,
        netns: cli.netns,
        cgroup_version: cli.cgroup_version,
        cgroups: cli.cgroups,
        parent_cgroup,
        resource_limits: cli.resource_limits,
        daemonize: cli.daemonize,
        new_pid_ns: cli.new_pid_ns,
        exec_args: cli.exec_args,
    };
    // SAFETY: this process has no other thread, and nothing here uses a descriptor above 2
    // after the call (the jailer closes them all).
    match unsafe { skiff::jailer::run(&config) } {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&skiff::error_chain(&e), 1),
    }
}
