//! Downloads a part from a peer (ClickHouse's Fetcher): streams the files into
//! `tmp-fetch_<part>`, verifies every size and hash against the exchange header and the
//! part's checksums against the header the source published in ZooKeeper, checks that its
//! columns are the table's, a prefix of them or an extension of them (columns appended to
//! a live table), and only then installs the directory under its final name.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tracing::{Instrument, debug, info_span};

use rtable_protocol::PartName;
use rtable_protocol::hash::{FileHasher, Hash128};
use rtable_protocol::part_header::{Checksums, FileChecksum};

use crate::exchange::{self, FileEntry};
use crate::replica::{Replica, SECRET_HEADER};
use crate::store::{ActivePart, CHECKSUMS_FILE, PartStore, StoreError};

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
    #[error("push of part {part} from {source_replica} broke off: {message}")]
    Pushed {
        source_replica: String,
        part: String,
        message: String,
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

/// The downloads in flight, by part name (see `Replica::fetching`).
pub(crate) type Slots =
    parking_lot::Mutex<std::collections::HashMap<String, tokio::sync::watch::Sender<()>>>;

/// Holds a part's slot in `Replica::fetching` for the duration of one download. The slot
/// is a watch sender that is never sent on: dropping it (download over, either way) is
/// what wakes everyone waiting in [`wait_in_flight`].
pub(crate) struct InFlight<'a> {
    slots: &'a Slots,
    part: String,
}

impl<'a> InFlight<'a> {
    pub(crate) fn claim(replica: &'a Replica, part: &PartName) -> Option<Self> {
        Self::claim_in(&replica.fetching, part)
    }

    fn claim_in(slots: &'a Slots, part: &PartName) -> Option<Self> {
        let part = part.to_string();
        // Decide under the lock, build the guard after it: dropping a guard re-locks.
        let claimed = match slots.lock().entry(part.clone()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(tokio::sync::watch::channel(()).0);
                true
            }
        };
        // Built only when claimed: a guard that exists releases the slot when dropped, so
        // one made for a refused claim would free the holder's slot under its feet.
        if claimed {
            Some(InFlight { slots, part })
        } else {
            None
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Bound to a local so the sender is dropped after the lock is released.
        let _slot = self.slots.lock().remove(&self.part);
    }
}

/// Waits until no download of exactly `part` is in flight (a prefetch started by the log
/// pull, or another entry's fetch), at most `limit`. True when none is in flight any more:
/// the caller then finds the part installed, or the download failed and it fetches itself.
pub async fn wait_in_flight(replica: &Replica, part: &PartName, limit: Duration) -> bool {
    let Some(mut slot) = replica
        .fetching
        .lock()
        .get(&part.to_string())
        .map(|sender| sender.subscribe())
    else {
        return true;
    };
    // Nothing is ever sent: `changed` only returns, with an error, once the sender is gone.
    tokio::time::timeout(limit, async { while slot.changed().await.is_ok() {} })
        .await
        .is_ok()
}

/// Whether a fetch is the log pull's prefetch (ahead of its queue entry) or an entry's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Executing a queue entry: the entry exists and records the part right after.
    Entry,
    /// Ahead of the queue entry: the part is recorded when the entry executes.
    Prefetch,
}

pub struct Fetched {
    pub part: std::sync::Arc<ActivePart>,
    pub bytes: u64,
    pub seconds: f64,
}

/// Fetches `part` from the peer at `address` (host:port). `expected_checksums_hash` is the
/// `checksums hash` of the source's `parts/<part>` header when known.
///
/// The async side only receives; one blocking thread prepares `tmp-fetch_<part>`, hashes
/// and writes the files as the bytes come, verifies and installs them. One thread for all
/// the disk work keeps a small fetch (every insert's part) to a single hop off the runtime.
pub async fn fetch_part(
    replica: &Replica,
    address: &str,
    part: &PartName,
    expected_checksums_hash: Option<Hash128>,
) -> Result<Fetched, FetchError> {
    fetch(
        replica,
        address,
        part,
        expected_checksums_hash,
        Purpose::Entry,
    )
    .await
}

/// [`fetch_part`] for a given [`Purpose`].
pub async fn fetch(
    replica: &Replica,
    address: &str,
    part: &PartName,
    expected_checksums_hash: Option<Hash128>,
    purpose: Purpose,
) -> Result<Fetched, FetchError> {
    let body = async {
        let response = request(replica, address, part).await?;
        Ok(response.bytes_stream().map(|chunk| {
            chunk.map_err(|source| FetchError::Http {
                address: address.to_string(),
                part: part.to_string(),
                source,
            })
        }))
    };
    receive(
        replica,
        address,
        part,
        expected_checksums_hash,
        purpose,
        body,
    )
    .await
}

/// Installs a part its source pushed right after committing it (see `push`): the same
/// checks and install as a fetch, on the bytes of the push request instead of a response.
pub async fn receive_pushed<S, E>(
    replica: &Replica,
    source: &str,
    part: &PartName,
    body: S,
) -> Result<Fetched, FetchError>
where
    S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let body = async { Ok(pushed_stream(source, part, body)) };
    receive(replica, source, part, None, Purpose::Prefetch, body).await
}

async fn receive<B, S>(
    replica: &Replica,
    address: &str,
    part: &PartName,
    expected_checksums_hash: Option<Hash128>,
    purpose: Purpose,
    body: B,
) -> Result<Fetched, FetchError>
where
    B: std::future::Future<Output = Result<S, FetchError>>,
    S: futures::Stream<Item = Result<Bytes, FetchError>> + Unpin,
{
    let (installed, bytes, seconds) = receive_into(
        replica,
        address,
        part,
        expected_checksums_hash,
        purpose,
        body,
    )
    .await?;
    Ok(Fetched {
        part: installed,
        bytes,
        seconds,
    })
}

/// The body of a peer's request (push or handoff) as a download's stream.
fn pushed_stream<'a, S, E>(
    source: &'a str,
    part: &'a PartName,
    body: S,
) -> impl futures::Stream<Item = Result<Bytes, FetchError>> + Unpin + 'a
where
    S: futures::Stream<Item = Result<Bytes, E>> + Unpin + 'a,
    E: std::fmt::Display,
{
    body.map(move |chunk| {
        chunk.map_err(|e| FetchError::Pushed {
            source_replica: source.to_string(),
            part: part.to_string(),
            message: e.to_string(),
        })
    })
}

/// One download: a blocking thread prepares `tmp-fetch_<part>` while `body` starts (the
/// request's round trip), then writes, verifies and installs what the stream brings.
async fn receive_into<B, S>(
    replica: &Replica,
    address: &str,
    part: &PartName,
    expected_checksums_hash: Option<Hash128>,
    purpose: Purpose,
    body: B,
) -> Result<(std::sync::Arc<ActivePart>, u64, f64), FetchError>
where
    B: std::future::Future<Output = Result<S, FetchError>>,
    S: futures::Stream<Item = Result<Bytes, FetchError>> + Unpin,
{
    let span = info_span!("fetch", replica = %replica.name, part = %part, from = %address);
    async move {
        let Some(_slot) = InFlight::claim(replica, part) else {
            return Err(FetchError::InFlight(part.to_string()));
        };
        // The download we waited out (or lost the claim to) may have installed it already.
        if replica.store.contains(part) {
            return Err(FetchError::Store(StoreError::AlreadyExists {
                name: part.to_string(),
                path: replica.store.parts_dir().join(part.to_string()),
            }));
        }
        let started = Instant::now();
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE);
        let receiver = Receiver {
            store: replica.store.clone(),
            part: part.clone(),
            address: address.to_string(),
            expected_checksums_hash,
            table: crate::rows::arrow_schema(&replica.table.schema),
            purpose,
        };
        // Started before the request, so preparing the directory overlaps the round trip.
        // The fetch span follows the disk work onto its thread, for its log lines.
        let span = tracing::Span::current();
        let writer = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            receiver.run(rx)
        });
        let received: Result<(), FetchError> = async {
            let mut stream = body.await?;
            while let Some(chunk) = stream.next().await {
                // A failed send means the writer stopped early; its own error says why.
                if tx.send(chunk?).await.is_err() {
                    break;
                }
            }
            Ok(())
        }
        .await;
        // The end of the body, for the writer: every listed byte must have come by now.
        drop(tx);
        let written = writer
            .await
            .map_err(|e| io_error(Path::new("tmp-fetch"), std::io::Error::other(e)))?;
        let (part, bytes) = match (written, received) {
            // Every listed byte arrived and verified: an error after them changes nothing.
            (Ok(done), _) => done,
            // A refused request or a cut connection also leaves the writer short of
            // bytes; the HTTP error is the cause worth reporting.
            (Err(_), Err(e)) | (Err(e), Ok(())) => return Err(e),
        };
        let seconds = started.elapsed().as_secs_f64();
        debug!(bytes, seconds, "fetched part");
        Ok((part, bytes, seconds))
    }
    .instrument(span)
    .await
}

/// Sends `GET /parts/<part>`; a non-success status becomes `FetchError::Status`.
async fn request(
    replica: &Replica,
    address: &str,
    part: &PartName,
) -> Result<reqwest::Response, FetchError> {
    let url = format!("{}://{address}/parts/{part}", replica.host.scheme);
    let mut request = replica.http.get(&url);
    if let Some(secret) = &replica.secret {
        request = request.header(SECRET_HEADER, secret);
    }
    let response = request.send().await.map_err(|source| FetchError::Http {
        address: address.to_string(),
        part: part.to_string(),
        source,
    })?;
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
    Ok(response)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
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

/// Chunks of the response waiting for the writer thread: bounded, so a fetch holds a few
/// MiB at most however big the part is and however slow the disk.
const WRITE_QUEUE: usize = 16;

/// The blocking half of a fetch: everything that touches the disk.
struct Receiver {
    store: PartStore,
    part: PartName,
    address: String,
    expected_checksums_hash: Option<Hash128>,
    /// The table's columns: a fetched part holds them, a prefix of them (written before
    /// columns were appended) or them plus appended ones (written by a replica already
    /// running a newer definition). The columns hash of the source's header is not
    /// compared: it names the columns its writer ran, which may differ from ours in the
    /// same ways.
    table: arrow::datatypes::SchemaRef,
    purpose: Purpose,
}

impl Receiver {
    /// Writes the body's files into a fresh `tmp-fetch_<part>`, verifies and installs them;
    /// on any failure the directory is removed. Returns the part and the bytes received.
    fn run(
        self,
        rx: tokio::sync::mpsc::Receiver<Bytes>,
    ) -> Result<(std::sync::Arc<ActivePart>, u64), FetchError> {
        let dir = self.store.fetch_dir(&self.part)?;
        let result = self.write_and_install(&dir, rx);
        if result.is_err() {
            let _ignored = std::fs::remove_dir_all(&dir);
        }
        result
    }

    fn write_and_install(
        &self,
        dir: &Path,
        mut rx: tokio::sync::mpsc::Receiver<Bytes>,
    ) -> Result<(std::sync::Arc<ActivePart>, u64), FetchError> {
        // Phase times (debug log below): where a slow fetch spends its time.
        let started = Instant::now();
        let (files, rest) = self.read_header(&mut rx)?;
        let header_at = started.elapsed();
        let bytes = self.write_files(dir, &files, rest, rx)?;
        let written_at = started.elapsed();
        let checksums = self.read_checksums(dir, &files)?;
        self.check_columns(dir)?;
        let checked_at = started.elapsed();
        // Every file was hashed as it was written and matched the exchange header, so
        // installing checks them against `checksums` without reading them back.
        let streamed = Checksums {
            files: files
                .iter()
                .map(|f| {
                    let checksum = FileChecksum {
                        size: f.size,
                        hash: f.hash,
                    };
                    (f.name.clone(), checksum)
                })
                .collect(),
        };
        let part = self
            .store
            .install_fetched_streamed(dir, &self.part, &checksums, &streamed)?;
        debug!(
            header_ms = ms(header_at),
            written_ms = ms(written_at),
            checked_ms = ms(checked_at),
            installed_ms = ms(started.elapsed()),
            "fetch phases (from the writer's start)"
        );
        // A prefetch has no queue entry yet to prove the part after a crash; the executor
        // fires this failpoint for it instead, right before recording it.
        if self.purpose == Purpose::Entry
            && crate::failpoint::fire(crate::failpoint::CRASH_BEFORE_RECORDING_FETCH)
        {
            tracing::error!(part = %self.part, "failpoint crash_before_recording_fetch: exiting with the part installed but not in ZooKeeper");
            std::process::abort();
        }
        Ok((part, bytes))
    }

    fn corrupt(&self, message: impl Into<String>) -> FetchError {
        corrupt(&self.address, &self.part, message)
    }

    /// The exchange header, and the body bytes that came after it in the same chunk.
    fn read_header(
        &self,
        rx: &mut tokio::sync::mpsc::Receiver<Bytes>,
    ) -> Result<(Vec<FileEntry>, Bytes), FetchError> {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            if let Some((len, start)) = exchange::header_end(&buf) {
                let text = std::str::from_utf8(&buf[..len])
                    .map_err(|_| self.corrupt("header is not UTF-8"))?;
                let files = exchange::parse_header(text).map_err(|source| FetchError::Header {
                    address: self.address.clone(),
                    source,
                })?;
                return Ok((files, Bytes::from(buf.split_off(start))));
            }
            if buf.len() > exchange::MAX_HEADER_BYTES {
                return Err(self.corrupt("header too long"));
            }
            match rx.blocking_recv() {
                Some(chunk) => buf.extend_from_slice(&chunk),
                None => return Err(self.corrupt("stream ended inside the header")),
            }
        }
    }

    /// Splits the body into the listed files, hashing and writing each in large buffered
    /// writes, and checks each hash as soon as its file ends. Nothing is fsynced here:
    /// installing fsyncs every file once.
    fn write_files(
        &self,
        dir: &Path,
        files: &[FileEntry],
        mut chunk: Bytes,
        mut rx: tokio::sync::mpsc::Receiver<Bytes>,
    ) -> Result<u64, FetchError> {
        let mut total = 0u64;
        for file in files {
            let path = dir.join(&file.name);
            let created = std::fs::File::create(&path).map_err(|e| io_error(&path, e))?;
            let mut out = std::io::BufWriter::with_capacity(exchange::CHUNK_BYTES, created);
            let mut hasher = FileHasher::new();
            let mut remaining = file.size;
            while remaining > 0 {
                if chunk.is_empty() {
                    chunk = rx.blocking_recv().ok_or_else(|| {
                        self.corrupt(format!(
                            "stream ended with {remaining} bytes of {} missing",
                            file.name
                        ))
                    })?;
                    continue;
                }
                let take = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(chunk.len());
                let piece = chunk.split_to(take);
                hasher.update(&piece);
                out.write_all(&piece).map_err(|e| io_error(&path, e))?;
                remaining -= take as u64;
            }
            out.flush().map_err(|e| io_error(&path, e))?;
            let actual = hasher.finish();
            if actual != file.hash {
                return Err(self.corrupt(format!(
                    "hash mismatch in {}: header says {}, bytes hash to {}",
                    file.name,
                    file.hash.to_hex(),
                    actual.to_hex()
                )));
            }
            total += file.size;
        }
        while chunk.is_empty() {
            match rx.blocking_recv() {
                Some(next) => chunk = next,
                None => return Ok(total),
            }
        }
        Err(self.corrupt("unexpected bytes after the last file"))
    }

    /// Refuses a part whose columns no reader of this table could read (see `table`).
    fn check_columns(&self, dir: &Path) -> Result<(), FetchError> {
        let columns = crate::store::columns_in(dir)
            .map_err(|e| self.corrupt(format!("{}: {e}", crate::store::DATA_FILE)))?;
        crate::rows::check_prefix(columns.fields(), self.table.fields())
            .map_err(|e| self.corrupt(e.to_string()))
    }

    /// The part's checksums as sent, checked against the source's header in ZooKeeper.
    fn read_checksums(&self, dir: &Path, files: &[FileEntry]) -> Result<Checksums, FetchError> {
        if !files.iter().any(|f| f.name == CHECKSUMS_FILE) {
            return Err(self.corrupt(format!("no {CHECKSUMS_FILE} sent")));
        }
        let path = dir.join(CHECKSUMS_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
        let checksums = Checksums::parse(&text).map_err(|e| self.corrupt(e.to_string()))?;
        if let Some(expected) = self.expected_checksums_hash {
            let actual = checksums.total_hash();
            if actual != expected {
                return Err(self.corrupt(format!(
                    "checksums differ from the part header in ZooKeeper ({} vs {})",
                    actual.to_hex(),
                    expected.to_hex()
                )));
            }
        }
        Ok(checksums)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(name: &str) -> PartName {
        PartName::parse(name).expect("part name")
    }

    #[test]
    fn a_refused_claim_leaves_the_holders_slot_alone() {
        let slots = Slots::default();
        let first = InFlight::claim_in(&slots, &part("all_0_5_1")).expect("first claim");
        assert!(InFlight::claim_in(&slots, &part("all_0_5_1")).is_none());
        // The refusal above must not have released the first download's slot.
        assert!(slots.lock().contains_key("all_0_5_1"));
        assert!(InFlight::claim_in(&slots, &part("all_0_5_1")).is_none());
        // Other parts are independent.
        let other = InFlight::claim_in(&slots, &part("all_6_6_0")).expect("other part");
        drop(first);
        assert!(!slots.lock().contains_key("all_0_5_1"));
        let again = InFlight::claim_in(&slots, &part("all_0_5_1")).expect("claim after release");
        drop(again);
        drop(other);
        assert!(slots.lock().is_empty());
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_the_holder_finishes() {
        let slots = Slots::default();
        let holder = InFlight::claim_in(&slots, &part("all_1_1_0")).expect("claim");
        let mut waiter = slots
            .lock()
            .get("all_1_1_0")
            .map(|s| s.subscribe())
            .expect("slot");
        drop(holder);
        assert!(waiter.changed().await.is_err(), "the sender is gone");
    }
}
