//! The few tree operations both the operator and the sidecar perform: create a table,
//! register, activate, read and drop a replica, remove a table.
//!
//! Each operation that changes more than one node does it in one multi, so a crash or a
//! lost connection never leaves a half-made table or replica behind.

use std::time::Duration;

use zookeeper_client as zk;

use crate::columns;
use crate::definition::{self, DefinitionChange};
use crate::host::HostInfo;
use crate::metadata::TableMetadata;
use crate::paths::{TablePaths, sequence_of};
use crate::schema::TableSchema;
use crate::zk_acl::{self, TreeAcl};

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("ZooKeeper {op} {path}: {source}")]
    ZooKeeper {
        op: &'static str,
        path: String,
        #[source]
        source: zk::Error,
    },
    #[error(
        "table definition differs from the one in ZooKeeper at {path}; the tree is left unchanged. Make the manifest match the tree (or use a new table path):\n{diff}\n--- local definition ---\n{local}--- tree definition ---\n{tree}"
    )]
    SchemaMismatch {
        path: String,
        diff: String,
        local: String,
        tree: String,
    },
    #[error("node {path} holds text rtable cannot read: {message}")]
    Corrupt { path: String, message: String },
    #[error(
        "replica {replica} is active (its is_active node exists, owned by session {owner:#x}); stop its pod first and retry once the session is gone"
    )]
    ReplicaActive { replica: String, owner: i64 },
    #[error("replica {replica} is not registered under {path}")]
    NoReplica { replica: String, path: String },
    #[error("gave up after {attempts} attempts on {what}: the tree kept changing under us")]
    Contention { what: String, attempts: u32 },
    /// The table's tree does not let these credentials in (see `zk_access::check`).
    #[error("ZooKeeper refuses the table's tree {root} to {who}: {why}. {fix}")]
    AccessRefused {
        root: String,
        who: String,
        why: String,
        fix: String,
    },
}

impl TreeError {
    pub fn zk(op: &'static str, path: impl Into<String>, source: zk::Error) -> Self {
        TreeError::ZooKeeper {
            op,
            path: path.into(),
            source,
        }
    }

    /// True when the error comes from the connection or session, not from the tree's content:
    /// the caller should retry with backoff rather than report a user error.
    pub fn is_transient(&self) -> bool {
        match self {
            TreeError::ZooKeeper { source, .. } => is_transient(source),
            TreeError::Contention { .. } => true,
            _ => false,
        }
    }

    /// The underlying ZooKeeper error, when there is one.
    pub fn zk_error(&self) -> Option<&zk::Error> {
        match self {
            TreeError::ZooKeeper { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Connection-level failures whose outcome is unknown or that a new attempt may fix.
pub fn is_transient(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::ConnectionLoss
            | zk::Error::Timeout
            | zk::Error::SessionExpired
            | zk::Error::ClientClosed
            | zk::Error::NoHosts
            | zk::Error::Custom(_)
            | zk::Error::Throttled
    )
}

/// Maps an operation failure inside a multi to the path it was about.
pub fn multi_error(op: &'static str, paths: &[String], e: zk::MultiWriteError) -> TreeError {
    match e {
        zk::MultiWriteError::RequestFailed { source } => {
            TreeError::zk(op, paths.first().cloned().unwrap_or_default(), source)
        }
        zk::MultiWriteError::OperationFailed { index, source } => {
            TreeError::zk(op, paths.get(index).cloned().unwrap_or_default(), source)
        }
    }
}

/// Makes `block_numbers/<partition>` if it is missing. As in ClickHouse, the same multi
/// bumps the data version of `block_numbers`, so that a transaction can check that the
/// set of partitions did not change (ZooKeeper has no check on a node's children).
pub async fn ensure_partition_node(
    client: &zk::Client,
    paths: &TablePaths,
    acl: &TreeAcl,
    partition_id: &str,
) -> Result<(), TreeError> {
    let partition = paths.block_numbers_partition(partition_id);
    let parent = paths.block_numbers();
    let mut multi = client.new_multi_writer();
    multi
        .add_create(&partition, b"", &acl.persistent())
        .map_err(|e| TreeError::zk("create", partition.clone(), e))?;
    multi
        .add_set_data(&parent, b"", None)
        .map_err(|e| TreeError::zk("set", parent.clone(), e))?;
    match multi.commit().await {
        Ok(_)
        | Err(zk::MultiWriteError::OperationFailed {
            index: 0,
            source: zk::Error::NodeExists,
        }) => Ok(()),
        Err(e) => Err(multi_error(
            "create a partition's block_numbers node",
            &[partition, parent],
            e,
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    AlreadyExists,
    /// The tree held this definition minus columns at the end: its `columns` node now
    /// lists all of them (`before` columns became `after`).
    ColumnsAppended {
        before: usize,
        after: usize,
    },
    /// Only from [`create_table_allowing_older`]: the tree already holds this definition
    /// plus columns appended at the end (`local` vs `tree` columns); left as it is.
    TreeAhead {
        local: usize,
        tree: usize,
    },
}

/// Creates the table's tree in one multi, or checks that an existing tree holds the same
/// definition. A tree whose columns are a strict prefix of this definition's (every other
/// part of the definition equal) gets the appended columns: its `columns` node is set
/// with a version check, so concurrent callers (the operator and every sidecar) apply the
/// append once and the others see it done. Any other difference, including a tree that
/// has more columns than this definition, is reported, never overwritten.
pub async fn create_table(
    client: &zk::Client,
    paths: &TablePaths,
    acl: &TreeAcl,
    schema: &TableSchema,
) -> Result<CreateOutcome, TreeError> {
    create_or_update(client, paths, acl, schema, false).await
}

/// Like [`create_table`], but a tree that already has columns appended to this definition
/// is accepted as [`CreateOutcome::TreeAhead`]: a replica started from the older
/// definition keeps serving its columns until it restarts with the new one (its parts
/// lack the appended columns, which every reader fills with defaults).
pub async fn create_table_allowing_older(
    client: &zk::Client,
    paths: &TablePaths,
    acl: &TreeAcl,
    schema: &TableSchema,
) -> Result<CreateOutcome, TreeError> {
    create_or_update(client, paths, acl, schema, true).await
}

const CREATE_ATTEMPTS: u32 = 5;

async fn create_or_update(
    client: &zk::Client,
    paths: &TablePaths,
    acl: &TreeAcl,
    schema: &TableSchema,
    allow_older: bool,
) -> Result<CreateOutcome, TreeError> {
    let metadata = TableMetadata::from_schema(schema).render();
    let columns_text = columns::render(&schema.columns);
    // Ancestors (`/clickhouse/tables/01`) are shared between tables and created one by one;
    // only the table's own nodes must appear atomically.
    if let Some((parent, _)) = paths.root().rsplit_once('/')
        && !parent.is_empty()
    {
        ensure_ancestors(client, parent).await?;
    }
    for _ in 0..CREATE_ATTEMPTS {
        if let Some(existing) = read_existing(client, paths).await? {
            match definition::classify(
                &metadata,
                &columns_text,
                &existing.metadata,
                &existing.columns,
            ) {
                DefinitionChange::Same => return Ok(CreateOutcome::AlreadyExists),
                DefinitionChange::Append { added } => {
                    match append_columns(client, paths, &existing, &columns_text).await? {
                        true => {
                            return Ok(CreateOutcome::ColumnsAppended {
                                before: schema.columns.len() - added.len(),
                                after: schema.columns.len(),
                            });
                        }
                        // Someone changed the tree since we read it: read it again.
                        false => continue,
                    }
                }
                DefinitionChange::Behind { missing } if allow_older => {
                    return Ok(CreateOutcome::TreeAhead {
                        local: schema.columns.len(),
                        tree: schema.columns.len() + missing.len(),
                    });
                }
                DefinitionChange::Behind { .. } | DefinitionChange::Incompatible => {
                    return Err(schema_mismatch(
                        paths,
                        &metadata,
                        &columns_text,
                        &existing.metadata,
                        &existing.columns,
                    ));
                }
            }
        }
        let nodes = paths.table_nodes();
        let mut multi = client.new_multi_writer();
        for node in &nodes {
            let data: &[u8] = if *node == paths.metadata() {
                metadata.as_bytes()
            } else if *node == paths.columns() {
                columns_text.as_bytes()
            } else if *node == paths.replicas() {
                b"last added replica: "
            } else {
                b""
            };
            multi
                .add_create(node, data, &acl.persistent())
                .map_err(|e| TreeError::zk("create", node.clone(), e))?;
        }
        let leader = format!("{}/leader_election-0", paths.leader_election());
        multi
            .add_create(&leader, b"all (multiple leaders Ok)", &acl.persistent())
            .map_err(|e| TreeError::zk("create", leader.clone(), e))?;
        match multi.commit().await {
            Ok(_) => return Ok(CreateOutcome::Created),
            // Someone else created it between our check and our multi: compare again.
            Err(zk::MultiWriteError::OperationFailed {
                source: zk::Error::NodeExists,
                ..
            }) => continue,
            Err(e) => return Err(multi_error("create table", &nodes, e)),
        }
    }
    Err(TreeError::Contention {
        what: format!("creating {}", paths.root()),
        attempts: CREATE_ATTEMPTS,
    })
}

/// The tree's `metadata` and `columns` with the versions they were read at.
struct ExistingDefinition {
    metadata: String,
    metadata_version: i32,
    columns: String,
    columns_version: i32,
}

/// `None` when the table does not exist (no `metadata` node).
async fn read_existing(
    client: &zk::Client,
    paths: &TablePaths,
) -> Result<Option<ExistingDefinition>, TreeError> {
    let Some((metadata, metadata_version)) = get_versioned(client, &paths.metadata()).await? else {
        return Ok(None);
    };
    // `columns` is created with `metadata` in one multi and never removed alone.
    let (columns, columns_version) = get_versioned(client, &paths.columns())
        .await?
        .unwrap_or((String::new(), -1));
    Ok(Some(ExistingDefinition {
        metadata,
        metadata_version,
        columns,
        columns_version,
    }))
}

async fn get_versioned(
    client: &zk::Client,
    path: &str,
) -> Result<Option<(String, i32)>, TreeError> {
    match client.get_data(path).await {
        Ok((data, stat)) => String::from_utf8(data)
            .map(|text| Some((text, stat.version)))
            .map_err(|_| TreeError::Corrupt {
                path: path.to_string(),
                message: "not UTF-8".to_string(),
            }),
        Err(zk::Error::NoNode) => Ok(None),
        Err(e) => Err(TreeError::zk("get", path, e)),
    }
}

/// Sets `columns` to the appended definition in one multi that also checks `metadata` is
/// unchanged, both at the versions they were read at. `false` when either changed since
/// (the caller reads the tree again and classifies anew).
async fn append_columns(
    client: &zk::Client,
    paths: &TablePaths,
    existing: &ExistingDefinition,
    columns_text: &str,
) -> Result<bool, TreeError> {
    let ops = vec![paths.metadata(), paths.columns()];
    let mut multi = client.new_multi_writer();
    multi
        .add_check_version(&paths.metadata(), existing.metadata_version)
        .map_err(|e| TreeError::zk("check", paths.metadata(), e))?;
    multi
        .add_set_data(
            &paths.columns(),
            columns_text.as_bytes(),
            Some(existing.columns_version),
        )
        .map_err(|e| TreeError::zk("set", paths.columns(), e))?;
    match multi.commit().await {
        Ok(_) => Ok(true),
        Err(zk::MultiWriteError::OperationFailed {
            source: zk::Error::BadVersion | zk::Error::NoNode,
            ..
        }) => Ok(false),
        Err(e) => Err(multi_error("append columns", &ops, e)),
    }
}

/// Builds the mismatch error with both definitions, field by field where the tree parses.
pub fn schema_mismatch(
    paths: &TablePaths,
    local_metadata: &str,
    local_columns: &str,
    tree_metadata: &str,
    tree_columns: &str,
) -> TreeError {
    let mut diff = Vec::new();
    match (
        TableMetadata::parse(local_metadata),
        TableMetadata::parse(tree_metadata),
    ) {
        (Ok(l), Ok(t)) => diff.extend(l.diff(&t)),
        _ => diff.push("metadata: the tree's metadata node does not parse".to_string()),
    }
    if local_columns != tree_columns {
        diff.push(columns_diff(local_columns, tree_columns));
    }
    TreeError::SchemaMismatch {
        path: paths.root().to_string(),
        diff: diff.join("\n"),
        local: format!("{local_metadata}{local_columns}"),
        tree: format!("{tree_metadata}{tree_columns}"),
    }
}

/// One line on how the column lists differ.
fn columns_diff(local_columns: &str, tree_columns: &str) -> String {
    let (Ok(local), Ok(tree)) = (columns::parse(local_columns), columns::parse(tree_columns))
    else {
        return "columns differ (the tree's columns node does not parse)".to_string();
    };
    let list = |cols: &[crate::schema::Column]| {
        cols.iter()
            .map(|c| format!("`{}` {}", c.name, c.ty))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match definition::classify_columns(&local, &tree) {
        DefinitionChange::Behind { missing } => format!(
            "columns differ: the tree has columns appended that the local definition lacks: {}",
            list(&missing)
        ),
        DefinitionChange::Append { added } => format!(
            "columns differ: the local definition appends {} (appended only when the rest of the definition is the same)",
            list(&added)
        ),
        _ => format!(
            "columns differ: local {} vs tree {} (only appending columns at the end is supported)",
            list(&local),
            list(&tree)
        ),
    }
}

/// Creates every missing node of `path` (like `mkdir -p`) with the table's ACL, tolerating
/// concurrent creators.
pub async fn ensure_path(client: &zk::Client, path: &str, acl: &TreeAcl) -> Result<(), TreeError> {
    ensure_each(client, path, &acl.persistent()).await
}

/// Like [`ensure_path`], for the ancestors of a table's root that other tables share.
async fn ensure_ancestors(client: &zk::Client, path: &str) -> Result<(), TreeError> {
    ensure_each(client, path, &zk_acl::ancestor()).await
}

async fn ensure_each(
    client: &zk::Client,
    path: &str,
    options: &zk::CreateOptions<'_>,
) -> Result<(), TreeError> {
    let mut current = String::new();
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        current.push('/');
        current.push_str(segment);
        match client.create(&current, b"", options).await {
            Ok(_) | Err(zk::Error::NodeExists) => {}
            Err(e) => return Err(TreeError::zk("create", current.clone(), e)),
        }
    }
    Ok(())
}

/// Reads a node as UTF-8 text; `None` when it doesn't exist.
pub async fn get_string(client: &zk::Client, path: &str) -> Result<Option<String>, TreeError> {
    match client.get_data(path).await {
        Ok((data, _)) => String::from_utf8(data)
            .map(Some)
            .map_err(|_| TreeError::Corrupt {
                path: path.to_string(),
                message: "not UTF-8".to_string(),
            }),
        Err(zk::Error::NoNode) => Ok(None),
        Err(e) => Err(TreeError::zk("get", path, e)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// The replica was created now; `is_lost` tells whether it must clone from a peer.
    Registered {
        is_lost: bool,
    },
    AlreadyRegistered,
}

/// Registers `replica` with all its nodes in one multi, guarded by the version of
/// `replicas` so two replicas registering at once both see each other. A replica that
/// joins a table that already has others starts lost (`is_lost=1`) and clones.
pub async fn register_replica(
    client: &zk::Client,
    paths: &TablePaths,
    acl: &TreeAcl,
    replica: &str,
    schema: &TableSchema,
) -> Result<RegisterOutcome, TreeError> {
    let rp = paths.replica(replica);
    let metadata = TableMetadata::from_schema(schema).render();
    let columns_text = columns::render(&schema.columns);
    for _ in 0..10 {
        if client
            .check_stat(rp.root())
            .await
            .map_err(|e| TreeError::zk("exists", rp.root(), e))?
            .is_some()
        {
            return Ok(RegisterOutcome::AlreadyRegistered);
        }
        let (others, stat) = client
            .get_children(&paths.replicas())
            .await
            .map_err(|e| TreeError::zk("list", paths.replicas(), e))?;
        let is_lost = !others.is_empty();
        let last_added = format!("last added replica: {replica}");
        let nodes: Vec<(String, Vec<u8>)> = vec![
            (rp.root().to_string(), Vec::new()),
            (rp.host(), Vec::new()),
            (rp.log_pointer(), Vec::new()),
            (rp.queue(), Vec::new()),
            (rp.parts(), Vec::new()),
            (rp.flags(), Vec::new()),
            (
                rp.is_lost(),
                if is_lost {
                    b"1".to_vec()
                } else {
                    b"0".to_vec()
                },
            ),
            (rp.metadata(), metadata.clone().into_bytes()),
            (rp.columns(), columns_text.clone().into_bytes()),
            (rp.metadata_version(), b"0".to_vec()),
            (rp.min_unprocessed_insert_time(), b"0".to_vec()),
            (rp.max_processed_insert_time(), b"0".to_vec()),
            (rp.mutation_pointer(), Vec::new()),
        ];
        let mut op_paths: Vec<String> = nodes.iter().map(|(p, _)| p.clone()).collect();
        op_paths.push(paths.replicas());
        let mut multi = client.new_multi_writer();
        for (path, data) in &nodes {
            multi
                .add_create(path, data, &acl.persistent())
                .map_err(|e| TreeError::zk("create", path.clone(), e))?;
        }
        multi
            .add_set_data(&paths.replicas(), last_added.as_bytes(), Some(stat.version))
            .map_err(|e| TreeError::zk("set", paths.replicas(), e))?;
        match multi.commit().await {
            Ok(_) => return Ok(RegisterOutcome::Registered { is_lost }),
            Err(zk::MultiWriteError::OperationFailed {
                source: zk::Error::BadVersion | zk::Error::NodeExists,
                ..
            }) => continue,
            Err(e) => return Err(multi_error("register replica", &op_paths, e)),
        }
    }
    Err(TreeError::Contention {
        what: format!("registering replica {replica}"),
        attempts: 10,
    })
}

/// Sets `replicas/<replica>/columns` to this definition's columns when it holds others
/// (the replica restarted with columns appended). `true` when it changed the node.
pub async fn update_replica_columns(
    client: &zk::Client,
    paths: &TablePaths,
    replica: &str,
    schema: &TableSchema,
) -> Result<bool, TreeError> {
    let node = paths.replica(replica).columns();
    let columns_text = columns::render(&schema.columns);
    match get_string(client, &node).await? {
        Some(text) if text == columns_text => Ok(false),
        // A replica being dropped (or half-registered): nothing to update.
        None => Ok(false),
        Some(_) => match client.set_data(&node, columns_text.as_bytes(), None).await {
            Ok(_) => Ok(true),
            Err(zk::Error::NoNode) => Ok(false),
            Err(e) => Err(TreeError::zk("set", node, e)),
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activation {
    /// Versions the inserter remembers: a change while it waits means it lost its identity.
    pub is_active_version: i32,
    pub host_version: i32,
}

/// Marks the replica live: ephemeral `is_active` and its address in `host`, in one multi.
/// An `is_active` owned by this very session (a retried activation) counts as success; one
/// owned by another session means another process still serves this replica.
pub async fn activate(
    client: &zk::Client,
    paths: &TablePaths,
    acl: &TreeAcl,
    replica: &str,
    host: &HostInfo,
) -> Result<Activation, TreeError> {
    let rp = paths.replica(replica);
    let host_text = host.render();
    let is_active_data = format!("pid: {}, random: {}", std::process::id(), rand_u32());
    let ops = vec![rp.is_active(), rp.host()];
    let mut multi = client.new_multi_writer();
    multi
        .add_create(&rp.is_active(), is_active_data.as_bytes(), &acl.ephemeral())
        .map_err(|e| TreeError::zk("create", rp.is_active(), e))?;
    multi
        .add_set_data(&rp.host(), host_text.as_bytes(), None)
        .map_err(|e| TreeError::zk("set", rp.host(), e))?;
    match multi.commit().await {
        Ok(results) => {
            let host_version = match results.get(1) {
                Some(zk::MultiWriteResult::SetData { stat }) => stat.version,
                _ => -1,
            };
            // ZOOKEEPER-4026: the Stat of a create inside a multi is invalid on 3.8; a fresh
            // ephemeral node always has data version 0.
            Ok(Activation {
                is_active_version: 0,
                host_version,
            })
        }
        Err(zk::MultiWriteError::OperationFailed {
            index: 0,
            source: zk::Error::NodeExists,
        }) => {
            let stat = client
                .check_stat(&rp.is_active())
                .await
                .map_err(|e| TreeError::zk("exists", rp.is_active(), e))?;
            match stat {
                Some(s) if s.ephemeral_owner == client.session_id().0 => {
                    let (_, host_stat) = client
                        .get_data(&rp.host())
                        .await
                        .map_err(|e| TreeError::zk("get", rp.host(), e))?;
                    Ok(Activation {
                        is_active_version: s.version,
                        host_version: host_stat.version,
                    })
                }
                Some(s) => Err(TreeError::ReplicaActive {
                    replica: replica.to_string(),
                    owner: s.ephemeral_owner,
                }),
                // Gone between the two calls: the caller retries.
                None => Err(TreeError::Contention {
                    what: format!("activating {replica}"),
                    attempts: 1,
                }),
            }
        }
        Err(zk::MultiWriteError::OperationFailed {
            source: zk::Error::NoNode,
            ..
        }) => Err(TreeError::NoReplica {
            replica: replica.to_string(),
            path: paths.replicas(),
        }),
        Err(e) => Err(multi_error("activate", &ops, e)),
    }
}

fn rand_u32() -> u32 {
    // Only needs to differ between restarts of one pid, like ClickHouse's `random:`.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ std::process::id().rotate_left(16)
}

/// What the operator and `/status` need to know about one replica, read from the tree.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplicaState {
    pub name: String,
    pub is_active: bool,
    pub is_lost: bool,
    /// `None` while the replica has not pulled the log yet.
    pub log_pointer: Option<u64>,
    pub queue_size: u32,
    pub parts_count: u32,
    /// `None` for a half-removed replica (its `host` node is gone) or one never activated.
    pub host: Option<HostInfo>,
}

pub async fn list_replicas(
    client: &zk::Client,
    paths: &TablePaths,
) -> Result<Vec<String>, TreeError> {
    let mut names = client
        .list_children(&paths.replicas())
        .await
        .map_err(|e| TreeError::zk("list", paths.replicas(), e))?;
    names.sort();
    Ok(names)
}

/// Reads a replica's state with one multi-read, so the fields are from one moment.
pub async fn read_replica_state(
    client: &zk::Client,
    paths: &TablePaths,
    replica: &str,
) -> Result<ReplicaState, TreeError> {
    let rp = paths.replica(replica);
    if client
        .check_stat(rp.root())
        .await
        .map_err(|e| TreeError::zk("exists", rp.root(), e))?
        .is_none()
    {
        return Err(TreeError::NoReplica {
            replica: replica.to_string(),
            path: paths.replicas(),
        });
    }
    let is_active = client
        .check_stat(&rp.is_active())
        .await
        .map_err(|e| TreeError::zk("exists", rp.is_active(), e))?
        .is_some();
    let is_lost = get_string(client, &rp.is_lost()).await?.as_deref() == Some("1");
    let log_pointer = get_string(client, &rp.log_pointer())
        .await?
        .and_then(|s| s.trim().parse::<u64>().ok());
    let queue_size = child_count(client, &rp.queue()).await?;
    let parts_count = child_count(client, &rp.parts()).await?;
    let host = match get_string(client, &rp.host()).await? {
        Some(text) if !text.is_empty() => HostInfo::parse(&text).ok(),
        _ => None,
    };
    Ok(ReplicaState {
        name: replica.to_string(),
        is_active,
        is_lost,
        log_pointer,
        queue_size,
        parts_count,
        host,
    })
}

async fn child_count(client: &zk::Client, path: &str) -> Result<u32, TreeError> {
    match client.check_stat(path).await {
        Ok(Some(stat)) => Ok(stat.num_children.max(0) as u32),
        Ok(None) => Ok(0),
        Err(e) => Err(TreeError::zk("exists", path, e)),
    }
}

/// The highest `log-NNNNNNNNNN` index, `None` for an empty log.
pub async fn log_max_index(
    client: &zk::Client,
    paths: &TablePaths,
) -> Result<Option<u64>, TreeError> {
    let children = client
        .list_children(&paths.log())
        .await
        .map_err(|e| TreeError::zk("list", paths.log(), e))?;
    Ok(children.iter().filter_map(|c| sequence_of(c)).max())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropOutcome {
    Dropped,
    AlreadyGone,
}

/// Removes a replica's metadata the way ClickHouse's DROP REPLICA does: mark it lost,
/// remove `host` first (no host = dropped, so a crash half-way is still a dropped
/// replica), then everything else. Refused while its `is_active` exists.
pub async fn drop_replica(
    client: &zk::Client,
    paths: &TablePaths,
    replica: &str,
) -> Result<DropOutcome, TreeError> {
    let rp = paths.replica(replica);
    if client
        .check_stat(rp.root())
        .await
        .map_err(|e| TreeError::zk("exists", rp.root(), e))?
        .is_none()
    {
        return Ok(DropOutcome::AlreadyGone);
    }
    if let Some(stat) = client
        .check_stat(&rp.is_active())
        .await
        .map_err(|e| TreeError::zk("exists", rp.is_active(), e))?
    {
        return Err(TreeError::ReplicaActive {
            replica: replica.to_string(),
            owner: stat.ephemeral_owner,
        });
    }
    match client.set_data(&rp.is_lost(), b"1", None).await {
        Ok(_) | Err(zk::Error::NoNode) => {}
        Err(e) => return Err(TreeError::zk("set", rp.is_lost(), e)),
    }
    match client.delete(&rp.host(), None).await {
        Ok(()) | Err(zk::Error::NoNode) => {}
        Err(e) => return Err(TreeError::zk("delete", rp.host(), e)),
    }
    remove_recursive(client, rp.root()).await?;
    Ok(DropOutcome::Dropped)
}

/// Removes the whole table tree, children first; a missing node counts as removed.
pub async fn remove_table(client: &zk::Client, paths: &TablePaths) -> Result<(), TreeError> {
    remove_recursive(client, paths.root()).await
}

/// Deletes `path` and everything under it, children first. Batches deletes of one level
/// into multis of at most 100 so a large queue or log costs few round trips.
pub async fn remove_recursive(client: &zk::Client, path: &str) -> Result<(), TreeError> {
    // Iterative post-order walk: deep trees must not recurse on the async stack.
    let mut stack: Vec<(String, bool)> = vec![(path.to_string(), false)];
    while let Some((node, expanded)) = stack.pop() {
        if expanded {
            match client.delete(&node, None).await {
                Ok(()) | Err(zk::Error::NoNode) => {}
                // A child appeared after we listed (a late queue entry): go round again.
                Err(zk::Error::NotEmpty) => stack.push((node, false)),
                Err(e) => return Err(TreeError::zk("delete", node, e)),
            }
            continue;
        }
        let children = match client.list_children(&node).await {
            Ok(c) => c,
            Err(zk::Error::NoNode) => continue,
            Err(e) => return Err(TreeError::zk("list", node, e)),
        };
        stack.push((node.clone(), true));
        let mut leaves = Vec::new();
        for child in children {
            let child_path = format!("{node}/{child}");
            let stat = match client.check_stat(&child_path).await {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => return Err(TreeError::zk("exists", child_path, e)),
            };
            if stat.num_children == 0 {
                leaves.push(child_path);
            } else {
                stack.push((child_path, false));
            }
        }
        for chunk in leaves.chunks(100) {
            let mut multi = client.new_multi_writer();
            for leaf in chunk {
                multi
                    .add_delete(leaf, None)
                    .map_err(|e| TreeError::zk("delete", leaf.clone(), e))?;
            }
            if multi.commit().await.is_err() {
                // Some leaf changed (gained a child or vanished): fall back to one by one.
                for leaf in chunk {
                    stack.push((leaf.clone(), false));
                }
            }
        }
    }
    Ok(())
}

/// Connects to the ensemble without credentials or TLS, waiting at most `connect_timeout` for
/// the first server (see [`crate::zk_access::ZkAccess::connect`] for the others).
pub async fn connect(
    connect_string: &str,
    session_timeout: Duration,
    connect_timeout: Duration,
) -> Result<zk::Client, TreeError> {
    zk::Client::connector()
        .with_session_timeout(session_timeout)
        .with_connection_timeout(connect_timeout)
        .connect(connect_string)
        .await
        .map_err(|e| TreeError::zk("connect", connect_string, e))
}
