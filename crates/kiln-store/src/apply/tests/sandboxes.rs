//! Sandbox lifecycle beyond create and place: fork snapshots that go
//! with their last fork, the images a tenant named, a stop's grace time.

use super::*;

#[test]
fn a_fork_snapshot_goes_when_its_last_fork_has_ended() {
    let mut sm = Sm::new();
    sm.ok(tenant("a", Quotas::default()));
    sm.ok(node("n", 8, 8192));
    sm.ok(create(1, "a", spec(1, 256), None, Some("n")));
    let snap = |name: &str, ephemeral| Command::PutSnapshot {
        tenant: t("a"),
        name: name.into(),
        source: sid(1),
        now_ms: 1,
        ephemeral,
    };
    sm.ok(snap("fork-1", true));
    sm.ok(snap("named", false));
    let from = |name: &str| {
        let mut s = spec(1, 256);
        s.origin = kiln_api::sandbox::Origin::Snapshot {
            snapshot: name.into(),
        };
        s
    };
    sm.ok(create(2, "a", from("fork-1"), None, Some("n")));
    sm.ok(create(3, "a", from("fork-1"), None, Some("n")));
    sm.ok(create(4, "a", from("named"), None, Some("n")));
    let report = |id: u64, state: SandboxState| Command::ReportSandbox {
        node: n("n"),
        id: sid(id),
        generation: 1,
        state,
        now_ms: 6000,
        start: None,
    };
    let exited = || SandboxState::Exited {
        exit_code: 0,
        signal: None,
        finished_at: 6000,
        timed_out: false,
    };
    let names = |sm: &Sm| -> Vec<String> {
        query::list_snapshots(&sm.st, &t("a"))
            .map(|s| s.name.clone())
            .collect()
    };
    sm.ok(report(2, SandboxState::Running { main_pid: 5 }));
    sm.ok(report(2, exited()));
    // Fork 3 has not even started: the snapshot stays.
    assert_eq!(names(&sm), vec!["fork-1".to_string(), "named".to_string()]);
    sm.ok(report(3, exited()));
    assert_eq!(names(&sm), vec!["named".to_string()]);
    // A named snapshot stays whatever its restores do.
    sm.ok(report(4, exited()));
    assert_eq!(names(&sm), vec!["named".to_string()]);
}

#[test]
fn a_tenant_remembers_its_latest_images_bounded() {
    let mut sm = Sm::new();
    sm.ok(tenant("acme", Quotas::default()));
    let max = crate::state::MAX_RECENT_IMAGES as u64;
    for i in 0..max + 5 {
        let mut s = spec(1, 256);
        s.image = format!("img-{i}");
        sm.ok(create(i, "acme", s, None, None));
        sm.ok(Command::SetDesired {
            tenant: Some(t("acme")),
            id: sid(i),
            desired: DesiredState::Deleted,
            stop_grace_secs: None,
        });
        sm.ok(Command::ForgetSandbox { id: sid(i) });
    }
    // Used again: moved to the end, not doubled.
    let mut s = spec(1, 256);
    s.image = "img-10".into();
    sm.ok(create(1000, "acme", s, None, None));
    let recent = &sm.st.tenants[&t("acme")].recent_images;
    assert_eq!(recent.len(), max as usize);
    assert_eq!(recent.last().map(String::as_str), Some("img-10"));
    assert_eq!(recent.iter().filter(|i| *i == "img-10").count(), 1);
    assert!(!recent.contains(&"img-0".to_string()), "the oldest went");
}

#[test]
fn a_stop_carries_its_grace_time_to_the_node() {
    let mut sm = Sm::new();
    sm.ok(tenant("acme", Quotas::default()));
    sm.ok(node("a", 2, 1024));
    sm.ok(create(1, "acme", spec(1, 256), None, Some("a")));
    let stop = |grace| Command::SetDesired {
        tenant: Some(t("acme")),
        id: sid(1),
        desired: DesiredState::Stopped,
        stop_grace_secs: grace,
    };
    assert!(matches!(
        sm.rejected(stop(Some(crate::apply::MAX_STOP_GRACE_SECS + 1))),
        Rejection::Invalid { .. }
    ));
    assert!(sm.st.sandboxes[&sid(1)].stop_grace_secs.is_none());
    sm.ok(stop(Some(2)));
    let d = query::node_desired(&sm.st, &n("a")).expect("registered");
    assert_eq!(d.sandboxes[0].desired, DesiredState::Stopped);
    assert_eq!(d.sandboxes[0].stop_grace_secs, Some(2));
    // Deleting it kills at once: no grace time left over.
    sm.ok(Command::SetDesired {
        tenant: Some(t("acme")),
        id: sid(1),
        desired: DesiredState::Deleted,
        stop_grace_secs: Some(30),
    });
    assert!(sm.st.sandboxes[&sid(1)].stop_grace_secs.is_none());
    // Unset, the assignment carries nothing (older nodes decode it).
    let d = query::node_desired(&sm.st, &n("a")).expect("registered");
    let wire = serde_json::to_string(&d.sandboxes[0]).expect("json");
    assert!(!wire.contains("stop_grace_secs"), "{wire}");
}
