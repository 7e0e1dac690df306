//! The Argo CD health checks in `charts/tripod/health/*.lua`, run against
//! fixture objects with the stock Lua interpreter.
//!
//! Argo CD runs a health check with the live object in the global `obj` and
//! reads back the `hs` table the script returns. This test does the same: it
//! renders each serde_json fixture as a Lua table literal, prepends
//! `obj = <literal>`, wraps the script in a function so its top-level
//! `return hs` works, and prints `status<TAB>message`.
//!
//! Needs `lua5.4` on PATH (Debian/Ubuntu: `apt-get install -y lua5.4`).

use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const LUA: &str = "lua5.4";

fn script(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("charts/tripod/health")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A Lua string literal for `s`. Lua strings are byte strings, so UTF-8
/// passes through unchanged; quotes, backslashes and control bytes are
/// escaped (control bytes as three-digit decimal escapes, so a following
/// digit cannot extend them).
fn lua_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii_control() => out.push_str(&format!("\\{:03}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A Lua expression for a JSON value: objects and arrays become tables
/// (arrays 1-indexed, as Argo CD's JSON-to-Lua conversion does), `null`
/// becomes `nil`.
fn to_lua(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => lua_string(s),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(to_lua).collect();
            format!("{{{}}}", parts.join(", "))
        }
        Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), to_lua(v)))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
    }
}

/// Runs the health check `name` on `obj`: (hs.status, hs.message).
fn health(name: &str, obj: &Value) -> (String, String) {
    let program = format!(
        "obj = {obj}\n\
         local function __tripod_health()\n{body}\nend\n\
         local r = __tripod_health()\n\
         io.write(tostring(r.status), \"\\t\", tostring(r.message))\n",
        obj = to_lua(obj),
        body = script(name),
    );
    let mut child = match Command::new(LUA)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{LUA}` is not on PATH: install it to run the Argo CD health check tests \
             (Debian/Ubuntu: `apt-get install -y lua5.4`)"
        ),
        Err(e) => panic!("spawn {LUA}: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(program.as_bytes())
        .expect("write the Lua program");
    let out = child.wait_with_output().expect("wait for lua");
    assert!(
        out.status.success(),
        "{name} failed on {obj}:\n{}\n--- program ---\n{program}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
    let (status, message) = stdout
        .split_once('\t')
        .unwrap_or_else(|| panic!("{name}: want `status\\tmessage`, got {stdout:?}"));
    (status.to_string(), message.to_string())
}

fn check(name: &str, obj: Value, want_status: &str, want_fragment: &str) {
    let (status, message) = health(name, &obj);
    assert_eq!(status, want_status, "{name}: message {message:?} for {obj}");
    assert!(
        message.contains(want_fragment),
        "{name}: message {message:?} lacks {want_fragment:?} for {obj}"
    );
    assert!(
        ["Healthy", "Progressing", "Degraded", "Suspended", "Missing"].contains(&status.as_str()),
        "{name}: {status} is not an Argo CD health status"
    );
}

fn cond(type_: &str, status: &str, reason: &str, message: &str, generation: i64) -> Value {
    json!({
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    })
}

/// The three kstatus conditions as Tripod writes them for a phase.
fn conditions(
    ready: bool,
    reconciling: bool,
    stalled: bool,
    reason: &str,
    message: &str,
    generation: i64,
) -> Value {
    let s = |b: bool| if b { "True" } else { "False" };
    json!([
        cond("Ready", s(ready), reason, message, generation),
        cond("Reconciling", s(reconciling), reason, message, generation),
        cond("Stalled", s(stalled), reason, message, generation),
    ])
}

fn imagebuild(generation: i64, status: Option<Value>) -> Value {
    let mut obj = json!({
        "apiVersion": "build.tripod.dev/v1alpha1",
        "kind": "ImageBuild",
        "metadata": {"name": "hello", "namespace": "default", "generation": generation},
        "spec": {
            "source": {"inline": {"dockerfile": "FROM scratch\nCOPY \"hello.txt\" /\n", "files": {"hello.txt": "Hello\tfrom Tripod\n"}}},
            "platforms": ["linux/amd64"],
            "output": {"image": "127.0.0.1:5000/examples/hello:latest", "insecure": true},
        },
    });
    if let Some(s) = status {
        obj["status"] = s;
    }
    obj
}

fn buildrunner(status: Option<Value>) -> Value {
    let mut obj = json!({
        "apiVersion": "build.tripod.dev/v1alpha1",
        "kind": "BuildRunner",
        "metadata": {"name": "mac-mini-1", "generation": 1},
        "spec": {"os": "darwin"},
    });
    if let Some(s) = status {
        obj["status"] = s;
    }
    obj
}

const IB: &str = "imagebuild.lua";
const BR: &str = "buildrunner.lua";

#[test]
fn lua_literals_round_trip_through_the_interpreter() {
    let v = json!({"a": [1, 2.5, -3], "s": "q\"\\\n\t\u{1}é", "n": null, "t": true});
    let program = format!(
        "local v = {}\nio.write(#v.a, v.a[2], v.s, tostring(v.n), tostring(v.t))",
        to_lua(&v)
    );
    let out = Command::new(LUA)
        .args(["-e", &program])
        .output()
        .unwrap_or_else(|e| panic!("run `{LUA}` (install with `apt-get install -y lua5.4`): {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "32.5q\"\\\n\t\u{1}éniltrue"
    );
}

#[test]
fn imagebuild_without_status_waits_for_the_controller() {
    check(
        IB,
        imagebuild(1, None),
        "Progressing",
        "Waiting for the controller to observe generation 1",
    );
}

#[test]
fn imagebuild_with_an_old_observed_generation_waits() {
    let status = json!({
        "observedGeneration": 2,
        "phase": "Succeeded",
        "image": {"reference": "r/hello:latest", "digest": "sha256:ab", "pinned": "r/hello@sha256:ab"},
        "conditions": conditions(true, false, false, "Succeeded", "built", 2),
    });
    check(
        IB,
        imagebuild(3, Some(status)),
        "Progressing",
        "observe generation 3",
    );
}

#[test]
fn imagebuild_with_an_old_ready_condition_waits() {
    let status = json!({
        "observedGeneration": 3,
        "phase": "Failed",
        "conditions": conditions(false, false, true, "BuildFailed", "old failure", 2),
    });
    check(
        IB,
        imagebuild(3, Some(status)),
        "Progressing",
        "observe generation 3",
    );
}

#[test]
fn imagebuild_scheduling_is_progressing_with_the_reconciling_message() {
    let status = json!({
        "observedGeneration": 1,
        "phase": "Scheduling",
        "conditions": conditions(false, true, false, "Scheduling", "waiting for a darwin/arm64 BuildRunner", 1),
    });
    check(
        IB,
        imagebuild(1, Some(status)),
        "Progressing",
        "waiting for a darwin/arm64 BuildRunner",
    );
}

#[test]
fn imagebuild_succeeded_is_healthy_with_the_pinned_image() {
    let pinned = "127.0.0.1:5000/examples/hello@sha256:0123456789abcdef";
    let status = json!({
        "observedGeneration": 4,
        "phase": "Succeeded",
        "image": {"reference": "127.0.0.1:5000/examples/hello:latest", "digest": "sha256:0123456789abcdef", "pinned": pinned},
        "conditions": conditions(true, false, false, "Succeeded", "all platforms built", 4),
    });
    check(IB, imagebuild(4, Some(status)), "Healthy", pinned);
}

#[test]
fn imagebuild_failed_is_degraded_with_the_stalled_message() {
    let status = json!({
        "observedGeneration": 1,
        "phase": "Failed",
        "conditions": conditions(false, false, true, "BuildFailed", "linux/amd64: RUN make exited 2 after 2 attempts", 1),
    });
    check(
        IB,
        imagebuild(1, Some(status)),
        "Degraded",
        "RUN make exited 2",
    );
}

#[test]
fn imagebuild_with_a_refused_build_pod_is_degraded() {
    // Reconciling and Stalled both True: the controller keeps retrying, but
    // a person has to act (a ServiceAccount, Pod Security, a quota).
    let status = json!({
        "observedGeneration": 1,
        "phase": "Scheduling",
        "conditions": conditions(false, true, true, "BuildPodRejected", "the API server refused build Pod app-1-linux-amd64-1: violates PodSecurity \"restricted:latest\"", 1),
    });
    check(
        IB,
        imagebuild(1, Some(status)),
        "Degraded",
        "refused build Pod",
    );
}

#[test]
fn imagebuild_cancelled_is_suspended() {
    let status = json!({
        "observedGeneration": 2,
        "phase": "Cancelled",
        "conditions": conditions(false, false, false, "Cancelled", "cancelled by spec.cancel", 2),
    });
    check(IB, imagebuild(2, Some(status)), "Suspended", "cancelled");
}

#[test]
fn imagebuild_pending_without_conditions_is_progressing() {
    let status = json!({"observedGeneration": 1, "phase": "Pending"});
    check(IB, imagebuild(1, Some(status)), "Progressing", "Pending");
}

#[test]
fn buildrunner_online_is_healthy() {
    let status = json!({
        "phase": "Online",
        "agentVersion": "0.4.0",
        "lastHeartbeatTime": "2026-01-01T00:00:00Z",
        "conditions": [cond("Ready", "True", "Heartbeating", "agent connected", 1)],
    });
    check(BR, buildrunner(Some(status)), "Healthy", "online");
}

#[test]
fn buildrunner_draining_is_suspended() {
    check(
        BR,
        buildrunner(Some(json!({"phase": "Draining"}))),
        "Suspended",
        "draining",
    );
}

#[test]
fn buildrunner_offline_is_degraded() {
    let status = json!({
        "phase": "Offline",
        "conditions": [cond("Ready", "False", "HeartbeatMissed", "no heartbeat for 90s", 1)],
    });
    check(
        BR,
        buildrunner(Some(status)),
        "Degraded",
        "no heartbeat for 90s",
    );
}

#[test]
fn buildrunner_without_status_waits_for_its_agent() {
    check(
        BR,
        buildrunner(None),
        "Progressing",
        "waiting for the runner's agent to connect",
    );
}
