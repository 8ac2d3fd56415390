//! Parses what `wrk --latency` prints.

use serde::Serialize;

/// One wrk run, as wrk reported it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WrkResult {
    /// Completed requests (any status).
    pub requests: u64,
    /// Length of the run in seconds, as wrk measured it.
    pub seconds: f64,
    /// `Requests/sec`.
    pub rps: f64,
    /// Bytes read, as wrk rounds them.
    pub bytes_read: f64,
    /// Latency percentiles from `Latency Distribution`, in milliseconds.
    pub p50_ms: f64,
    /// 75th percentile.
    pub p75_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest latency (`Thread Stats` line), in milliseconds.
    pub max_ms: f64,
    /// `Non-2xx or 3xx responses`.
    pub non_2xx_3xx: u64,
    /// Sum of `Socket errors: connect, read, write, timeout`.
    pub socket_errors: u64,
}

impl WrkResult {
    /// Requests that did not succeed: non-2xx/3xx answers plus socket
    /// errors.
    pub fn failures(&self) -> u64 {
        self.non_2xx_3xx + self.socket_errors
    }
}

/// Why wrk's output could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot parse wrk output: {}", self.0)
    }
}

impl std::error::Error for ParseError {}

/// Splits a wrk quantity (`1.02ms`, `41.98MB`) into its number and the
/// unit that follows it.
fn number_and_unit(text: &str) -> Option<(f64, &str)> {
    let text = text.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    Some((number.parse().ok()?, unit))
}

/// A wrk duration (`812.00us`, `1.02ms`, `2.50s`, `1.00m`) in milliseconds.
pub fn duration_ms(text: &str) -> Option<f64> {
    let (number, unit) = number_and_unit(text)?;
    let factor = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    Some(number * factor)
}

/// A wrk byte count (`41.98MB`, `512.00B`) in bytes (wrk's units are
/// powers of 1024).
pub fn bytes(text: &str) -> Option<f64> {
    let (number, unit) = number_and_unit(text)?;
    let factor = match unit {
        "B" => 1.0,
        "KB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        "TB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(number * factor)
}

/// Parses the whole output of one `wrk --latency` run.
pub fn parse(output: &str) -> Result<WrkResult, ParseError> {
    let mut result = WrkResult::default();
    let mut seen_rps = false;
    let mut seen_total = false;
    let mut in_distribution = false;
    for line in output.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("Latency Distribution") {
            in_distribution = true;
            continue;
        }
        if in_distribution {
            if let Some((pct, value)) = trimmed.split_once('%') {
                let value = duration_ms(value)
                    .ok_or_else(|| ParseError(format!("latency percentile in `{trimmed}`")))?;
                match pct.trim() {
                    "50" => result.p50_ms = value,
                    "75" => result.p75_ms = value,
                    "90" => result.p90_ms = value,
                    "99" => result.p99_ms = value,
                    _ => {}
                }
                continue;
            }
            in_distribution = false;
        }
        if let Some(rest) = trimmed.strip_prefix("Latency") {
            // Thread Stats: Avg Stdev Max +/-Stdev.
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if let Some(max) = fields.get(2).and_then(|field| duration_ms(field)) {
                result.max_ms = max;
            }
        } else if trimmed.contains(" requests in ") {
            // `314425 requests in 5.00s, 41.98MB read`
            let mut words = trimmed.split_whitespace();
            result.requests = words
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| ParseError(format!("request count in `{trimmed}`")))?;
            let seconds = words
                .nth(2)
                .map(|s| s.trim_end_matches(','))
                .and_then(duration_ms)
                .ok_or_else(|| ParseError(format!("duration in `{trimmed}`")))?;
            result.seconds = seconds / 1000.0;
            result.bytes_read = words.next().and_then(bytes).unwrap_or(0.0);
            seen_total = true;
        } else if let Some(rest) = trimmed.strip_prefix("Socket errors:") {
            // `connect 0, read 0, write 0, timeout 0`
            result.socket_errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1))
                .filter_map(|n| n.parse::<u64>().ok())
                .sum();
        } else if let Some(rest) = trimmed.strip_prefix("Non-2xx or 3xx responses:") {
            result.non_2xx_3xx = rest
                .trim()
                .parse()
                .map_err(|_| ParseError(format!("non-2xx count in `{trimmed}`")))?;
        } else if let Some(rest) = trimmed.strip_prefix("Requests/sec:") {
            result.rps = rest
                .trim()
                .parse()
                .map_err(|_| ParseError(format!("requests/s in `{trimmed}`")))?;
            seen_rps = true;
        }
    }
    if !seen_rps || !seen_total {
        return Err(ParseError(format!(
            "no `Requests/sec` or `requests in` line in:\n{output}"
        )));
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 5s test @ http://127.0.0.1:8080/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  245.12us   8.80ms   89.43%
    Req/Sec    63.20k     2.31k   66.83k    80.00%
  Latency Distribution
     50%  812.00us
     75%    1.08ms
     90%    1.22ms
     99%    1.88s
  314425 requests in 5.00s, 41.98MB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 5
Requests/sec:  62879.54
Transfer/sec:      8.39MB
";

    #[test]
    fn parses_a_full_run() {
        let result = parse(SAMPLE).unwrap();
        assert_eq!(result.requests, 314_425);
        assert!((result.seconds - 5.0).abs() < 1e-9);
        assert!((result.rps - 62_879.54).abs() < 1e-6);
        assert!((result.p50_ms - 0.812).abs() < 1e-9);
        assert!((result.p75_ms - 1.08).abs() < 1e-9);
        assert!((result.p99_ms - 1880.0).abs() < 1e-9);
        assert!((result.max_ms - 8.8).abs() < 1e-9);
        assert_eq!(result.non_2xx_3xx, 5);
        assert_eq!(result.socket_errors, 6);
        assert_eq!(result.failures(), 11);
        assert!((result.bytes_read - 41.98 * 1024.0 * 1024.0).abs() < 1.0);
    }

    #[test]
    fn a_clean_run_has_no_failures() {
        let clean: String = SAMPLE
            .lines()
            .filter(|line| !line.contains("Socket errors") && !line.contains("Non-2xx"))
            .map(|line| format!("{line}\n"))
            .collect();
        assert_eq!(parse(&clean).unwrap().failures(), 0);
    }

    #[test]
    fn refuses_garbage() {
        assert!(parse("unable to connect to 127.0.0.1:1 Connection refused").is_err());
    }

    #[test]
    fn units() {
        assert_eq!(duration_ms("1.00m"), Some(60_000.0));
        assert_eq!(duration_ms("2ms"), Some(2.0));
        assert_eq!(duration_ms("x"), None);
        assert_eq!(bytes("1.00KB"), Some(1024.0));
    }
}
