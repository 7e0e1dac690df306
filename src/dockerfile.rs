//! What a Dockerfile asks of the platform it targets, read without building
//! it: the base image of the target stage (the controller reads its
//! `os.version` to pick Windows nodes) and the first RUN step that would
//! execute on the target platform (refused when the host cannot run it,
//! e.g. `windows/*` on Linux). Pure; parsed by `parse-dockerfile`.

use std::collections::{BTreeMap, BTreeSet};

use parse_dockerfile::{Instruction, Stage};

/// Errors reading a Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerfileError {
    /// It does not parse.
    #[error("Dockerfile: {0}")]
    Parse(String),
    /// It has no FROM.
    #[error("Dockerfile: no FROM")]
    NoStage,
    /// The target stage does not exist.
    #[error("target {0:?}: no stage of that name in the Dockerfile")]
    NoTarget(String),
}

/// Expands `$NAME`, `${NAME}`, `${NAME:-default}` and `${NAME:+alt}`; `\$`
/// is a literal `$`.
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' && chars.get(i + 1) == Some(&'$') {
            out.push('$');
            i += 2;
            continue;
        }
        if c != '$' {
            out.push(c);
            i += 1;
            continue;
        }
        if chars.get(i + 1) == Some(&'{') {
            let Some(end) = chars[i + 2..].iter().position(|&c| c == '}') else {
                out.push(c);
                i += 1;
                continue;
            };
            let inner: String = chars[i + 2..i + 2 + end].iter().collect();
            let value = if let Some((name, default)) = inner.split_once(":-") {
                vars.get(name)
                    .filter(|v| !v.is_empty())
                    .cloned()
                    .unwrap_or_else(|| expand(default, vars))
            } else if let Some((name, alt)) = inner.split_once(":+") {
                if vars.get(name).is_some_and(|v| !v.is_empty()) {
                    expand(alt, vars)
                } else {
                    String::new()
                }
            } else {
                vars.get(&inner).cloned().unwrap_or_default()
            };
            out.push_str(&value);
            i += 3 + end;
            continue;
        }
        let name: String = chars[i + 1..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
            .collect();
        if name.is_empty() {
            out.push(c);
            i += 1;
        } else {
            out.push_str(vars.get(&name).map(String::as_str).unwrap_or(""));
            i += 1 + name.chars().count();
        }
    }
    out
}

/// What the target platform needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetNeeds {
    /// The image the target stage is built on (its FROM, followed through
    /// other stages, ARGs expanded); `None` for `scratch`.
    pub base_image: Option<String>,
    /// The first RUN of a stage the target needs that runs on the target
    /// platform's OS (stages `FROM --platform=$BUILDPLATFORM`, or fixed to
    /// another OS, run on the build host and are not counted):
    /// `line N: RUN …`.
    pub target_run: Option<String>,
}

/// Reads `text` for `target` (the last stage when `None`) with `build_args`,
/// building for an OS named `target_os` (`windows`): a stage `FROM
/// --platform=$BUILDPLATFORM`, or fixed to another OS, runs elsewhere.
pub fn target_needs(
    text: &str,
    build_args: &[(String, String)],
    target: Option<&str>,
    target_os: &str,
) -> Result<TargetNeeds, DockerfileError> {
    let file = parse_dockerfile::parse(text).map_err(|e| DockerfileError::Parse(e.to_string()))?;
    let given: BTreeMap<String, String> = build_args.iter().cloned().collect();
    let mut global = BTreeMap::new();
    for arg in file.global_args() {
        for pair in arg.arguments.value.split_whitespace() {
            let (k, v) = match pair.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.trim_matches('"').to_string())),
                None => (pair.to_string(), None),
            };
            let value = given.get(&k).cloned().or(v).unwrap_or_default();
            global.insert(k, value);
        }
    }
    // Platform variables as BuildKit predefines them: only whether a stage
    // runs on the target matters here.
    global.insert("TARGETPLATFORM".into(), "$TARGETPLATFORM".into());
    global.insert("BUILDPLATFORM".into(), "$BUILDPLATFORM".into());
    let stages: Vec<Stage<'_, '_>> = file.stages().collect();
    if stages.is_empty() {
        return Err(DockerfileError::NoStage);
    }
    let by_name = |name: &str| {
        stages.iter().position(|s| {
            s.from
                .as_
                .as_ref()
                .is_some_and(|(_, n)| n.value.eq_ignore_ascii_case(name))
        })
    };
    let target_index = match target {
        Some(t) => by_name(t).ok_or_else(|| DockerfileError::NoTarget(t.to_string()))?,
        None => stages.len() - 1,
    };
    let image_of = |i: usize| expand(&stages[i].from.image.value, &global);
    // Whether stage `i` runs on the target platform (follows FROM chains).
    let on_target = |mut i: usize| loop {
        if let Some(flag) = stages[i]
            .from
            .options
            .iter()
            .find(|f| f.name.value == "platform")
        {
            let value = flag.value.as_ref().map(|v| v.value.as_ref()).unwrap_or("");
            let value = expand(value, &global);
            return value.contains("TARGETPLATFORM")
                || value
                    .to_ascii_lowercase()
                    .starts_with(&format!("{target_os}/"));
        }
        match by_name(&image_of(i)) {
            Some(j) if j < i => i = j,
            _ => return true,
        }
    };
    // Base image of the target: FROM followed through stage names.
    let mut i = target_index;
    let base_image = loop {
        let image = image_of(i);
        match by_name(&image) {
            Some(j) if j < i => i = j,
            _ if image == "scratch" => break None,
            _ => break Some(image),
        }
    };
    // Stages the target needs, and the first RUN among those on the target.
    let mut needed = BTreeSet::new();
    let mut todo = vec![target_index];
    while let Some(i) = todo.pop() {
        if !needed.insert(i) {
            continue;
        }
        if let Some(j) = by_name(&image_of(i)).filter(|&j| j < i) {
            todo.push(j);
        }
        for ins in stages[i].instructions {
            if let Instruction::Copy(c) = ins {
                for flag in c.options.iter().filter(|f| f.name.value == "from") {
                    let from = flag.value.as_ref().map(|v| v.value.as_ref()).unwrap_or("");
                    let j = from.parse::<usize>().ok().or_else(|| by_name(from));
                    if let Some(j) = j.filter(|&j| j < i) {
                        todo.push(j);
                    }
                }
            }
        }
    }
    let target_run = needed
        .iter()
        .filter(|&&i| on_target(i))
        .flat_map(|&i| stages[i].instructions.iter())
        .find_map(|ins| match ins {
            Instruction::Run(r) => Some(r.run.span.start),
            _ => None,
        })
        .map(|start| {
            let line = text[..start].matches('\n').count() + 1;
            let shown: String = text[start..]
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(120)
                .collect();
            format!("line {line}: {}", shown.trim())
        });
    Ok(TargetNeeds {
        base_image,
        target_run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_image_follows_stages_and_args() {
        let text = "ARG BASE=example.com/win/servercore:ltsc2022\nFROM ${BASE} AS base\nCOPY a /a\nFROM base\nCOPY b /b\n";
        let needs = target_needs(text, &[], None, "windows").unwrap();
        assert_eq!(
            needs.base_image.as_deref(),
            Some("example.com/win/servercore:ltsc2022")
        );
        assert_eq!(needs.target_run, None);
        let needs =
            target_needs(text, &[("BASE".into(), "r/x:1".into())], None, "windows").unwrap();
        assert_eq!(needs.base_image.as_deref(), Some("r/x:1"));
        let scratch = target_needs("FROM scratch\nCOPY a /a\n", &[], None, "windows").unwrap();
        assert_eq!(scratch.base_image, None);
    }

    #[test]
    fn runs_on_the_build_platform_are_not_target_runs() {
        let text = "FROM --platform=$BUILDPLATFORM golang AS build\nRUN go build\n\
                    FROM r/win:1 AS other\nRUN del x\n\
                    FROM r/win:1\nCOPY --from=build /app /app\n";
        let needs = target_needs(text, &[], None, "windows").unwrap();
        assert_eq!(needs.target_run, None, "the unused stage's RUN counts not");
        let needs = target_needs(text, &[], Some("other"), "windows").unwrap();
        assert_eq!(needs.target_run.as_deref(), Some("line 4: RUN del x"));
        let text = "FROM r/win:1 AS a\nRUN echo\nFROM a\nCOPY x /x\n";
        assert_eq!(
            target_needs(text, &[], None, "windows")
                .unwrap()
                .target_run
                .as_deref(),
            Some("line 2: RUN echo")
        );
        let text = "FROM r/win:1 AS a\nRUN echo\nFROM scratch\nCOPY --from=0 /x /x\n";
        assert!(
            target_needs(text, &[], None, "windows")
                .unwrap()
                .target_run
                .is_some()
        );
        // A stage fixed to the target's OS runs there; one fixed to another
        // OS does not.
        let text = "FROM --platform=windows/amd64 r/win:1 AS a\nRUN dir\nFROM --platform=linux/amd64 r/l:1 AS b\nRUN ls\nFROM r/win:1\nCOPY --from=a /x /x\nCOPY --from=b /y /y\n";
        assert_eq!(
            target_needs(text, &[], None, "windows")
                .unwrap()
                .target_run
                .as_deref(),
            Some("line 2: RUN dir")
        );
    }

    #[test]
    fn missing_target_is_named() {
        assert_eq!(
            target_needs("FROM scratch\n", &[], Some("nope"), "windows"),
            Err(DockerfileError::NoTarget("nope".into()))
        );
    }
}
