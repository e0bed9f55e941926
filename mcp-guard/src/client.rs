//! Talking to a running daemon over its local HTTP listener.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// Sends a GET and returns the open stream positioned at the body, after checking for 200.
///
/// # Errors
/// No daemon answers, or it answered with an error status.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<BufReader<TcpStream>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    write!(
        s,
        // HTTP/1.0: the answer is never chunked; the body ends when the connection closes.
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"
    )?;
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
pub fn get_body(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut body = String::new();
    get(addr, path)?.read_to_string(&mut body)?;
    Ok(body)
}
