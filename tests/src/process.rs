//! Child processes that are killed when their guard drops.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// A background process whose stderr and stdout lines are collected; killed on drop.
pub struct Proc {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    name: String,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().expect("lines").push(l);
                }
            });
        }
        Self {
            child: Some(child),
            lines,
            name: name.to_string(),
        }
    }

    /// Whether the process has ended (reaped here if it has).
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until a line containing `needle` appears; panics with the output so far otherwise.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!(
                    "{} exited ({st}) before printing {needle:?}:\n{}",
                    self.name,
                    self.output()
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "{} did not print {needle:?} within {timeout:?}:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `n` lines contain `needle` (a later occurrence of a message seen before).
    pub fn wait_for_count(&mut self, needle: &str, n: usize, timeout: Duration) {
        let start = Instant::now();
        loop {
            let seen = self.lines().iter().filter(|l| l.contains(needle)).count();
            if seen >= n {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "{} printed {needle:?} {seen} times within {timeout:?}, expected {n}:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    pub fn output(&self) -> String {
        self.lines().join("\n")
    }

    /// Sends a signal and returns at once.
    pub fn signal(&mut self, sig: libc::c_int) {
        let pid = self.pid();
        // SAFETY: kill on a child pid we own (not yet reaped: `child` is still held).
        unsafe { libc::kill(pid as i32, sig) };
    }

    /// Waits up to `timeout` for the process to end on its own; the exit status, or None (it is
    /// still running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                // Let the reader threads drain the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return Some(st);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait (SIGKILL after `grace`); returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill on a child pid we own.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                // Let the reader threads drain the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return st;
            }
            if start.elapsed() > grace {
                let _ = child.kill();
                return child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
