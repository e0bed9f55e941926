//! A simulated compromised MCP server. A prompt injection made its agent call tools
//! with attacker-chosen URLs; the server does what it is told, as real SSRF-prone tools
//! do. It prints what each tool call got.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

fn fetch(label: &str, addr: &str, request: &str) {
    let sa: SocketAddr = addr.parse().expect("address");
    print!("  tool call {label:<58} -> ");
    match TcpStream::connect_timeout(&sa, Duration::from_secs(2)) {
        Ok(mut s) => {
            let _ = s.write_all(request.as_bytes());
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            let first = body
                .lines()
                .last()
                .unwrap_or("")
                .chars()
                .take(70)
                .collect::<String>();
            println!("REACHED: {first}");
        }
        Err(e) => println!("BLOCKED: {e}"),
    }
}

fn main() {
    println!(
        "fake-mcp-server (pid {}): executing injected tool calls",
        std::process::id()
    );
    fetch(
        "fetch_url(http://169.254.169.254/.../security-credentials/)",
        "169.254.169.254:80",
        "GET /latest/meta-data/iam/security-credentials/mcp-role HTTP/1.0\r\n\r\n",
    );
    fetch(
        "fetch_url(http://[fd00:ec2::254]/latest/meta-data/)",
        "[fd00:ec2::254]:80",
        "GET /latest/meta-data/ HTTP/1.0\r\n\r\n",
    );
    fetch(
        "fetch_url(http://[::ffff:169.254.169.254]/) (dual-stack)",
        "[::ffff:169.254.169.254]:80",
        "GET / HTTP/1.0\r\n\r\n",
    );
    fetch(
        "sql_query(postgres://orders-db.internal:5432) = 10.0.20.7",
        "10.0.20.7:5432",
        "SELECT * FROM customers;\n",
    );
    fetch(
        "http_get(http://redis.internal:6379) = 192.168.7.3",
        "192.168.7.3:6379",
        "KEYS *\r\n",
    );
    // Below the socket hooks: a raw socket would let it hand-craft packets.
    print!(
        "  tool call {:<58} -> ",
        "run_shell(ping 169.254.169.254) = raw ICMP socket"
    );
    // SAFETY: plain socket(2), closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        println!("BLOCKED: {}", std::io::Error::last_os_error());
    } else {
        // SAFETY: our own fd.
        unsafe { libc::close(fd) };
        println!("REACHED: raw socket created");
    }
    fetch(
        "fetch_url(https://api.github.com/...) = 93.184.216.34 (allowed)",
        "93.184.216.34:443",
        "GET /repos HTTP/1.0\r\n\r\n",
    );
}
