//! The Dockerfile subset the darwin backend builds, as a list of steps:
//! parsed by `parse-dockerfile`, the target stage picked, ARG and ENV
//! values substituted. Pure; refuses what it cannot build with the
//! instruction named.

use std::collections::BTreeMap;

use parse_dockerfile::{Command, Instruction, Source};

/// What one instruction does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Copy files from the build context (or here-documents) into the image.
    Copy {
        /// Sources, relative to the context.
        sources: Vec<CopySource>,
        /// Destination (absolute, WORKDIR applied).
        dest: String,
        /// `--chmod` (octal).
        chmod: Option<u32>,
        /// `--chown` (numeric uid:gid).
        chown: Option<(u64, u64)>,
    },
    /// Set environment variables.
    Env(Vec<(String, String)>),
    /// Set the working directory (absolute).
    Workdir(String),
    /// Set the entrypoint.
    Entrypoint(Vec<String>),
    /// Set the command.
    Cmd(Vec<String>),
    /// Add labels.
    Label(Vec<(String, String)>),
    /// Set the user.
    User(String),
    /// Declare ports.
    Expose(Vec<String>),
    /// Declare volumes.
    Volume(Vec<String>),
    /// Set the stop signal.
    StopSignal(String),
    /// Set the shell of shell-form commands.
    Shell(Vec<String>),
    /// Run a command (macOS hosts only).
    Run(Vec<String>),
    /// Nothing to do in the image (an ARG).
    Nothing,
}

/// A COPY source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopySource {
    /// A path (possibly with `*`/`?` in its last part) in the context.
    Path(String),
    /// A here-document's text.
    Inline(String),
}

/// A Dockerfile turned into steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// `STEP i/n: …` text and what it does, in order.
    pub steps: Vec<(String, Step)>,
}

impl Recipe {
    /// Whether any step runs a command.
    pub fn runs_commands(&self) -> Option<&str> {
        self.steps
            .iter()
            .find(|(_, s)| matches!(s, Step::Run(_)))
            .map(|(t, _)| t.as_str())
    }
}

fn refuse(text: &str, why: &str) -> String {
    format!("{text}: {why}")
}

pub use crate::dockerfile::expand;

/// Splits `a=b "c d"=e f='g h'` into words, quotes removed, respecting
/// backslash escapes.
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (Some(q), c) if c == q => quote = None,
            (q, '\\') if q != Some('\'') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    any = true;
                }
            }
            (_, c) => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// `k=v` pairs of ENV/LABEL/ARG arguments; `legacy`: the `ENV key value`
/// form (one pair, the rest of the line the value).
fn pairs(raw: &str, legacy: bool) -> Result<Vec<(String, Option<String>)>, String> {
    let ws = words(raw);
    if legacy
        && let Some(first) = ws.first()
        && !first.contains('=')
    {
        // The rest of the raw text after the first word (split on the raw
        // text: quotes and escapes change the unquoted word's length).
        let rest = raw
            .trim_start()
            .split_once(char::is_whitespace)
            .map(|(_, r)| r.trim())
            .unwrap_or("");
        let value = words(rest).join(" ");
        return Ok(vec![(first.clone(), Some(value))]);
    }
    ws.into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), Some(v.to_string()))),
            Some(_) => Err(format!("{w:?} has no name")),
            None => Ok((w, None)),
        })
        .collect()
}

fn command(label: &str, c: &Command<'_>, shell: &[String]) -> Result<Vec<String>, String> {
    match c {
        Command::Exec(args) => Ok(args.value.iter().map(|a| a.value.to_string()).collect()),
        Command::Shell(s) => {
            let mut v = shell.to_vec();
            v.push(s.value.to_string());
            Ok(v)
        }
        _ => Err(refuse(label, "a command form this version does not know")),
    }
}

fn absolute(path: &str, workdir: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", workdir.trim_end_matches('/'))
    }
}

/// Turns `text` into a recipe for `target` (the last stage when `None`).
pub fn recipe(
    text: &str,
    build_args: &[(String, String)],
    target: Option<&str>,
) -> Result<Recipe, String> {
    let file = parse_dockerfile::parse(text).map_err(|e| format!("Dockerfile: {e}"))?;
    let given: BTreeMap<String, String> = build_args.iter().cloned().collect();
    // Global ARGs (before the first FROM) serve FROM lines.
    let mut global = BTreeMap::new();
    for arg in file.global_args() {
        for (k, v) in pairs(&arg.arguments.value, false)? {
            let value = given.get(&k).cloned().or(v).unwrap_or_default();
            global.insert(k, value);
        }
    }
    let stage = match target {
        Some(t) => file
            .stage(t)
            .ok_or_else(|| format!("target {t:?}: no stage of that name in the Dockerfile"))?,
        None => file
            .stages()
            .last()
            .ok_or_else(|| "Dockerfile: no FROM".to_string())?,
    };
    let image = expand(&stage.from.image.value, &global);
    if image != "scratch" {
        return Err(format!(
            "FROM {image}: the darwin backend builds FROM scratch only (there are no macOS base images to pull)"
        ));
    }
    if let Some(flag) = stage.from.options.first() {
        return Err(format!("FROM --{}: not supported", flag.name.value));
    }
    let total = stage.instructions.len() + 1;
    let mut steps = vec![(format!("STEP 1/{total}: FROM scratch"), Step::Nothing)];
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut workdir = "/".to_string();
    let mut shell = vec!["/bin/sh".to_string(), "-c".to_string()];
    for (i, ins) in stage.instructions.iter().enumerate() {
        let start = ins_start(ins);
        let end = text[start..].find('\n').map_or(text.len(), |e| start + e);
        let raw = &text[start..end];
        let shown: String = raw.lines().next().unwrap_or("").chars().take(200).collect();
        let label = format!("STEP {}/{total}: {}", i + 2, shown.trim());
        let step = match ins {
            Instruction::Arg(a) => {
                for (k, v) in pairs(&a.arguments.value, false)? {
                    let value = given
                        .get(&k)
                        .cloned()
                        .or(v)
                        .or_else(|| global.get(&k).cloned());
                    vars.insert(k, value.unwrap_or_default());
                }
                Step::Nothing
            }
            Instruction::Env(e) => {
                let mut set = Vec::new();
                for (k, v) in pairs(&e.arguments.value, true).map_err(|w| refuse(&label, &w))? {
                    let v = expand(
                        &v.ok_or_else(|| refuse(&label, "ENV needs name=value"))?,
                        &vars,
                    );
                    vars.insert(k.clone(), v.clone());
                    set.push((k, v));
                }
                Step::Env(set)
            }
            Instruction::Label(l) => {
                let mut set = Vec::new();
                for (k, v) in pairs(&l.arguments.value, false).map_err(|w| refuse(&label, &w))? {
                    let v = v.ok_or_else(|| refuse(&label, "LABEL needs name=value"))?;
                    set.push((expand(&k, &vars), expand(&v, &vars)));
                }
                Step::Label(set)
            }
            Instruction::Maintainer(m) => {
                Step::Label(vec![("maintainer".into(), m.name.value.to_string())])
            }
            Instruction::Workdir(w) => {
                workdir = absolute(&expand(&w.arguments.value, &vars), &workdir);
                Step::Workdir(workdir.clone())
            }
            Instruction::User(u) => Step::User(expand(&u.arguments.value, &vars)),
            Instruction::Entrypoint(e) => Step::Entrypoint(command(&label, &e.arguments, &shell)?),
            Instruction::Cmd(c) => Step::Cmd(command(&label, &c.arguments, &shell)?),
            Instruction::Expose(e) => Step::Expose(
                e.arguments
                    .iter()
                    .map(|p| expand(&p.value, &vars))
                    .collect(),
            ),
            Instruction::Stopsignal(s) => Step::StopSignal(expand(&s.arguments.value, &vars)),
            Instruction::Shell(s) => {
                shell = s.arguments.iter().map(|a| a.value.to_string()).collect();
                Step::Shell(shell.clone())
            }
            Instruction::Volume(v) => Step::Volume(match &v.arguments {
                parse_dockerfile::JsonOrStringArray::Json(a) => {
                    a.value.iter().map(|s| expand(&s.value, &vars)).collect()
                }
                parse_dockerfile::JsonOrStringArray::String(a) => {
                    a.iter().map(|s| expand(&s.value, &vars)).collect()
                }
            }),
            Instruction::Run(r) => {
                if let Some(flag) = r.options.first() {
                    return Err(refuse(
                        &label,
                        &format!("RUN --{} is not supported", flag.name.value),
                    ));
                }
                if !r.here_docs.is_empty() {
                    return Err(refuse(&label, "RUN with here-documents is not supported"));
                }
                Step::Run(command(&label, &r.arguments, &shell)?)
            }
            Instruction::Copy(c) => copy_step(
                &label,
                &c.options,
                &c.src,
                &c.dest.value,
                &vars,
                &workdir,
                false,
            )?,
            Instruction::Add(a) => copy_step(
                &label,
                &a.options,
                &a.src,
                &a.dest.value,
                &vars,
                &workdir,
                true,
            )?,
            Instruction::Healthcheck(_) => {
                return Err(refuse(
                    &label,
                    "HEALTHCHECK is a Docker extension OCI images do not carry",
                ));
            }
            Instruction::Onbuild(_) => {
                return Err(refuse(
                    &label,
                    "ONBUILD is a Docker extension OCI images do not carry",
                ));
            }
            Instruction::From(_) => unreachable_from(&label)?,
            _ => return Err(refuse(&label, "not supported by the darwin backend")),
        };
        steps.push((label, step));
    }
    Ok(Recipe { steps })
}

fn unreachable_from(label: &str) -> Result<Step, String> {
    Err(refuse(label, "a FROM inside a stage"))
}

fn ins_start(ins: &Instruction<'_>) -> usize {
    // Where the instruction's keyword starts.
    match ins {
        Instruction::Add(i) => i.add.span.start,
        Instruction::Arg(i) => i.arg.span.start,
        Instruction::Cmd(i) => i.cmd.span.start,
        Instruction::Copy(i) => i.copy.span.start,
        Instruction::Entrypoint(i) => i.entrypoint.span.start,
        Instruction::Env(i) => i.env.span.start,
        Instruction::Expose(i) => i.expose.span.start,
        Instruction::From(i) => i.from.span.start,
        Instruction::Healthcheck(i) => i.healthcheck.span.start,
        Instruction::Label(i) => i.label.span.start,
        Instruction::Maintainer(i) => i.maintainer.span.start,
        Instruction::Onbuild(i) => i.onbuild.span.start,
        Instruction::Run(i) => i.run.span.start,
        Instruction::Shell(i) => i.shell.span.start,
        Instruction::Stopsignal(i) => i.stopsignal.span.start,
        Instruction::User(i) => i.user.span.start,
        Instruction::Volume(i) => i.volume.span.start,
        Instruction::Workdir(i) => i.workdir.span.start,
        _ => 0,
    }
}

#[allow(clippy::too_many_arguments)]
fn copy_step(
    label: &str,
    options: &[parse_dockerfile::Flag<'_>],
    src: &[Source<'_>],
    dest: &str,
    vars: &BTreeMap<String, String>,
    workdir: &str,
    add: bool,
) -> Result<Step, String> {
    let mut chmod = None;
    let mut chown = None;
    for flag in options {
        let value = flag.value.as_ref().map(|v| expand(&v.value, vars));
        match (flag.name.value.as_ref(), value) {
            ("chmod", Some(v)) => {
                chmod = Some(
                    u32::from_str_radix(&v, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| refuse(label, &format!("--chmod={v}: not an octal mode")))?,
                );
            }
            ("chown", Some(v)) => {
                let (u, g) = v.split_once(':').unwrap_or((&v, &v));
                match (u.parse::<u64>(), g.parse::<u64>()) {
                    (Ok(u), Ok(g)) => chown = Some((u, g)),
                    _ => {
                        return Err(refuse(
                            label,
                            &format!(
                                "--chown={v}: only numeric uid[:gid] (no user database in a scratch image)"
                            ),
                        ));
                    }
                }
            }
            (name, _) => {
                return Err(refuse(
                    label,
                    &format!("--{name} is not supported by the darwin backend"),
                ));
            }
        }
    }
    let mut sources = Vec::new();
    for s in src {
        match s {
            Source::Path(p) => {
                let p = expand(&p.value, vars);
                if add && (p.contains("://") || p.starts_with("git@")) {
                    return Err(refuse(
                        label,
                        "ADD from a URL is not supported: fetch it into the context",
                    ));
                }
                if add
                    && [".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst"]
                        .iter()
                        .any(|ext| p.ends_with(ext))
                {
                    return Err(refuse(
                        label,
                        "ADD of an archive (which Docker unpacks) is not supported: unpack it into the context and COPY it",
                    ));
                }
                sources.push(CopySource::Path(p));
            }
            Source::HereDoc(h) => sources.push(CopySource::Inline(if h.expand {
                expand(&h.value, vars)
            } else {
                h.value.to_string()
            })),
            _ => return Err(refuse(label, "a source form this version does not know")),
        }
    }
    let dest = absolute(&expand(dest, vars), workdir);
    Ok(Step::Copy {
        sources,
        dest,
        chmod,
        chown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_variables() {
        let vars = BTreeMap::from([
            ("A".to_string(), "1".to_string()),
            ("E".to_string(), String::new()),
        ]);
        assert_eq!(
            expand("$A-${A}-${B:-x}-${A:+y}-${E:-d}-\\$A", &vars),
            "1-1-x-y-d-$A"
        );
        assert_eq!(expand("cost $5", &vars), "cost ");
        assert_eq!(expand("a$", &vars), "a$");
    }

    #[test]
    fn legacy_env_with_quotes_and_non_ascii_names() {
        assert_eq!(
            pairs("\"é\" x y", true).unwrap(),
            [("é".to_string(), Some("x y".to_string()))]
        );
        assert_eq!(
            pairs("PATH /a b", true).unwrap(),
            [("PATH".to_string(), Some("/a b".to_string()))]
        );
    }

    #[test]
    fn a_copy_only_dockerfile_becomes_steps() {
        let r = recipe(
            "ARG V=1\nFROM scratch\nARG V\nENV APP=/app NAME=\"a b\"\nWORKDIR $APP\nCOPY --chmod=0755 bin/hello ./\nLABEL version=$V\nENTRYPOINT [\"/app/hello\"]\nCMD --help\nUSER 501:20\n",
            &[("V".into(), "2".into())],
            None,
        )
        .unwrap();
        let steps: Vec<&Step> = r.steps.iter().map(|(_, s)| s).collect();
        assert_eq!(r.steps[0].0, "STEP 1/9: FROM scratch");
        assert!(
            r.steps[4]
                .0
                .starts_with("STEP 5/9: COPY --chmod=0755 bin/hello ./")
        );
        assert_eq!(
            steps[2],
            &Step::Env(vec![
                ("APP".into(), "/app".into()),
                ("NAME".into(), "a b".into())
            ])
        );
        assert_eq!(steps[3], &Step::Workdir("/app".into()));
        assert_eq!(
            steps[4],
            &Step::Copy {
                sources: vec![CopySource::Path("bin/hello".into())],
                dest: "/app/./".into(),
                chmod: Some(0o755),
                chown: None
            }
        );
        assert_eq!(steps[5], &Step::Label(vec![("version".into(), "2".into())]));
        assert_eq!(steps[6], &Step::Entrypoint(vec!["/app/hello".into()]));
        assert_eq!(
            steps[7],
            &Step::Cmd(vec!["/bin/sh".into(), "-c".into(), "--help".into()])
        );
        assert_eq!(r.runs_commands(), None);
    }

    #[test]
    fn what_cannot_be_built_is_refused_naming_the_instruction() {
        for (df, want) in [
            (
                "FROM alpine\n",
                "FROM alpine: the darwin backend builds FROM scratch only",
            ),
            (
                "FROM scratch\nCOPY --from=x /a /b\n",
                "COPY --from=x /a /b: --from is not supported",
            ),
            ("FROM scratch\nADD https://x/y /y\n", "ADD from a URL"),
            ("FROM scratch\nADD a.tar.gz /\n", "ADD of an archive"),
            ("FROM scratch\nHEALTHCHECK CMD true\n", "HEALTHCHECK"),
            ("FROM scratch\nCOPY --chown=app a /a\n", "only numeric"),
        ] {
            let err = recipe(df, &[], None).unwrap_err();
            assert!(err.contains(want), "{df:?}: {err}");
        }
        let r = recipe("FROM scratch\nRUN make\n", &[], None).unwrap();
        assert_eq!(r.runs_commands(), Some("STEP 2/2: RUN make"));
        let r = recipe(
            "FROM scratch AS a\nENV X=1\nFROM scratch AS b\nENV Y=2\n",
            &[],
            Some("a"),
        )
        .unwrap();
        assert_eq!(r.steps[1].1, Step::Env(vec![("X".into(), "1".into())]));
    }
}
