//! Tests that need something from the machine (python3 and PyPI, the seed
//! guide beside the checkout, fixed ports, IPv6 loopback): where it is
//! missing they fail under [`REQUIRE_ALL`], and otherwise say loudly that
//! they checked nothing.

use std::io::Write;

/// The environment variable that turns every skip into a failure (`1`):
/// CI sets it, so a green run has checked everything.
pub const REQUIRE_ALL: &str = "PLUGIN_HOST_REQUIRE_ALL";

/// The value `test` needs, or: panics naming what is missing when
/// [`REQUIRE_ALL`] is `1`; otherwise prints `SKIPPED <test>: <reason>` to
/// the terminal and returns `None`, and the test returns without checking.
///
/// The line goes to the stderr handle itself, which the test harness does
/// not capture (it captures `eprintln!`), so a skip shows even in a passing
/// run.
pub fn require_or_skip<T>(test: &str, needed: Result<T, String>) -> Option<T> {
    let required = std::env::var(REQUIRE_ALL).is_ok_and(|value| value == "1");
    settle(required, test, needed)
        .map_err(|skipped| writeln!(std::io::stderr(), "{skipped}"))
        .ok()
}

/// The value, or the `SKIPPED` line to print; panics when `required`.
fn settle<T>(required: bool, test: &str, needed: Result<T, String>) -> Result<T, String> {
    needed.map_err(|reason| {
        assert!(
            !required,
            "{test} cannot run, and {REQUIRE_ALL}=1 requires it: {reason}"
        );
        format!("SKIPPED {test}: {reason} (set {REQUIRE_ALL}=1 to make this a failure)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_need_is_a_skip_unless_required() {
        assert_eq!(settle(false, "t", Ok::<_, String>(7)), Ok(7));
        assert_eq!(settle(true, "t", Ok::<_, String>(7)), Ok(7));
        let skipped = settle::<u8>(false, "t", Err("no python3".into())).unwrap_err();
        assert!(skipped.starts_with("SKIPPED t: no python3"), "{skipped}");

        let failed = std::panic::catch_unwind(|| {
            let _ = settle::<u8>(true, "t", Err("no python3".into()));
        });
        let message = failed.expect_err("a failure when required");
        let message = message.downcast_ref::<String>().expect("a message");
        assert!(message.contains("no python3"), "{message}");
        assert!(message.contains(REQUIRE_ALL), "{message}");
    }
}
