use super::*;

#[test]
fn mirrors_from_apt_sources() {
    let deb822 = "Types: deb\nURIs: http://apt.invalid/debian-security\nSuites: bookworm-security\n\nTypes: deb deb-src\n# comment: yes\nURIs: http://apt.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\n";
    assert_eq!(
        mirror_from_deb822(deb822, "bookworm").as_deref(),
        Some("http://apt.invalid/debian")
    );
    assert_eq!(mirror_from_deb822(deb822, "trixie"), None);
    let one = "# deb http://old.invalid/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://apt.invalid/debian bookworm main\n";
    assert_eq!(
        mirror_from_one_line(one, "bookworm").as_deref(),
        Some("http://apt.invalid/debian")
    );
}

#[test]
fn tar_names_are_written_raw() {
    let bytes = Tar::new().file("../../x", 0o644, b"x").bytes();
    let mut ar = tar::Archive::new(&bytes[..]);
    let e = ar
        .entries()
        .expect("entries")
        .next()
        .expect("one")
        .expect("ok");
    assert_eq!(&*e.path_bytes(), b"../../x");
}
