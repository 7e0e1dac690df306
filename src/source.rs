//! Materialising a build context: a git checkout or inline files, free of
//! Kubernetes and proto types.
//!
//! The agent in a build Pod calls [`fetch`] before it drives the builder.
//!
//! Git sources run the `git` CLI with a cleared environment (only `PATH`,
//! proxy and CA variables pass through), no system or global configuration,
//! no terminal prompts and `ext::` transports disabled. The remote URL is
//! written to the new repository's configuration rather than passed as an
//! argument, so credentials embedded in it never show in `ps`. Credentials
//! given as [`GitCredentials`] are handed over through files in a private
//! (0700) directory next to the workspace, removed when the fetch ends. The
//! checkout is shallow where the server allows it, submodules and Git LFS
//! objects are not fetched, and the `.git` directory is removed after checkout
//! (as BuildKit does), so neither history nor the remote configuration end up
//! in the build context. URLs and git's messages are redacted before they
//! reach errors or logs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::process::Command;

/// The Dockerfile path inside a git context when none is given.
pub const DEFAULT_DOCKERFILE: &str = "Dockerfile";
/// The file, directly in the workspace, an inline source's Dockerfile is written to.
pub const INLINE_DOCKERFILE: &str = "Dockerfile.inline";
/// The directory, directly in the workspace, an inline source's files are written to.
pub const INLINE_CONTEXT_DIR: &str = "context";
/// The largest number of files an inline source may carry.
pub const MAX_INLINE_FILES: usize = 64;

/// Where a build context comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum Source {
    /// A git repository, checked out at one commit.
    Git {
        /// The remote, in any form `git fetch` accepts except `ext::`
        /// (`https://`, `ssh://`, `git://`, `user@host:path`, local paths).
        url: String,
        /// A branch, tag or commit sha (full, or abbreviated to at least 7
        /// hex digits); the remote's `HEAD` when absent.
        revision: Option<String>,
        /// The build context as a directory of the repository; its root when absent.
        context_dir: Option<String>,
        /// How to authenticate to the remote.
        credentials: Option<GitCredentials>,
    },
    /// A Dockerfile and files given in the resource itself.
    Inline {
        /// The Dockerfile's content.
        dockerfile: String,
        /// Files of the build context: relative path to content.
        files: BTreeMap<String, String>,
    },
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Git {
                url,
                revision,
                context_dir,
                credentials,
            } => f
                .debug_struct("Git")
                .field("url", &redact_url(url))
                .field("revision", revision)
                .field("context_dir", context_dir)
                .field("credentials", credentials)
                .finish(),
            Source::Inline { dockerfile, files } => f
                .debug_struct("Inline")
                .field("dockerfile", dockerfile)
                .field("files", files)
                .finish(),
        }
    }
}

/// Credentials for a git remote. `Debug` never shows the secrets.
#[derive(Clone, PartialEq, Eq)]
pub enum GitCredentials {
    /// HTTP(S) basic authentication (a token goes in `password`), answered
    /// through a `GIT_ASKPASS` script reading environment variables set only
    /// on the git process.
    Basic {
        /// The user name.
        username: String,
        /// The password or token.
        password: String,
    },
    /// An SSH private key, used with `IdentitiesOnly=yes` and `BatchMode=yes`
    /// (a passphrase-protected key therefore fails rather than prompts).
    SshKey {
        /// The private key (OpenSSH or PEM format).
        private_key: String,
        /// `known_hosts` lines for the remote; host keys are checked strictly
        /// against them. When absent the host key is accepted on first use
        /// (`StrictHostKeyChecking=accept-new`), which does not protect
        /// against an impostor server.
        known_hosts: Option<String>,
    },
}

impl fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GitCredentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            GitCredentials::SshKey { known_hosts, .. } => f
                .debug_struct("SshKey")
                .field("private_key", &"<redacted>")
                .field("known_hosts", &known_hosts.as_ref().map(|_| "<given>"))
                .finish(),
        }
    }
}

/// A materialised build context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The build context directory (absolute, canonical).
    pub dir: PathBuf,
    /// The Dockerfile (absolute).
    pub dockerfile: PathBuf,
    /// The commit checked out, as a full sha, for git sources.
    pub revision: Option<String>,
}

/// Why a build context could not be fetched. Messages name the offending
/// field and never contain credentials.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A field is malformed; detected before anything is fetched.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, e.g. `source.inline.files`.
        field: &'static str,
        /// What is wrong, quoting the value.
        message: String,
    },
    /// The workspace is unusable.
    #[error("workspace {}: {message}", path.display())]
    Workspace {
        /// The workspace as given.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The revision does not exist on the remote.
    #[error("source.git.revision: {revision:?} not found in {url}{}", detail(.stderr))]
    RevisionNotFound {
        /// The revision as given.
        revision: String,
        /// The remote, redacted.
        url: String,
        /// git's last lines of error output, redacted.
        stderr: String,
    },
    /// The context directory is missing or unusable.
    #[error("source.git.contextDir: {dir:?} {reason}")]
    ContextDir {
        /// The context directory as given.
        dir: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The Dockerfile is missing or unusable.
    #[error("dockerfile: {path:?} {reason}")]
    Dockerfile {
        /// The Dockerfile path as given.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A git command failed (network, authentication, server errors).
    #[error("source.git: {command} ({url}) failed{}", detail(.stderr))]
    Git {
        /// The git command, e.g. `git fetch`.
        command: String,
        /// The remote, redacted.
        url: String,
        /// git's last lines of error output, redacted.
        stderr: String,
    },
    /// A local file operation (or starting git) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

fn detail(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SourceError {
    let what = what.into();
    move |source| SourceError::Io { what, source }
}

/// Fetches `source` into `workspace` (created if missing; it must be empty or
/// absent) and returns the build context.
///
/// For git sources the repository is checked out into `workspace` itself and
/// `dockerfile` is a path inside the context directory (default
/// [`DEFAULT_DOCKERFILE`]); it must not resolve outside the checkout. A
/// private directory for credentials is created next to `workspace` (in its
/// parent) for the duration of the fetch.
///
/// Inline sources write their files to `workspace/context` and their
/// Dockerfile to `workspace/Dockerfile.inline`, outside the context so that a
/// file named `Dockerfile` does not clash; `dockerfile` is ignored for them.
///
/// Dropping the returned future kills any running git process.
pub async fn fetch(
    source: &Source,
    dockerfile: Option<&str>,
    workspace: &Path,
) -> Result<Context, SourceError> {
    fetch_with(source, dockerfile, workspace, &FetchLimits::default()).await
}

/// Checks a source and Dockerfile path as [`fetch`] does before touching
/// anything: the URL, revision, context directory and Dockerfile path of a
/// git source, the file names of an inline one.
pub fn validate(source: &Source, dockerfile: Option<&str>) -> Result<(), SourceError> {
    match source {
        Source::Git {
            url,
            revision,
            context_dir,
            ..
        } => GitPlan::validate(url, revision.as_deref(), context_dir.as_deref(), dockerfile)
            .map(|_| ()),
        Source::Inline {
            dockerfile: content,
            files,
        } => validate_inline(content, files).map(|_| ()),
    }
}

/// Bounds of a fetch.
#[derive(Debug, Clone)]
pub struct FetchLimits {
    /// The longest one git command may run before it is killed.
    pub git_command_timeout: std::time::Duration,
}

impl Default for FetchLimits {
    fn default() -> Self {
        Self {
            git_command_timeout: GIT_COMMAND_TIMEOUT,
        }
    }
}

/// [`fetch`] with explicit limits.
pub async fn fetch_with(
    source: &Source,
    dockerfile: Option<&str>,
    workspace: &Path,
    limits: &FetchLimits,
) -> Result<Context, SourceError> {
    match source {
        Source::Git {
            url,
            revision,
            context_dir,
            credentials,
        } => {
            let plan =
                GitPlan::validate(url, revision.as_deref(), context_dir.as_deref(), dockerfile)?;
            let workspace = prepare_workspace(workspace).await?;
            fetch_git(&plan, credentials.as_ref(), &workspace, limits).await
        }
        Source::Inline {
            dockerfile: content,
            files,
        } => {
            let files = validate_inline(content, files)?;
            let workspace = prepare_workspace(workspace).await?;
            write_inline(content, &files, &workspace).await
        }
    }
}

/// Creates the workspace or checks it is an empty directory; returns it canonicalised.
async fn prepare_workspace(workspace: &Path) -> Result<PathBuf, SourceError> {
    let fail = |message: String| SourceError::Workspace {
        path: workspace.to_path_buf(),
        message,
    };
    match tokio::fs::read_dir(workspace).await {
        Ok(mut entries) => match entries.next_entry().await {
            Ok(None) => {}
            Ok(Some(_)) => return Err(fail("is not empty".into())),
            Err(e) => return Err(fail(format!("cannot list: {e}"))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tokio::fs::create_dir_all(workspace)
                .await
                .map_err(|e| fail(format!("cannot create: {e}")))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(fail("is not a directory".into()));
        }
        Err(e) => return Err(fail(format!("cannot list: {e}"))),
    }
    tokio::fs::canonicalize(workspace)
        .await
        .map_err(|e| fail(format!("cannot resolve: {e}")))
}

/// Checks that `value` is a relative path without `..` and returns it with
/// `.` components removed (possibly empty).
fn relative_path(field: &'static str, value: &str, within: &str) -> Result<PathBuf, SourceError> {
    let invalid = |message: String| SourceError::Invalid { field, message };
    if value.contains('\0') {
        return Err(invalid(format!("{value:?} contains a NUL byte")));
    }
    let mut out = PathBuf::new();
    for component in Path::new(value).components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(invalid(format!("{value:?} escapes the {within}")));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(invalid(format!(
                    "{value:?} is absolute; give a path relative to the {within}"
                )));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Git

/// A validated git source.
#[derive(Debug)]
struct GitPlan<'a> {
    url: &'a str,
    revision: Option<&'a str>,
    context_dir: Option<(&'a str, PathBuf)>,
    dockerfile: (&'a str, PathBuf),
}

impl<'a> GitPlan<'a> {
    fn validate(
        url: &'a str,
        revision: Option<&'a str>,
        context_dir: Option<&'a str>,
        dockerfile: Option<&'a str>,
    ) -> Result<Self, SourceError> {
        validate_url(url)?;
        if let Some(revision) = revision {
            validate_revision(revision)?;
        }
        let context_dir = match context_dir {
            Some(dir) => {
                let rel = relative_path("source.git.contextDir", dir, "repository")?;
                (!rel.as_os_str().is_empty()).then_some((dir, rel))
            }
            None => None,
        };
        let dockerfile = dockerfile.unwrap_or(DEFAULT_DOCKERFILE);
        let rel = relative_path("dockerfile", dockerfile, "context")?;
        if rel.as_os_str().is_empty() {
            return Err(SourceError::Invalid {
                field: "dockerfile",
                message: format!("{dockerfile:?} names no file"),
            });
        }
        Ok(GitPlan {
            url,
            revision,
            context_dir,
            dockerfile: (dockerfile, rel),
        })
    }
}

fn validate_url(url: &str) -> Result<(), SourceError> {
    let invalid = |message: String| SourceError::Invalid {
        field: "source.git.url",
        message,
    };
    if url.trim().is_empty() {
        return Err(invalid("is empty".into()));
    }
    let shown = redact_url(url);
    if url.chars().any(char::is_control) {
        return Err(invalid(format!("{shown:?} contains control characters")));
    }
    if url.starts_with('-') {
        return Err(invalid(format!("{shown:?} starts with '-'")));
    }
    if url
        .get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("ext::"))
    {
        return Err(invalid(format!(
            "{shown:?}: ext:: transports are not allowed"
        )));
    }
    Ok(())
}

fn validate_revision(revision: &str) -> Result<(), SourceError> {
    let bad = revision.is_empty()
        || revision.starts_with(['-', '+', '/'])
        || revision.ends_with(['/', '.'])
        || revision.contains("..")
        || revision.contains("@{")
        || revision.contains("//")
        || revision
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c));
    if bad {
        return Err(SourceError::Invalid {
            field: "source.git.revision",
            message: format!("{revision:?} is not a valid branch, tag or commit"),
        });
    }
    Ok(())
}

/// Whether `revision` could be a (possibly abbreviated) commit sha.
fn is_sha_like(revision: &str) -> bool {
    (7..=64).contains(&revision.len()) && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// Shows `url` with credentials removed: the whole user-info of non-SSH URLs
/// (a lone user name is often a token), only the password of `ssh://` URLs.
/// scp-like `user@host:path` addresses carry no password and are kept.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let scheme = &url[..scheme_end];
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let shown = if is_ssh_scheme(scheme) {
        match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***"),
            None => userinfo.to_string(),
        }
    } else {
        "***".to_string()
    };
    format!(
        "{scheme}://{shown}@{}{}",
        &authority[at + 1..],
        &rest[authority_end..]
    )
}

/// Splits the credentials out of a clone URL: the URL without its
/// user-info (an `ssh://` URL keeps its user name, which is not a secret),
/// and the user name and password it carried (percent-decoded; for
/// `ssh://`, none: ssh takes no password from a URL). scp-like
/// `user@host:path` addresses are returned as they are.
pub fn split_userinfo(url: &str) -> (String, Option<(String, String)>) {
    let Some(scheme_end) = url.find("://") else {
        return (url.to_string(), None);
    };
    let scheme = &url[..scheme_end];
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return (url.to_string(), None);
    };
    let userinfo = &authority[..at];
    let host_and_path = format!("{}{}", &authority[at + 1..], &rest[authority_end..]);
    if is_ssh_scheme(scheme) {
        let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
        return (format!("{scheme}://{user}@{host_and_path}"), None);
    }
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    (
        format!("{scheme}://{host_and_path}"),
        Some((percent_decode(user), percent_decode(password))),
    )
}

fn is_ssh_scheme(scheme: &str) -> bool {
    ["ssh", "git+ssh", "ssh+git"]
        .iter()
        .any(|s| scheme.eq_ignore_ascii_case(s))
}

/// The secrets an URL carries in its user-info (see [`redact_url`]).
fn url_secrets(url: &str) -> Vec<String> {
    let Some(scheme_end) = url.find("://") else {
        return Vec::new();
    };
    let rest = &url[scheme_end + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let Some(at) = authority.rfind('@') else {
        return Vec::new();
    };
    match authority[..at].split_once(':') {
        Some((_, password)) => vec![password.to_string()],
        None if !is_ssh_scheme(&url[..scheme_end]) => vec![authority[..at].to_string()],
        None => Vec::new(),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes credentials from text git printed.
#[derive(Debug, Default)]
struct Redactor {
    replacements: Vec<(String, String)>,
}

impl Redactor {
    fn new(url: &str, credentials: Option<&GitCredentials>) -> Self {
        let mut replacements = Vec::new();
        let shown = redact_url(url);
        if shown != url {
            replacements.push((url.to_string(), shown));
        }
        let mut secrets = url_secrets(url);
        if let Some(GitCredentials::Basic { password, .. }) = credentials {
            secrets.push(password.clone());
        }
        for secret in secrets {
            let decoded = percent_decode(&secret);
            for s in [secret, decoded] {
                if !s.is_empty() && !replacements.iter().any(|(n, _)| *n == s) {
                    replacements.push((s, "***".to_string()));
                }
            }
        }
        Redactor { replacements }
    }

    fn apply(&self, text: &str) -> String {
        let mut text = text.to_string();
        for (needle, replacement) in &self.replacements {
            text = text.replace(needle.as_str(), replacement);
        }
        text
    }
}

/// The last lines of git's error output, redacted, on one line.
fn stderr_tail(stderr: &[u8], redactor: &Redactor) -> String {
    const LINES: usize = 5;
    const WIDTH: usize = 300;
    let text = redactor.apply(&String::from_utf8_lossy(stderr));
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("hint:"))
        .collect();
    lines[lines.len().saturating_sub(LINES)..]
        .iter()
        .map(|l| match l.char_indices().nth(WIDTH) {
            Some((i, _)) => format!("{}…", &l[..i]),
            None => (*l).to_string(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A directory removed (synchronously) when dropped.
#[derive(Debug)]
struct PrivateDir(PathBuf);

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove git credentials directory");
        }
    }
}

/// Environment variables passed through to git from the agent's environment.
const PASSTHROUGH_ENV: &[&str] = &[
    "PATH",
    "TMPDIR",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "GIT_SSL_CAINFO",
    "GIT_SSL_CAPATH",
];

/// The longest one git command may run: a fetch that has not finished by
/// then is killed. (HTTP transfers also end after a minute below 1 KiB/s,
/// ssh after 30 s without a connection or a minute without an answer.)
pub const GIT_COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// ssh options that bound its waits.
const SSH_DEADLINES: &str =
    "-o ConnectTimeout=30 -o ServerAliveInterval=15 -o ServerAliveCountMax=4";

const ASKPASS_SCRIPT: &str = "#!/bin/sh\n\
# Answers git's credential prompts from variables set on the git process.\n\
case \"$1\" in\n\
  [Uu]sername*) printf '%s\\n' \"$GIT_USERNAME\" ;;\n\
  *) printf '%s\\n' \"$GIT_PASSWORD\" ;;\n\
esac\n";

/// The private directory and environment every git process of one fetch runs with.
#[derive(Debug)]
struct GitEnv {
    dir: PrivateDir,
    vars: Vec<(&'static str, String)>,
}

impl GitEnv {
    /// Creates a 0700 directory in `parent` and writes what `credentials` need into it.
    async fn prepare(
        credentials: Option<&GitCredentials>,
        parent: &Path,
    ) -> Result<GitEnv, SourceError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = parent.join(format!(
            ".tripod-git-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let credentials = credentials.cloned();
        let task_path = path.clone();
        tokio::task::spawn_blocking(move || write_private_dir(&task_path, credentials.as_ref()))
            .await
            .map_err(|e| SourceError::Io {
                what: "preparing git credentials".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }
}

fn write_private_dir(
    path: &Path,
    credentials: Option<&GitCredentials>,
) -> Result<GitEnv, SourceError> {
    use std::io::Write;

    let what = || format!("creating {}", path.display());
    crate::os::create_dir(path, 0o700).map_err(io_error(what()))?;
    let dir = PrivateDir(path.to_path_buf());
    crate::os::set_mode(path, 0o700).map_err(io_error(what()))?;
    let write = |name: &str, content: &str, mode: u32| -> Result<PathBuf, SourceError> {
        let file = path.join(name);
        let what = format!("writing {}", file.display());
        let mut f = crate::os::create_file(&file, mode, true).map_err(io_error(what.clone()))?;
        f.write_all(content.as_bytes())
            .and_then(|()| crate::os::set_mode(&file, mode))
            .map_err(io_error(what))?;
        Ok(file)
    };

    let home = path.display().to_string();
    let mut vars: Vec<(&'static str, String)> = vec![
        ("HOME", home),
        ("LC_ALL", "C".into()),
        ("LANG", "C".into()),
        ("GIT_TERMINAL_PROMPT", "0".into()),
        ("GIT_CONFIG_NOSYSTEM", "1".into()),
        ("GIT_CONFIG_GLOBAL", "/dev/null".into()),
    ];
    let mut askpass = "/bin/false".to_string();
    let mut ssh = format!("ssh -o BatchMode=yes {SSH_DEADLINES}");
    match credentials {
        None => {}
        Some(GitCredentials::Basic { username, password }) => {
            askpass = write("askpass", ASKPASS_SCRIPT, 0o700)?
                .display()
                .to_string();
            vars.push(("GIT_USERNAME", username.clone()));
            vars.push(("GIT_PASSWORD", password.clone()));
        }
        Some(GitCredentials::SshKey {
            private_key,
            known_hosts,
        }) => {
            let mut key = private_key.replace("\r\n", "\n");
            if !key.ends_with('\n') {
                key.push('\n');
            }
            let key = write("id", &key, 0o600)?;
            let (hosts, checking) = match known_hosts {
                Some(lines) => (write("known_hosts", lines, 0o600)?, "yes"),
                None => (path.join("known_hosts"), "accept-new"),
            };
            ssh = format!(
                "ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes {SSH_DEADLINES} -o UserKnownHostsFile={} -o StrictHostKeyChecking={checking}",
                shell_quote(&key.display().to_string()),
                shell_quote(&hosts.display().to_string()),
            );
        }
    }
    vars.push(("GIT_ASKPASS", askpass));
    vars.push(("GIT_SSH_COMMAND", ssh));
    Ok(GitEnv { dir, vars })
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The output of one git command; `stderr` is redacted.
struct GitOutput {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs git in one repository with one environment.
struct Git<'a> {
    repo: &'a Path,
    env: &'a GitEnv,
    redactor: &'a Redactor,
    url: String,
    timeout: std::time::Duration,
}

impl Git<'_> {
    async fn run(&self, args: &[&str]) -> Result<GitOutput, SourceError> {
        tracing::debug!(?args, repo = %self.repo.display(), "git");
        let mut cmd = Command::new("git");
        cmd.env_clear();
        for name in PASSTHROUGH_ENV {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        if std::env::var_os("PATH").is_none() {
            cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin");
        }
        cmd.envs(self.env.vars.iter().map(|(k, v)| (*k, v.as_str())));
        cmd.current_dir(self.repo)
            .args([
                "-c",
                "credential.helper=",
                "-c",
                "protocol.ext.allow=never",
                "-c",
                "core.hooksPath=/dev/null",
                "-c",
                "submodule.recurse=false",
                "-c",
                "fetch.recurseSubmodules=false",
                "-c",
                "gc.auto=0",
                "-c",
                "maintenance.auto=false",
                "-c",
                "advice.detachedHead=false",
                "-c",
                "init.defaultBranch=tripod",
                // A transfer slower than 1 KiB/s for a minute is a stall.
                "-c",
                "http.lowSpeedLimit=1024",
                "-c",
                "http.lowSpeedTime=60",
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let output = tokio::time::timeout(self.timeout, cmd.output())
            .await
            .map_err(|_| SourceError::Git {
                command: format!("git {}", args.first().copied().unwrap_or_default()),
                url: self.url.clone(),
                stderr: format!(
                    "no result within {}s (the process was killed)",
                    self.timeout.as_secs()
                ),
            })?
            .map_err(io_error("source.git: cannot run git"))?;
        Ok(GitOutput {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).trim().to_string(),
            stderr: stderr_tail(&output.stderr, self.redactor),
        })
    }

    /// Runs git and fails unless it succeeds; returns its stdout.
    async fn check(&self, args: &[&str]) -> Result<String, SourceError> {
        let out = self.run(args).await?;
        if out.success {
            Ok(out.stdout)
        } else {
            Err(self.failed(args, out.stderr))
        }
    }

    fn failed(&self, args: &[&str], stderr: String) -> SourceError {
        SourceError::Git {
            command: format!("git {}", args.first().copied().unwrap_or_default()),
            url: self.url.clone(),
            stderr,
        }
    }
}

/// Escapes a value for a double-quoted git config string.
fn config_quote(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', r"\\").replace('"', "\\\""))
}

async fn fetch_git(
    plan: &GitPlan<'_>,
    credentials: Option<&GitCredentials>,
    workspace: &Path,
    limits: &FetchLimits,
) -> Result<Context, SourceError> {
    let result = fetch_git_into(plan, credentials, workspace, limits).await;
    if result.is_err() {
        // The repository configuration holds the URL, maybe with credentials.
        let _ = tokio::fs::remove_dir_all(workspace.join(".git")).await;
    }
    result
}

async fn fetch_git_into(
    plan: &GitPlan<'_>,
    credentials: Option<&GitCredentials>,
    workspace: &Path,
    limits: &FetchLimits,
) -> Result<Context, SourceError> {
    let started = std::time::Instant::now();
    let redactor = Redactor::new(plan.url, credentials);
    let shown_url = redact_url(plan.url);
    tracing::info!(url = %shown_url, revision = plan.revision.unwrap_or("HEAD"), "fetching git source");
    let parent = workspace.parent().unwrap_or(workspace);
    let env = GitEnv::prepare(credentials, parent).await?;
    tracing::debug!(dir = %env.dir.0.display(), "private git directory");
    let git = Git {
        repo: workspace,
        env: &env,
        redactor: &redactor,
        url: shown_url.clone(),
        timeout: limits.git_command_timeout,
    };

    git.check(&["init", "-q", "--template="]).await?;
    // The URL goes into the configuration file, not on a command line.
    let config = workspace.join(".git").join("config");
    let mut text = tokio::fs::read_to_string(&config)
        .await
        .map_err(io_error(format!("reading {}", config.display())))?;
    text.push_str(&format!(
        "[remote \"origin\"]\n\turl = {}\n",
        config_quote(plan.url)
    ));
    tokio::fs::write(&config, text)
        .await
        .map_err(io_error(format!("writing {}", config.display())))?;

    let commit = match plan.revision {
        None => {
            git.check(&["fetch", "--depth", "1", "--no-tags", "origin", "HEAD"])
                .await?;
            git.check(&["rev-parse", "--verify", "FETCH_HEAD^{commit}"])
                .await?
        }
        Some(revision) => {
            let fetch = [
                "fetch",
                "--depth",
                "1",
                "--no-tags",
                "origin",
                "--",
                revision,
            ];
            let shallow = git.run(&fetch).await?;
            let not_found = |stderr: String| SourceError::RevisionNotFound {
                revision: revision.to_string(),
                url: shown_url.clone(),
                stderr,
            };
            if shallow.success {
                git.check(&["rev-parse", "--verify", "FETCH_HEAD^{commit}"])
                    .await?
            } else if is_sha_like(revision) {
                // Abbreviated shas cannot be fetched directly, and some
                // servers refuse unadvertised full shas: fetch all branches
                // and tags and look the commit up locally.
                tracing::debug!(stderr = %shallow.stderr, "shallow fetch by sha failed, fetching all branches and tags");
                git.check(&[
                    "fetch",
                    "--no-tags",
                    "origin",
                    "--",
                    "+refs/heads/*:refs/remotes/origin/*",
                    "+refs/tags/*:refs/tags/*",
                ])
                .await?;
                let spec = format!("{revision}^{{commit}}");
                let found = git.run(&["rev-parse", "--verify", &spec]).await?;
                if !found.success {
                    // "Needed a single revision" only restates "not found";
                    // other messages (an ambiguous abbreviation) are kept.
                    let stderr = if found.stderr.ends_with("Needed a single revision") {
                        String::new()
                    } else {
                        found.stderr
                    };
                    return Err(not_found(stderr));
                }
                found.stdout
            } else if shallow.stderr.contains("couldn't find remote ref") {
                return Err(not_found(shallow.stderr));
            } else {
                return Err(git.failed(&fetch, shallow.stderr));
            }
        }
    };
    git.check(&["checkout", "-q", "--detach", &commit, "--"])
        .await?;
    let head = git.check(&["rev-parse", "--verify", "HEAD"]).await?;
    drop(env);

    let dot_git = workspace.join(".git");
    tokio::fs::remove_dir_all(&dot_git)
        .await
        .map_err(io_error(format!("removing {}", dot_git.display())))?;

    let dir = match &plan.context_dir {
        None => workspace.to_path_buf(),
        Some((raw, rel)) => resolve_context_dir(workspace, raw, rel).await?,
    };
    let (raw_df, rel_df) = &plan.dockerfile;
    let dockerfile = dir.join(rel_df);
    match tokio::fs::canonicalize(&dockerfile).await {
        Ok(real) if !real.starts_with(workspace) => {
            return Err(SourceError::Dockerfile {
                path: raw_df.to_string(),
                reason: "resolves outside the repository",
            });
        }
        Ok(real) if !real.is_file() => {
            return Err(SourceError::Dockerfile {
                path: raw_df.to_string(),
                reason: "is not a regular file",
            });
        }
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Err(SourceError::Dockerfile {
                path: raw_df.to_string(),
                reason: "not found in the context",
            });
        }
        Err(e) => return Err(io_error(format!("resolving {}", dockerfile.display()))(e)),
    }
    tracing::info!(url = %shown_url, commit = %head, elapsed_ms = started.elapsed().as_millis() as u64, "git source fetched");
    Ok(Context {
        dir,
        dockerfile,
        revision: Some(head),
    })
}

async fn resolve_context_dir(root: &Path, raw: &str, rel: &Path) -> Result<PathBuf, SourceError> {
    let fail = |reason| SourceError::ContextDir {
        dir: raw.to_string(),
        reason,
    };
    let joined = root.join(rel);
    match tokio::fs::canonicalize(&joined).await {
        Ok(real) if !real.starts_with(root) => Err(fail("resolves outside the repository")),
        Ok(real) if real.is_dir() => Ok(real),
        Ok(_) => Err(fail("is not a directory in the repository")),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            Err(fail("is not a directory in the repository"))
        }
        Err(e) => Err(io_error(format!("resolving {}", joined.display()))(e)),
    }
}

// ---------------------------------------------------------------------------
// Inline

fn validate_inline(
    dockerfile: &str,
    files: &BTreeMap<String, String>,
) -> Result<Vec<(PathBuf, String)>, SourceError> {
    const FIELD: &str = "source.inline.files";
    if dockerfile.trim().is_empty() {
        return Err(SourceError::Invalid {
            field: "source.inline.dockerfile",
            message: "is empty".into(),
        });
    }
    if files.len() > MAX_INLINE_FILES {
        return Err(SourceError::Invalid {
            field: FIELD,
            message: format!("{} files, at most {MAX_INLINE_FILES}", files.len()),
        });
    }
    let mut out: Vec<(PathBuf, String)> = Vec::with_capacity(files.len());
    for (name, content) in files {
        let rel = relative_path(FIELD, name, "context")?;
        if rel.as_os_str().is_empty() {
            return Err(SourceError::Invalid {
                field: FIELD,
                message: format!("{name:?} names no file"),
            });
        }
        for (other, _) in &out {
            let clash = if *other == rel {
                "names the same file as another entry"
            } else if rel.starts_with(other) || other.starts_with(&rel) {
                "is both a file and a directory"
            } else {
                continue;
            };
            return Err(SourceError::Invalid {
                field: FIELD,
                message: format!("{name:?} {clash}"),
            });
        }
        out.push((rel, content.clone()));
    }
    Ok(out)
}

async fn write_inline(
    dockerfile: &str,
    files: &[(PathBuf, String)],
    workspace: &Path,
) -> Result<Context, SourceError> {
    let dir = workspace.join(INLINE_CONTEXT_DIR);
    tokio::fs::create_dir(&dir)
        .await
        .map_err(io_error(format!("creating {}", dir.display())))?;
    for (rel, content) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io_error(format!("creating {}", parent.display())))?;
        }
        tokio::fs::write(&path, content)
            .await
            .map_err(io_error(format!("writing {}", path.display())))?;
    }
    let path = workspace.join(INLINE_DOCKERFILE);
    tokio::fs::write(&path, dockerfile)
        .await
        .map_err(io_error(format!("writing {}", path.display())))?;
    tracing::info!(files = files.len(), dir = %dir.display(), "inline source written");
    Ok(Context {
        dir,
        dockerfile: path,
        revision: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_split_out_of_clone_urls() {
        assert_eq!(
            split_userinfo("https://bot:s%40cret@git.example/r.git"),
            (
                "https://git.example/r.git".to_string(),
                Some(("bot".to_string(), "s@cret".to_string()))
            )
        );
        assert_eq!(
            split_userinfo("https://TOKEN@git.example:8443/r.git?x=a@b"),
            (
                "https://git.example:8443/r.git?x=a@b".to_string(),
                Some(("TOKEN".to_string(), String::new()))
            )
        );
        assert_eq!(
            split_userinfo("ssh://git:pw@git.example/r.git"),
            ("ssh://git@git.example/r.git".to_string(), None)
        );
        for plain in [
            "https://git.example/r.git",
            "git@git.example:r.git",
            "/srv/r.git",
        ] {
            assert_eq!(split_userinfo(plain), (plain.to_string(), None));
        }
    }
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tripod-source-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    fn var<'a>(env: &'a GitEnv, name: &str) -> Option<&'a str> {
        env.vars
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn redacts_urls() {
        let cases = [
            (
                "https://user:pw@example.com/r.git",
                "https://***@example.com/r.git",
            ),
            (
                "https://token@example.com/r.git",
                "https://***@example.com/r.git",
            ),
            ("https://example.com/r.git", "https://example.com/r.git"),
            ("https://example.com/a@b", "https://example.com/a@b"),
            (
                "ssh://git:pw@example.com/r.git",
                "ssh://git:***@example.com/r.git",
            ),
            ("ssh://git@example.com/r.git", "ssh://git@example.com/r.git"),
            ("git@example.com:org/r.git", "git@example.com:org/r.git"),
            ("http://u:p@h", "http://***@h"),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn redactor_removes_url_and_password_from_git_output() {
        let creds = GitCredentials::Basic {
            username: "bob".into(),
            password: "hunter2".into(),
        };
        let r = Redactor::new("https://alice:p%40ss@example.com/r.git", Some(&creds));
        let out = r.apply(
            "fatal: unable to access 'https://alice:p%40ss@example.com/r.git/': p@ss hunter2 p%40ss",
        );
        assert!(
            !out.contains("hunter2") && !out.contains("p@ss") && !out.contains("p%40ss"),
            "{out}"
        );
        assert!(out.contains("https://***@example.com/r.git"), "{out}");
        let tail = stderr_tail(b"hint: x\n\nremote: a\nfatal: hunter2 rejected\n", &r);
        assert_eq!(tail, "remote: a; fatal: *** rejected");
    }

    #[test]
    fn errors_show_redacted_url() {
        let err = SourceError::Git {
            command: "git fetch".into(),
            url: redact_url("https://u:secret@example.com/r.git"),
            stderr: String::new(),
        };
        let msg = err.to_string();
        assert!(!msg.contains("secret"), "{msg}");
        assert_eq!(
            msg,
            "source.git: git fetch (https://***@example.com/r.git) failed"
        );
        let src = Source::Git {
            url: "https://u:secret@example.com/r.git".into(),
            revision: None,
            context_dir: None,
            credentials: Some(GitCredentials::Basic {
                username: "u".into(),
                password: "secret2".into(),
            }),
        };
        let debug = format!("{src:?}");
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[tokio::test]
    async fn askpass_script_and_env() {
        let parent = scratch("askpass");
        let creds = GitCredentials::Basic {
            username: "bob".into(),
            password: "s3cr'et $x".into(),
        };
        let env = GitEnv::prepare(Some(&creds), &parent)
            .await
            .expect("prepare");
        let dir = env.dir.0.clone();
        assert!(dir.starts_with(&parent));
        assert_eq!(mode(&dir), 0o700);
        let script = PathBuf::from(var(&env, "GIT_ASKPASS").expect("GIT_ASKPASS"));
        assert!(script.starts_with(&dir));
        assert_eq!(mode(&script), 0o700);
        let text = std::fs::read_to_string(&script).expect("script");
        assert!(!text.contains("s3cr") && !text.contains("bob"), "{text}");
        assert_eq!(var(&env, "GIT_USERNAME"), Some("bob"));
        assert_eq!(var(&env, "GIT_PASSWORD"), Some("s3cr'et $x"));
        assert_eq!(var(&env, "GIT_TERMINAL_PROMPT"), Some("0"));
        for (prompt, want) in [
            ("Username for 'https://example.com': ", "bob\n"),
            ("Password for 'https://bob@example.com': ", "s3cr'et $x\n"),
        ] {
            let out = std::process::Command::new(&script)
                .arg(prompt)
                .env_clear()
                .envs(env.vars.iter().map(|(k, v)| (*k, v.as_str())))
                .output()
                .expect("run askpass");
            assert!(out.status.success());
            assert_eq!(String::from_utf8_lossy(&out.stdout), want);
        }
        drop(env);
        assert!(!dir.exists(), "private dir removed");
        let _ = std::fs::remove_dir_all(&parent);
    }

    #[tokio::test]
    async fn no_credentials_disable_prompts() {
        let parent = scratch("nocreds");
        let env = GitEnv::prepare(None, &parent).await.expect("prepare");
        assert_eq!(var(&env, "GIT_ASKPASS"), Some("/bin/false"));
        assert_eq!(var(&env, "GIT_USERNAME"), None);
        let plain = format!("ssh -o BatchMode=yes {SSH_DEADLINES}");
        assert_eq!(var(&env, "GIT_SSH_COMMAND"), Some(plain.as_str()));
        drop(env);
        let _ = std::fs::remove_dir_all(&parent);
    }

    #[tokio::test]
    async fn ssh_key_files_and_command() {
        let parent = scratch("ssh dir");
        let creds = GitCredentials::SshKey {
            private_key: "-----BEGIN KEY-----\r\nabc\r\n-----END KEY-----".into(),
            known_hosts: Some("example.com ssh-ed25519 AAAA\n".into()),
        };
        let env = GitEnv::prepare(Some(&creds), &parent)
            .await
            .expect("prepare");
        let dir = env.dir.0.clone();
        let key = dir.join("id");
        assert_eq!(mode(&key), 0o600);
        assert_eq!(
            std::fs::read_to_string(&key).expect("key"),
            "-----BEGIN KEY-----\nabc\n-----END KEY-----\n"
        );
        let ssh = var(&env, "GIT_SSH_COMMAND").expect("ssh");
        assert_eq!(
            ssh,
            format!(
                "ssh -i '{}' -o IdentitiesOnly=yes -o BatchMode=yes {SSH_DEADLINES} -o UserKnownHostsFile='{}' -o StrictHostKeyChecking=yes",
                key.display(),
                dir.join("known_hosts").display()
            )
        );
        assert_eq!(var(&env, "GIT_ASKPASS"), Some("/bin/false"));
        drop(env);

        let creds = GitCredentials::SshKey {
            private_key: "k".into(),
            known_hosts: None,
        };
        let env = GitEnv::prepare(Some(&creds), &parent)
            .await
            .expect("prepare");
        let ssh = var(&env, "GIT_SSH_COMMAND").expect("ssh");
        assert!(ssh.ends_with("StrictHostKeyChecking=accept-new"), "{ssh}");
        assert!(!env.dir.0.join("known_hosts").exists());
        assert!(!format!("{creds:?}").contains("\"k\""));
        drop(env);
        let _ = std::fs::remove_dir_all(&parent);
    }

    #[test]
    fn validates_git_fields() {
        let plan = GitPlan::validate("git://h/r", Some("main"), Some("./app/"), None).expect("ok");
        assert_eq!(plan.context_dir.map(|(_, p)| p), Some(PathBuf::from("app")));
        assert_eq!(plan.dockerfile.1, PathBuf::from("Dockerfile"));
        let root =
            GitPlan::validate("git://h/r", None, Some("."), Some("a/Dockerfile")).expect("ok");
        assert!(root.context_dir.is_none());

        let err = |url, rev: Option<&str>, dir: Option<&str>, df: Option<&str>| {
            GitPlan::validate(url, rev, dir, df)
                .expect_err("invalid")
                .to_string()
        };
        assert!(err("", None, None, None).starts_with("source.git.url: "));
        assert!(err("ext::sh -c x", None, None, None).contains("ext::"));
        assert!(err("-oProxyCommand=x", None, None, None).starts_with("source.git.url"));
        for rev in ["-x", "+main", "a:b", "a b", "a..b", "x^{tree}", "a~1", ""] {
            assert!(
                err("git://h/r", Some(rev), None, None).starts_with("source.git.revision: "),
                "{rev}"
            );
        }
        assert_eq!(
            err("git://h/r", None, Some("../x"), None),
            "source.git.contextDir: \"../x\" escapes the repository"
        );
        assert!(err("git://h/r", None, Some("/abs"), None).contains("is absolute"));
        assert_eq!(
            err("git://h/r", None, None, Some("../Dockerfile")),
            "dockerfile: \"../Dockerfile\" escapes the context"
        );
        assert!(err("git://h/r", None, None, Some(".")).starts_with("dockerfile: "));
    }

    #[test]
    fn sha_like() {
        assert!(is_sha_like("abcdef1"));
        assert!(is_sha_like(&"a".repeat(40)));
        assert!(!is_sha_like("abcdef"));
        assert!(!is_sha_like("feature"));
    }

    #[test]
    fn validates_inline_files() {
        let files = |names: &[&str]| -> BTreeMap<String, String> {
            names
                .iter()
                .map(|n| (n.to_string(), String::new()))
                .collect()
        };
        let err = |names: &[&str]| {
            validate_inline("FROM x", &files(names))
                .expect_err("invalid")
                .to_string()
        };
        assert_eq!(
            err(&["../x"]),
            "source.inline.files: \"../x\" escapes the context"
        );
        assert_eq!(
            err(&["a/../../x"]),
            "source.inline.files: \"a/../../x\" escapes the context"
        );
        assert!(err(&["/etc/passwd"]).contains("is absolute"));
        assert!(err(&["."]).contains("names no file"));
        assert!(err(&["a", "a/b"]).contains("both a file and a directory"));
        assert!(err(&["a", "./a"]).contains("same file"));
        let many: Vec<String> = (0..=MAX_INLINE_FILES).map(|i| format!("f{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(err(&many).contains("at most 64"));
        assert!(
            validate_inline(" \n", &BTreeMap::new())
                .expect_err("empty")
                .to_string()
                .starts_with("source.inline.dockerfile")
        );
        let ok = validate_inline("FROM x", &files(&["Dockerfile", "./a/b.txt"])).expect("ok");
        // Sorted by name as given: "./a/b.txt" < "Dockerfile".
        assert_eq!(ok[0].0, PathBuf::from("a/b.txt"));
        assert_eq!(ok[1].0, PathBuf::from("Dockerfile"));
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
        assert_eq!(config_quote(r#"https://h/a"b\c"#), r#""https://h/a\"b\\c""#);
    }
}
