//! A real OCI registry on loopback: Debian's `docker-registry` (registry v2).

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::Error;
use crate::process::{spawn_supervised, supervised_command};

/// A running registry.
#[derive(Debug)]
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub address: String,
    /// The process (supervised: it dies with this process).
    pub child: Child,
}

/// Starts `docker-registry serve` on loopback; see [`start_registry_on`].
pub fn start_registry(
    dir: &Path,
    name: &str,
    port: u16,
    htpasswd: Option<&Path>,
) -> Result<Registry, Error> {
    start_registry_on("127.0.0.1", dir, name, port, htpasswd)
}

/// Starts `docker-registry serve` with its data and config under `dir`
/// (`dir/<name>/`, `dir/<name>.yml`, `dir/<name>.log`), on `host:port`
/// (port 0: a free one), requiring the users of `htpasswd` (bcrypt) when
/// given. Data stays across restarts. Returns once the port accepts
/// connections. Build Pods reach a registry on the node's address
/// ([`crate::node::NODE_IP`]), not on loopback.
pub fn start_registry_on(
    host: &str,
    dir: &Path,
    name: &str,
    port: u16,
    htpasswd: Option<&Path>,
) -> Result<Registry, Error> {
    let port = if port == 0 {
        std::net::TcpListener::bind((host, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| Error::io(format!("bind a free port on {host}"), e))?
    } else {
        port
    };
    let data = dir.join(name);
    std::fs::create_dir_all(&data)
        .map_err(|e| Error::io(format!("create {}", data.display()), e))?;
    let auth = htpasswd
        .map(|p| {
            format!(
                "auth:\n  htpasswd:\n    realm: tripod\n    path: {}\n",
                p.display()
            )
        })
        .unwrap_or_default();
    let cfg = dir.join(format!("{name}.yml"));
    let config = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}:{port}\n{auth}",
        data.display()
    );
    std::fs::write(&cfg, config).map_err(|e| Error::io(format!("write {}", cfg.display()), e))?;
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)
        .map_err(|e| Error::io(format!("create {}", log_path.display()), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| Error::io("clone log handle", e))?;
    let mut cmd = supervised_command("docker-registry");
    cmd.arg("serve")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    let mut child = spawn_supervised(cmd)
        .map_err(|e| Error::io("start docker-registry (Debian package docker-registry)", e))?;
    let address = format!("{host}:{port}");
    let started = Instant::now();
    while std::net::TcpStream::connect(&address).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(Error::io(
                format!(
                    "docker-registry exited ({status}): {}",
                    tail.lines().last().unwrap_or("")
                ),
                std::io::Error::other("registry did not start"),
            ));
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            return Err(Error::io(
                format!("docker-registry did not listen on {address} within 20s"),
                std::io::Error::other("timeout"),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Registry { address, child })
}

/// A plain HTTP/1.0 request to a registry (or any loopback server):
/// `(status, head, body)`. For tests that read manifests and blobs as a
/// client other than Tripod's would.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    accept: &str,
) -> std::io::Result<(u16, String, Vec<u8>)> {
    exchange(
        addr,
        &format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"),
        &[],
    )
}

/// [`http_request`] with a body (a blob upload, a manifest, a JSON request).
pub fn http_send(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<(u16, String, Vec<u8>)> {
    exchange(
        addr,
        &format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        ),
        body,
    )
}

/// Writes a request and reads the whole answer: `(status, head, body)`.
fn exchange(addr: &str, head: &str, body: &[u8]) -> std::io::Result<(u16, String, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(buf.len());
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let body = buf.get(split + 4..).unwrap_or_default().to_vec();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, head, body))
}
