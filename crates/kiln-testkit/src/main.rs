//! `kiln-testkit image <busybox|python|multilayer>`: builds (or reuses) a test image and
//! prints its reference (`oci:DIR:TAG`) for `kiln run` / `kiln image pull`.

use anyhow::{Result, bail};
use kiln_testkit::images;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let layout = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["image", "busybox"] => images::busybox()?,
        ["image", "python"] => images::python()?,
        ["image", "multilayer"] => images::multilayer()?,
        _ => bail!("usage: kiln-testkit image <busybox|python|multilayer>"),
    };
    println!("{}", layout.image_ref());
    Ok(())
}
