//! The API server itself refuses bad input, with messages naming the field.

use kube::Api;
use kube::api::{DynamicObject, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;

use crate::common::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_corpus_is_refused_naming_the_field() {
    let env = TestEnv::new("bad-input").await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 12,
        "the corpus has {} manifests",
        files.len()
    );
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read");
        let expects: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expects.is_empty(),
            "{} has no '# expect:' line",
            file.display()
        );
        let obj: DynamicObject = serde_yaml::from_str(&text).expect("yaml");
        let types = obj.types.clone().expect("apiVersion/kind");
        let (group, version) = types.api_version.split_once('/').expect("group/version");
        let gvk = GroupVersionKind::gvk(group, version, &types.kind);
        let plural = format!("{}s", types.kind.to_lowercase());
        let ar = ApiResource::from_gvk_with_plural(&gvk, &plural);
        let api: Api<DynamicObject> = if types.kind == "BuildRunner" {
            Api::all_with(env.client.clone(), &ar)
        } else {
            Api::namespaced_with(env.client.clone(), &env.ns, &ar)
        };
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => failures.push(format!("{}: accepted", file.display())),
            Err(kube::Error::Api(status)) => {
                let msg = status.message.clone();
                for want in &expects {
                    if !msg.contains(want) {
                        failures.push(format!(
                            "{}: message lacks {want:?}: {msg}",
                            file.file_name().unwrap_or_default().to_string_lossy()
                        ));
                    }
                }
                assert_eq!(status.code, 422, "{}: {msg}", file.display());
            }
            Err(e) => failures.push(format!("{}: unexpected error {e}", file.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // And a valid one with aliases goes through (the controller canonicalises).
    let (ok, out) = env.kubectl(
        &["apply", "-f", "-"],
        Some(&crate::common::manifest(
            "aliases",
            &["Linux/x86_64", "macos/aarch64"],
            "",
        )),
    );
    assert!(ok, "{out}");
    env.cleanup().await;
}
