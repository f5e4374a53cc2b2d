//! The rtable sidecar: one replica of a replicated table. Modules follow ClickHouse's
//! split: `sink` (inserts), `queue` (log pull and execution), `fetcher` + `exchange`
//! (part transfer), `recovery` (restarting and cloning), `session` (read-only handling),
//! plus the part `store`, `rows` codecs and the HTTP `api`.

pub mod api;
pub mod auth;
pub mod cleanup;
pub mod config;
pub mod drop;
pub mod exchange;
pub mod failpoint;
pub mod fetcher;
pub mod file_watch;
pub mod handoff;
pub mod heap;
pub mod merge;
pub mod metrics;
pub mod outcome;
pub mod part_check;
pub mod push;
pub mod query_api;
pub mod queue;
pub mod quorum;
pub mod recovery;
pub mod replica;
pub mod rows;
pub mod select;
pub mod serve;
pub mod session;
pub mod sink;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod table_reload;
pub mod tls;
pub mod zk_access;
