//! Git URL, revision, context directory, Dockerfile path and inline file
//! names (one per line of the input): the checks never panic, and what they
//! accept stays inside the context.
#![no_main]

use std::collections::BTreeMap;
use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use tripod::source::{Source, validate};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let url = lines.next().unwrap_or_default().to_string();
    let revision = lines.next().filter(|l| !l.is_empty()).map(str::to_string);
    let context_dir = lines.next().filter(|l| !l.is_empty()).map(str::to_string);
    let dockerfile = lines.next().filter(|l| !l.is_empty());
    let files: BTreeMap<String, String> = lines.map(|l| (l.to_string(), String::new())).collect();
    let git = Source::Git {
        url: url.clone(),
        revision,
        context_dir: context_dir.clone(),
        credentials: None,
    };
    if validate(&git, dockerfile).is_ok() {
        for p in [context_dir.as_deref(), dockerfile].into_iter().flatten() {
            assert!(
                !Path::new(p)
                    .components()
                    .any(|c| matches!(c, Component::ParentDir | Component::RootDir)),
                "accepted {p:?}"
            );
        }
    }
    let _ = tripod::source::redact_url(&url);
    let _ = tripod::source::split_userinfo(&url);
    let inline = Source::Inline {
        dockerfile: "FROM scratch\n".into(),
        files: files.clone(),
    };
    if validate(&inline, None).is_ok() {
        for name in files.keys() {
            assert!(
                !Path::new(name)
                    .components()
                    .any(|c| matches!(c, Component::ParentDir | Component::RootDir)),
                "accepted {name:?}"
            );
        }
    }
});
