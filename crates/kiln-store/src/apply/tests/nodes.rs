//! Node credentials, what a node is told to protect, and what its
//! records keep of it (stream key, automatic templates).

use super::*;

#[test]
fn node_credentials_are_bound_to_one_node_and_rotate() {
    let mut sm = Sm::new();
    sm.ok(tenant("a", Quotas::default()));
    let mk =
        |id: &str, tenant: Option<&str>, node: Option<&str>, secret: &str| Command::CreateToken {
            id: id.into(),
            tenant: tenant.map(t),
            role: Role::Node,
            sha256: query::hash_token(secret),
            description: String::new(),
            now_ms: 5,
            node: node.map(n),
        };
    assert!(matches!(
        sm.rejected(mk("n1", None, None, "x1")),
        Rejection::Invalid { .. }
    ));
    assert!(matches!(
        sm.rejected(mk("n1", Some("a"), Some("h1"), "x1")),
        Rejection::Invalid { .. }
    ));
    // Only node credentials name a node.
    assert!(matches!(
        sm.rejected(Command::CreateToken {
            id: "t".into(),
            tenant: Some(t("a")),
            role: Role::Tenant,
            sha256: query::hash_token("y"),
            description: String::new(),
            now_ms: 5,
            node: Some(n("h1")),
        }),
        Rejection::Invalid { .. }
    ));
    sm.ok(mk("n1", None, Some("h1"), "x1"));
    sm.ok(mk("n2", None, Some("h2"), "x2"));
    let tok = query::token_by_hash(&sm.st, &query::hash_token("x1")).expect("live");
    assert_eq!((tok.role, tok.node.clone()), (Role::Node, Some(n("h1"))));
    // A registration of h1 presenting x1: the rotation keeps x1 (the node
    // holds it) until the new x3 is used; h2's are never touched.
    let live =
        |sm: &Sm, secret: &str| query::token_by_hash(&sm.st, &query::hash_token(secret)).is_some();
    let rotate = |keep: Option<&str>| Command::RotateNodeCredentials {
        node: n("h1"),
        keep: keep.map(query::hash_token),
        now_ms: 6,
    };
    sm.ok(rotate(Some("x1")));
    sm.ok(mk("n3", None, Some("h1"), "x3"));
    assert!(live(&sm, "x1") && live(&sm, "x2") && live(&sm, "x3"));
    // The node died before saving x3 and registers again with x1: x3,
    // never used, goes; x1 stays until the next one is used.
    sm.ok(rotate(Some("x1")));
    sm.ok(mk("n4", None, Some("h1"), "x4"));
    assert!(live(&sm, "x1") && !live(&sm, "x3") && live(&sm, "x4"));
    // x4 used: it is the only one.
    sm.ok(Command::ConfirmNodeCredential {
        node: n("h1"),
        sha256: query::hash_token("x4"),
        now_ms: 7,
    });
    assert!(!live(&sm, "x1") && live(&sm, "x4") && live(&sm, "x2"));
    // Only a live credential of that node confirms.
    for (node, secret) in [("h1", "x1"), ("h2", "x4"), ("h1", "nope")] {
        assert!(matches!(
            sm.rejected(Command::ConfirmNodeCredential {
                node: n(node),
                sha256: query::hash_token(secret),
                now_ms: 8,
            }),
            Rejection::Invalid { .. }
        ));
    }
    // A registration presenting nothing (first one, or after a revoke)
    // leaves no earlier credential live.
    sm.ok(rotate(None));
    assert!(!live(&sm, "x4") && live(&sm, "x2"));
    let mut rebuilt = sm.st.clone();
    rebuilt.rebuild_indexes();
    assert_eq!(rebuilt.idx, sm.st.idx);
}

#[test]
fn a_node_is_told_the_other_nodes_addresses_to_protect() {
    let mut sm = Sm::new();
    for (name, address) in [
        ("a", "10.1.0.1:7000"),
        ("b", "http://10.1.0.2:7000"),
        ("c", "nodes.example:7000"),
        ("d", "127.0.0.1:7000"),
        ("e", "10.1.0.1:7100"),
    ] {
        let mut c = node(name, 4, 4096);
        if let Command::RegisterNode { address: a, .. } = &mut c {
            *a = address.to_owned();
        }
        sm.ok(c);
    }
    let d = query::node_desired(&sm.st, &n("a")).expect("registered");
    // Its own address is its own; names and loopback are not addresses of
    // another host; duplicates once.
    assert_eq!(
        d.cluster_addresses,
        vec![
            "10.1.0.1".parse::<std::net::Ipv4Addr>().expect("ip"),
            "10.1.0.2".parse().expect("ip")
        ]
    );
    let d = query::node_desired(&sm.st, &n("b")).expect("registered");
    assert_eq!(
        d.cluster_addresses,
        vec!["10.1.0.1".parse::<std::net::Ipv4Addr>().expect("ip")]
    );
}

#[test]
fn a_node_stream_key_is_validated_and_kept() {
    let mut sm = Sm::new();
    let key = "0123456789abcdef0123456789abcdef".to_string();
    assert!(matches!(
        sm.rejected(Command::SetNodeStreamKey {
            name: n("a"),
            key: key.clone(),
            cert_sha256: None,
        }),
        Rejection::NotFound { .. }
    ));
    sm.ok(node("a", 4, 4096));
    for bad in [
        "short",
        "has space 0123456789abcdef0123456789",
        &"x".repeat(129),
    ] {
        assert!(matches!(
            sm.rejected(Command::SetNodeStreamKey {
                name: n("a"),
                key: bad.to_string(),
                cert_sha256: None,
            }),
            Rejection::Invalid { .. }
        ));
    }
    let cert = "ab".repeat(32);
    for bad in [
        "AB".repeat(32),
        "ab".repeat(31),
        format!("{}zz", "ab".repeat(31)),
    ] {
        assert!(matches!(
            sm.rejected(Command::SetNodeStreamKey {
                name: n("a"),
                key: key.clone(),
                cert_sha256: Some(bad),
            }),
            Rejection::Invalid { .. }
        ));
    }
    assert_eq!(sm.st.nodes[&n("a")].stream_key, None, "nothing half-set");
    sm.ok(Command::SetNodeStreamKey {
        name: n("a"),
        key: key.clone(),
        cert_sha256: Some(cert.clone()),
    });
    // Re-registration keeps the key until the node sends a new one.
    sm.ok(node("a", 4, 4096));
    assert_eq!(
        sm.st.nodes[&n("a")].stream_key.as_deref(),
        Some(key.as_str())
    );
    assert_eq!(
        sm.st.nodes[&n("a")].stream_cert_sha256.as_deref(),
        Some(cert.as_str())
    );
}

#[test]
fn a_heartbeat_replaces_the_automatic_templates_and_registering_clears_them() {
    let mut sm = Sm::new();
    sm.ok(node("h1", 4, 4096));
    let tpl = kiln_api::templates::NodeTemplate {
        name: "tpl-1".into(),
        node: None,
        image: "busybox".into(),
        resources: kiln_api::sandbox::Resources::default(),
        size_bytes: 1,
        created_at_ms: 1,
    };
    let hb = |templates| Command::Heartbeat {
        name: n("h1"),
        now_ms: 10,
        images: None,
        templates,
    };
    sm.ok(hb(Some(vec![tpl.clone()])));
    assert_eq!(sm.st.nodes[&n("h1")].templates, vec![tpl.clone()]);
    sm.ok(hb(None));
    assert_eq!(sm.st.nodes[&n("h1")].templates.len(), 1, "None keeps them");
    let mut bad = tpl.clone();
    bad.image = "x\u{7}".into();
    sm.rejected(hb(Some(vec![bad])));
    let too_many = vec![tpl; kiln_api::templates::MAX_NODE_TEMPLATES + 1];
    sm.rejected(hb(Some(too_many)));
    sm.ok(node("h1", 4, 4096));
    assert!(sm.st.nodes[&n("h1")].templates.is_empty());
}
