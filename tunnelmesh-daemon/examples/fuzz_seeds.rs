//! Write the fuzz targets' seeds to `fuzz/corpus/TARGET/` (`cargo run --example fuzz_seeds
//! --features fuzzing`); files already there are left alone.

use std::{fs, path::Path};

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, name, bytes) in tunnelmesh_daemon::fuzzing::seeds::seeds() {
        let dir = corpus.join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(name), bytes)?;
    }
    println!("seeds written to {}", corpus.display());
    Ok(())
}
