//! Content digests of snapshot files (`sha256-pages`, and the older
//! `sha256-extents`) and the list of files a manifest covers.

use super::*;

pub(super) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Size and `DIGEST_ALGORITHM` digest of one file.
pub fn file_digest(path: &Path) -> std::io::Result<(u64, String)> {
    digest_with(path, DIGEST_ALGORITHM)
}

/// Size and digest of one file with `algorithm` (current or legacy).
pub fn digest_with(path: &Path, algorithm: &str) -> std::io::Result<(u64, String)> {
    match algorithm {
        DIGEST_ALGORITHM => pages_digest(path),
        LEGACY_DIGEST_ALGORITHM => extents_digest(path),
        other => Err(std::io::Error::other(format!(
            "unknown digest algorithm {other:?}"
        ))),
    }
}

/// `sha256-pages`: SHA-256 over the file's size and, for every 4 KiB page
/// that is not all zeros, its offset and bytes. It depends only on the
/// contents: a hole and a block of zeros are the same, so a copy made with
/// or without holes (`cp`, `rsync -S`, a backup) has the same digest. Only
/// the data extents are read (`SEEK_DATA`/`SEEK_HOLE`), so a sparse guest
/// RAM file costs what it holds.
pub(super) fn pages_digest(path: &Path) -> std::io::Result<(u64, String)> {
    const PAGE: u64 = 4096;
    let f = fs::File::open(path)?;
    let size = f.metadata()?.len();
    let mut h = Sha256::new();
    h.update(size.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    let mut r = &f;
    // Pages below this are done (extents need not be page-aligned).
    let mut next_page: u64 = 0;
    for extent in kiln_vmm::sparse::data_extents(&f, size) {
        let (start, end) = extent?;
        let mut off = (start / PAGE).max(next_page) * PAGE;
        let stop = (end.div_ceil(PAGE) * PAGE).min(size);
        while off < stop {
            let want = usize::try_from((stop - off).min(buf.len() as u64)).unwrap_or(buf.len());
            r.seek(SeekFrom::Start(off))?;
            r.read_exact(&mut buf[..want]).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    std::io::Error::new(e.kind(), "file shrank while hashing")
                } else {
                    e
                }
            })?;
            for (i, page) in buf[..want].chunks(PAGE as usize).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    h.update((off + i as u64 * PAGE).to_le_bytes());
                    h.update(page);
                }
            }
            off += want as u64;
        }
        next_page = end.div_ceil(PAGE);
    }
    Ok((size, hex(&h.finalize())))
}

/// `sha256-extents` (legacy): SHA-256 over each data extent's offset,
/// length and bytes. Depends on how the file is laid out, not only on its
/// contents.
pub(super) fn extents_digest(path: &Path) -> std::io::Result<(u64, String)> {
    let f = fs::File::open(path)?;
    let size = f.metadata()?.len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut r = &f;
    for extent in kiln_vmm::sparse::data_extents(&f, size) {
        let (start, end) = extent?;
        h.update(start.to_le_bytes());
        h.update((end - start).to_le_bytes());
        r.seek(SeekFrom::Start(start))?;
        let mut left = end - start;
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let n = r.read(&mut buf[..want])?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shrank while hashing",
                ));
            }
            h.update(&buf[..n]);
            left -= n as u64;
        }
    }
    Ok((size, hex(&h.finalize())))
}

/// Digests several files at once, one thread each, remembering them in
/// `memo` (and using what it remembers) if given.
pub(super) fn digest_files(
    paths: &[PathBuf],
    memo: Option<&Path>,
    algorithm: &str,
) -> Vec<std::io::Result<(u64, String)>> {
    let memo = memo.map(kiln_vmm::memo::Memo::at);
    let one = |p: &Path| -> std::io::Result<(u64, String)> {
        match &memo {
            None => digest_with(p, algorithm),
            Some(m) => {
                let digest =
                    m.get_or(p, algorithm, || digest_with(p, algorithm).map(|(_, d)| d))?;
                Ok((fs::metadata(p)?.len(), digest))
            }
        }
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = paths.iter().map(|p| s.spawn(|| one(p))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("hashing thread panicked")))
            })
            .collect()
    })
}

/// Every regular file under `dir`, relative, sorted; `skip` names top-level
/// entries to leave out.
pub(super) fn relative_files(dir: &Path, skip: &[&str]) -> std::io::Result<Vec<String>> {
    fn walk(base: &Path, rel: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
        for e in fs::read_dir(base.join(rel))? {
            let e = e?;
            let r = rel.join(e.file_name());
            let ft = e.file_type()?;
            if ft.is_dir() {
                walk(base, &r, out)?;
            } else if ft.is_file() {
                out.push(r.to_string_lossy().into_owned());
            }
        }
        Ok(())
    }
    let mut out = vec![];
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if skip.contains(&name.as_str()) {
            continue;
        }
        let ft = e.file_type()?;
        if ft.is_dir() {
            walk(dir, Path::new(&name), &mut out)?;
        } else if ft.is_file() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}
