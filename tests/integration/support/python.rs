//! Python virtualenvs for the checks and examples written in Python, made under `target/` once
//! per set of requirements: a stamp in the virtualenv holds what was installed, so later runs
//! start at once and need no network; and running their commands, failing loudly.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The python of a virtualenv at `venv` with `requirements` (the text of a requirements file)
/// installed; made or brought up to date when the requirements changed.
pub fn venv(venv: &Path, requirements: &str) -> PathBuf {
    let python = venv.join("bin").join("python");
    let stamp = venv.join("quotad-requirements.txt");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(requirements) {
        return python;
    }
    let _ = std::fs::remove_file(&stamp);
    if !python.exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(venv));
    }
    let wanted = venv.join("requirements.txt");
    std::fs::write(&wanted, requirements).expect("write the requirements");
    // PyPI is across a network: a failed install is tried twice more, and the last failure
    // fails the test with what pip printed.
    for attempt in 1..=3 {
        let mut pip = Command::new(&python);
        pip.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-input", "-r"])
        .arg(&wanted);
        if attempt == 3 {
            run(&mut pip);
        } else if pip.output().is_ok_and(|out| out.status.success()) {
            break;
        } else {
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    }
    std::fs::write(&stamp, requirements).expect("write the requirements stamp");
    python
}

/// Runs `command` to its end and fails the test, with what it printed, unless it succeeded.
pub fn run(command: &mut Command) -> std::process::Output {
    let shown = format!("{command:?}");
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        output.status.success(),
        "{shown} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
