//! `palisade crdgen`: prints or writes the CRDs generated from the Rust types
//! (`palisade_loadbalancer::crd`). `crds/` and the chart's `crds/` are its output; a test in
//! `tests/` fails when they drift.
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

#[derive(Args, Debug)]
pub struct CrdgenArgs {
    /// Write one file per CRD (`<group>_<plural>.yaml`) into this directory instead of
    /// printing a multi-document YAML stream.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

pub fn run(args: CrdgenArgs) -> anyhow::Result<()> {
    let files = crd_files()?;
    match args.out_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (name, yaml) in files {
                let path = dir.join(name);
                std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        None => {
            for (_, yaml) in files {
                print!("---\n{yaml}");
            }
        }
    }
    Ok(())
}

/// `(file name, YAML)` for every CRD, in a stable order.
pub fn crd_files() -> anyhow::Result<Vec<(String, String)>> {
    palisade_loadbalancer::crd::crds()
        .into_iter()
        .map(|crd| {
            let name = format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural);
            let yaml =
                serde_saphyr::to_string(&crd).with_context(|| format!("serializing CRD {name}"))?;
            Ok((name, yaml))
        })
        .collect()
}
