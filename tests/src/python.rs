//! Throwaway Python virtual environments for the tests that drive Python
//! code (the guide's FastAPI plugin, Playwright, an OpenAPI validator).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Makes a fresh virtual environment at `venv` with `packages` pip
/// installed, and answers its `python`, or why there is none (no python3,
/// no venv module, PyPI unreachable). pip is bounded in time, so an
/// unreachable PyPI is an answer within a minute, not a hang. Blocking:
/// call it off the async runtime.
pub fn make_venv(venv: &Path, packages: &[&str]) -> Result<PathBuf, String> {
    let _ = std::fs::remove_dir_all(venv);
    let created = Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv)
        .output()
        .map_err(|error| format!("cannot run python3: {error}"))?;
    if !created.status.success() {
        return Err(format!(
            "python3 -m venv failed: {}",
            String::from_utf8_lossy(&created.stderr).trim()
        ));
    }
    let installed = Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--retries",
            "1",
            "--timeout",
            "20",
        ])
        .args(packages)
        .output()
        .map_err(|error| format!("cannot run pip: {error}"))?;
    if !installed.status.success() {
        let stderr = String::from_utf8_lossy(&installed.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(format!(
            "pip install {} failed: {}",
            packages.join(" "),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    Ok(venv.join("bin/python"))
}

/// The pinned tools the browser and catalogue tests run: Playwright, which
/// drives the system's Chromium (never a browser of its own: no
/// `playwright install`), and an OpenAPI 3.1 validator.
pub const TOOLS: &[&str] = &["playwright==1.65.2", "openapi-spec-validator==0.9.0"];

/// The python of a virtual environment with [`TOOLS`], made once per test
/// process under `dir` (the first caller's), or why there is none.
/// Blocking: call it off the async runtime.
pub fn tools(dir: &Path) -> Result<PathBuf, String> {
    static TOOLS_PYTHON: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    TOOLS_PYTHON
        .get_or_init(|| make_venv(&dir.join("python-tools-venv"), TOOLS))
        .clone()
}
