//! Just enough RESP to drive a test server: send a command, read one reply as text.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One reply, rendered as text: a simple string or bulk string as itself, an integer as
/// digits, a nil as `(nil)`, an array as its elements joined by newlines. A server error
/// reply is `Err`.
pub(crate) fn command(addr: SocketAddr, args: &[&str]) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    send(&mut s, args).map_err(|e| e.to_string())?;
    read_reply(&mut BufReader::new(s))
}

pub(crate) fn send(s: &mut TcpStream, args: &[&str]) -> std::io::Result<()> {
    let mut buf = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        buf.extend_from_slice(a.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    s.write_all(&buf)
}

pub(crate) fn read_reply(r: &mut impl BufRead) -> Result<String, String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at(line.len().min(1));
    match kind {
        "+" | ":" => Ok(rest.to_string()),
        "-" => Err(rest.to_string()),
        "$" => {
            let n: i64 = rest
                .parse()
                .map_err(|_| format!("bad bulk length {rest:?}"))?;
            if n < 0 {
                return Ok("(nil)".to_string());
            }
            let n = usize::try_from(n).map_err(|e| e.to_string())?;
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf).map_err(|e| e.to_string())?;
            buf.truncate(n);
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        "*" => {
            let n: i64 = rest
                .parse()
                .map_err(|_| format!("bad array length {rest:?}"))?;
            let mut items = Vec::new();
            for _ in 0..n.max(0) {
                items.push(read_reply(r)?);
            }
            Ok(items.join("\n"))
        }
        "" => Err("connection closed".to_string()),
        _ => Err(format!("unexpected reply {line:?}")),
    }
}

/// Whether the server at `s` answers `PING` with `PONG`.
pub(crate) fn pings(s: &mut TcpStream) -> bool {
    if send(s, &["PING"]).is_err() {
        return false;
    }
    let Ok(clone) = s.try_clone() else {
        return false;
    };
    matches!(
        read_reply(&mut BufReader::new(clone)).as_deref(),
        Ok("PONG")
    )
}
