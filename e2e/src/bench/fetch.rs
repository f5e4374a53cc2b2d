//! The fetch baseline: a minimal HTTP/1.1 server that sends one file, and a download of a
//! URL into a file (fsynced, as a fetched part is) with reqwest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Serves `file` to every GET on 127.0.0.1:<port> until the task is aborted.
pub struct FileServer {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl FileServer {
    pub async fn start(file: PathBuf) -> anyhow::Result<FileServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the raw file server")?;
        let port = listener
            .local_addr()
            .context("raw file server address")?
            .port();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let file = file.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(socket, &file).await {
                        eprintln!("bench: raw file server: {e:#}");
                    }
                });
            }
        });
        Ok(FileServer { port, task })
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut socket: tokio::net::TcpStream, file: &Path) -> anyhow::Result<()> {
    // Read the request head (a GET has no body).
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buf).await.context("reading the request")?;
        anyhow::ensure!(n > 0, "client closed before sending a request");
        head.extend_from_slice(&buf[..n]);
        anyhow::ensure!(head.len() < 64 * 1024, "request head too large");
    }
    let mut f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("opening {}", file.display()))?;
    let len = f
        .metadata()
        .await
        .with_context(|| format!("stat {}", file.display()))?
        .len();
    let header = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    socket
        .write_all(header.as_bytes())
        .await
        .context("writing the response head")?;
    // 1 MiB reads, as the sidecar's part server does: tokio's default 8 KiB copy buffer
    // would make the baseline measure blocking-pool hops rather than the loopback.
    let mut reader = tokio::io::BufReader::with_capacity(1 << 20, &mut f);
    tokio::io::copy_buf(&mut reader, &mut socket)
        .await
        .context("sending the file")?;
    socket.shutdown().await.context("closing the response")?;
    Ok(())
}

/// Downloads `url` into `dest`, fsyncs it, and returns (bytes, elapsed).
pub async fn download_to_file(
    http: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    dest: &Path,
) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    let mut request = http.get(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let mut response = request.send().await.with_context(|| format!("GET {url}"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "GET {url} answered {}",
        response.status()
    );
    let file = tokio::fs::File::create(dest)
        .await
        .with_context(|| format!("creating {}", dest.display()))?;
    // 1 MiB writes, like the sidecar's fetcher, rather than one per network chunk.
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let mut total = 0u64;
    while let Some(chunk) = response
        .chunk()
        .await
        .with_context(|| format!("reading GET {url}"))?
    {
        total += chunk.len() as u64;
        out.write_all(&chunk)
            .await
            .with_context(|| format!("writing {}", dest.display()))?;
    }
    out.flush()
        .await
        .with_context(|| format!("writing {}", dest.display()))?;
    out.get_mut()
        .sync_all()
        .await
        .with_context(|| format!("fsyncing {}", dest.display()))?;
    Ok((total, started.elapsed()))
}
