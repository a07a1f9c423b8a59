//! The REST API under `/v1` (axum) and `/metrics`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;

use crate::server::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn metrics(State(s): State<Arc<Shared>>) -> String {
    let by_state = s.raft.read_local(|st| {
        let mut m: BTreeMap<String, u64> = BTreeMap::new();
        for r in st.sandboxes.values() {
            let k = match &r.observed {
                kiln_api::sandbox::SandboxState::Exited { .. } => "exited".to_owned(),
                kiln_api::sandbox::SandboxState::Failed { .. } => "failed".to_owned(),
                o => o.label(),
            };
            *m.entry(k).or_default() += 1;
        }
        m
    });
    s.metrics.render(&s.raft, &by_state)
}
