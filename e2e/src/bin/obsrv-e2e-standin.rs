//! A stand-in for a connector process in the control plane's own tests: a tiny HTTP server on
//! `$OBSRV_LISTEN` that shows what the kubelet gave it.
//!
//! - `GET /readyz`, `/healthz`: 200 (503 while the file named by `$STANDIN_NOT_READY`,
//!   respectively `$STANDIN_NOT_LIVE`, exists)
//! - `GET /env/<NAME>`: the variable's value (404 if unset)
//! - `GET /file/<path>`: a file's contents (absolute path; e.g. from the args)
//! - `GET /args`: the arguments, one per line
//! - `GET /exit/<code>`: exits with that code (to test restarts)

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};

fn respond(mut s: TcpStream, code: u16, body: &str) {
    let reason = if code == 200 { "OK" } else { "Error" };
    let _ = write!(
        s,
        "HTTP/1.1 {code} {reason}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn main() {
    let addr = std::env::var("OBSRV_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            std::process::exit(2);
        }
    };
    eprintln!("stand-in listening on {addr}");
    for stream in listener.incoming().flatten() {
        let mut line = String::new();
        if BufReader::new(&stream).read_line(&mut line).is_err() {
            continue;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        match path.as_str() {
            "/healthz" => {
                let dead = std::env::var("STANDIN_NOT_LIVE")
                    .is_ok_and(|f| std::path::Path::new(&f).exists());
                respond(stream, if dead { 503 } else { 200 }, "ok")
            }
            "/readyz" => {
                let not_ready = std::env::var("STANDIN_NOT_READY")
                    .is_ok_and(|f| std::path::Path::new(&f).exists());
                respond(stream, if not_ready { 503 } else { 200 }, "")
            }
            "/args" => respond(
                stream,
                200,
                &std::env::args().skip(1).collect::<Vec<_>>().join("\n"),
            ),
            p if p.starts_with("/env/") => match std::env::var(&p[5..]) {
                Ok(v) => respond(stream, 200, &v),
                Err(_) => respond(stream, 404, ""),
            },
            p if p.starts_with("/file/") => match std::fs::read_to_string(&p[5..]) {
                Ok(v) => respond(stream, 200, &v),
                Err(e) => respond(stream, 404, &e.to_string()),
            },
            p if p.starts_with("/exit/") => {
                respond(stream, 200, "bye");
                std::process::exit(p[6..].parse().unwrap_or(1));
            }
            _ => respond(stream, 404, ""),
        }
    }
}
