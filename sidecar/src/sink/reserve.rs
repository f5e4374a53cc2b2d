//! Block numbers allocated ahead of the insert that uses them. An insert normally pays two
//! ZooKeeper round trips on its critical path: the multi that allocates its block number
//! (an ephemeral sequential lock under `block_numbers/<partition>`) and the multi that
//! commits it. After each commit the committer allocates the next number for the same
//! partition in the background, so the next insert finds it ready and pays only the commit.
//! The request count stays the same; the allocation just moves off the critical path.
//!
//! A reserved lock is an insert in flight as far as everyone else can tell, and it is just
//! as safe: merges never span a locked number, a drop waits for locks below its own, and
//! the commit multi deletes the lock, so a lock that vanished with its session fails the
//! commit rather than land a part inside a range a merge has taken since. What a reserve
//! must not do is sit idle: it would hold back merges across it (other replicas' inserts
//! land above it) and drops of its partition. So an unused reservation is given back
//! after `IDLE`, and a drop on this replica gives back its own at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::debug;
use zookeeper_client as zk;

use rtable_protocol::paths::sequence_of;
use rtable_protocol::tree;

use crate::replica::Replica;

/// How long a reserved number may wait for an insert before it is given back.
pub const IDLE: Duration = Duration::from_millis(1000);
/// How long taking waits for a refill in flight before allocating anew.
const TAKE_PATIENCE: Duration = Duration::from_millis(20);

/// A reserved block number: the lock node's path and its number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    pub number: u64,
    pub path: String,
}

#[derive(Default)]
struct State {
    /// The session generation the locks belong to (ephemeral: they die with it).
    generation: u64,
    by_partition: HashMap<String, Reserved>,
}

/// The reservations of one replica, at most one per partition. An async mutex: taking
/// waits for a refill in flight, which is never slower than allocating anew.
#[derive(Default)]
pub struct Reserve {
    state: tokio::sync::Mutex<State>,
}

impl Reserve {
    /// One reserved number for each of `partitions` (in order, which must be distinct),
    /// all taken, or none when any is missing or belongs to another session.
    pub async fn take_all(&self, generation: u64, partitions: &[&str]) -> Option<Vec<Reserved>> {
        // A refill in flight is worth waiting for only as long as an allocation would take;
        // one stuck on a lost connection is not.
        let mut state = tokio::time::timeout(TAKE_PATIENCE, self.state.lock())
            .await
            .ok()?;
        if state.generation != generation {
            return None;
        }
        take_each(&mut state.by_partition, partitions)
    }

    /// Reserves the next number of each partition (those without one) in the background,
    /// and gives each back if no insert took it within `IDLE`.
    pub fn refill(
        self: &Arc<Self>,
        replica: Arc<Replica>,
        client: zk::Client,
        generation: u64,
        partitions: Vec<String>,
    ) {
        let reserve = self.clone();
        tokio::spawn(async move {
            let fresh = {
                let mut state = reserve.state.lock().await;
                if state.generation != generation {
                    // A new session: the old locks are gone with the old one.
                    state.generation = generation;
                    state.by_partition.clear();
                }
                let missing: Vec<String> = partitions
                    .into_iter()
                    .filter(|p| !state.by_partition.contains_key(p))
                    .collect();
                if missing.is_empty() {
                    return;
                }
                match allocate(&replica, &client, &missing).await {
                    Ok(locks) => {
                        let fresh: Vec<(String, Reserved)> =
                            missing.into_iter().zip(locks).collect();
                        for (partition, lock) in &fresh {
                            state.by_partition.insert(partition.clone(), lock.clone());
                        }
                        fresh
                    }
                    Err(e) => {
                        debug!(replica = %replica.name, error = %e, "could not reserve block numbers; the next insert allocates its own");
                        return;
                    }
                }
            };
            tokio::time::sleep(IDLE).await;
            let idle: Vec<Reserved> = {
                let mut state = reserve.state.lock().await;
                fresh
                    .into_iter()
                    .filter(|(partition, lock)| {
                        remove_if_present(&mut state.by_partition, partition, lock)
                    })
                    .map(|(_, lock)| lock)
                    .collect()
            };
            release(&replica, &client, &idle).await;
        });
    }

    /// Gives back every reservation of `partition` now (a drop of it is waiting).
    pub async fn release_partition(&self, replica: &Replica, client: &zk::Client, partition: &str) {
        let taken = self.state.lock().await.by_partition.remove(partition);
        if let Some(lock) = taken {
            release(replica, client, &[lock]).await;
        }
    }
}

/// Takes `partitions`' reservations when all are there; otherwise leaves the map as is.
fn take_each(
    by_partition: &mut HashMap<String, Reserved>,
    partitions: &[&str],
) -> Option<Vec<Reserved>> {
    let distinct = partitions
        .iter()
        .collect::<std::collections::HashSet<_>>()
        .len()
        == partitions.len();
    if partitions.is_empty()
        || !distinct
        || !partitions.iter().all(|p| by_partition.contains_key(*p))
    {
        return None;
    }
    partitions.iter().map(|p| by_partition.remove(*p)).collect()
}

/// Removes `lock` when it is still `partition`'s reservation (not taken meanwhile).
fn remove_if_present(
    by_partition: &mut HashMap<String, Reserved>,
    partition: &str,
    lock: &Reserved,
) -> bool {
    if by_partition.get(partition) == Some(lock) {
        by_partition.remove(partition);
        true
    } else {
        false
    }
}

/// One multi creating a lock per partition (their parents exist: an insert into each
/// partition has just committed).
async fn allocate(
    replica: &Replica,
    client: &zk::Client,
    partitions: &[String],
) -> Result<Vec<Reserved>, tree::TreeError> {
    let mut multi = client.new_multi_writer();
    for partition in partitions {
        let prefix = replica.paths.block_number_lock_prefix(partition);
        multi
            .add_create(&prefix, b"", &tree::ephemeral_sequential())
            .map_err(|e| tree::TreeError::zk("create", prefix.clone(), e))?;
    }
    let results = multi.commit().await.map_err(|e| {
        tree::multi_error("reserve block numbers", &[replica.paths.block_numbers()], e)
    })?;
    let mut locks = Vec::with_capacity(partitions.len());
    for result in results {
        let zk::MultiWriteResult::Create { path, .. } = result else {
            continue;
        };
        let Some(number) = path.rsplit('/').next().and_then(sequence_of) else {
            continue;
        };
        locks.push(Reserved { number, path });
    }
    if locks.len() != partitions.len() {
        // Cannot happen with a successful multi; give back what came so nothing leaks.
        release(replica, client, &locks).await;
        return Err(tree::TreeError::Corrupt {
            path: replica.paths.block_numbers(),
            message: "reservation multi returned too few locks".to_string(),
        });
    }
    Ok(locks)
}

async fn release(replica: &Replica, client: &zk::Client, locks: &[Reserved]) {
    for lock in locks {
        match client.delete(&lock.path, None).await {
            Ok(()) | Err(zk::Error::NoNode) => {}
            Err(e) => {
                debug!(replica = %replica.name, lock = %lock.path, error = %e, "could not give back a reserved block number; it goes with the session")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(n: u64) -> Reserved {
        Reserved {
            number: n,
            path: format!("/t/block_numbers/p/block-{n:010}"),
        }
    }

    fn map(entries: &[(&str, u64)]) -> HashMap<String, Reserved> {
        entries
            .iter()
            .map(|(p, n)| (p.to_string(), lock(*n)))
            .collect()
    }

    #[test]
    fn takes_all_partitions_or_none() {
        let mut m = map(&[("202601", 7), ("202602", 9)]);
        assert_eq!(take_each(&mut m, &["202601", "202603"]), None);
        assert_eq!(
            m.len(),
            2,
            "a failed take leaves every reservation in place"
        );
        assert_eq!(
            take_each(&mut m, &["202602", "202601"]),
            Some(vec![lock(9), lock(7)])
        );
        assert!(m.is_empty());
    }

    #[test]
    fn two_units_of_one_partition_need_two_numbers() {
        let mut m = map(&[("202601", 7)]);
        assert_eq!(take_each(&mut m, &["202601", "202601"]), None);
        assert_eq!(take_each(&mut m, &[]), None);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn only_an_untaken_reservation_is_given_back_when_idle() {
        let mut m = map(&[("202601", 7)]);
        assert!(
            !remove_if_present(&mut m, "202601", &lock(5)),
            "taken and replaced"
        );
        assert_eq!(m.len(), 1);
        assert!(remove_if_present(&mut m, "202601", &lock(7)));
        assert!(m.is_empty());
    }
}
