//! What a command prints and how it exits: a [`Report`] (a JSON document and its
//! table, and whether it is a finding) or a [`Failure`] (a usage or connection error).

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

/// Exit code: the command did its work and found nothing wrong.
pub const OK: u8 = 0;
/// Exit code: a finding — a key absent or unreadable, a write superseded, a resync.
pub const FINDING: u8 = 1;
/// Exit code: the command line was wrong, or the backend could not be reached.
pub const USAGE: u8 = 2;

/// A command's result: one JSON document, its readable form, and whether it is a
/// finding (exit 1).
#[derive(Debug)]
pub struct Report {
    pub json: Value,
    pub text: String,
    pub finding: bool,
}

impl Report {
    /// Prints the JSON document or the text on stdout; the exit code says whether it is
    /// a finding.
    pub fn print(self, json: bool) -> ExitCode {
        if json {
            println!("{}", self.json);
        } else {
            print!("{}", self.text);
        }
        ExitCode::from(if self.finding { FINDING } else { OK })
    }
}

/// A usage or connection error (exit 2).
#[derive(Debug)]
pub struct Failure {
    kind: &'static str,
    message: String,
}

impl Failure {
    /// The command line is wrong.
    pub fn usage(message: impl Into<String>) -> Self {
        Failure {
            kind: "usage",
            message: message.into(),
        }
    }

    /// The backend could not be connected to (or the URL is wrong).
    pub fn connect(e: flagcache::Error) -> Self {
        Failure {
            kind: "connect",
            message: e.to_string(),
        }
    }

    /// The backend failed a call.
    pub fn backend(e: flagcache::Error) -> Self {
        Failure {
            kind: "backend",
            message: e.to_string(),
        }
    }

    /// Prints the error on stderr and, with `--json`, as `{"error": {"kind", "message"}}`
    /// on stdout; exits 2.
    pub fn print(self, json: bool) -> ExitCode {
        eprintln!("flagcache: {}", self.message);
        if json {
            let doc = serde_json::json!({"error": {"kind": self.kind, "message": self.message}});
            println!("{doc}");
        }
        ExitCode::from(USAGE)
    }
}

/// `d` for people: `850ms`, `12.3s`, `4m05s`, `2h10m`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// Rows as a table: each column as wide as its widest cell, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(human(Duration::from_secs(245)), "4m05s");
        assert_eq!(human(Duration::from_secs(7800)), "2h10m");
    }

    #[test]
    fn columns_align() {
        let t = table(&["A", "B"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     B\nlong  x\n");
    }
}
