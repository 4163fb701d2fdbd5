//! The jailed process's cgroup, made as Firecracker's jailer makes it: for each `--cgroup
//! FILE=VALUE`, the cgroup `<hierarchy>/<parent-cgroup>/<id>` is created, VALUE written to FILE
//! in it, and the jailer moves itself in, so the VMM it execs starts there.
//!
//! Under cgroup v2 there is one hierarchy (the `cgroup2` mount) and the controller a file
//! belongs to (`memory` for `memory.max`) is enabled in `cgroup.subtree_control` from the root
//! down to the new cgroup's parent. Under v1 each controller has its own mount; a new cpuset
//! cgroup gets its parent's CPUs and memory nodes, as the kernel does not fill them in.
//!
//! Everything that can be checked without touching the hierarchy (the mounts, the controllers
//! on offer) is checked by [`CgroupPlan::new`], before the jailer makes anything.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

/// Where the kernel lists this process's mounts.
const MOUNTS: &str = "/proc/self/mounts";

/// Errors while checking or making the cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `--cgroup-version` is neither 1 nor 2.
    #[error("'{0}' is not a cgroup version (1 or 2)")]
    Version(String),
    /// A `--cgroup` argument is not `FILE=VALUE` with a controller file name.
    #[error("{0}")]
    Setting(&'static str),
    /// `--parent-cgroup` is not a relative path below the hierarchy's root.
    #[error("--parent-cgroup {0}: must be a relative path without '.' or '..' components")]
    ParentPath(String),
    /// The mount table cannot be read.
    #[error("cannot read {MOUNTS}")]
    Mounts(#[source] io::Error),
    /// No cgroup2 file system is mounted.
    #[error("no cgroup v2 hierarchy is mounted (no cgroup2 entry in {MOUNTS})")]
    NoV2Hierarchy,
    /// No v1 hierarchy has this controller.
    #[error("--cgroup {file}: no cgroup v1 hierarchy with the {controller} controller is mounted")]
    NoV1Controller { file: String, controller: String },
    /// The v2 hierarchy does not offer this controller.
    #[error(
        "--cgroup {file}: the cgroup v2 hierarchy at {} has no {controller} controller \
         (it offers: {available})", root.display()
    )]
    NoV2Controller {
        file: String,
        controller: String,
        root: PathBuf,
        available: String,
    },
    /// Reading a cgroup file failed.
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] io::Error),
    /// Making a cgroup directory failed.
    #[error("cannot create cgroup {}", .0.display())]
    Create(PathBuf, #[source] io::Error),
    /// Enabling a controller for the cgroups below failed.
    #[error("cannot enable the {controller} controller in {}{hint}", path.display())]
    Enable {
        controller: String,
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    /// The new cgroup has no such file.
    #[error("--cgroup {file}: no such file in cgroup {}", dir.display())]
    UnknownFile { file: String, dir: PathBuf },
    /// Writing a value failed.
    #[error("cannot write '{value}' to {}", path.display())]
    Write {
        value: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Moving the jailer into the cgroup failed.
    #[error("cannot move the jailer into cgroup {}{}", .0.display(), .1)]
    Join(PathBuf, &'static str, #[source] io::Error),
}

/// Which cgroup interface `--cgroup` settings are for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller (Firecracker's default).
    #[default]
    V1,
    /// The unified hierarchy.
    V2,
}

impl FromStr for CgroupVersion {
    type Err = CgroupError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "1" => Ok(Self::V1),
            "2" => Ok(Self::V2),
            _ => Err(CgroupError::Version(s.to_owned())),
        }
    }
}

/// One `--cgroup FILE=VALUE`: a controller file of the new cgroup and what to write to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupSetting {
    /// The file, such as `memory.max`; its name up to the first '.' is its controller.
    pub file: String,
    /// What is written to it.
    pub value: String,
}

impl CgroupSetting {
    /// The controller the file belongs to: `cpu` for `cpu.weight`.
    pub fn controller(&self) -> &str {
        self.file.split('.').next().unwrap_or_default()
    }

    /// Whether the file is one of cgroup v2's core files (`cgroup.max.descendants`), which
    /// every cgroup has whatever its controllers.
    fn is_core(&self) -> bool {
        self.controller() == "cgroup"
    }
}

impl FromStr for CgroupSetting {
    type Err = CgroupError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The value may itself hold '=' (io.max takes "8:0 rbps=1048576").
        let (file, value) = s.split_once('=').ok_or(CgroupError::Setting(
            "must be FILE=VALUE, such as cpu.weight=100",
        ))?;
        if value.is_empty() {
            return Err(CgroupError::Setting("the value after '=' is empty"));
        }
        let plain_name = !file.is_empty() && file != "." && file != ".." && !file.contains('/');
        let (controller, knob) = file.split_once('.').unwrap_or_default();
        if !plain_name || controller.is_empty() || knob.is_empty() {
            return Err(CgroupError::Setting(
                "the file must be a cgroup file name such as cpu.weight or memory.max",
            ));
        }
        Ok(Self {
            file: file.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// Checks `--parent-cgroup`: a relative path that stays below the hierarchy's root.
pub fn parent_cgroup_path(text: &str) -> Result<PathBuf, CgroupError> {
    let path = Path::new(text);
    let below_root = path.components().next().is_some()
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    if below_root {
        Ok(path.to_owned())
    } else {
        Err(CgroupError::ParentPath(text.to_owned()))
    }
}

/// One cgroup file system from the mount table.
#[derive(Debug, PartialEq, Eq)]
struct CgroupMount {
    dir: PathBuf,
    v2: bool,
    options: Vec<String>,
}

/// Undoes the octal escapes (`\040` for a space) the kernel writes in mount-table fields.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup file systems in a mount table (`/proc/self/mounts` format), in its order.
fn cgroup_mounts(table: &str) -> Vec<CgroupMount> {
    table
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let (_source, dir, fstype, options) = (
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
            );
            let v2 = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            Some(CgroupMount {
                dir: PathBuf::from(unescape(dir)),
                v2,
                options: options.split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// One cgroup to make: in which hierarchy, and what to write there.
#[derive(Debug)]
struct Group {
    /// The hierarchy's root (its mount point).
    root: PathBuf,
    /// v2: the controllers to enable down the path; v1: empty.
    controllers: BTreeSet<String>,
    /// v1 cpuset hierarchy: new cgroups copy their parent's CPUs and memory nodes.
    cpuset: bool,
    settings: Vec<CgroupSetting>,
}

/// What the jailer will do with cgroups, worked out before anything is made.
#[derive(Debug)]
pub struct CgroupPlan {
    /// `<parent-cgroup>/<id>` below each hierarchy's root.
    path: PathBuf,
    action: Action,
}

#[derive(Debug)]
enum Action {
    /// No `--cgroup`, v1: the jailer leaves its cgroups as they are.
    Nothing,
    /// No `--cgroup`, v2: move into `<root>/<parent-cgroup>` if it exists (Firecracker's way of
    /// using a cgroup the user prepared).
    JoinParent(PathBuf),
    /// Make these cgroups and move in.
    Create(Vec<Group>),
}

impl CgroupPlan {
    /// Works out the cgroups for `settings` under `<parent>/<id>`, reading the mount table.
    pub fn new(
        version: CgroupVersion,
        settings: &[CgroupSetting],
        parent: &Path,
        id: &str,
    ) -> Result<Self, CgroupError> {
        let table = fs::read_to_string(MOUNTS).map_err(CgroupError::Mounts)?;
        Self::from_mounts(&table, version, settings, parent, id)
    }

    fn from_mounts(
        table: &str,
        version: CgroupVersion,
        settings: &[CgroupSetting],
        parent: &Path,
        id: &str,
    ) -> Result<Self, CgroupError> {
        let mounts = cgroup_mounts(table);
        let path = parent.join(id);
        let action = match version {
            CgroupVersion::V1 if settings.is_empty() => Action::Nothing,
            CgroupVersion::V1 => Action::Create(v1_groups(&mounts, settings)?),
            CgroupVersion::V2 => {
                let root = mounts
                    .iter()
                    .find(|m| m.v2)
                    .map(|m| m.dir.clone())
                    .ok_or(CgroupError::NoV2Hierarchy)?;
                if settings.is_empty() {
                    Action::JoinParent(root.join(parent))
                } else {
                    Action::Create(vec![v2_group(root, settings)?])
                }
            }
        };
        Ok(Self { path, action })
    }

    /// The cgroup directories the process will be in, one per hierarchy.
    #[cfg(test)]
    fn dirs(&self) -> Vec<PathBuf> {
        match &self.action {
            Action::Nothing => Vec::new(),
            Action::JoinParent(dir) => vec![dir.clone()],
            Action::Create(groups) => groups.iter().map(|g| g.root.join(&self.path)).collect(),
        }
    }

    /// Makes the cgroups, writes the settings and moves this process in. On failure, the
    /// cgroup directories this call made are removed again.
    pub fn apply(&self) -> Result<(), CgroupError> {
        let groups = match &self.action {
            Action::Nothing => return Ok(()),
            Action::JoinParent(dir) if !dir.is_dir() => return Ok(()),
            Action::JoinParent(dir) => return join(dir),
            Action::Create(groups) => groups,
        };
        let mut made = Vec::new();
        let result = groups
            .iter()
            .try_for_each(|g| g.prepare(&self.path, &mut made))
            .and_then(|()| {
                groups
                    .iter()
                    .try_for_each(|g| join(&g.root.join(&self.path)))
            });
        if result.is_err() {
            // Deepest first; a directory something else has meanwhile used stays.
            for dir in made.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
        }
        result
    }
}

fn v2_group(root: PathBuf, settings: &[CgroupSetting]) -> Result<Group, CgroupError> {
    let listed = root.join("cgroup.controllers");
    let text = fs::read_to_string(&listed).map_err(|e| CgroupError::Read(listed, e))?;
    let available: BTreeSet<&str> = text.split_whitespace().collect();
    let mut controllers = BTreeSet::new();
    for setting in settings.iter().filter(|s| !s.is_core()) {
        let controller = setting.controller();
        if !available.contains(controller) {
            return Err(CgroupError::NoV2Controller {
                file: setting.file.clone(),
                controller: controller.to_owned(),
                available: if available.is_empty() {
                    "none".to_owned()
                } else {
                    available.iter().copied().collect::<Vec<_>>().join(" ")
                },
                root,
            });
        }
        controllers.insert(controller.to_owned());
    }
    Ok(Group {
        root,
        controllers,
        cpuset: false,
        settings: settings.to_vec(),
    })
}

fn v1_groups(
    mounts: &[CgroupMount],
    settings: &[CgroupSetting],
) -> Result<Vec<Group>, CgroupError> {
    let mut groups: Vec<Group> = Vec::new();
    for setting in settings {
        let controller = setting.controller();
        let mount = mounts
            .iter()
            .find(|m| !m.v2 && m.options.iter().any(|o| o == controller))
            .ok_or_else(|| CgroupError::NoV1Controller {
                file: setting.file.clone(),
                controller: controller.to_owned(),
            })?;
        // Controllers mounted together (cpu,cpuacct) share one cgroup.
        match groups.iter_mut().find(|g| g.root == mount.dir) {
            Some(group) => group.settings.push(setting.clone()),
            None => groups.push(Group {
                root: mount.dir.clone(),
                controllers: BTreeSet::new(),
                cpuset: mount.options.iter().any(|o| o == "cpuset"),
                settings: vec![setting.clone()],
            }),
        }
    }
    Ok(groups)
}

impl Group {
    /// Makes `<root>/<path>` (noting each directory made in `made`), enables the controllers
    /// and writes the settings.
    fn prepare(&self, path: &Path, made: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
        let mut dir = self.root.clone();
        for part in path.components() {
            // Controllers are enabled on the way down: a cgroup's subtree_control can only
            // take what its own parent enabled for it.
            for controller in &self.controllers {
                enable(&dir, controller)?;
            }
            dir.push(part);
            match fs::create_dir(&dir) {
                Ok(()) => {
                    made.push(dir.clone());
                    if self.cpuset {
                        inherit_cpuset(&dir)?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(CgroupError::Create(dir, e)),
            }
        }
        for setting in &self.settings {
            let file = dir.join(&setting.file);
            if !file.exists() {
                return Err(CgroupError::UnknownFile {
                    file: setting.file.clone(),
                    dir,
                });
            }
            write(&file, &setting.value)?;
        }
        Ok(())
    }
}

/// Writes `value` as `echo` would, with a newline, which every cgroup file accepts.
fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, format!("{value}\n")).map_err(|source| CgroupError::Write {
        value: value.to_owned(),
        path: path.to_owned(),
        source,
    })
}

/// Enables `controller` for the children of the v2 cgroup `dir`, unless it already is.
fn enable(dir: &Path, controller: &str) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&file).map_err(|e| CgroupError::Read(file.clone(), e))?;
    if enabled.split_whitespace().any(|c| c == controller) {
        return Ok(());
    }
    fs::write(&file, format!("+{controller}\n")).map_err(|source| CgroupError::Enable {
        controller: controller.to_owned(),
        path: dir.to_owned(),
        hint: match source.raw_os_error() {
            Some(libc::EBUSY) => {
                " (it holds processes: cgroup v2 lets only cgroups without processes \
                 hand controllers down)"
            }
            _ => "",
        },
        source,
    })
}

/// Gives a new v1 cpuset cgroup its parent's CPUs and memory nodes: it starts with none, and
/// no process may join a cpuset without both.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let parent = dir.parent().unwrap_or(dir);
    for name in ["cpuset.cpus", "cpuset.mems"] {
        let from = parent.join(name);
        let value = fs::read_to_string(&from).map_err(|e| CgroupError::Read(from, e))?;
        write(&dir.join(name), value.trim())?;
    }
    Ok(())
}

/// Moves this process (all its threads) into the cgroup `dir`.
fn join(dir: &Path) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, format!("{}\n", std::process::id())).map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::EBUSY) => {
                " (it hands controllers down to child cgroups, and cgroup v2 keeps processes \
                 out of such cgroups; pass --cgroup to have the jailer make a child)"
            }
            _ => "",
        };
        CgroupError::Join(dir.to_owned(), hint, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
sysfs /sys sysfs rw,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/un\\040ified cgroup2 rw,relatime 0 0
";

    fn setting(s: &str) -> CgroupSetting {
        s.parse().unwrap()
    }

    #[test]
    fn settings_are_file_equals_value() {
        let s = setting("memory.max=128M");
        assert_eq!((s.file.as_str(), s.value.as_str()), ("memory.max", "128M"));
        assert_eq!(s.controller(), "memory");
        let io = setting("io.max=8:0 rbps=1048576");
        assert_eq!(io.value, "8:0 rbps=1048576");
        for bad in [
            "memory.max",
            "memory.max=",
            "=1",
            "max=1",
            ".max=1",
            "memory.=1",
            "../memory.max=1",
            "a/b.c=1",
        ] {
            assert!(bad.parse::<CgroupSetting>().is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_and_parent_paths() {
        assert_eq!("1".parse::<CgroupVersion>().unwrap(), CgroupVersion::V1);
        assert_eq!("2".parse::<CgroupVersion>().unwrap(), CgroupVersion::V2);
        assert!("3".parse::<CgroupVersion>().is_err());
        assert_eq!(
            parent_cgroup_path("vms/skiff").unwrap(),
            Path::new("vms/skiff")
        );
        for bad in ["", "/abs", "a/../b", "./a", ".."] {
            assert!(parent_cgroup_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mount_table_is_parsed_with_escapes() {
        let mounts = cgroup_mounts(HYBRID);
        assert_eq!(mounts.len(), 4);
        assert_eq!(mounts[0].dir, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert!(mounts[0].options.iter().any(|o| o == "cpuacct"));
        assert!(mounts[3].v2);
        assert_eq!(mounts[3].dir, Path::new("/sys/fs/cgroup/un ified"));
        assert_eq!(unescape("a\\134b\\"), "a\\b\\");
    }

    #[test]
    fn v1_settings_are_grouped_by_hierarchy() {
        let settings = [
            setting("cpu.shares=512"),
            setting("cpuacct.usage=0"),
            setting("cpuset.cpus=0"),
        ];
        let plan = CgroupPlan::from_mounts(
            HYBRID,
            CgroupVersion::V1,
            &settings,
            Path::new("skiff"),
            "vm1",
        )
        .unwrap();
        assert_eq!(
            plan.dirs(),
            [
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/skiff/vm1"),
                PathBuf::from("/sys/fs/cgroup/cpuset/skiff/vm1"),
            ]
        );
        let Action::Create(groups) = &plan.action else {
            panic!("{plan:?}")
        };
        assert_eq!(groups[0].settings.len(), 2);
        assert!(!groups[0].cpuset && groups[1].cpuset);

        let err = CgroupPlan::from_mounts(
            HYBRID,
            CgroupVersion::V1,
            &[setting("memory.limit_in_bytes=1")],
            Path::new("skiff"),
            "vm1",
        )
        .unwrap_err();
        assert!(err
            .to_string()
            .contains("no cgroup v1 hierarchy with the memory"));
        let nothing =
            CgroupPlan::from_mounts(HYBRID, CgroupVersion::V1, &[], Path::new("p"), "i").unwrap();
        assert!(nothing.dirs().is_empty());
    }

    #[test]
    fn v2_needs_a_cgroup2_mount() {
        let plan =
            CgroupPlan::from_mounts(HYBRID, CgroupVersion::V2, &[], Path::new("p"), "i").unwrap();
        assert_eq!(plan.dirs(), [PathBuf::from("/sys/fs/cgroup/un ified/p")]);
        let v1_only: String = HYBRID.lines().take(4).map(|l| format!("{l}\n")).collect();
        let err = CgroupPlan::from_mounts(&v1_only, CgroupVersion::V2, &[], Path::new("p"), "i")
            .unwrap_err();
        assert!(matches!(err, CgroupError::NoV2Hierarchy), "{err}");
    }
}
