//! Deadlines that count the time this process actually ran.
//!
//! A plain `tokio::time::timeout` measures wall-clock (monotonic) time. A
//! supervisor stopped for a while (`SIGSTOP`, a host under memory
//! pressure, a debugger) wakes up with every deadline it was waiting on
//! already passed, and the task that checks the deadline can run before
//! the task that would have delivered the answer: a VMM that answered
//! within milliseconds of the supervisor resuming is reported as having
//! not answered at all. [`run_time_timeout`] waits in short slices and
//! counts a slice that took far longer than asked (the process was not
//! running) as only twice its length, so only time in which the other side
//! could have answered and we could have seen it is counted.

use std::future::Future;
use std::time::{Duration, Instant};

/// How long one slice of waiting is.
const SLICE: Duration = Duration::from_millis(200);

/// The deadline passed (counting only time this process ran).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `fut` for at most `limit` of this process's own running time.
pub async fn run_time_timeout<F: Future>(limit: Duration, fut: F) -> Result<F::Output, Elapsed> {
    let mut fut = std::pin::pin!(fut);
    let mut counted = Duration::ZERO;
    loop {
        let slice = SLICE.min(limit.saturating_sub(counted));
        let started = Instant::now();
        match tokio::time::timeout(slice, &mut fut).await {
            Ok(out) => return Ok(out),
            Err(_) => {
                counted += started.elapsed().min(slice * 2);
                if counted >= limit {
                    // Tasks woken at the same instant as this one (the
                    // reader that delivers the answer) get one turn first.
                    tokio::task::yield_now().await;
                    return match tokio::time::timeout(Duration::ZERO, &mut fut).await {
                        Ok(out) => Ok(out),
                        Err(_) => Err(Elapsed),
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_in_time_are_returned() {
        let got = run_time_timeout(Duration::from_secs(1), async { 7 }).await;
        assert_eq!(got, Ok(7));
    }

    #[tokio::test]
    async fn a_future_that_never_ends_times_out_near_the_limit() {
        let t0 = Instant::now();
        let got = run_time_timeout(Duration::from_millis(500), std::future::pending::<()>()).await;
        assert_eq!(got, Err(Elapsed));
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(500), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    /// A thread that blocks the (single-threaded) runtime for longer than
    /// the limit stands in for a stopped process: an answer that became
    /// ready during the stall is still taken, where a plain timeout gives up.
    #[test]
    fn a_stalled_process_does_not_miss_an_answer_that_arrived() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let outcome = |patient: bool| {
            rt.block_on(async move {
                let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
                // The answer is delivered by another task, as QMP's reader
                // does, a little after the limit: its wake-up comes due
                // in the same turn as the waiter's deadline, after the stall.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    let _ = tx.send(5);
                });
                let waiter = async move {
                    if patient {
                        run_time_timeout(Duration::from_millis(300), rx)
                            .await
                            .map(|r| r.ok())
                            .ok()
                            .flatten()
                    } else {
                        tokio::time::timeout(Duration::from_millis(300), rx)
                            .await
                            .ok()
                            .and_then(|r| r.ok())
                    }
                };
                let stall = async move {
                    tokio::task::yield_now().await;
                    // The whole runtime stops, as under SIGSTOP, past the
                    // limit and past the answer's time.
                    std::thread::sleep(Duration::from_millis(800));
                };
                let (got, ()) = tokio::join!(waiter, stall);
                got
            })
        };
        assert_eq!(outcome(true), Some(5));
        // The plain timeout is what failed before (shown here so the test
        // proves the difference, not just the happy path).
        assert_eq!(outcome(false), None);
    }
}
