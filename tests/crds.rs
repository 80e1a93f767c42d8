//! Drift check: `crds/` and the chart's `crds/` are exactly what `palisade crdgen` prints
//! from the Rust types. Regenerate with `make crds`.
use std::path::Path;
use std::process::Command;

use palisade_tests::{palisade_bin, TempDir};

fn read_dir_sorted(dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(e.path()).unwrap())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn committed_crds_match_the_rust_types() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let tmp = TempDir::new("crdgen");
    let status = Command::new(palisade_bin())
        .args(["crdgen", "--out-dir"])
        .arg(tmp.path())
        .status()
        .expect("run palisade crdgen");
    assert!(status.success());
    let generated = read_dir_sorted(tmp.path());
    assert_eq!(
        generated.iter().map(|g| g.0.as_str()).collect::<Vec<_>>(),
        [
            "palisade.dev_bfdprofiles.yaml",
            "palisade.dev_bgpadvertisements.yaml",
            "palisade.dev_bgppeers.yaml",
            "palisade.dev_bgpsessionstatuses.yaml",
            "palisade.dev_ipaddresspools.yaml",
            "palisade.dev_l2advertisements.yaml",
            "palisade.dev_servicebgpstatuses.yaml",
            "palisade.dev_servicel2statuses.yaml"
        ]
    );
    for dir in [repo.join("crds"), repo.join("charts/palisade/crds")] {
        let committed = read_dir_sorted(&dir);
        assert_eq!(
            committed.iter().map(|c| &c.0).collect::<Vec<_>>(),
            generated.iter().map(|g| &g.0).collect::<Vec<_>>(),
            "{} holds other files than crdgen writes; run `make crds`",
            dir.display()
        );
        for ((name, want), (_, have)) in generated.iter().zip(&committed) {
            assert!(
                want == have,
                "{}/{name} drifted from the Rust types; run `make crds`",
                dir.display()
            );
        }
    }
}

#[test]
fn crds_parse_as_kubernetes_objects() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for (name, text) in read_dir_sorted(&repo.join("crds")) {
        let crd: CustomResourceDefinition =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(crd.spec.group, "palisade.dev");
        // Configuration is cluster-wide; a ServiceL2Status / ServiceBGPStatus lives next to
        // its Service.
        let scope = if matches!(
            crd.spec.names.kind.as_str(),
            "ServiceL2Status" | "ServiceBGPStatus"
        ) {
            "Namespaced"
        } else {
            "Cluster"
        };
        assert_eq!(crd.spec.scope, scope, "{name}");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.served && v.storage);
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{name}: no status subresource"
        );
        assert!(
            v.additional_printer_columns
                .as_ref()
                .is_some_and(|c| !c.is_empty()),
            "{name}: no printer columns"
        );
    }
}
