//! Block numbers allocated ahead of the insert that uses them. An insert normally pays two
//! ZooKeeper round trips on its critical path: the multi that allocates its block number
//! (an ephemeral sequential lock under `block_numbers/<partition>`) and the multi that
//! commits it. The commit multi also creates the next lock of every partition it commits
//! to, so the next insert into them finds its number ready and pays only the commit, and
//! the reservation costs no request of its own.
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

use crate::replica::Replica;

/// How long a reserved number may wait for an insert before it is given back.
pub const IDLE: Duration = Duration::from_millis(1000);
/// How long taking waits for the state's lock (held briefly by a keep or a give-back)
/// before allocating anew.
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

/// The reservations of one replica, at most one per partition.
#[derive(Default)]
pub struct Reserve {
    state: tokio::sync::Mutex<State>,
}

impl Reserve {
    /// One reserved number for each of `partitions` (in order, which must be distinct),
    /// all taken, or none when any is missing or belongs to another session.
    pub async fn take_all(&self, generation: u64, partitions: &[&str]) -> Option<Vec<Reserved>> {
        // A give-back stuck on a lost connection is not worth waiting for.
        let mut state = tokio::time::timeout(TAKE_PATIENCE, self.state.lock())
            .await
            .ok()?;
        if state.generation != generation {
            return None;
        }
        take_each(&mut state.by_partition, partitions)
    }

    /// Keeps the locks a commit multi created for `generation`'s session, one per partition
    /// (a partition that has one already gives the new one back), and gives each back if no
    /// insert took it within `IDLE`.
    pub fn keep(
        self: &Arc<Self>,
        replica: Arc<Replica>,
        client: zk::Client,
        generation: u64,
        locks: Vec<(String, Reserved)>,
    ) {
        if locks.is_empty() {
            return;
        }
        let reserve = self.clone();
        tokio::spawn(async move {
            let (kept, extra) = {
                let mut state = reserve.state.lock().await;
                if state.generation != generation {
                    // A new session: the old locks are gone with the old one.
                    state.generation = generation;
                    state.by_partition.clear();
                }
                let mut kept = Vec::new();
                let mut extra = Vec::new();
                for (partition, lock) in locks {
                    if state.by_partition.contains_key(&partition) {
                        extra.push(lock);
                    } else {
                        state.by_partition.insert(partition.clone(), lock.clone());
                        kept.push((partition, lock));
                    }
                }
                (kept, extra)
            };
            release(&replica, &client, &extra).await;
            tokio::time::sleep(IDLE).await;
            let idle: Vec<Reserved> = {
                let mut state = reserve.state.lock().await;
                kept.into_iter()
                    .filter(|(partition, lock)| {
                        remove_if_present(&mut state.by_partition, partition, lock)
                    })
                    .map(|(_, lock)| lock)
                    .collect()
            };
            if !idle.is_empty() {
                debug!(replica = %replica.name, count = idle.len(), "giving back idle reserved block numbers");
            }
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

/// The lock a commit multi created, from its path.
pub fn parse_lock(path: &str) -> Option<Reserved> {
    let number = path.rsplit('/').next().and_then(sequence_of)?;
    Some(Reserved {
        number,
        path: path.to_string(),
    })
}

/// Gives back the locks a commit multi with an unknown outcome created after all, found
/// by their tokens: left alone they would bar merges across their numbers, and drops of
/// their partitions, until the session ends.
pub async fn give_back_tokens(replica: Arc<Replica>, tokens: Vec<(String, String)>) {
    let Ok((client, _)) = replica.sessions.active() else {
        return;
    };
    for (partition, token) in tokens {
        let dir = replica.paths.block_numbers_partition(&partition);
        let Ok(children) = client.list_children(&dir).await else {
            continue;
        };
        for child in children {
            let path = format!("{dir}/{child}");
            if let Ok((data, _)) = client.get_data(&path).await
                && data == token.as_bytes()
            {
                debug!(replica = %replica.name, lock = %path, "giving back a reservation an unknown commit outcome left");
                let _ = client.delete(&path, None).await;
            }
        }
    }
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
