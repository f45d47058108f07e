//! CPU and memory limits through cgroups (v2, or v1 controllers), where the
//! cgroup file system is writable. Where it is not, limits are reported as not
//! enforced and replicas run without them.

use std::fs;
use std::path::{Path, PathBuf};

const CFS_PERIOD_US: u64 = 100_000;

/// How this machine can enforce limits.
#[derive(Debug, Clone)]
pub enum Cgroups {
    V2 { root: PathBuf },
    V1 { memory: PathBuf, cpu: PathBuf },
    Disabled { why: String },
}

impl Cgroups {
    /// Probes `/sys/fs/cgroup` and prepares a `tessera` parent group.
    pub fn detect() -> Cgroups {
        Cgroups::detect_at(Path::new("/sys/fs/cgroup"), None)
    }

    /// [`Cgroups::detect`], with the replicas' groups inside one of their
    /// own for the agent whose home is `home`. Replica names (job, attempt,
    /// replica) repeat between agents on one machine — several `tessera up`
    /// each count jobs from 1 — so without it one agent stopping its job 2
    /// would kill another's. The group's name is a hash of the home's path,
    /// the same on every start, so an agent restarted on the same home
    /// still finds the groups of replicas it left behind.
    pub fn detect_for(home: &Path) -> Cgroups {
        let home = home.canonicalize().unwrap_or_else(|_| home.to_path_buf());
        Cgroups::detect_at(Path::new("/sys/fs/cgroup"), Some(&scope_name(&home)))
    }

    pub fn disabled(why: impl Into<String>) -> Cgroups {
        Cgroups::Disabled { why: why.into() }
    }

    fn detect_at(base: &Path, scope: Option<&str>) -> Cgroups {
        let controllers = base.join("cgroup.controllers");
        if controllers.exists() {
            let have = fs::read_to_string(&controllers).unwrap_or_default();
            if !(have.split_whitespace().any(|c| c == "cpu")
                && have.split_whitespace().any(|c| c == "memory"))
            {
                return Cgroups::disabled("cgroup v2 without the cpu and memory controllers");
            }
            let parent = base.join("tessera");
            let root = scope.map_or_else(|| parent.clone(), |s| parent.join(s));
            let setup = fs::create_dir_all(&root)
                .and_then(|_| fs::write(base.join("cgroup.subtree_control"), "+cpu +memory"))
                .and_then(|_| fs::write(parent.join("cgroup.subtree_control"), "+cpu +memory"))
                .and_then(|_| fs::write(root.join("cgroup.subtree_control"), "+cpu +memory"));
            return match setup {
                Ok(()) => Cgroups::V2 { root },
                Err(e) => Cgroups::disabled(format!("cgroup v2 is not writable here ({e})")),
            };
        }
        let memory = base.join("memory");
        let cpu = [base.join("cpu"), base.join("cpu,cpuacct")]
            .into_iter()
            .find(|p| p.join("cpu.cfs_quota_us").exists());
        match cpu {
            Some(cpu) if memory.join("memory.limit_in_bytes").exists() => {
                let (mut memory, mut cpu) = (memory.join("tessera"), cpu.join("tessera"));
                if let Some(s) = scope {
                    memory.push(s);
                    cpu.push(s);
                }
                match fs::create_dir_all(&memory).and_then(|_| fs::create_dir_all(&cpu)) {
                    Ok(()) => Cgroups::V1 { memory, cpu },
                    Err(e) => Cgroups::disabled(format!("cgroup v1 is not writable here ({e})")),
                }
            }
            _ => Cgroups::disabled("no cgroup cpu and memory controllers found"),
        }
    }

    pub fn enforced(&self) -> bool {
        !matches!(self, Cgroups::Disabled { .. })
    }

    /// A sentence for `tessera nodes`.
    pub fn note(&self) -> String {
        match self {
            Cgroups::V2 { root } => format!(
                "cpu and memory limits enforced (cgroup v2, {})",
                root.display()
            ),
            Cgroups::V1 { .. } => "cpu and memory limits enforced (cgroup v1)".into(),
            Cgroups::Disabled { why } => format!("limits NOT enforced: {why}"),
        }
    }

    /// Creates the group for one replica with its limits; returns the
    /// `cgroup.procs` files the replica must write its pid into.
    pub fn create(
        &self,
        name: &str,
        cpu_milli: u64,
        memory_bytes: u64,
    ) -> std::io::Result<Vec<PathBuf>> {
        let quota = (cpu_milli * CFS_PERIOD_US / 1000).max(1000);
        match self {
            Cgroups::V2 { root } => {
                let dir = root.join(name);
                fs::create_dir_all(&dir)?;
                fs::write(dir.join("memory.max"), memory_bytes.to_string())?;
                fs::write(dir.join("memory.swap.max"), "0").ok();
                fs::write(dir.join("cpu.max"), format!("{quota} {CFS_PERIOD_US}"))?;
                Ok(vec![dir.join("cgroup.procs")])
            }
            Cgroups::V1 { memory, cpu } => {
                let m = memory.join(name);
                let c = cpu.join(name);
                fs::create_dir_all(&m)?;
                fs::create_dir_all(&c)?;
                fs::write(m.join("memory.limit_in_bytes"), memory_bytes.to_string())?;
                fs::write(c.join("cpu.cfs_period_us"), CFS_PERIOD_US.to_string())?;
                fs::write(c.join("cpu.cfs_quota_us"), quota.to_string())?;
                Ok(vec![m.join("cgroup.procs"), c.join("cgroup.procs")])
            }
            Cgroups::Disabled { .. } => Ok(Vec::new()),
        }
    }

    /// Whether the kernel's OOM killer fired in this replica's group.
    pub fn oom_killed(&self, name: &str) -> bool {
        let read = |p: PathBuf| fs::read_to_string(p).unwrap_or_default();
        let count = |text: String, key: &str| {
            text.lines()
                .filter_map(|l| l.strip_prefix(key))
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .next()
                .unwrap_or(0)
        };
        match self {
            Cgroups::V2 { root } => {
                count(read(root.join(name).join("memory.events")), "oom_kill ") > 0
            }
            Cgroups::V1 { memory, .. } => {
                count(
                    read(memory.join(name).join("memory.oom_control")),
                    "oom_kill ",
                ) > 0
                    || count(read(memory.join(name).join("memory.failcnt")), "") > 0
            }
            Cgroups::Disabled { .. } => false,
        }
    }

    /// Kills every process in the replica's group.
    pub fn kill_all(&self, name: &str) {
        let procs = match self {
            Cgroups::V2 { root } => {
                // cgroup.kill (Linux 5.14+) kills the whole subtree at once.
                if fs::write(root.join(name).join("cgroup.kill"), "1").is_ok() {
                    return;
                }
                vec![root.join(name).join("cgroup.procs")]
            }
            Cgroups::V1 { memory, cpu } => vec![
                memory.join(name).join("cgroup.procs"),
                cpu.join(name).join("cgroup.procs"),
            ],
            Cgroups::Disabled { .. } => vec![],
        };
        for file in procs {
            for pid in fs::read_to_string(file).unwrap_or_default().lines() {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }

    /// Removes this agent's own group ([`Cgroups::detect_for`]) when no
    /// replica's group is left in it (one still running keeps it, for the
    /// next agent on the same home to find).
    pub fn release_scope(&self) {
        for d in self.roots() {
            if d.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(SCOPE_PREFIX))
            {
                let _ = fs::remove_dir(d);
            }
        }
    }

    /// The groups replicas' groups are made in (one per controller
    /// hierarchy).
    fn roots(&self) -> Vec<&Path> {
        match self {
            Cgroups::V2 { root } => vec![root],
            Cgroups::V1 { memory, cpu } => vec![memory, cpu],
            Cgroups::Disabled { .. } => vec![],
        }
    }

    /// Removes the replica's group (once its processes are gone).
    pub fn remove(&self, name: &str) {
        for d in self.roots().into_iter().map(|r| r.join(name)) {
            for _ in 0..20 {
                if fs::remove_dir(&d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// How an agent's own group's name begins ([`scope_name`]).
const SCOPE_PREFIX: &str = "home-";

/// A stable name for an agent's group: [`SCOPE_PREFIX`] and the 64-bit
/// FNV-1a hash of its home's path (the same on every start and build).
fn scope_name(home: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in home.as_os_str().as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{SCOPE_PREFIX}{h:016x}")
}

#[cfg(test)]
mod scope_tests {
    use super::*;

    #[test]
    fn each_home_gets_its_own_stable_group() {
        let a = scope_name(Path::new("/var/lib/tessera-a"));
        assert_eq!(a, scope_name(Path::new("/var/lib/tessera-a")));
        assert_ne!(a, scope_name(Path::new("/var/lib/tessera-b")));
        assert!(a.starts_with("home-") && a.len() == 21, "{a}");
    }
}
