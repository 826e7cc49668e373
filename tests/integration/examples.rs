//! The client examples in `examples/` (Python, and TypeScript on Node) run against a real quotad
//! process, and the proto's language options put generated code where other languages expect it.
//!
//! Each example starts while quotad's Redis is still down: quotad answers UNAVAILABLE until its
//! store has answered once, the example retries, and the test starts Redis as soon as the
//! example says it is retrying, so the retry path runs every time and nothing depends on timing.
//! Then the example drives a free account into the upgrade prompt and a plus account's long task
//! across the plan boundary onto credits, checks what it saw (exit status 1 otherwise), and the
//! test reads the accounts back from quotad itself.
//!
//! Both examples run from copies under `target/examples-run/` (beside a link to `proto/`, so the
//! documented commands work there unchanged): the Python one in a virtualenv made there from
//! `examples/python/requirements.txt`, the TypeScript one after `npm ci` from its
//! `package-lock.json`. Both are made on the first run and kept while those files are unchanged,
//! so later runs need no network.

use crate::support;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use quotad::api::pb;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use support::BearerToken;
use support::process::Quotad;
use support::python::run;
use support::redis::RedisServer;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const ADMIN_TOKEN: &str = "examples-admin-token";
const QUOTA_TOKEN: &str = "examples-quota-token";
const CREDIT: i64 = 1_000_000;

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where the examples run: `target/examples-run/`, laid out like the repository.
fn run_root() -> PathBuf {
    let root = crate_root().join("target").join("examples-run");
    std::fs::create_dir_all(&root).unwrap();
    let proto = root.join("proto");
    if std::fs::symlink_metadata(&proto).is_err() {
        match std::os::unix::fs::symlink(crate_root().join("proto"), &proto) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => panic!("cannot link {}: {e}", proto.display()),
        }
    }
    root
}

/// Copies `examples/NAME` to the run root, leaving out what is generated or installed (`skip`);
/// what an earlier run installed at the top of the copy (`node_modules`) stays.
fn copy_example(name: &str, skip: &[&str]) -> PathBuf {
    fn copy_dir(from: &Path, to: &Path, skip: &[&str]) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let file_name = entry.file_name();
            if skip.iter().any(|s| file_name == *s) {
                continue;
            }
            let (source, target) = (entry.path(), to.join(&file_name));
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&source, &target, skip);
            } else {
                std::fs::copy(&source, &target).unwrap();
            }
        }
    }
    let to = run_root().join("examples").join(name);
    // What an earlier run copied goes first, so that a file removed from the example is gone.
    if let Ok(entries) = std::fs::read_dir(&to) {
        for entry in entries {
            let entry = entry.unwrap();
            if skip.iter().any(|s| entry.file_name() == *s) {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                std::fs::remove_dir_all(entry.path()).unwrap();
            } else {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
    }
    copy_dir(&crate_root().join("examples").join(name), &to, skip);
    to
}

/// Runs `make` unless `stamp` already holds `wanted` (what it was made from last time).
fn once_per(stamp: &Path, wanted: &str, make: impl FnOnce()) {
    if std::fs::read_to_string(stamp).ok().as_deref() == Some(wanted) {
        return;
    }
    let _ = std::fs::remove_file(stamp);
    make();
    std::fs::write(stamp, wanted).unwrap();
}

/// The Python example's directory, with its virtualenv's python and freshly generated stubs.
fn python_example() -> (PathBuf, PathBuf) {
    let dir = copy_example("python", &["gen", "__pycache__", ".venv"]);
    let requirements = std::fs::read_to_string(dir.join("requirements.txt")).unwrap();
    let python = support::python::venv(&run_root().join("venv"), &requirements);
    // The command examples/README.md gives.
    let _ = std::fs::remove_dir_all(dir.join("gen"));
    std::fs::create_dir(dir.join("gen")).unwrap();
    run(Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I", "../../proto"])
        .args(["--python_out=gen", "--pyi_out=gen", "--grpc_python_out=gen"])
        .arg("quota/v1/quota.proto")
        .current_dir(&dir));
    assert!(dir.join("gen/quota/v1/quota_pb2_grpc.py").exists());
    (dir, python)
}

/// The TypeScript example's directory, installed, generated and compiled.
fn typescript_example() -> PathBuf {
    let dir = copy_example("typescript", &["node_modules", "gen", "dist"]);
    let lock = std::fs::read_to_string(dir.join("package-lock.json")).unwrap();
    let npm = |args: &[&str]| {
        run(Command::new("npm")
            .args(args)
            .args(["--no-audit", "--no-fund"])
            .current_dir(&dir))
    };
    once_per(
        &dir.join("node_modules").join(".quotad-lock"),
        &lock,
        || {
            npm(&["ci"]);
        },
    );
    let _ = std::fs::remove_dir_all(dir.join("src").join("gen"));
    let _ = std::fs::remove_dir_all(dir.join("dist"));
    npm(&["run", "generate"]);
    npm(&["run", "build"]);
    assert!(dir.join("dist/gen/quota/v1/quota.js").exists());
    dir
}

/// What an example printed, line by line as it comes, and on stderr when it is done.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Running {
            child,
            lines,
            stdout: Vec::new(),
            stderr,
        }
    }

    /// Reads output until a line contains `text`; false if the output ended first.
    fn wait_for_line(&mut self, text: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.stdout.push(line);
                    if found {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    /// Waits for the exit (killing it past `limit`): its status, all of stdout, and stderr.
    fn finish(mut self, limit: Duration) -> (std::process::ExitStatus, String, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The reader thread ends with the pipe; collect what it has left.
        self.stdout.extend(self.lines.iter());
        let stderr = self.stderr.join().unwrap();
        (status, self.stdout.join("\n"), stderr)
    }
}

/// Runs an example against a quotad on a Redis that comes up only once the example retries,
/// checks what it printed, and reads its accounts back from quotad.
fn run_through_a_store_outage(mut example: Command, run_id: &str) {
    let mut redis = RedisServer::start();
    redis.kill();
    let demo_config = crate_root().join("examples").join("demo.toml");
    let quotad = Quotad::start_listening(
        &[
            "--store",
            "redis",
            "--config",
            demo_config.to_str().unwrap(),
        ],
        &[
            ("QUOTAD_REDIS_URL", redis.url().as_str()),
            ("QUOTAD_ADMIN_TOKEN", ADMIN_TOKEN),
            ("QUOTAD_QUOTA_TOKEN", QUOTA_TOKEN),
        ],
    );
    example
        .env("QUOTAD_ADDR", &quotad.addr)
        .env("QUOTAD_QUOTA_TOKEN", QUOTA_TOKEN)
        .env("QUOTAD_ADMIN_TOKEN", ADMIN_TOKEN)
        .args(["--run-id", run_id]);
    let mut running = Running::spawn(example);

    let retrying = running.wait_for_line("answered UNAVAILABLE", Duration::from_secs(60));
    if retrying {
        redis.restart();
    }
    let (status, stdout, stderr) = running.finish(Duration::from_secs(120));
    let shown = format!("{status}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(retrying, "the example never retried: {shown}");
    println!("{stdout}");
    assert!(status.success(), "the example failed: {shown}");
    for expected in [
        // The first Reserve, retried with the same request id until quotad's store answered.
        &format!("Reserve {run_id}-free-task-1 answered UNAVAILABLE") as &str,
        "DENY   WINDOW_EXHAUSTED: action UPGRADE_PLAN, upgrade to go, retry at ",
        "message: What is left of your free plan's included usage",
        "chunk 3, partial commit: charged 16 credits (plan 8, credits 8); may continue  <- the plan's included usage ran out: credits pay from here",
        "chunk 4, final commit: charged 16 credits (plan 0, credits 16)",
        "task total: 64 credits (plan 40, credits 24)",
        "cancelled: Release returned 16 credits (plan 0, credits 16)",
        "all checks passed",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in: {shown}");
    }

    // quotad agrees with what the example said.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = Channel::from_shared(quotad.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client =
            QuotaServiceClient::with_interceptor(channel, BearerToken(Some(QUOTA_TOKEN.into())));
        let plus = usage(&mut client, format!("{run_id}-plus")).await;
        let ledger = plus.ledger.unwrap();
        assert_eq!(plus.plan, "plus");
        assert_eq!(
            plus.windows[0].used_micros,
            40 * CREDIT,
            "{:?}",
            plus.windows
        );
        assert_eq!(
            (
                ledger.granted_micros,
                ledger.spent_micros,
                ledger.held_micros
            ),
            (100 * CREDIT, 24 * CREDIT, 0)
        );
        assert!(plus.holds.is_empty(), "{:?}", plus.holds);
        let free = usage(&mut client, format!("{run_id}-free")).await;
        assert_eq!(free.plan, "free");
        assert_eq!(free.windows[0].used_micros, 3_675_000, "one small task");
    });
}

async fn usage(
    client: &mut QuotaServiceClient<InterceptedService<Channel, BearerToken>>,
    account_id: String,
) -> pb::GetUsageResponse {
    let request = pb::GetUsageRequest {
        account_id,
        recent_limit: 0,
    };
    client.get_usage(request).await.unwrap().into_inner()
}

#[test]
fn python_example_retries_then_reaches_credits_and_the_upgrade_prompt() {
    let (dir, python) = python_example();
    let mut example = Command::new(python);
    example
        .arg("quota_demo.py")
        .env("PYTHONUNBUFFERED", "1")
        .current_dir(dir);
    run_through_a_store_outage(example, "py");
}

#[test]
fn typescript_example_retries_then_reaches_credits_and_the_upgrade_prompt() {
    let dir = typescript_example();
    let mut example = Command::new("node");
    example.arg("dist/demo.js").current_dir(dir);
    run_through_a_store_outage(example, "ts");
}

/// The language options of `quota.proto` put each language's code under quotad's own
/// namespace, checked with the full `protoc` that quotad's build already uses.
#[test]
fn proto_options_place_code_for_other_languages() {
    let out = run_root().join("other-languages");
    let _ = std::fs::remove_dir_all(&out);
    let languages = ["java", "kotlin", "csharp", "php", "ruby", "objc", "cpp"];
    let mut protoc = Command::new(protoc_bin_vendored::protoc_bin_path().unwrap());
    protoc.arg("-I").arg(crate_root().join("proto"));
    for language in languages {
        let dir = out.join(language);
        std::fs::create_dir_all(&dir).unwrap();
        protoc.arg(format!("--{language}_out={}", dir.display()));
    }
    run(protoc.arg("quota/v1/quota.proto"));

    let read = |path: &str| {
        std::fs::read_to_string(out.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let java = read("java/io/quotad/quota/v1/ReserveRequest.java");
    assert!(java.contains("\npackage io.quotad.quota.v1;\n"));
    read("java/io/quotad/quota/v1/QuotaProto.java");
    read("kotlin/io/quotad/quota/v1/ReserveRequestKt.kt");
    assert!(read("csharp/Quota.cs").contains("namespace Quotad.Quota.V1 {"));
    assert!(
        read("php/Quotad/Quota/V1/ReserveRequest.php").contains("namespace Quotad\\Quota\\V1;")
    );
    assert!(
        read("php/Quotad/Quota/V1/GPBMetadata/Quota.php")
            .contains("namespace Quotad\\Quota\\V1\\GPBMetadata;")
    );
    let ruby = read("ruby/quota/v1/quota_pb.rb");
    assert!(
        ruby.contains("module Quotad\n  module Quota\n    module V1\n"),
        "{ruby}"
    );
    assert!(read("objc/quota/v1/Quota.pbobjc.h").contains("@interface QTDReserveRequest :"));
    assert!(read("cpp/quota/v1/quota.pb.h").contains("namespace quota {"));

    // Go: protoc has no Go generator built in, so the option itself is checked: an import path
    // ending in the package's version, and the package name after `;`.
    let proto = std::fs::read_to_string(crate_root().join("proto/quota/v1/quota.proto")).unwrap();
    let go_package = proto
        .lines()
        .find_map(|l| l.strip_prefix("option go_package = \""))
        .and_then(|rest| rest.strip_suffix("\";"))
        .expect("quota.proto sets go_package");
    let (path, name) = go_package.split_once(';').expect("IMPORT/PATH;name");
    assert!(path.contains('.') && path.ends_with("/quota/v1"), "{path}");
    assert_eq!(name, "quotav1");
}
