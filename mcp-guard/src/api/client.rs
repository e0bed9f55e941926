//! Talking to a running daemon: its control socket (a Unix socket only root, or the
//! configured group, can open) for /status, /events and /dns, or its TCP listener for
//! /metrics, /healthz and /readyz.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

/// Where a daemon answers.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The control socket.
    Control(PathBuf),
    /// The metrics listener.
    Tcp(SocketAddr),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Control(p) => write!(f, "{}", p.display()),
            Self::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// A connected stream of either kind.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

fn connect(to: &Endpoint) -> std::io::Result<Box<dyn Stream>> {
    Ok(match to {
        Endpoint::Control(p) => Box::new(UnixStream::connect(p).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "control socket {}: {e} (is the daemon running, and are you root or in daemon.control_group?)",
                    p.display()
                ),
            )
        })?),
        Endpoint::Tcp(a) => Box::new(TcpStream::connect_timeout(a, Duration::from_secs(2))?),
    })
}

/// Sends a GET and returns the open stream positioned at the body, after checking for 200.
///
/// # Errors
/// No daemon answers, or it answered with an error status.
pub fn get(to: &Endpoint, path: &str) -> std::io::Result<BufReader<Box<dyn Stream>>> {
    let mut s = connect(to)?;
    // HTTP/1.0: the answer is never chunked; the body ends when the connection closes.
    write!(s, "GET {path} HTTP/1.0\r\nHost: mcp-guard\r\n\r\n")?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(std::io::Error::other(format!(
            "daemon answered {}",
            status.trim()
        )));
    }
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    Ok(r)
}

/// GET returning the whole body.
///
/// # Errors
/// As [`get`].
pub fn get_body(to: &Endpoint, path: &str) -> std::io::Result<String> {
    let mut body = String::new();
    get(to, path)?.read_to_string(&mut body)?;
    Ok(body)
}

/// GET on the control socket at `socket`.
///
/// # Errors
/// As [`get`].
pub fn control_body(socket: &Path, path: &str) -> std::io::Result<String> {
    get_body(&Endpoint::Control(socket.to_path_buf()), path)
}

/// A POST (no body) on the control socket: the status code and the body, whatever the
/// status (the daemon explains refusals in the body).
///
/// # Errors
/// No daemon answers.
pub fn control_post(socket: &Path, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = connect(&Endpoint::Control(socket.to_path_buf()))?;
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: mcp-guard\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    let mut body = String::new();
    r.read_to_string(&mut body)?;
    Ok((code, body))
}
