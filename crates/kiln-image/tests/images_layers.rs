//! The multi-layer image gives exactly the documented tree, in the unpacked root and in the
//! ext4 disk.

mod common;

use std::os::unix::fs::MetadataExt;

use common::{debugfs, pull, store};
use kiln_image::manifest::{Compression, Document, parse_document};
use kiln_image::unpack::{UnpackOptions, unpack_layer_file};
use kiln_testkit::images::{self, MULTILAYER_EXPECTED};

#[test]
fn multilayer_unpacks_to_the_expected_tree() -> anyhow::Result<()> {
    common::init_tracing();
    let layout = images::multilayer()?;
    let (_, bytes) = layout.manifest()?;
    let Ok(Document::Manifest(m)) = parse_document(&bytes, None) else {
        anyhow::bail!("not a manifest");
    };
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("rootfs");
    std::fs::create_dir(&root)?;
    for l in &m.layers {
        let c = Compression::from_media_type(&l.media_type).expect("layer type");
        unpack_layer_file(
            &root,
            &layout.blob_path(&l.digest),
            c,
            &l.digest,
            None,
            &UnpackOptions::default(),
        )?;
    }
    let tree = images::tree_listing(&root)?;
    assert_eq!(tree, MULTILAYER_EXPECTED, "{tree:#?}");
    let ino = |p: &str| std::fs::metadata(root.join(p)).map(|m| m.ino());
    assert_eq!(ino("bin/tool")?, ino("bin/tool-link")?);
    assert_eq!(ino("data/base.txt")?, ino("data/hard")?);
    assert_eq!(
        xattr::get(root.join("xattr.txt"), "user.kiln")?,
        Some(b"yes".to_vec())
    );
    Ok(())
}

#[tokio::test]
async fn multilayer_disk_matches() -> anyhow::Result<()> {
    common::init_tracing();
    let layout = images::multilayer()?;
    let (_d, store) = store();
    let img = pull(&store, &layout.image_ref()).await?;
    assert_eq!(img.layers.len(), 3);
    assert_eq!(img.config.cmd, vec!["/bin/tool"]);
    let disk = &img.disk;
    let ls = debugfs(disk, "ls -l /opq");
    assert!(
        ls.contains("new") && !ls.contains("old1") && !ls.contains("sub"),
        "{ls}"
    );
    let ls = debugfs(disk, "ls -l /etc");
    assert!(
        ls.contains("keep.conf") && !ls.contains("gone.conf"),
        "{ls}"
    );
    let ls = debugfs(disk, "ls /emptied");
    assert!(!ls.contains(" x "), "{ls}");
    assert_eq!(debugfs(disk, "cat /replaced"), "v2");
    assert_eq!(debugfs(disk, "cat /data/hard"), "base");
    let stat = debugfs(disk, "stat /bin/tool");
    assert!(stat.contains("Mode:  04755"), "{stat}");
    assert!(stat.contains("Links: 2"), "{stat}");
    let stat = debugfs(disk, "stat /data/base.txt");
    assert!(
        stat.contains("User:  1000") && stat.contains("Group:  1000"),
        "{stat}"
    );
    let stat = debugfs(disk, "stat /data/link");
    assert!(
        stat.contains("Type: symlink") && stat.contains("base.txt"),
        "{stat}"
    );
    let ea = debugfs(disk, "ea_get /xattr.txt user.kiln");
    assert!(ea.contains("yes"), "{ea}");
    Ok(())
}
