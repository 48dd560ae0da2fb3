//! The deployment manifests: the fields that matter for running the daemon safely.
//! Needs no root.

use serde_yaml_ng::Value;

fn documents() -> Vec<Value> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/daemonset.yaml"
    ))
    .unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_daemonset_runs_on_the_host_network_with_only_the_capabilities_it_needs() {
    let docs = documents();
    let pod = &kind(&docs, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let container = &pod["containers"][0];
    assert_eq!(strings(&container["args"])[0], "daemon");
    let security = &container["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(strings(&security["capabilities"]["drop"]), vec!["ALL"]);
    let mut added = strings(&security["capabilities"]["add"]);
    added.sort();
    assert_eq!(added, vec!["BPF", "NET_ADMIN", "PERFMON"]);
}

#[test]
fn bpffs_run_and_the_config_are_mounted_and_node_name_comes_from_the_downward_api() {
    let docs = documents();
    let pod = &kind(&docs, "DaemonSet")["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let mounts: Vec<(String, String)> = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                m["mountPath"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for path in ["/sys/fs/bpf", "/run/visibility", "/etc/visibility"] {
        assert!(
            mounts.iter().any(|(_, p)| p == path),
            "{path} not mounted: {mounts:?}"
        );
    }
    let volumes = pod["volumes"].as_sequence().unwrap();
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .map(|v| v["hostPath"]["path"].clone())
    };
    let bpffs = mounts.iter().find(|(_, p)| p == "/sys/fs/bpf").unwrap();
    assert_eq!(host_path(&bpffs.0), Some(Value::from("/sys/fs/bpf")));
    let node_name = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .unwrap();
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let config_volume = volumes.iter().find(|v| v["name"] == "config").unwrap();
    assert_eq!(
        config_volume["configMap"]["name"],
        kind(&docs, "ConfigMap")["metadata"]["name"]
    );
}

#[test]
fn the_configmap_is_a_valid_daemon_config() {
    let docs = documents();
    let text = kind(&docs, "ConfigMap")["data"]["config.toml"]
        .as_str()
        .unwrap();
    let config = configured(&docs);
    assert!(!config.exemptions.is_empty());
    assert!(text.contains("pod-cidr"), "the override is documented");
}

/// The daemon's configuration the ConfigMap gives.
fn configured(docs: &[Value]) -> visibility::config::NodeConfig {
    let text = kind(docs, "ConfigMap")["data"]["config.toml"]
        .as_str()
        .unwrap();
    let layer = visibility::config::Layer::from_toml(text).unwrap();
    visibility::config::NodeConfig::resolve(layer).unwrap()
}

/// One manifest for every node: nothing in it is per node. The ConfigMap sets no Pod
/// CIDR (each daemon learns its node's), and the CNI configuration it learns from is
/// mounted, read-only, where the daemon reads it.
#[test]
fn the_manifest_has_no_per_node_setting_and_mounts_the_cni_configuration() {
    let docs = documents();
    let config = configured(&docs);
    assert!(
        config.pod_cidrs.is_empty(),
        "one pod-cidr for every node: {:?}",
        config.pod_cidrs
    );
    let pod = &kind(&docs, "DaemonSet")["spec"]["template"]["spec"];
    let mount = pod["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == config.cni_conf_dir.to_str())
        .unwrap_or_else(|| panic!("{} is not mounted", config.cni_conf_dir.display()));
    assert_eq!(mount["readOnly"], true);
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(
        volume["hostPath"]["path"].as_str(),
        config.cni_conf_dir.to_str()
    );
}

/// Liveness asks only whether the daemon's loop passes (`/healthz`), so a failing health
/// check (a configuration problem) never restarts the daemon in a loop; readiness
/// (`/readyz`) shows health. Both reach the metrics listener the ConfigMap configures,
/// and the daemon answers them (`tests/tests/daemon/probes.rs`). No probe runs
/// `visibility status`, which fails on any health check.
#[test]
fn the_probes_ask_the_daemon_for_liveness_and_readiness_on_its_metrics_listener() {
    let docs = documents();
    let listener = configured(&docs)
        .metrics_addr
        .expect("the probes need the metrics listener");
    let container = &kind(&docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0];
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let probe_spec = &container[probe];
        assert!(probe_spec["exec"].is_null(), "{probe} runs a command");
        let get = &probe_spec["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            get["port"].as_u64(),
            Some(u64::from(listener.port())),
            "{probe}"
        );
        assert_eq!(
            get["host"].as_str(),
            Some(listener.ip().to_string().as_str()),
            "{probe}: the listener is on {listener}"
        );
    }
    // A stuck loop is restarted within a minute or two, not at its first slow pass.
    let liveness = &container["livenessProbe"];
    let tolerated = liveness["periodSeconds"].as_u64().unwrap()
        * liveness["failureThreshold"].as_u64().unwrap();
    assert!(tolerated >= 30, "liveness gives up after {tolerated} s");
}

#[test]
fn the_containerfile_builds_the_visibility_binary() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/Containerfile"
    ))
    .unwrap();
    assert!(text.contains("cargo build --release -p visibility-userspace --bin visibility"));
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/visibility\"]"));
}

/// The Grafana dashboard takes its data source and its nodes as variables: every panel
/// queries `${datasource}`, and every query is narrowed to the selected `$node`s.
/// (`tests/tests/dashboard.rs` runs the queries against a real Prometheus server.)
#[test]
fn the_dashboard_has_datasource_and_node_variables_that_every_query_uses() {
    let text = std::fs::read_to_string(visibility_tests::dashboard::dashboard_path()).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    assert_eq!(variable("node")["type"], "query");
    assert_eq!(variable("node")["includeAll"], true);

    let panels = dashboard["panels"].as_array().unwrap();
    for panel in panels {
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            assert!(expr.contains("instance=~\"$node\""), "{expr}");
        }
    }
    // The panels the issue asks for, by the metric each one shows.
    let exprs: Vec<&str> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    for metric in [
        "visibility_redirected_packets_total",
        "visibility_redirected_bytes_total",
        "verdict=~\"pass_.*\"",
        "visibility_flow_map_entries",
        "visibility_flow_map_fill_ratio",
        "visibility_flow_evictions_total",
        "visibility_flow_records_emitted_total",
        "visibility_flow_records_dropped_total",
        "visibility_attach_failures_total",
        "visibility_health_check_passing",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(metric)),
            "no panel shows {metric}"
        );
    }
}

/// Every document of every manifest in deploy/, as JSON, with the file it came from.
fn all_manifest_objects() -> Vec<(String, serde_json::Value)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    let mut objects = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty());
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            objects.push((name, serde_json::to_value(value).unwrap()));
        }
    }
    objects
}

/// The object through its k8s-openapi type and back: a field the type does not know
/// (a typo, a wrong indentation, a field of another kind) is lost on the way.
fn through<T: serde::de::DeserializeOwned + serde::Serialize>(
    object: &serde_json::Value,
) -> serde_json::Value {
    let typed: T =
        serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{e}: {object:#}"));
    serde_json::to_value(&typed).unwrap()
}

/// `kubectl --dry-run=client` needs an API server, which cannot run here: the
/// manifests go through the API's own types instead.
#[test]
fn every_object_in_deploy_round_trips_through_its_kubernetes_type_without_losing_a_field() {
    use k8s_openapi::api::{apps, core, rbac};
    let objects = all_manifest_objects();
    for (file, object) in &objects {
        let kind = object["kind"].as_str().unwrap_or_default();
        let back = match kind {
            "Namespace" => through::<core::v1::Namespace>(object),
            "ConfigMap" => through::<core::v1::ConfigMap>(object),
            "ServiceAccount" => through::<core::v1::ServiceAccount>(object),
            "ClusterRole" => through::<rbac::v1::ClusterRole>(object),
            "ClusterRoleBinding" => through::<rbac::v1::ClusterRoleBinding>(object),
            "DaemonSet" => through::<apps::v1::DaemonSet>(object),
            other => panic!("{file}: no round trip for kind {other:?}"),
        };
        assert_eq!(&back, object, "{file}: {kind} changed on the way");
    }
    let kinds: Vec<&str> = objects
        .iter()
        .filter_map(|(_, o)| o["kind"].as_str())
        .collect();
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
    ] {
        assert!(kinds.contains(&kind), "no {kind} in deploy/: {kinds:?}");
    }
}

/// Read-only and least privilege: get/list/watch on pods, get on nodes, replicasets
/// and jobs (to name a ReplicaSet's Deployment and a Job's CronJob), nothing else;
/// bound to the ServiceAccount the DaemonSet runs as, and to nothing else.
#[test]
fn the_rbac_is_read_only_least_privilege_and_bound_to_the_daemonsets_service_account() {
    use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::ServiceAccount, rbac::v1};
    let objects = all_manifest_objects();
    let only = |kind: &str| {
        let found: Vec<&serde_json::Value> = objects
            .iter()
            .map(|(_, o)| o)
            .filter(|o| o["kind"] == kind)
            .collect();
        assert_eq!(found.len(), 1, "one {kind}");
        found[0].clone()
    };
    for kind in ["Role", "RoleBinding"] {
        assert!(objects.iter().all(|(_, o)| o["kind"] != kind), "a {kind}");
    }
    let role: v1::ClusterRole = serde_json::from_value(only("ClusterRole")).unwrap();
    let mut granted: Vec<(String, String, Vec<String>)> = Vec::new();
    for rule in role.rules.unwrap_or_default() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                let mut verbs = rule.verbs.clone();
                verbs.sort();
                granted.push((group.clone(), resource, verbs));
            }
        }
    }
    granted.sort();
    let expected = |group: &str, resource: &str, verbs: &[&str]| {
        (
            group.to_owned(),
            resource.to_owned(),
            verbs.iter().map(|v| (*v).to_owned()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        granted,
        [
            expected("", "nodes", &["get"]),
            expected("", "pods", &["get", "list", "watch"]),
            expected("apps", "replicasets", &["get"]),
            expected("batch", "jobs", &["get"]),
        ]
    );

    let binding: v1::ClusterRoleBinding =
        serde_json::from_value(only("ClusterRoleBinding")).unwrap();
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(binding.role_ref.name), role.metadata.name);
    let account: ServiceAccount = serde_json::from_value(only("ServiceAccount")).unwrap();
    let daemon_set: DaemonSet = serde_json::from_value(only("DaemonSet")).unwrap();
    let pod = daemon_set.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name, account.metadata.name);
    assert_eq!(
        pod.automount_service_account_token, None,
        "the token is mounted"
    );
    assert_eq!(account.metadata.namespace, daemon_set.metadata.namespace);
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(subjects[0].name.clone()), account.metadata.name);
    assert_eq!(subjects[0].namespace, account.metadata.namespace);
}

/// The ConfigMap names Pods through the API (in-cluster), and keeps per-Pod metric
/// labels off: their number grows with the Pods.
#[test]
fn the_configmap_names_pods_in_cluster_with_per_pod_metric_labels_off() {
    let config = configured(&documents());
    assert_eq!(
        config.kubernetes.access,
        visibility::kubernetes::Access::Auto
    );
    assert!(!config.kubernetes.pod_metric_labels);
}
