//! `kiln info`: which VMM and accelerator Kiln uses on this host, and why.

use anyhow::Result;
use kiln_node::paths::GuestArtifacts;
use kiln_node::store::Store;
use kiln_vmm::{DriverConfig, KvmKind};
use serde_json::json;

fn digest(path: &std::path::Path) -> Option<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).ok()?;
    Some(format!("sha256:{}", hex::encode(h.finalize())))
}

pub async fn info(store: &Store, as_json: bool, driver: &str) -> Result<i32> {
    let host = tokio::task::spawn_blocking(|| kiln_vmm::detect(&DriverConfig::default())).await?;
    let choice = kiln_node::vm::parse_driver(driver)?;
    let sel = kiln_vmm::select(choice, &host);
    let kvm = match host.kvm {
        KvmKind::Absent => "absent",
        KvmKind::Hardware => "hardware KVM",
        KvmKind::Pvm => "kvm_pvm (software KVM: cannot boot Linux guests)",
    };
    let artifacts = GuestArtifacts::locate(store.dirs());
    let (kernel, initramfs, init) = match &artifacts {
        Ok(a) => (
            {
                let kind = sel
                    .as_ref()
                    .map(|s| s.kind)
                    .unwrap_or(kiln_vmm::DriverKind::Qemu);
                let k = a.kernel_for(kind);
                Some((k.display().to_string(), digest(k)))
            },
            Some((a.initramfs.display().to_string(), digest(&a.initramfs))),
            Some((a.init_binary.display().to_string(), digest(&a.init_binary))),
        ),
        Err(_) => (None, None, None),
    };
    let qemu_version = host
        .qemu
        .version
        .clone()
        .unwrap_or_else(|e| format!("unavailable: {e}"));
    let fc = host.firecracker.as_ref().map(|b| {
        (
            b.path.display().to_string(),
            b.version
                .clone()
                .unwrap_or_else(|e| format!("unavailable: {e}")),
        )
    });
    if as_json {
        let v = json!({
            "driver": sel.as_ref().ok().map(|s| json!({
                "kind": s.kind.to_string(),
                "accel": s.accel.to_string(),
                "binary": s.binary,
                "version": s.version,
                "reason": s.reason,
            })),
            "driver_error": sel.as_ref().err().map(|e| e.to_string()),
            "kvm": kvm,
            "qemu": { "path": host.qemu.path, "version": qemu_version },
            "firecracker": fc.as_ref().map(|(p, v)| json!({"path": p, "version": v})),
            "kernel": kernel.as_ref().map(|(p, d)| json!({"path": p, "digest": d})),
            "initramfs": initramfs.as_ref().map(|(p, d)| json!({"path": p, "digest": d})),
            "kiln_init": init.as_ref().map(|(p, d)| json!({"path": p, "digest": d})),
            "state_dir": store.dirs().state,
            "cache_dir": store.dirs().cache,
            "version": env!("CARGO_PKG_VERSION"),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(if sel.is_ok() { 0 } else { 1 });
    }
    println!("Kiln {}", env!("CARGO_PKG_VERSION"));
    match &sel {
        Ok(s) => {
            println!(
                "Driver:       {} with {}",
                s.kind,
                s.accel.to_string().to_uppercase()
            );
            println!("Why:          {}", s.reason);
        }
        Err(e) => println!("Driver:       none usable: {e}"),
    }
    println!("/dev/kvm:     {kvm}");
    println!(
        "QEMU:         {} ({})",
        host.qemu.path.display(),
        qemu_version
    );
    match &fc {
        Some((p, v)) => println!("Firecracker:  {p} ({v})"),
        None => println!("Firecracker:  not configured (set KILN_FIRECRACKER_BIN)"),
    }
    let show = |name: &str, v: &Option<(String, Option<String>)>| match v {
        Some((p, d)) => println!("{name:<13} {p} ({})", d.as_deref().unwrap_or("unreadable")),
        None => println!("{name:<13} missing"),
    };
    show("Kernel:", &kernel);
    show("Initramfs:", &initramfs);
    show("kiln-init:", &init);
    if let Err(e) = &artifacts {
        println!("              {e}");
    }
    println!("State dir:    {}", store.dirs().state.display());
    println!("Cache dir:    {}", store.dirs().cache.display());
    Ok(if sel.is_ok() { 0 } else { 1 })
}
