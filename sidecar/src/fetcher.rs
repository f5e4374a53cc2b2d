//! Downloads a part from a peer (ClickHouse's Fetcher): streams the files into
//! `tmp-fetch_<part>`, verifies every size and hash against the exchange header and the
//! part's checksums against the header the source published in ZooKeeper, and only then
//! installs the directory under its final name.

use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tracing::{Instrument, debug, info_span};

use rtable_protocol::PartName;
use rtable_protocol::hash::{FileHasher, Hash128};
use rtable_protocol::part_header::Checksums;

use crate::exchange::{self, FileEntry};
use crate::replica::{Replica, SECRET_HEADER};
use crate::store::{ActivePart, CHECKSUMS_FILE, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot reach {address} for part {part}: {source}")]
    Http {
        address: String,
        part: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{address} answered {status} for part {part}: {body}")]
    Status {
        address: String,
        part: String,
        status: u16,
        body: String,
    },
    #[error("bad part exchange from {address}: {source}")]
    Header {
        address: String,
        #[source]
        source: exchange::ExchangeError,
    },
    #[error("part {part} from {address}: {message}")]
    Corrupt {
        address: String,
        part: String,
        message: String,
    },
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("part {0} is already being fetched by another queue entry")]
    InFlight(String),
}

/// Holds a part's slot in `Replica::fetching` for the duration of one download.
struct InFlight<'a> {
    replica: &'a Replica,
    part: String,
}

impl<'a> InFlight<'a> {
    fn claim(replica: &'a Replica, part: &PartName) -> Option<Self> {
        let part = part.to_string();
        // Decide under the lock, build the guard after it: dropping a guard re-locks.
        let claimed = replica.fetching.lock().insert(part.clone());
        if claimed {
            Some(InFlight { replica, part })
        } else {
            None
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.replica.fetching.lock().remove(&self.part);
    }
}

pub struct Fetched {
    pub part: std::sync::Arc<ActivePart>,
    pub bytes: u64,
    pub seconds: f64,
}

/// Fetches `part` from the peer at `address` (host:port). `expected_checksums_hash` is the
/// `checksums hash` of the source's `parts/<part>` header when known.
pub async fn fetch_part(
    replica: &Replica,
    address: &str,
    part: &PartName,
    expected_checksums_hash: Option<Hash128>,
) -> Result<Fetched, FetchError> {
    let span = info_span!("fetch", replica = %replica.name, part = %part, from = %address);
    async move {
        let Some(_slot) = InFlight::claim(replica, part) else {
            return Err(FetchError::InFlight(part.to_string()));
        };
        let started = Instant::now();
        let store = replica.store.clone();
        let name = part.clone();
        let dir = tokio::task::spawn_blocking(move || store.fetch_dir(&name))
            .await
            .map_err(|e| io_error(Path::new("tmp-fetch"), std::io::Error::other(e)))??;
        let result = download(replica, address, part, &dir).await;
        let (files, bytes) = match result {
            Ok(ok) => ok,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return Err(e);
            }
        };
        let checksums =
            match read_checksums(&dir, &files, address, part, expected_checksums_hash).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = tokio::fs::remove_dir_all(&dir).await;
                    return Err(e);
                }
            };
        let store = replica.store.clone();
        let name = part.clone();
        let install_dir = dir.clone();
        let installed = tokio::task::spawn_blocking(move || {
            store.install_fetched(&install_dir, &name, &checksums)
        })
        .await
        .map_err(|e| io_error(&dir, std::io::Error::other(e)))?;
        let part = match installed {
            Ok(p) => p,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return Err(e.into());
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        debug!(bytes, seconds, "fetched part");
        Ok(Fetched {
            part,
            bytes,
            seconds,
        })
    }
    .instrument(span)
    .await
}

fn io_error(path: &Path, source: std::io::Error) -> FetchError {
    FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(address: &str, part: &PartName, message: impl Into<String>) -> FetchError {
    FetchError::Corrupt {
        address: address.to_string(),
        part: part.to_string(),
        message: message.into(),
    }
}

/// Streams the response into `dir`, hashing as it writes; returns the listed files and
/// the byte count.
async fn download(
    replica: &Replica,
    address: &str,
    part: &PartName,
    dir: &Path,
) -> Result<(Vec<FileEntry>, u64), FetchError> {
    let url = format!("http://{address}/parts/{part}");
    let mut request = replica.http.get(&url);
    if let Some(secret) = &replica.secret {
        request = request.header(SECRET_HEADER, secret);
    }
    let http_error = |source| FetchError::Http {
        address: address.to_string(),
        part: part.to_string(),
        source,
    };
    let response = request.send().await.map_err(http_error)?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(FetchError::Status {
            address: address.to_string(),
            part: part.to_string(),
            status: status.as_u16(),
            body: body.chars().take(500).collect(),
        });
    }
    let mut stream = response.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    // Header first.
    let (files, mut rest) = loop {
        if let Some((len, start)) = exchange::header_end(&buf) {
            let text = std::str::from_utf8(&buf[..len])
                .map_err(|_| corrupt(address, part, "header is not UTF-8"))?;
            let files = exchange::parse_header(text).map_err(|source| FetchError::Header {
                address: address.to_string(),
                source,
            })?;
            break (files, buf.split_off(start));
        }
        if buf.len() > exchange::MAX_HEADER_BYTES {
            return Err(corrupt(address, part, "header too long"));
        }
        match stream.next().await {
            Some(chunk) => buf.extend_from_slice(&chunk.map_err(http_error)?),
            None => return Err(corrupt(address, part, "stream ended inside the header")),
        }
    };
    let mut total = 0u64;
    for file in &files {
        let path = dir.join(&file.name);
        let mut out = tokio::fs::File::create(&path)
            .await
            .map_err(|e| io_error(&path, e))?;
        let mut hasher = FileHasher::new();
        let mut remaining = file.size;
        loop {
            if remaining > 0 && rest.is_empty() {
                match stream.next().await {
                    Some(chunk) => rest = chunk.map_err(http_error)?.to_vec(),
                    None => {
                        return Err(corrupt(
                            address,
                            part,
                            format!(
                                "stream ended with {remaining} bytes of {} missing",
                                file.name
                            ),
                        ));
                    }
                }
            }
            let take = (remaining as usize).min(rest.len());
            let tail = rest.split_off(take);
            hasher.update(&rest);
            out.write_all(&rest).await.map_err(|e| io_error(&path, e))?;
            remaining -= take as u64;
            rest = tail;
            if remaining == 0 {
                break;
            }
        }
        out.sync_all().await.map_err(|e| io_error(&path, e))?;
        let actual = hasher.finish();
        if actual != file.hash {
            return Err(corrupt(
                address,
                part,
                format!(
                    "hash mismatch in {}: header says {}, bytes hash to {}",
                    file.name,
                    file.hash.to_hex(),
                    actual.to_hex()
                ),
            ));
        }
        total += file.size;
    }
    if !rest.is_empty() || stream.next().await.is_some() {
        return Err(corrupt(
            address,
            part,
            "unexpected bytes after the last file",
        ));
    }
    Ok((files, total))
}

async fn read_checksums(
    dir: &Path,
    files: &[FileEntry],
    address: &str,
    part: &PartName,
    expected_hash: Option<Hash128>,
) -> Result<Checksums, FetchError> {
    if !files.iter().any(|f| f.name == CHECKSUMS_FILE) {
        return Err(corrupt(address, part, format!("no {CHECKSUMS_FILE} sent")));
    }
    let path = dir.join(CHECKSUMS_FILE);
    let text = tokio::fs::read_to_string(&path)
        .await
        .map_err(|e| io_error(&path, e))?;
    let checksums = Checksums::parse(&text).map_err(|e| corrupt(address, part, e.to_string()))?;
    if let Some(expected) = expected_hash {
        let actual = checksums.total_hash();
        if actual != expected {
            return Err(corrupt(
                address,
                part,
                format!(
                    "checksums differ from the part header in ZooKeeper ({} vs {})",
                    actual.to_hex(),
                    expected.to_hex()
                ),
            ));
        }
    }
    Ok(checksums)
}
