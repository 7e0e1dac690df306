//! `crds/` is the checked-in output of `tripod crds`: fail when it drifts.

#[test]
fn checked_in_crds_match_the_rust_types() {
    let generated = tripod::api::crds_yaml().expect("crds render");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/tripod.yaml");
    let on_disk = std::fs::read_to_string(&path).expect("crds/tripod.yaml");
    assert!(
        generated == on_disk,
        "crds/tripod.yaml is stale: run `cargo run -- crds > crds/tripod.yaml`"
    );
}

#[test]
fn crd_binary_output_matches_library() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tripod"))
        .arg("crds")
        .output()
        .expect("run tripod crds");
    assert!(out.status.success());
    let generated = tripod::api::crds_yaml().expect("crds render");
    assert_eq!(String::from_utf8_lossy(&out.stdout), generated);
}
