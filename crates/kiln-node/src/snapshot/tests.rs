#[test]
fn staging_dirs_name_their_owner_and_are_reaped_when_it_dies() {
    let t = tempfile::tempdir().unwrap();
    let store = super::SnapshotStore::at(t.path().to_path_buf());
    let live = store.staging("a.b-c").unwrap();
    let me = crate::store::ProcessIdentity::current();
    let name = live.file_name().unwrap().to_str().unwrap().to_string();
    assert_eq!(super::staging_owner(&name), Some(me));
    let grace = std::time::Duration::from_secs(3600);
    assert_eq!(store.reap_staging(grace), 0);
    assert!(live.is_dir());
    // The same pid with another start time: a reused pid, not the owner.
    let dead = t
        .path()
        .join(format!(".staging-x-1.{}.{}", me.pid, me.start_time + 1));
    std::fs::create_dir_all(dead.join("vm")).unwrap();
    // No owner in the name: kept until the grace passes.
    let unknown = t.path().join(".staging-old");
    std::fs::create_dir_all(&unknown).unwrap();
    assert_eq!(store.reap_staging(grace), 1);
    assert!(!dead.exists() && unknown.is_dir() && live.is_dir());
    assert_eq!(store.reap_staging(std::time::Duration::ZERO), 1);
    assert!(!unknown.exists() && live.is_dir());
}

/// The staging directory of a killed `kiln snapshot` is left alone
/// while its writer (the sandbox's supervisor) still writes it; it
/// used to be removed under the writer's feet.
#[test]
fn a_staging_dir_being_written_is_not_reaped() {
    let t = tempfile::tempdir().unwrap();
    let store = super::SnapshotStore::at(t.path().to_path_buf());
    let me = crate::store::ProcessIdentity::current();
    let dead_owner = t
        .path()
        .join(format!(".staging-s-1.{}.{}", me.pid, me.start_time + 1));
    std::fs::create_dir_all(dead_owner.join("vm")).unwrap();
    let writing = super::SnapshotStore::lock_staging(&dead_owner).unwrap();
    assert_eq!(store.reap_staging(std::time::Duration::ZERO), 0);
    assert!(dead_owner.join("vm").is_dir());
    drop(writing);
    assert_eq!(store.reap_staging(std::time::Duration::ZERO), 1);
    assert!(!dead_owner.exists());
    // A writer that comes after the reaper finds it gone.
    assert!(super::SnapshotStore::lock_staging(&dead_owner).is_err());
}

use super::*;

#[test]
fn names() {
    for ok in ["a", "snap-1", "A.b_c-9", "_x", &"x".repeat(128)] {
        assert!(validate_name(ok).is_ok(), "{ok}");
        assert!(kiln_api::sandbox::valid_name(ok), "{ok}");
    }
    for bad in ["", ".hidden", "-x", "a/b", "..", "a b", &"x".repeat(129)] {
        assert!(!kiln_api::sandbox::valid_name(bad), "{bad}");
        assert!(validate_name(bad).is_err(), "{bad}");
    }
    assert!(validate_name(&new_name("fork")).is_ok());
}

#[test]
fn extent_digest_sees_every_change_and_skips_holes() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("f");
    let f = fs::File::create(&p).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let write_at = |off: u64, b: &[u8]| {
        let mut f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(b).unwrap();
    };
    write_at(1 << 20, b"hello");
    let (size, d1) = file_digest(&p).unwrap();
    assert_eq!(size, 64 << 20);
    assert_eq!(file_digest(&p).unwrap().1, d1, "stable");
    write_at(1 << 20, b"hellp");
    let (_, d2) = file_digest(&p).unwrap();
    assert_ne!(d1, d2, "a changed byte changes the digest");
    write_at(40 << 20, b"x");
    let (_, d3) = file_digest(&p).unwrap();
    assert_ne!(d2, d3, "data written into a hole changes the digest");
    fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let (size, d4) = file_digest(&p).unwrap();
    assert_eq!(size, 32 << 20);
    assert_ne!(d3, d4);
    // The same contents laid out otherwise: holes filled with zeros, and
    // a page of written zeros, give the same digest.
    let dense = t.path().join("dense");
    fs::write(&dense, fs::read(&p).unwrap()).unwrap();
    assert_eq!(file_digest(&dense).unwrap().1, d4, "a copy without holes");
    let holey = t.path().join("holey");
    fs::copy(&p, &holey).unwrap();
    let mut g = fs::OpenOptions::new().write(true).open(&holey).unwrap();
    g.seek(SeekFrom::Start(8 << 20)).unwrap();
    g.write_all(&[0u8; 8192]).unwrap();
    drop(g);
    assert_eq!(
        file_digest(&holey).unwrap().1,
        d4,
        "zeros written into a hole"
    );
    // The legacy digest stays available for old manifests.
    assert!(digest_with(&p, LEGACY_DIGEST_ALGORITHM).is_ok());
    assert!(digest_with(&p, "md5").is_err());
}

fn driver(accel: kiln_vmm::Accel, cpu_model: &str) -> DriverInfo {
    DriverInfo {
        kind: DriverKind::Qemu,
        binary: "/usr/bin/qemu-system-x86_64".into(),
        version: "10.0.2".into(),
        accel,
        cpu_model: cpu_model.into(),
    }
}

fn guest() -> GuestDigests {
    GuestDigests {
        kernel_sha256: "k".into(),
        initramfs_sha256: "i".into(),
        init_sha256: "n".into(),
    }
}

fn parts(name: &str, image_disk: &Path, driver: DriverInfo) -> ManifestParts {
    let spec = SandboxSpec {
        image: "busybox".into(),
        image_digest: "sha256:00".into(),
        image_disk: image_disk.to_path_buf(),
        argv: vec!["true".into()],
        env: vec![],
        cwd: None,
        user: None,
        tty: false,
        stdin: false,
        cpus: 1,
        memory_mib: 256,
        disk_mib: 1024,
        timeout_secs: None,
        driver: "auto".into(),
        auto_remove: false,
        log_limit: None,
        network: None,
    };
    ManifestParts {
        name: name.into(),
        source: "0123456789abcdef".into(),
        ephemeral: name.starts_with("fork-"),
        guest: guest(),
        driver,
        spec,
        main_pid: 5,
        downtime_ms: 1,
    }
}

#[test]
fn a_snapshot_from_another_cpu_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let dirs = Dirs::new(t.path().join("state"), t.path().join("cache"));
    let store = SnapshotStore::new(&dirs);
    let disk = t.path().join("image.ext4");
    fs::write(&disk, b"image").unwrap();
    let kvm = driver(kiln_vmm::Accel::Kvm, "host");
    let staging = store.staging("snap-1").unwrap();
    fs::write(staging.join("x"), b"data").unwrap();
    let m = write_manifest(&staging, parts("snap-1", &disk, kvm.clone()), None).unwrap();
    assert_eq!(m.cpu.model, "host");
    assert_eq!(
        m.cpu.flags,
        host_cpu_flags(),
        "KVM passes the host CPU through"
    );
    store.publish(&staging, "snap-1").unwrap();
    store.verify("snap-1", &guest(), &kvm, true).unwrap();
    // Another CPU model is refused.
    let err = store
        .verify(
            "snap-1",
            &guest(),
            &driver(kiln_vmm::Accel::Kvm, "EPYC"),
            true,
        )
        .unwrap_err();
    assert!(matches!(err, VerifySnapshotError::Cpu { .. }), "{err}");
    // So is a host that lacks a feature the guest was using.
    let path = store.dir("snap-1").join(MANIFEST);
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    v["cpu"]["flags"]
        .as_array_mut()
        .unwrap()
        .push("kiln_no_such_flag".into());
    fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = store.verify("snap-1", &guest(), &kvm, true).unwrap_err();
    assert!(err.to_string().contains("lacks kiln_no_such_flag"), "{err}");
    // The image disk rebuilt with other contents is refused too.
    v["cpu"]["flags"].as_array_mut().unwrap().pop();
    fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    store.verify("snap-1", &guest(), &kvm, true).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(10));
    fs::write(&disk, b"other").unwrap();
    let err = store.verify("snap-1", &guest(), &kvm, true).unwrap_err();
    assert!(
        matches!(err, VerifySnapshotError::ImageDiskChanged { .. }),
        "{err}"
    );
    // Under TCG the features are the emulated model's, not the host's.
    let tcg = driver(kiln_vmm::Accel::Tcg, "max");
    assert!(CpuFeatures::of(&tcg).flags.is_empty());
}

#[test]
fn ephemeral_snapshot_goes_with_its_last_user() {
    let t = tempfile::tempdir().unwrap();
    let dirs = Dirs::new(t.path().join("state"), t.path().join("cache"));
    let store = SnapshotStore::new(&dirs);
    let staging = store.staging("fork-1").unwrap();
    fs::write(staging.join("x"), b"data").unwrap();
    let parts = parts(
        "fork-1",
        Path::new("/nonexistent"),
        driver(kiln_vmm::Accel::Tcg, "max"),
    );
    let m = write_manifest(&staging, parts, None).unwrap();
    assert_eq!(m.files.len(), 1);
    store.publish(&staging, "fork-1").unwrap();
    store.add_user("fork-1", "holder").unwrap();
    store.add_user("fork-1", "a").unwrap();
    store.add_user("fork-1", "b").unwrap();
    store.release_user("fork-1", "holder");
    store.release_user("fork-1", "a");
    assert!(store.exists("fork-1"));
    assert_eq!(store.users("fork-1"), vec!["b".to_string()]);
    assert!(matches!(
        store.remove("fork-1", |_| true),
        Err(RemoveSnapshotError::InUse { .. })
    ));
    store.release_user("fork-1", "b");
    assert!(!store.dir("fork-1").exists());
    store.release_user("fork-1", "b");
}

/// `snapshot rm` while a `kiln fork` restores from it: the fork's hold
/// is a user while its process lives (it used to be asked of the
/// sandbox store, which knows no such ID, and dropped).
#[test]
fn a_live_fork_hold_keeps_a_snapshot_from_removal() {
    let t = tempfile::tempdir().unwrap();
    let dirs = Dirs::new(t.path().join("state"), t.path().join("cache"));
    let store = SnapshotStore::new(&dirs);
    let staging = store.staging("snap-held").unwrap();
    fs::write(staging.join("x"), b"data").unwrap();
    let parts = parts(
        "snap-held",
        Path::new("/nonexistent"),
        driver(kiln_vmm::Accel::Tcg, "max"),
    );
    write_manifest(&staging, parts, None).unwrap();
    store.publish(&staging, "snap-held").unwrap();
    let me = crate::store::ProcessIdentity::current();
    store.add_user("snap-held", &holder_name(me)).unwrap();
    assert!(matches!(
        store.remove("snap-held", |_| false),
        Err(RemoveSnapshotError::InUse { .. })
    ));
    store.release_user("snap-held", &holder_name(me));
    let gone = crate::store::ProcessIdentity {
        start_time: me.start_time + 1,
        ..me
    };
    store.add_user("snap-held", &holder_name(gone)).unwrap();
    store.remove("snap-held", |_| false).unwrap();
    assert!(!store.exists("snap-held"));
}

/// A fork's hold names its process by pid and start time: a later
/// process with the same pid does not keep it (it used to: the pid
/// alone counted).
#[test]
fn holds_of_dead_forks_are_told_from_a_reused_pid() {
    let me = crate::store::ProcessIdentity::current();
    let reused = crate::store::ProcessIdentity {
        start_time: me.start_time + 1,
        ..me
    };
    assert!(!holder_is_dead(&holder_name(me)));
    assert!(holder_is_dead(&holder_name(reused)));
    // Holds written before: the pid alone.
    assert!(!holder_is_dead(&format!("fork-{}", me.pid)));
    assert!(
        is_process_hold(&holder_name(me)) && !is_process_hold("fork-x") && !is_process_hold("abc")
    );
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let gone = child.id();
    child.wait().unwrap();
    assert!(holder_is_dead(&format!("fork-{gone}")));
    // A sandbox ID is not a hold.
    assert!(!holder_is_dead("0123456789abcdef"));
}

/// A removal and a restore's registration are ordered: once removed, a
/// registration fails (it used to recreate `users/` inside the removed
/// snapshot's directory, leaving a half directory behind), and nothing of
/// the snapshot is left, not even the directory it was moved aside to.
#[test]
fn a_registration_after_a_removal_fails_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let dirs = Dirs::new(t.path().join("state"), t.path().join("cache"));
    let store = SnapshotStore::new(&dirs);
    let staging = store.staging("gone").unwrap();
    fs::write(staging.join("x"), b"data").unwrap();
    let parts = parts(
        "gone",
        Path::new("/nonexistent"),
        driver(kiln_vmm::Accel::Tcg, "max"),
    );
    write_manifest(&staging, parts, None).unwrap();
    store.publish(&staging, "gone").unwrap();
    store.remove("gone", |_| false).unwrap();
    let e = store.add_user("gone", "sandbox-1").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert!(!store.dir("gone").exists());
    let left: Vec<String> = fs::read_dir(store.dir("gone").parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(matches!(
        store.remove("gone", |_| false),
        Err(RemoveSnapshotError::NotFound(_))
    ));
}
