//! The broker JVMs as processes: launching one so that it outlives its starter, finding it
//! again from its pid file, stopping it; and the ports it listens on.

use std::collections::HashSet;
use std::fs;
use std::hash::{BuildHasher, RandomState};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::append;
use crate::layout::{Mode, Node};
use crate::{Error, Kafka, Result, at, fail, say};

/// How long a SIGTERM may take before SIGKILL follows.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Brokers this process launched. A test process that starts and stops brokers lives on,
/// so it reaps them itself; any other pid (from a pid file) is never waited for, as it may
/// belong to a child somebody else in this process waits for.
static LAUNCHED: Mutex<Option<HashSet<u32>>> = Mutex::new(None);

fn launched(pid: u32) -> bool {
    let guard = LAUNCHED.lock().unwrap_or_else(|e| e.into_inner());
    guard.as_ref().is_some_and(|set| set.contains(&pid))
}

fn remember(pid: u32) {
    let mut guard = LAUNCHED.lock().unwrap_or_else(|e| e.into_inner());
    guard.get_or_insert_with(HashSet::new).insert(pid);
}

/// True if the process exists and is not a zombie (an exited broker whose parent has not
/// reaped it yet would still pass `kill -0`).
pub(crate) fn is_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if launched(pid) {
        // SAFETY: a non-blocking waitpid on a child of ours; no memory is passed.
        unsafe { libc::waitpid(raw, std::ptr::null_mut(), libc::WNOHANG) };
    }
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(raw, 0) } != 0 {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The command name in parentheses may contain spaces: the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => true,
    }
}

/// The pid of the broker of `node` if it runs. After a crash or reboot the pid file may
/// name some unrelated process; only a Kafka JVM running this node's config counts.
pub(crate) fn broker_pid(node: &Node) -> Option<u32> {
    let pid: u32 = fs::read_to_string(&node.pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let config = node.config.display().to_string();
    let ours = cmdline
        .find("kafka.Kafka")
        .is_some_and(|at| cmdline[at..].contains(&config));
    (ours && is_alive(pid)).then_some(pid)
}

fn signal(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: sends a signal; no memory is involved.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Waits until none of `pids` is alive; returns those still alive after `timeout`.
fn wait_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|&p| is_alive(p)).collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Stops the processes together: SIGTERM (a clean, controlled shutdown), then SIGKILL to
/// whatever still runs after STOP_TIMEOUT.
pub(crate) fn terminate(pids: &[u32]) -> Result<()> {
    for &pid in pids {
        signal(pid, libc::SIGTERM);
    }
    let alive = wait_gone(pids, STOP_TIMEOUT);
    if alive.is_empty() {
        return Ok(());
    }
    say(format!(
        "broker (pid {}) still running after {}s; sending SIGKILL",
        join(&alive),
        STOP_TIMEOUT.as_secs()
    ));
    kill_now(&alive)
}

/// SIGKILL, and wait until the processes are gone.
pub(crate) fn kill_now(pids: &[u32]) -> Result<()> {
    for &pid in pids {
        signal(pid, libc::SIGKILL);
    }
    let alive = wait_gone(pids, Duration::from_secs(10));
    if alive.is_empty() {
        Ok(())
    } else {
        fail(format!("could not kill broker (pid {})", join(&alive)))
    }
}

pub(crate) fn join(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Kafka {
    /// Starts the JVM of `node` in the background and records its pid.
    pub(crate) fn launch(&self, node: &Node, mode: &Mode) -> Result<Child> {
        // Several of them on one small machine.
        let heap = if mode.cluster() {
            ["-Xms128m", "-Xmx384m"]
        } else {
            ["-Xms256m", "-Xmx768m"]
        };
        node.remove_pid_file();
        let mut command = Command::new("java");
        command
            .args(heap)
            .args([
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-XX:+ExitOnOutOfMemoryError",
                "-Djava.awt.headless=true",
            ])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.log4j_config().display()
            ))
            .arg(format!("-Dkafka.logs.dir={}", node.dir.display()))
            .args(&self.java_opts)
            .arg("-cp")
            .arg(self.classpath())
            .arg("kafka.Kafka")
            .arg(&node.config)
            // All three standard streams are redirected: a broker holding the caller's
            // stdout open would make $(cargo xtask kafka start) wait forever.
            .stdin(Stdio::null())
            .stdout(append(&node.log)?)
            .stderr(append(&node.log)?);
        // An own session, so a Ctrl-C in the terminal that ran `start` (or signals to the
        // process group of a CI step) does not reach the broker; it lives until `stop`.
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| Error::Run {
            command: format!("java kafka.Kafka {}", node.config.display()),
            source,
        })?;
        remember(child.id());
        fs::write(&node.pid_file, format!("{}\n", child.id())).map_err(at(&node.pid_file))?;
        Ok(child)
    }
}

/// True if something accepts TCP connections on 127.0.0.1:`port`.
pub(crate) fn port_open(port: u16) -> bool {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_ok()
}

/// A port nobody listens on and that is none of `taken`. Chosen from 20000-32767: below
/// Linux's ephemeral range (32768+), where outgoing connections get their local ports, so
/// a busy client cannot grab it between our check and the broker's bind. The small
/// remaining race is handled by retrying in start.
pub(crate) fn pick_free_port(taken: &[u16]) -> Result<u16> {
    let random = RandomState::new();
    for attempt in 0..100u32 {
        let port = 20000 + (random.hash_one(attempt) % 12768) as u16;
        if !taken.contains(&port)
            && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
            && !port_open(port)
        {
            return Ok(port);
        }
    }
    fail("found no free port on 127.0.0.1")
}

/// True if the broker's log says a port was taken (by someone else, after we picked it).
pub(crate) fn lost_a_port(node: &Node) -> bool {
    fs::read_to_string(&node.log).is_ok_and(|log| log.contains("Address already in use"))
}
