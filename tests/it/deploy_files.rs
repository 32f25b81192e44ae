//! The deployment files under deploy/ are well-formed and agree with the
//! daemon: every Kubernetes and Prometheus YAML document parses, the manifests
//! hold the expected objects, the ConfigMap's config parses with the daemon's
//! own parser, the probes point at the health endpoints, the dashboard has
//! panels with queries, and every metric the alert rules and the dashboard use
//! is one that switchyard exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use switchyard::config::Config;
use yaml_rust2::{Yaml, YamlLoader};

/// The metrics the daemon exports, histograms by their base name (without
/// `_bucket`, `_sum`, `_count`) (the scrape test in `observe.rs` checks
/// that a running daemon serves them).
pub const EXPORTED: [&str; 15] = switchyard::metric::ALL;

/// The port of the HTTP endpoints in every deployment file.
const HTTP_PORT: i64 = 9650;
/// Where every deployment runs the config from.
const CONFIG_PATH: &str = "/etc/switchyard/switchyard.toml";
/// The ConfigMap key that holds the config.
const CONFIG_KEY: &str = "switchyard.toml";

/// Every `switchyard_…` metric name used in the alert rules
/// (deploy/prometheus/) and the dashboards (deploy/grafana/), with a trailing
/// `_bucket`, `_sum` or `_count` removed, so that it compares with the names
/// of a scrape.
pub fn referenced_metrics() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for path in files("prometheus", &["yaml", "yml"])
        .into_iter()
        .chain(files("grafana", &["json"]))
    {
        out.extend(metric_names(&read(&path)));
    }
    out
}

/// The `switchyard_[a-z0-9_]+` names in `text` that are not part of a longer
/// identifier, histogram suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    const PREFIX: &str = "switchyard_";
    let bytes = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(PREFIX) {
        let start = from + i;
        let mut end = start + PREFIX.len();
        while end < bytes.len() && matches!(bytes[end], b'a'..=b'z' | b'0'..=b'9' | b'_') {
            end += 1;
        }
        from = end;
        let inside_identifier =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if inside_identifier || end == start + PREFIX.len() {
            continue;
        }
        let name = &text[start..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(*suffix))
            .unwrap_or(name);
        out.insert(base.to_string());
    }
    out
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// The files of deploy/`sub` whose extension is one of `exts`, sorted; at least one.
fn files(sub: &str, exts: &[&str]) -> Vec<PathBuf> {
    let dir = deploy_dir().join(sub);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e))
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no {exts:?} file in {}", dir.display());
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of every .yaml/.yml file in deploy/`sub`, with its file.
fn yaml_docs(sub: &str) -> Vec<(PathBuf, Yaml)> {
    let mut out = Vec::new();
    for path in files(sub, &["yaml", "yml"]) {
        let docs = YamlLoader::load_from_str(&read(&path))
            .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()));
        for doc in docs {
            // An empty document (a stray `---`) has nothing to check.
            if doc.is_badvalue() || doc.is_null() {
                continue;
            }
            out.push((path.clone(), doc));
        }
    }
    out
}

fn text<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {y:?}"))
}

fn list<'a>(y: &'a Yaml, what: &str) -> &'a [Yaml] {
    y.as_vec()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{what}: expected a list, found {y:?}"))
}

/// The one document of `kind` among the Kubernetes manifests.
fn the_one<'a>(docs: &'a [(PathBuf, Yaml)], kind: &str) -> &'a Yaml {
    let found: Vec<&Yaml> = docs
        .iter()
        .filter(|(_, d)| d["kind"].as_str() == Some(kind))
        .map(|(_, d)| d)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "deploy/kubernetes: expected exactly one {kind}, found {}",
        found.len()
    );
    found[0]
}

/// The Deployment's switchyard container.
fn container(deployment: &Yaml) -> &Yaml {
    let containers = list(
        &deployment["spec"]["template"]["spec"]["containers"],
        "Deployment containers",
    );
    containers
        .iter()
        .find(|c| c["name"].as_str() == Some("switchyard"))
        .unwrap_or_else(|| panic!("Deployment: no container named switchyard"))
}

/// A port as a probe or a Service names it: a number, or a container port's name.
fn resolve_port(container: &Yaml, port: &Yaml, what: &str) -> i64 {
    if let Some(n) = port.as_i64() {
        return n;
    }
    let name = text(port, what);
    list(&container["ports"], "container ports")
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_i64())
        .unwrap_or_else(|| panic!("{what}: {name:?} names no port of the container"))
}

/// Every `${NAME}` outside comments (the ones the config parser expands).
fn placeholders(toml: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in toml.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut rest = line;
        while let Some(i) = rest.find("${") {
            let escaped = rest[..i].ends_with('$');
            let after = &rest[i + 2..];
            let Some(end) = after.find('}') else { break };
            if !escaped {
                out.insert(after[..end].to_string());
            }
            rest = &after[end + 1..];
        }
    }
    out
}

/// Gives every variable a value unless the environment already has one.
#[allow(unused_unsafe)] // set_var is unsafe from edition 2024 on, safe before
fn set_env(vars: &BTreeSet<String>) {
    for var in vars {
        if std::env::var_os(var).is_none() {
            // Each test runs in a process of its own (nextest); no other thread
            // reads the environment while this one writes it.
            unsafe { std::env::set_var(var, "example-secret") };
        }
    }
}

/// `5m`, `1h30m`, `0s`: Prometheus's duration syntax.
fn is_prometheus_duration(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let Some(unit) = ["ms", "s", "m", "h", "d", "w", "y"]
            .iter()
            .find(|u| rest.starts_with(**u))
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

#[test]
fn kubernetes_manifests_hold_the_expected_objects() {
    let docs = yaml_docs("kubernetes");
    for (path, doc) in &docs {
        let kind = text(&doc["kind"], &format!("{}: kind", path.display()));
        text(
            &doc["apiVersion"],
            &format!("{}: {kind} apiVersion", path.display()),
        );
        text(
            &doc["metadata"]["name"],
            &format!("{}: {kind} metadata.name", path.display()),
        );
    }
    let config_map = the_one(&docs, "ConfigMap");
    let secret = the_one(&docs, "Secret");
    let deployment = the_one(&docs, "Deployment");
    let service = the_one(&docs, "Service");

    text(&config_map["data"][CONFIG_KEY], "ConfigMap data");
    assert!(
        secret["stringData"]
            .as_hash()
            .is_some_and(|h| !h.is_empty()),
        "Secret: no stringData"
    );

    // One daemon per slot, and never two at once during an update.
    let spec = &deployment["spec"];
    assert_eq!(
        spec["replicas"].as_i64(),
        Some(1),
        "Deployment: replicas must be 1"
    );
    assert_eq!(
        spec["strategy"]["type"].as_str(),
        Some("Recreate"),
        "Deployment: strategy must be Recreate"
    );

    // The selectors match the pod.
    let pod_labels = spec["template"]["metadata"]["labels"]
        .as_hash()
        .expect("Deployment: pod labels");
    for (selector, what) in [
        (&spec["selector"]["matchLabels"], "Deployment selector"),
        (&service["spec"]["selector"], "Service selector"),
    ] {
        let selector = selector
            .as_hash()
            .unwrap_or_else(|| panic!("{what}: missing"));
        assert!(!selector.is_empty(), "{what}: empty");
        for (k, v) in selector.iter() {
            assert_eq!(
                pod_labels.get(k),
                Some(v),
                "{what}: {k:?} does not match the pod's labels"
            );
        }
    }

    // The pod runs as non-root on a read-only root filesystem.
    let c = container(deployment);
    let pod_security = &spec["template"]["spec"]["securityContext"];
    assert!(
        pod_security["runAsNonRoot"].as_bool() == Some(true)
            || c["securityContext"]["runAsNonRoot"].as_bool() == Some(true),
        "Deployment: runAsNonRoot is not set"
    );
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true),
        "container: readOnlyRootFilesystem"
    );
    for key in ["requests", "limits"] {
        assert!(
            c["resources"][key].as_hash().is_some(),
            "container: resources.{key} missing"
        );
    }

    // The Service exposes the HTTP port.
    let ports = list(&service["spec"]["ports"], "Service ports");
    assert!(
        ports.iter().any(|p| p["port"].as_i64() == Some(HTTP_PORT)
            && resolve_port(c, &p["targetPort"], "Service targetPort") == HTTP_PORT),
        "Service: no port {HTTP_PORT} to the container's port {HTTP_PORT}"
    );
}

#[test]
fn deployment_probes_point_at_the_health_endpoints() {
    let docs = yaml_docs("kubernetes");
    let c = container(the_one(&docs, "Deployment"));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}: path");
        assert_eq!(
            resolve_port(c, &get["port"], probe),
            HTTP_PORT,
            "{probe}: port"
        );
        // Both endpoints answer without the bearer token, so no header (and no
        // secret) belongs in the manifest.
        assert!(
            get["httpHeaders"].is_badvalue(),
            "{probe}: sends headers; /healthz and /readyz need none"
        );
    }
}

#[test]
fn configmap_config_parses_with_the_daemons_parser() {
    let docs = yaml_docs("kubernetes");
    let config_map = the_one(&docs, "ConfigMap");
    let toml = text(&config_map["data"][CONFIG_KEY], "ConfigMap data");

    // Every secret the config names comes from the Secret the container reads.
    let vars = placeholders(toml);
    for var in [
        "SOURCE_PASSWORD",
        "TARGET_PASSWORD",
        "SWITCHYARD_HTTP_TOKEN",
    ] {
        assert!(
            vars.contains(var),
            "ConfigMap config: ${{{var}}} is not used"
        );
    }
    let secret = the_one(&docs, "Secret");
    let secret_name = text(&secret["metadata"]["name"], "Secret name");
    let secret_keys: BTreeSet<&str> = secret["stringData"]
        .as_hash()
        .into_iter()
        .chain(secret["data"].as_hash())
        .flat_map(|h| h.keys().filter_map(Yaml::as_str))
        .collect();
    for var in &vars {
        assert!(
            secret_keys.contains(var.as_str()),
            "Secret {secret_name}: no key {var} for the config's ${{{var}}}"
        );
    }
    let c = container(the_one(&docs, "Deployment"));
    let env_from = list(&c["envFrom"], "container envFrom");
    assert!(
        env_from
            .iter()
            .any(|e| e["secretRef"]["name"].as_str() == Some(secret_name)),
        "container: envFrom does not read Secret {secret_name}"
    );

    // The container reads the ConfigMap's file.
    let args: Vec<&str> = list(&c["args"], "container args")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--config", CONFIG_PATH]),
        "container args: no --config {CONFIG_PATH}"
    );
    let pod = &the_one(&docs, "Deployment")["spec"]["template"]["spec"];
    let config_volume = list(&pod["volumes"], "pod volumes")
        .iter()
        .find(|v| v["configMap"]["name"].as_str() == config_map["metadata"]["name"].as_str())
        .and_then(|v| v["name"].as_str())
        .expect("pod: no volume of the ConfigMap");
    let mount = list(&c["volumeMounts"], "container volumeMounts")
        .iter()
        .find(|m| m["name"].as_str() == Some(config_volume))
        .and_then(|m| m["mountPath"].as_str())
        .expect("container: the ConfigMap volume is not mounted");
    assert_eq!(
        format!("{}/{CONFIG_KEY}", mount.trim_end_matches('/')),
        CONFIG_PATH,
        "ConfigMap mount"
    );

    set_env(&vars);
    let config =
        Config::parse(toml).unwrap_or_else(|e| panic!("ConfigMap {CONFIG_KEY}: {}", e.report()));
    // Probes and Prometheus reach the pod's IP, not its loopback.
    assert_eq!(
        config.http.address.as_deref(),
        Some("0.0.0.0:9650"),
        "[http] address"
    );
    assert!(config.http.token.is_some(), "[http] token");
}

#[test]
fn prometheus_rules_are_well_formed() {
    let docs = yaml_docs("prometheus");
    let mut alerts = BTreeSet::new();
    let mut rules_seen = Vec::new();
    for (path, doc) in &docs {
        let file = path.display();
        let groups = list(&doc["groups"], &format!("{file}: groups"));
        assert!(!groups.is_empty(), "{file}: no groups");
        for group in groups {
            let group_name = text(&group["name"], &format!("{file}: group name"));
            let rules = list(
                &group["rules"],
                &format!("{file}: group {group_name} rules"),
            );
            assert!(!rules.is_empty(), "{file}: group {group_name} has no rules");
            for rule in rules {
                let alert = text(
                    &rule["alert"],
                    &format!("{file}: group {group_name}: alert"),
                );
                let at = format!("{file}: alert {alert}");
                assert!(alerts.insert(alert.to_string()), "{at}: defined twice");
                let expr = text(&rule["expr"], &format!("{at}: expr"));
                assert!(!expr.trim().is_empty(), "{at}: empty expr");
                let for_ = text(&rule["for"], &format!("{at}: for"));
                assert!(
                    is_prometheus_duration(for_),
                    "{at}: for: {for_:?} is not a duration"
                );
                let severity = text(
                    &rule["labels"]["severity"],
                    &format!("{at}: labels.severity"),
                );
                assert!(
                    ["critical", "warning", "info"].contains(&severity),
                    "{at}: severity {severity:?}"
                );
                for key in ["summary", "description"] {
                    let v = text(
                        &rule["annotations"][key],
                        &format!("{at}: annotations.{key}"),
                    );
                    assert!(!v.trim().is_empty(), "{at}: empty annotations.{key}");
                }
                rules_seen.push((
                    expr.split_whitespace().collect::<Vec<_>>().join(" "),
                    for_.to_string(),
                ));
            }
        }
    }
    // The conditions operators were promised, with their durations where fixed.
    for (needle, for_) in [
        (r#"up{job="switchyard"} == 0"#, None),
        ("switchyard_lag_seconds > 60", Some("5m")),
        ("switchyard_lag_bytes >", None),
        ("deriv(switchyard_slot_retained_bytes[30m]) > 0", None),
        ("increase(switchyard_errors_total[5m])", None),
        (r#"switchyard_phase{phase="streaming"} == 0"#, Some("30m")),
        ("switchyard_connection_up == 0", None),
    ] {
        let found = rules_seen.iter().find(|(expr, _)| expr.contains(needle));
        let (_, actual) = found.unwrap_or_else(|| panic!("no alert rule on {needle}"));
        if let Some(for_) = for_ {
            assert_eq!(actual, for_, "alert rule on {needle}: for");
        }
    }
}

/// Every panel, the ones inside rows included.
fn all_panels(panels: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in panels.as_array().into_iter().flatten() {
        out.push(p);
        out.extend(all_panels(&p["panels"]));
    }
    out
}

#[test]
fn dashboard_parses_with_panels_and_targets() {
    const DS: &str = "${DS_PROMETHEUS}";
    for path in files("grafana", &["json"]) {
        let file = path.display();
        let dash: serde_json::Value = serde_json::from_str(&read(&path))
            .unwrap_or_else(|e| panic!("{file}: invalid JSON: {e}"));
        assert!(
            dash["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{file}: no title"
        );
        assert!(
            dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
            "{file}: schemaVersion"
        );
        let variables = dash["templating"]["list"]
            .as_array()
            .expect("templating.list");
        assert!(
            variables.iter().any(|v| v["name"] == "DS_PROMETHEUS"
                && v["type"] == "datasource"
                && v["query"] == "prometheus"),
            "{file}: no datasource variable DS_PROMETHEUS"
        );

        let mut ids = BTreeSet::new();
        let mut with_queries = 0;
        for panel in all_panels(&dash["panels"]) {
            let title = panel["title"].as_str().unwrap_or_default();
            let at = format!("{file}: panel {title:?}");
            let id = panel["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{at}: no id"));
            assert!(ids.insert(id), "{at}: id {id} used twice");
            for key in ["w", "h"] {
                assert!(
                    panel["gridPos"][key].as_u64().is_some_and(|v| v > 0),
                    "{at}: gridPos.{key}"
                );
            }
            if panel["type"] == "row" {
                continue;
            }
            assert!(!title.is_empty(), "{file}: panel {id} has no title");
            assert_eq!(panel["datasource"]["uid"], DS, "{at}: datasource");
            let targets = panel["targets"]
                .as_array()
                .unwrap_or_else(|| panic!("{at}: no targets"));
            assert!(!targets.is_empty(), "{at}: no targets");
            for t in targets {
                assert!(
                    t["expr"]
                        .as_str()
                        .is_some_and(|e| e.contains("switchyard_")),
                    "{at}: target without a switchyard query"
                );
                assert!(
                    t["refId"].as_str().is_some_and(|r| !r.is_empty()),
                    "{at}: target without refId"
                );
                assert_eq!(t["datasource"]["uid"], DS, "{at}: target datasource");
            }
            with_queries += 1;
        }
        assert!(
            with_queries >= 10,
            "{file}: only {with_queries} panels with queries"
        );
    }
}

#[test]
fn referenced_metrics_are_exported() {
    let referenced = referenced_metrics();
    assert!(
        !referenced.is_empty(),
        "the rules and the dashboard reference no switchyard_ metric"
    );
    let exported: BTreeSet<&str> = EXPORTED.into_iter().collect();
    let unknown: Vec<&String> = referenced
        .iter()
        .filter(|m| !exported.contains(m.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "referenced but not exported: {unknown:?}"
    );
}

#[test]
fn dashboard_shows_every_exported_metric() {
    let mut shown = BTreeSet::new();
    for path in files("grafana", &["json"]) {
        shown.extend(metric_names(&read(&path)));
    }
    let missing: Vec<&str> = EXPORTED
        .into_iter()
        .filter(|m| !shown.contains(*m))
        .collect();
    assert!(
        missing.is_empty(),
        "exported but on no dashboard panel: {missing:?}"
    );
}

#[test]
fn metric_names_are_found_whole_and_by_base_name() {
    let text = r#"histogram_quantile(0.9, rate(switchyard_apply_duration_seconds_bucket[5m]))
        / rate(switchyard_batch_changes_sum[1m]) + switchyard_batch_changes_count
        up{job="switchyard"} my_switchyard_thing switchyard_ switchyard_phase{phase="x"}"#;
    let names: Vec<String> = metric_names(text).into_iter().collect();
    assert_eq!(
        names,
        [
            "switchyard_apply_duration_seconds",
            "switchyard_batch_changes",
            "switchyard_phase"
        ]
    );
}

#[test]
fn systemd_unit_is_sandboxed_and_stops_gracefully() {
    let unit = read(&deploy_dir().join("switchyard.service"));
    let settings: Vec<(&str, &str)> = unit
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with('#') && !l.starts_with(';') && !l.starts_with('[')
        })
        .filter_map(|l| l.split_once('='))
        .collect();
    let has = |key: &str, value: &str| settings.iter().any(|(k, v)| *k == key && *v == value);
    let exec = settings
        .iter()
        .find(|(k, _)| *k == "ExecStart")
        .map(|(_, v)| *v)
        .expect("ExecStart");
    assert!(
        exec.contains(&format!("run --config {CONFIG_PATH}")),
        "ExecStart: {exec}"
    );
    assert!(
        has("DynamicUser", "yes") || settings.iter().any(|(k, v)| *k == "User" && *v != "root"),
        "runs as root"
    );
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("StateDirectory", "switchyard"),
        ("ConfigurationDirectory", "switchyard"),
        ("EnvironmentFile", "-/etc/switchyard/env"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallFilter", "@system-service"),
        ("CapabilityBoundingSet", ""),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert!(
            has(key, value),
            "switchyard.service: {key}={value} is missing"
        );
    }
    assert!(
        settings.iter().any(|(k, _)| *k == "TimeoutStopSec"),
        "switchyard.service: no TimeoutStopSec"
    );
}

#[test]
fn dockerfile_runs_the_daemon_as_non_root_on_the_http_port() {
    let dockerfile = read(&deploy_dir().join("Dockerfile"));
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let has = |prefix: &str| instructions.iter().any(|l| l.starts_with(prefix));
    for prefix in [
        "FROM rust:1.95-bookworm AS builder",
        "FROM debian:bookworm-slim",
        "USER 10001",
        "WORKDIR /var/lib/switchyard",
        "EXPOSE 9650",
        r#"ENTRYPOINT ["switchyard"]"#,
    ] {
        assert!(has(prefix), "Dockerfile: no {prefix:?}");
    }
    let cmd = instructions
        .iter()
        .find(|l| l.starts_with("CMD "))
        .expect("Dockerfile: no CMD");
    assert!(
        cmd.contains(&format!(r#""--config", "{CONFIG_PATH}""#)),
        "Dockerfile CMD: {cmd}"
    );
    assert!(
        dockerfile.contains("cargo build --release --locked"),
        "Dockerfile: not a locked release build"
    );
}
