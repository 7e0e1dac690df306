//! Counting the controller's API requests: from the API server's audit log
//! (every request made as `tripod-controller`, one JSON line each), and,
//! as a cross-check, from the API server's own `apiserver_request_total`
//! for the series only the controller writes.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The verbs that change something.
const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

/// A position in the audit log: requests logged after it are counted.
#[derive(Debug, Clone, Copy)]
pub struct Mark(u64);

/// Where the log ends now.
pub fn mark(log: &Path) -> Mark {
    Mark(std::fs::metadata(log).map(|m| m.len()).unwrap_or(0))
}

/// The controller's requests between two marks, by verb and resource.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Requests {
    /// Writes, `"verb resource[/subresource]"` → count.
    pub writes: BTreeMap<String, u64>,
    /// Reads (get, list, watch), the same way.
    pub reads: BTreeMap<String, u64>,
}

impl Requests {
    /// Writes other than the leader's Lease renewals.
    pub fn writes_without_leases(&self) -> u64 {
        self.writes
            .iter()
            .filter(|(k, _)| !k.ends_with(" leases"))
            .map(|(_, v)| v)
            .sum()
    }

    /// The leader's Lease writes.
    pub fn lease_writes(&self) -> u64 {
        self.writes
            .iter()
            .filter(|(k, _)| k.ends_with(" leases"))
            .map(|(_, v)| v)
            .sum()
    }

    /// Reads of one kind (`"list pods"`).
    pub fn reads_of(&self, key: &str) -> u64 {
        self.reads.get(key).copied().unwrap_or(0)
    }
}

#[derive(Deserialize)]
struct Event {
    verb: String,
    #[serde(default)]
    user: User,
    #[serde(default, rename = "objectRef")]
    object_ref: Option<ObjectRef>,
    #[serde(default)]
    stage: String,
}

#[derive(Deserialize, Default)]
struct User {
    #[serde(default)]
    username: String,
}

#[derive(Deserialize)]
struct ObjectRef {
    #[serde(default)]
    resource: String,
    #[serde(default)]
    subresource: String,
}

/// Counts the requests of `user` logged between `from` and `to`.
pub fn count(log: &Path, from: Mark, to: Mark, user: &str) -> Result<Requests, Error> {
    let mut file =
        std::fs::File::open(log).map_err(|e| Error::Io(format!("{}: {e}", log.display())))?;
    file.seek(SeekFrom::Start(from.0))
        .map_err(|e| Error::Io(e.to_string()))?;
    let mut text = String::new();
    file.take(to.0.saturating_sub(from.0))
        .read_to_string(&mut text)
        .map_err(|e| Error::Io(e.to_string()))?;
    let mut out = Requests::default();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<Event>(line) else {
            continue;
        };
        if e.user.username != user || e.stage != "ResponseComplete" {
            continue;
        }
        let what = match &e.object_ref {
            Some(o) if o.subresource.is_empty() => o.resource.clone(),
            Some(o) => format!("{}/{}", o.resource, o.subresource),
            None => "(none)".into(),
        };
        let key = format!("{} {what}", e.verb);
        let map = if WRITE_VERBS.contains(&e.verb.as_str()) {
            &mut out.writes
        } else {
            &mut out.reads
        };
        *map.entry(key).or_default() += 1;
    }
    Ok(out)
}

/// The API server's `apiserver_request_total` for writes, summed by
/// `"VERB resource[/subresource]"`.
pub async fn metric_writes(client: &kube::Client) -> Result<BTreeMap<String, u64>, Error> {
    let text = metrics(client).await?;
    Ok(metric_sum(&text, "apiserver_request_total", true)
        .into_iter()
        .map(|(k, v)| (k, v as u64))
        .collect())
}

/// The API server's `/metrics`.
pub async fn metrics(client: &kube::Client) -> Result<String, Error> {
    let request = kube::core::Request::new("")
        .get("metrics", &Default::default())
        .map_err(|e| Error::Io(e.to_string()))?;
    Ok(client.request_text(request).await?)
}

/// A metric of the API server's summed by `"VERB resource[/subresource]"`
/// (writes only, or every verb).
pub fn metric_sum(text: &str, name: &str, writes_only: bool) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let prefix = format!("{name}{{");
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split("\",")
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let verb = label("verb");
        if writes_only && !["POST", "PUT", "PATCH", "APPLY", "DELETE"].contains(&verb.as_str()) {
            continue;
        }
        let (resource, sub) = (label("resource"), label("subresource"));
        let what = if sub.is_empty() {
            resource
        } else {
            format!("{resource}/{sub}")
        };
        let n: f64 = value.trim().parse().unwrap_or(0.0);
        *out.entry(format!("{verb} {what}")).or_default() += n;
    }
    out
}

/// `after - before`, per key, leaving out what did not change.
pub fn delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_the_users_completed_requests() {
        let dir = std::env::temp_dir().join(format!("tripod-bench-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("audit.log");
        let lines = [
            r#"{"verb":"patch","stage":"ResponseComplete","user":{"username":"tripod-controller"},"objectRef":{"resource":"imagebuilds","subresource":"status"}}"#,
            r#"{"verb":"create","stage":"ResponseComplete","user":{"username":"tripod-controller"},"objectRef":{"resource":"pods"}}"#,
            r#"{"verb":"update","stage":"ResponseComplete","user":{"username":"tripod-controller"},"objectRef":{"resource":"leases"}}"#,
            r#"{"verb":"list","stage":"ResponseComplete","user":{"username":"tripod-controller"},"objectRef":{"resource":"pods"}}"#,
            r#"{"verb":"create","stage":"ResponseComplete","user":{"username":"tripod-admin"},"objectRef":{"resource":"pods"}}"#,
        ];
        std::fs::write(&log, lines.join("\n") + "\n").unwrap();
        let r = count(&log, Mark(0), mark(&log), "tripod-controller").unwrap();
        assert_eq!(r.writes["patch imagebuilds/status"], 1);
        assert_eq!(r.writes["create pods"], 1);
        assert_eq!(r.writes_without_leases(), 2);
        assert_eq!(r.lease_writes(), 1);
        assert_eq!(r.reads_of("list pods"), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
