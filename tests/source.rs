//! `tripod::source` against a real git: a bare repository served by
//! `git daemon` on loopback (one daemon per test, killed when the test ends),
//! a fake HTTP server for basic credentials, and inline sources.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tripod::source::{Context, GitCredentials, Source, SourceError, fetch};

static SEQ: AtomicU32 = AtomicU32::new(0);

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Tripod")
        .env("GIT_AUTHOR_EMAIL", "tripod@example.com")
        .env("GIT_COMMITTER_NAME", "Tripod")
        .env("GIT_COMMITTER_EMAIL", "tripod@example.com")
        .args(["-c", "init.defaultBranch=main"])
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tripod-source-test-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// A bare repository served by `git daemon`; the daemon is killed and the
/// directory removed on drop.
///
/// `main` has two commits (tag `v1` on the first), `feature` one more. Files:
/// `Dockerfile`, `app/Dockerfile`, `app/hello.txt` (`one`, `two`, `feature`)
/// and, from the second commit, a symlink `outside` -> `/etc`.
struct Fixture {
    dir: PathBuf,
    child: Child,
    url: String,
    first: String,
    main: String,
    feature: String,
}

impl Fixture {
    fn start() -> Fixture {
        let started = Instant::now();
        let dir = scratch();
        let work = dir.join("work");
        std::fs::create_dir_all(work.join("app")).expect("work dir");
        git(&work, &["init", "-q"]);
        std::fs::write(work.join("Dockerfile"), "FROM scratch\nCOPY app /\n").expect("write");
        std::fs::write(
            work.join("app/Dockerfile"),
            "FROM scratch\nCOPY hello.txt /\n",
        )
        .expect("write");
        std::fs::write(work.join("app/hello.txt"), "one\n").expect("write");
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", "one"]);
        git(&work, &["tag", "-a", "v1", "-m", "version 1"]);
        let first = git(&work, &["rev-parse", "HEAD"]);
        std::fs::write(work.join("app/hello.txt"), "two\n").expect("write");
        std::os::unix::fs::symlink("/etc", work.join("outside")).expect("symlink");
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", "two"]);
        let main = git(&work, &["rev-parse", "HEAD"]);
        git(&work, &["checkout", "-q", "-b", "feature"]);
        std::fs::write(work.join("app/hello.txt"), "feature\n").expect("write");
        git(&work, &["commit", "-q", "-am", "feature"]);
        let feature = git(&work, &["rev-parse", "HEAD"]);
        git(&work, &["checkout", "-q", "main"]);
        git(&dir, &["clone", "-q", "--bare", "work", "repo.git"]);

        let port = free_port();
        let base = dir.display().to_string();
        // The daemon binary itself, not the `git daemon` wrapper, whose
        // child would outlive a kill of the wrapper.
        let exec_path = Command::new("git")
            .arg("--exec-path")
            .output()
            .expect("git --exec-path");
        let daemon = std::path::Path::new(String::from_utf8_lossy(&exec_path.stdout).trim())
            .join("git-daemon");
        let child = tripod_harness::supervised_command(&daemon)
            .args([
                "--reuseaddr",
                &format!("--base-path={base}"),
                "--export-all",
                "--listen=127.0.0.1",
                &format!("--port={port}"),
                &base,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon");
        let mut fixture = Fixture {
            dir,
            child,
            url: format!("git://127.0.0.1:{port}/repo.git"),
            first,
            main,
            feature,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = fixture.child.try_wait() {
                panic!("git daemon exited: {status}");
            }
            assert!(Instant::now() < deadline, "git daemon did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("fixture ready in {:?}", started.elapsed());
        fixture
    }

    fn source(&self, revision: Option<&str>, context_dir: Option<&str>) -> Source {
        Source::Git {
            url: self.url.clone(),
            revision: revision.map(str::to_string),
            context_dir: context_dir.map(str::to_string),
            credentials: None,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read(ctx: &Context, rel: &str) -> String {
    std::fs::read_to_string(ctx.dir.join(rel)).expect("read context file")
}

async fn fetch_ok(source: &Source, dockerfile: Option<&str>) -> (Context, PathBuf) {
    let parent = scratch();
    let workspace = parent.join("ws");
    let started = Instant::now();
    let ctx = fetch(source, dockerfile, &workspace)
        .await
        .unwrap_or_else(|e| panic!("fetch {source:?}: {e}"));
    eprintln!("fetch {source:?}: {:?}", started.elapsed());
    assert!(!workspace.join(".git").exists(), ".git removed");
    assert_private_dir_removed(&parent);
    (ctx, parent)
}

async fn fetch_err(source: &Source, dockerfile: Option<&str>) -> SourceError {
    let parent = scratch();
    let err = fetch(source, dockerfile, &parent.join("ws"))
        .await
        .expect_err("fetch should fail");
    eprintln!("fetch {source:?}: {err}");
    assert_private_dir_removed(&parent);
    assert!(!parent.join("ws/.git").exists(), ".git removed on error");
    let _ = std::fs::remove_dir_all(&parent);
    err
}

fn assert_private_dir_removed(parent: &Path) {
    let names: Vec<String> = std::fs::read_dir(parent)
        .expect("list parent")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".tripod-git")),
        "credentials directory left behind: {names:?}"
    );
}

#[tokio::test]
async fn default_head() {
    let repo = Fixture::start();
    let (ctx, parent) = fetch_ok(&repo.source(None, None), None).await;
    assert_eq!(ctx.revision.as_deref(), Some(repo.main.as_str()));
    assert_eq!(read(&ctx, "app/hello.txt"), "two\n");
    assert_eq!(
        ctx.dir,
        parent.join("ws").canonicalize().expect("canonical")
    );
    assert_eq!(ctx.dockerfile, ctx.dir.join("Dockerfile"));
    assert!(ctx.dockerfile.is_absolute() && ctx.dockerfile.is_file());
    let _ = std::fs::remove_dir_all(parent);
}

#[tokio::test]
async fn branch_tag_and_shas() {
    let repo = Fixture::start();
    let abbreviated = &repo.first[..8];
    let cases = [
        ("feature", "feature\n", repo.feature.as_str()),
        ("main", "two\n", repo.main.as_str()),
        ("v1", "one\n", repo.first.as_str()),
        (repo.first.as_str(), "one\n", repo.first.as_str()),
        (abbreviated, "one\n", repo.first.as_str()),
    ];
    for (revision, hello, commit) in cases {
        let (ctx, parent) = fetch_ok(&repo.source(Some(revision), None), None).await;
        assert_eq!(read(&ctx, "app/hello.txt"), hello, "{revision}");
        assert_eq!(ctx.revision.as_deref(), Some(commit), "{revision}");
        let _ = std::fs::remove_dir_all(parent);
    }
}

#[tokio::test]
async fn context_dir_and_dockerfile() {
    let repo = Fixture::start();
    let (ctx, parent) = fetch_ok(&repo.source(Some("v1"), Some("app")), None).await;
    let ws = parent.join("ws").canonicalize().expect("canonical");
    assert_eq!(ctx.dir, ws.join("app"));
    assert_eq!(ctx.dockerfile, ws.join("app/Dockerfile"));
    assert_eq!(read(&ctx, "hello.txt"), "one\n");
    let _ = std::fs::remove_dir_all(parent);

    // A Dockerfile elsewhere in the context.
    let (ctx, parent) = fetch_ok(&repo.source(None, None), Some("app/Dockerfile")).await;
    assert_eq!(ctx.dockerfile, ctx.dir.join("app/Dockerfile"));
    let _ = std::fs::remove_dir_all(parent);
}

#[tokio::test]
async fn missing_revision_context_dir_and_dockerfile() {
    let repo = Fixture::start();

    let err = fetch_err(&repo.source(Some("v9"), None), None).await;
    let msg = err.to_string();
    assert!(
        matches!(err, SourceError::RevisionNotFound { .. }),
        "{err:?}"
    );
    assert!(
        msg.starts_with(&format!(
            "source.git.revision: \"v9\" not found in {}",
            repo.url
        )),
        "{msg}"
    );
    assert!(
        msg.contains("couldn't find remote ref"),
        "git's stderr: {msg}"
    );

    // Hex-looking, so it goes through the full fetch fallback.
    let err = fetch_err(&repo.source(Some("deadbeef42"), None), None).await;
    assert!(
        matches!(err, SourceError::RevisionNotFound { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "source.git.revision: \"deadbeef42\" not found in {}",
            repo.url
        )
    );

    let err = fetch_err(&repo.source(None, Some("nope")), None).await;
    assert_eq!(
        err.to_string(),
        "source.git.contextDir: \"nope\" is not a directory in the repository"
    );
    let err = fetch_err(&repo.source(None, Some("app/hello.txt")), None).await;
    assert!(
        err.to_string().starts_with("source.git.contextDir: "),
        "{err}"
    );

    let err = fetch_err(&repo.source(None, Some("app")), Some("sub/Dockerfile")).await;
    assert_eq!(
        err.to_string(),
        "dockerfile: \"sub/Dockerfile\" not found in the context"
    );
}

#[tokio::test]
async fn symlinked_context_dir_cannot_escape() {
    let repo = Fixture::start();
    let err = fetch_err(&repo.source(None, Some("outside")), None).await;
    assert_eq!(
        err.to_string(),
        "source.git.contextDir: \"outside\" resolves outside the repository"
    );
    let err = fetch_err(&repo.source(None, None), Some("outside/passwd")).await;
    assert_eq!(
        err.to_string(),
        "dockerfile: \"outside/passwd\" resolves outside the repository"
    );
}

#[tokio::test]
async fn unreachable_remote_and_busy_workspace() {
    let url = format!("git://127.0.0.1:{}/repo.git", free_port());
    let source = Source::Git {
        url: url.clone(),
        revision: Some("main".into()),
        context_dir: None,
        credentials: None,
    };
    let err = fetch_err(&source, None).await;
    assert!(matches!(err, SourceError::Git { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("source.git: git fetch ({url}) failed: ")),
        "{err}"
    );

    let parent = scratch();
    std::fs::create_dir_all(parent.join("ws")).expect("ws");
    std::fs::write(parent.join("ws/leftover"), "x").expect("leftover");
    let err = fetch(&source, None, &parent.join("ws"))
        .await
        .expect_err("busy workspace");
    assert!(err.to_string().ends_with("is not empty"), "{err}");
    let _ = std::fs::remove_dir_all(parent);
}

// --- Basic credentials against a fake HTTP server -------------------------

/// Answers 401 to requests without credentials and 404 to the others,
/// recording the `Authorization` headers it sees.
fn fake_http() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let request = String::from_utf8_lossy(&request).into_owned();
            let auth = request.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("authorization")
                    .then(|| value.trim().to_string())
            });
            let response = match auth {
                Some(auth) => {
                    record.lock().expect("lock").push(auth);
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                }
                None => {
                    "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"tripod\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                }
            };
            let _ = stream.write_all(response.as_bytes());
        }
    });
    (port, seen)
}

fn base64(input: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(input)
}

#[tokio::test]
async fn basic_credentials_go_through_askpass() {
    let (port, seen) = fake_http();
    let url = format!("http://127.0.0.1:{port}/repo.git");
    let source = Source::Git {
        url: url.clone(),
        revision: None,
        context_dir: None,
        credentials: Some(GitCredentials::Basic {
            username: "robot".into(),
            password: "s3cret-t0ken".into(),
        }),
    };
    let err = fetch_err(&source, None).await;
    let msg = err.to_string();
    assert!(matches!(err, SourceError::Git { .. }), "{err:?}");
    assert!(!msg.contains("s3cret"), "{msg}");
    assert!(msg.contains(&url), "{msg}");
    let want = format!("Basic {}", base64(b"robot:s3cret-t0ken"));
    assert!(
        seen.lock().expect("lock").contains(&want),
        "server saw {:?}",
        seen.lock().expect("lock")
    );
}

#[tokio::test]
async fn credentials_in_url_are_redacted() {
    let (port, seen) = fake_http();
    let source = Source::Git {
        url: format!("http://robot:pa55word@127.0.0.1:{port}/repo.git"),
        revision: Some("main".into()),
        context_dir: None,
        credentials: None,
    };
    let err = fetch_err(&source, None).await;
    let msg = err.to_string();
    assert!(!msg.contains("pa55word") && !msg.contains("robot"), "{msg}");
    assert!(
        msg.contains(&format!("http://***@127.0.0.1:{port}/repo.git")),
        "{msg}"
    );
    assert!(!format!("{source:?}").contains("pa55word"));
    let want = format!("Basic {}", base64(b"robot:pa55word"));
    assert!(seen.lock().expect("lock").contains(&want));
}

#[tokio::test]
async fn without_credentials_git_does_not_prompt() {
    let (port, seen) = fake_http();
    let source = Source::Git {
        url: format!("http://127.0.0.1:{port}/repo.git"),
        revision: None,
        context_dir: None,
        credentials: None,
    };
    let started = Instant::now();
    let err = fetch_err(&source, None).await;
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(matches!(err, SourceError::Git { .. }), "{err:?}");
    assert!(seen.lock().expect("lock").is_empty());
}

// --- Inline ---------------------------------------------------------------

#[tokio::test]
async fn inline_files() {
    let files: BTreeMap<String, String> = [
        ("Dockerfile", "not the one\n"),
        ("a.txt", "a\n"),
        ("./sub/dir/b.txt", "b\n"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let source = Source::Inline {
        dockerfile: "FROM scratch\nCOPY . /\n".into(),
        files,
    };
    let parent = scratch();
    let ctx = fetch(&source, None, &parent.join("ws"))
        .await
        .expect("inline");
    let ws = parent.join("ws").canonicalize().expect("canonical");
    assert_eq!(ctx.dir, ws.join("context"));
    assert_eq!(ctx.dockerfile, ws.join("Dockerfile.inline"));
    assert_eq!(ctx.revision, None);
    assert_eq!(
        std::fs::read_to_string(&ctx.dockerfile).expect("dockerfile"),
        "FROM scratch\nCOPY . /\n"
    );
    assert_eq!(read(&ctx, "Dockerfile"), "not the one\n");
    assert_eq!(read(&ctx, "a.txt"), "a\n");
    assert_eq!(read(&ctx, "sub/dir/b.txt"), "b\n");
    let _ = std::fs::remove_dir_all(&parent);

    let source = Source::Inline {
        dockerfile: "FROM scratch\n".into(),
        files: [("../x".to_string(), "x".to_string())]
            .into_iter()
            .collect(),
    };
    let parent = scratch();
    let err = fetch(&source, None, &parent.join("ws"))
        .await
        .expect_err("escape");
    assert_eq!(
        err.to_string(),
        "source.inline.files: \"../x\" escapes the context"
    );
    assert!(!parent.join("ws").exists(), "nothing written");
    assert!(!parent.join("x").exists());
    let _ = std::fs::remove_dir_all(&parent);
}

#[tokio::test]
async fn a_remote_that_never_answers_is_given_up_at_the_deadline() {
    // Accepts connections and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            keep.lock().expect("lock").push(conn);
        }
    });
    let source = Source::Git {
        url: format!("git://127.0.0.1:{port}/silent.git"),
        revision: None,
        context_dir: None,
        credentials: None,
    };
    let parent = scratch();
    let limits = tripod::source::FetchLimits {
        git_command_timeout: Duration::from_secs(3),
    };
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        tripod::source::fetch_with(&source, None, &parent.join("ws"), &limits),
    )
    .await
    .expect("the fetch ends by itself")
    .expect_err("nothing to fetch");
    assert!(err.to_string().contains("no result within 3s"), "{err}");
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert!(!held.lock().expect("lock").is_empty(), "git did connect");
    let _ = std::fs::remove_dir_all(&parent);
}
