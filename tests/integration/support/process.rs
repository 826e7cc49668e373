//! A real `quotad` process: started on port 0, its address read from the `listening on ADDR`
//! log line, its output kept (drained on a thread so the pipe never fills), stopped by signal.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Quotad {
    pub addr: String,
    /// The HTTP admin port (`/metrics`, `/healthz`, `/readyz`).
    pub http_addr: String,
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
    /// The thread that reads its output, until the pipe closes.
    reader: Option<std::thread::JoinHandle<()>>,
}

/// `quotad` with none of the caller's quotad variables, so tests say everything they mean;
/// pretty logs (the address lines are read from them) and the HTTP admin port on a free port.
pub fn command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quotad"));
    for (key, _) in std::env::vars() {
        if key.starts_with("QUOTAD_") || key.starts_with("OTEL_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.env("QUOTAD_LOG_FORMAT", "pretty")
        .env("QUOTAD_HTTP_LISTEN", "127.0.0.1:0");
    cmd
}

impl Quotad {
    /// Starts `quotad serve --listen 127.0.0.1:0 ARGS` with `env` added.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Quotad {
        Self::start_on("127.0.0.1:0", args, env)
    }

    /// Starts `quotad serve --listen LISTEN ARGS` with `env` added, and waits until it serves.
    pub fn start_on(listen: &str, args: &[&str], env: &[(&str, &str)]) -> Quotad {
        Self::launch(listen, args, env, true)
    }

    /// Starts quotad and returns once it listens, before its store has answered.
    pub fn start_listening(args: &[&str], env: &[(&str, &str)]) -> Quotad {
        Self::launch("127.0.0.1:0", args, env, false)
    }

    fn launch(listen: &str, args: &[&str], env: &[(&str, &str)], until_serving: bool) -> Quotad {
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
        let reader = std::thread::spawn(move || {
            let word_after = |line: &str, marker: &str| {
                let rest = line.split(marker).nth(1)?;
                Some(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                )
            };
            let (mut grpc, mut http, mut sent) = (None, None, false);
            let mut serving = !until_serving;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                grpc = grpc.or_else(|| word_after(&line, "listening on "));
                http = http.or_else(|| word_after(&line, "metrics and probes at http://"));
                serving |= line.contains("ready: serving requests");
                lines.lock().unwrap().push(line);
                if let (false, true, Some(g), Some(h)) = (sent, serving, &grpc, &http) {
                    let _ = tx.send((g.clone(), h.clone()));
                    sent = true;
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok((addr, http_addr)) => Quotad {
                addr,
                http_addr,
                child,
                output,
                reader: Some(reader),
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

    /// Waits for it to exit, and for the last of its output to be read: what it printed
    /// before exiting is then all in [`output`](Self::output).
    pub fn wait(&mut self) -> ExitStatus {
        let status = self.child.wait().unwrap();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        status
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Waits (at most 10 s) until a line it printed matches `line`: its output is read by
    /// another thread, so a line it printed a moment ago may not have been read yet.
    pub async fn until_logged(&self, what: &str, line: impl Fn(&str) -> bool) {
        let started = std::time::Instant::now();
        while !self.output.lock().unwrap().iter().any(|l| line(l)) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{what} not logged:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (at most 10 s) until it printed a line holding `text`.
    pub async fn until_printed(&self, text: &str) {
        self.until_logged(&format!("{text:?}"), |l| l.contains(text))
            .await;
    }
}

impl Drop for Quotad {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET (the admin port's `/metrics`, `/healthz`, `/readyz`): status and body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: quotad\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}
