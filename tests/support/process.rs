//! A real `quotad` process: started on port 0, its address read from the `listening on ADDR`
//! log line, its output kept (drained on a thread so the pipe never fills), stopped by signal.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Quotad {
    pub addr: String,
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

/// `quotad` with none of the caller's quotad variables, so tests say everything they mean.
pub fn command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quotad"));
    for (key, _) in std::env::vars() {
        if key.starts_with("QUOTAD_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd
}

impl Quotad {
    /// Starts `quotad serve --listen 127.0.0.1:0 ARGS` with `env` added.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Quotad {
        Self::start_on("127.0.0.1:0", args, env)
    }

    /// Starts `quotad serve --listen LISTEN ARGS` with `env` added.
    pub fn start_on(listen: &str, args: &[&str], env: &[(&str, &str)]) -> Quotad {
        let mut child = command()
            .args(["serve", "--listen", listen])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("quotad starts");
        let stdout = child.stdout.take().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(
                        rest.split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned(),
                    );
                }
                lines.lock().unwrap().push(line);
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => Quotad {
                addr,
                child,
                output,
            },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "quotad did not log its address: {:?}",
                    output.lock().unwrap()
                );
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "TERM", "KILL") to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().unwrap()
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }
}

impl Drop for Quotad {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
