//! `swarmnet-whoami`: the demo server (in the spirit of traefik/whoami). Answers every HTTP
//! request with who it is (task, service, node from the environment netd gives tasks), the
//! addresses of its interfaces, and the client address it saw, so a request shows which replica
//! answered and whether the client's source address survived the path.
//!
//! `swarmnet-whoami [--port 80]`; also answers plain TCP lines (`nc`) the same way.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_unset| "-".into())
}

/// IPv4 addresses of this network namespace, from /proc/net/fib_trie's local entries.
fn addresses() -> Vec<String> {
    let Ok(text) = std::fs::read_to_string("/proc/net/fib_trie") else {
        return vec![];
    };
    let mut out: Vec<String> = Vec::new();
    let mut last = "";
    for line in text.lines() {
        let t = line.trim_start_matches([' ', '|', '-', '+']).trim();
        if t.contains("/32 host LOCAL") {
            if !last.starts_with("127.") && !out.iter().any(|a| a == last) {
                out.push(last.to_owned());
            }
        } else if let Some(ip) = t.split_whitespace().next() {
            last = ip;
        }
    }
    out
}

fn answer(stream: TcpStream) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let http = first.contains("HTTP/");
    if http {
        // Drain the request headers.
        let mut line = String::new();
        while reader.read_line(&mut line)? > 2 {
            line.clear();
        }
    }
    let body = format!(
        "task: {}\nservice: {}\nslot: {}\nnode: {}\naddresses: {}\nclient: {}\n",
        env("SWARMNET_TASK_ID"),
        env("SWARMNET_SERVICE"),
        env("SWARMNET_TASK_SLOT"),
        env("SWARMNET_NODE"),
        addresses().join(" "),
        peer
    );
    let mut w = stream;
    if http {
        write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
    } else {
        w.write_all(body.as_bytes())?;
    }
    w.flush()
}

fn main() -> std::io::Result<()> {
    let mut port = 80u16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--port", Some(p)) => {
                port = p
                    .parse()
                    .map_err(|e| std::io::Error::other(format!("--port {p}: {e}")))?
            }
            _ => {
                eprintln!("usage: swarmnet-whoami [--port PORT]");
                std::process::exit(2);
            }
        }
    }
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                std::thread::spawn(move || {
                    let _ = answer(s);
                });
            }
            Err(e) => eprintln!("accept: {e}"),
        }
    }
    Ok(())
}
