//! seccomp-bpf filters, one per thread kind (main, vCPU, event, API), each installed by its
//! thread once it has opened what it needs and before it touches anything a guest or client
//! controls. A thread that makes a system call outside its filter ends the whole process with
//! status [`BAD_SYSCALL_EXIT`] after one line on stderr naming the thread and the call.
//!
//! The filters are written in seccompiler's JSON format (`resources/seccomp/x86_64.json`,
//! compiled into the binary), which is also what `--seccomp-filter FILE` takes: an object with
//! one filter per thread kind, keyed `main`, `vcpu`, `event` and `api` (Firecracker's `vmm` is
//! taken for both `main` and `event`). A kind missing from a custom file runs unfiltered.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use seccompiler::{BpfMap, BpfProgram};

/// The filters Skiff ships.
const DEFAULT_FILTERS: &str = include_str!("../resources/seccomp/x86_64.json");

/// The exit status of a process one of whose threads made a forbidden system call (as
/// Firecracker's).
pub const BAD_SYSCALL_EXIT: i32 = 148;

/// The kinds of thread Skiff runs, each with a filter of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread (the controller) once the VM runs.
    Main,
    /// A vCPU thread.
    Vcpu,
    /// The device (event-manager) thread.
    Event,
    /// The API server thread.
    Api,
}

impl ThreadKind {
    const ALL: [ThreadKind; 4] = [Self::Main, Self::Vcpu, Self::Event, Self::Api];

    /// The key of this kind's filter in a filter file.
    fn key(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Vcpu => "vcpu",
            Self::Event => "event",
            Self::Api => "api",
        }
    }
}

/// Which filters the threads install.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SeccompConfig {
    /// Skiff's own filters.
    #[default]
    Default,
    /// No filters (`--no-seccomp`).
    None,
    /// Filters from a seccompiler JSON file (`--seccomp-filter`).
    Custom(PathBuf),
}

/// Errors while loading or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter file cannot be read.
    #[error("cannot read seccomp filter file {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    /// The filter file is not a valid seccompiler JSON filter for this architecture.
    #[error("seccomp filter file {}: {}", .0.display(), .1)]
    Compile(PathBuf, String),
    /// Skiff's own filters do not compile (a build defect).
    #[error("Skiff's default seccomp filters do not compile: {0}")]
    Default(String),
    /// The kernel refused a filter.
    #[error("cannot install the seccomp filter of the {0} thread: {1}")]
    Install(&'static str, String),
}

/// The compiled filters, one per thread kind (none where a kind runs unfiltered).
#[derive(Debug, Clone, Default)]
pub struct Filters {
    programs: HashMap<ThreadKind, BpfProgram>,
}

impl Filters {
    /// Compiles the filters `config` names. Call it before starting the threads it is for:
    /// it also makes every later thread allocate from glibc's main arena, since freeing in a
    /// thread arena may make glibc open /proc/sys/vm/overcommit_memory, which no filter allows.
    pub fn load(config: &SeccompConfig) -> Result<Self, SeccompError> {
        let map = match config {
            SeccompConfig::None => return Ok(Self::default()),
            SeccompConfig::Default => compile(DEFAULT_FILTERS.as_bytes())
                .map_err(|e| SeccompError::Default(e.to_string()))?,
            SeccompConfig::Custom(path) => {
                let file =
                    std::fs::File::open(path).map_err(|e| SeccompError::Read(path.clone(), e))?;
                compile(file).map_err(|e| SeccompError::Compile(path.clone(), e.to_string()))?
            }
        };
        let filters = Self::from_map(map);
        if !filters.programs.is_empty() {
            // SAFETY: mallopt only changes a malloc tunable; M_ARENA_MAX takes any int.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
        }
        Ok(filters)
    }

    fn from_map(mut map: BpfMap) -> Self {
        let vmm = map.remove("vmm");
        let mut programs = HashMap::new();
        for kind in ThreadKind::ALL {
            let program = map.remove(kind.key()).or_else(|| match kind {
                ThreadKind::Main | ThreadKind::Event => vmm.clone(),
                _ => None,
            });
            if let Some(program) = program.filter(|p| !p.is_empty()) {
                programs.insert(kind, program);
            }
        }
        Self { programs }
    }

    /// Installs `kind`'s filter on the calling thread; for good: a thread cannot drop it.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let Some(program) = self.programs.get(&kind) else {
            return Ok(());
        };
        install_sigsys_handler();
        THREAD_KIND.with(|k| k.set(Some(kind)));
        seccompiler::apply_filter(program)
            .map_err(|e| SeccompError::Install(kind.key(), e.to_string()))
    }

    /// Whether `kind` runs under a filter.
    pub fn filters(&self, kind: ThreadKind) -> bool {
        self.programs.contains_key(&kind)
    }
}

fn compile(reader: impl std::io::Read) -> Result<BpfMap, seccompiler::Error> {
    seccompiler::compile_from_json(reader, seccompiler::TargetArch::x86_64)
}

/// Compiles a filter file, for a clear error before anything starts.
pub fn check_file(path: &Path) -> Result<(), SeccompError> {
    Filters::load(&SeccompConfig::Custom(path.to_owned())).map(|_| ())
}

thread_local! {
    /// The filter this thread runs under, for the SIGSYS report.
    static THREAD_KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Reports the forbidden call and ends the process. Only async-signal-safe calls, both of
/// which every filter allows: write(2) and exit_group(2).
extern "C" fn handle_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: for SIGSYS the kernel fills the `_sigsys` member of siginfo: a pointer (the call
    // address) at byte 16, then the system call number as an int at byte 24 (siginfo.h).
    let nr = unsafe {
        info.cast::<u8>()
            .add(24)
            .cast::<libc::c_int>()
            .read_unaligned()
    };
    let kind = THREAD_KIND
        .with(Cell::get)
        .map_or("unknown", ThreadKind::key);
    let mut line = [0u8; 160];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"skiff: error: seccomp: the ");
    put(kind.as_bytes());
    put(b" thread made system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b", which its filter forbids; exiting\n");
    // SAFETY: write(2) of a valid stack buffer and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::_exit(BAD_SYSCALL_EXIT);
    }
}

fn install_sigsys_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, handle_sigsys) {
            // Without the handler a forbidden call still ends the process (SIGSYS's default
            // action), only without the line that names it.
            log::warn!("cannot install the SIGSYS handler: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_filters_compile_for_every_thread_kind() {
        let filters = Filters::load(&SeccompConfig::Default).unwrap();
        for kind in ThreadKind::ALL {
            assert!(filters.filters(kind), "{kind:?}");
        }
        assert!(!Filters::load(&SeccompConfig::None)
            .unwrap()
            .filters(ThreadKind::Vcpu));
    }

    #[test]
    fn custom_files_are_checked() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("skiff-seccomp-{}.json", std::process::id()));
        std::fs::write(&path, "{\"vcpu\": {\"mismatch_action\": \"trap\"").unwrap();
        let err = check_file(&path).unwrap_err().to_string();
        assert!(err.starts_with("seccomp filter file "), "{err}");
        std::fs::write(
            &path,
            r#"{"vmm": {"mismatch_action": "trap", "match_action": "allow",
                "filter": [{"syscall": "read"}]}}"#,
        )
        .unwrap();
        let filters = Filters::load(&SeccompConfig::Custom(path.clone())).unwrap();
        assert!(filters.filters(ThreadKind::Main) && filters.filters(ThreadKind::Event));
        assert!(!filters.filters(ThreadKind::Vcpu) && !filters.filters(ThreadKind::Api));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(check_file(&path), Err(SeccompError::Read(..))));
    }
}
