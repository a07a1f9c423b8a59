//! `cargo run -p kiln-store --example bench_api [CREATES] [CONCURRENCY]`:
//! sandbox creates per second committed through 1 and 3 Raft replicas on
//! loopback, with commit latency percentiles.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let creates: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5000);
    let concurrency: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);
    for replicas in [1, 3] {
        let dir = tempfile::tempdir()?;
        let r =
            kiln_store::bench::bench_creates(replicas, creates, concurrency, dir.path()).await?;
        println!("{r}");
    }
    Ok(())
}
