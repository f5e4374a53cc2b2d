//! Polling with deadlines: tests wait for a condition, never for a fixed time.

use std::future::Future;
use std::time::{Duration, Instant};

/// One observation of a polled condition.
pub enum Check<T> {
    /// The condition holds; polling stops with this value.
    Done(T),
    /// Not yet; the text describes what was seen (reported if the deadline passes).
    Wait(String),
}

/// Calls `probe` every `interval` until it returns `Check::Done` or `timeout` passes.
/// A probe error is treated like `Wait` (processes restart, connections drop); on timeout
/// the error names `what` and the last observation.
pub async fn poll_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut probe: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Check<T>>>,
{
    let started = Instant::now();
    let mut last: String;
    loop {
        match probe().await {
            Ok(Check::Done(v)) => return Ok(v),
            Ok(Check::Wait(seen)) => last = seen,
            Err(e) => last = format!("error: {e:#}"),
        }
        if started.elapsed() >= timeout {
            anyhow::bail!(
                "timed out after {:.1}s waiting for {what}; last seen: {last}",
                timeout.as_secs_f64()
            );
        }
        tokio::time::sleep(interval).await;
    }
}
