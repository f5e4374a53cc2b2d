//! Writes the seed corpus: `rtable-fuzz-seeds <corpus dir>` puts every seed at
//! `<dir>/<target>/seed-<name>` (overwriting seeds, leaving other corpus files alone).

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(rtable_fuzz_targets::corpus_dir);
    let seeds = rtable_fuzz_targets::seeds::seeds()?;
    for s in &seeds {
        let target_dir = dir.join(s.target);
        std::fs::create_dir_all(&target_dir)
            .with_context(|| format!("creating {}", target_dir.display()))?;
        let path = target_dir.join(format!("seed-{}", s.name));
        std::fs::write(&path, &s.bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("wrote {} seeds to {}", seeds.len(), dir.display());
    Ok(())
}
