//! The Kubernetes side: the daemon's watch of this node's Pods and its reads of the
//! Node, against an API server stand-in ([`stand_in`]: no real API server can run
//! here, so a stand-in speaks the real list/watch protocol over HTTPS). Records must
//! name the Pod that had an address when the flow ran, through Pods added, deleted
//! and their addresses reused, a bookmark, a `410 Gone` that forces a new list, and
//! the API going away and coming back. Needs root: the daemon's state directory
//! (where it saves the Pods for `visibility flows`) is under /run/visibility.

mod stand_in;

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use stand_in::StandIn;
use visibility::{
    flows::{records::Aggregator, view::Clock},
    kubernetes::{Access, KubeConfig, Kubernetes, PodNames, Unnamed},
    net::addr_bytes,
    state::DaemonStatus,
};
use visibility_common::flow::{FlowKey, FlowStats, Path as FlowPath};

const NODE: &str = "node-a";

/// An object's `ownerReferences`: its controller (kind, name), if it has one.
fn owner_references(controller: Option<(&str, &str)>) -> Value {
    let api_version = |kind| match kind {
        "Job" | "CronJob" => "batch/v1",
        _ => "apps/v1",
    };
    controller
        .into_iter()
        .map(|(kind, name)| {
            json!({"apiVersion": api_version(kind), "kind": kind, "name": name,
                "uid": format!("{name}-uid"), "controller": true})
        })
        .collect()
}

fn pod(uid: &str, name: &str, namespace: &str, ips: &[&str], owner: Option<(&str, &str)>) -> Value {
    let created = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let owners = owner_references(owner);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid,
            "creationTimestamp": created, "ownerReferences": owners},
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ips[0],
            "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()},
    })
}

fn now_ns() -> u64 {
    Clock::now().datapath_now()
}

/// The record of one flow from `src` to `dst` whose packets ran at `at_ns`.
fn record(names: &PodNames, src: &str, dst: &str, at_ns: u64) -> Value {
    let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let key = FlowKey {
        family: if src.is_ipv4() { 4 } else { 6 },
        protocol: 6,
        src_port: 40000,
        dst_port: 8080,
        src_addr: addr_bytes(&src),
        dst_addr: addr_bytes(&dst),
        ..Default::default()
    };
    let stats = FlowStats {
        packets: 3,
        bytes: 300,
        first_seen_ns: at_ns,
        last_seen_ns: at_ns,
        path: FlowPath::ViaGateway as u8,
        ..Default::default()
    };
    let (records, _) = Aggregator::default().interval(
        &[(key, stats)],
        &Clock::now(),
        now_ns(),
        NODE,
        &|_| None,
        names,
    );
    serde_json::to_value(&records[0]).unwrap()
}

/// `namespace/pod` of the Pod that had `ip` at `at_ns`, as a record names it.
fn pod_at(names: &PodNames, ip: &str, at_ns: u64) -> Option<String> {
    let peer = if ip.contains(':') {
        "fd00:99::1"
    } else {
        "10.99.0.1"
    };
    let details = &record(names, ip, peer, at_ns)["src_gke_details"];
    let pod = details.get("pod")?;
    Some(format!(
        "{}/{}",
        pod["pod_namespace"].as_str()?,
        pod["pod_name"].as_str()?
    ))
}

/// Waits until `check` holds; the deadline only keeps a broken build from hanging.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn count(requests: &[String], what: impl Fn(&str) -> bool) -> usize {
    requests.iter().filter(|r| what(r)).count()
}

fn is_pod_list(request: &&str) -> bool {
    request.starts_with("GET /api/v1/pods?") && !request.contains("watch=true")
}

struct Lab {
    dir: PathBuf,
    pin_dir: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        DaemonStatus::remove(&self.pin_dir);
    }
}

fn lab() -> Lab {
    let name = visibility_tests::unique::name("kube");
    let dir = std::env::temp_dir().join(format!("vis-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    Lab {
        dir,
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/vis-{name}")),
    }
}

/// The daemon's Kubernetes side, started as node [`NODE`] with `config`, and the names
/// its records take.
fn watch_pods(lab: &Lab, config: &KubeConfig) -> (Arc<Kubernetes>, PodNames) {
    let kubernetes = Arc::new(Kubernetes::default());
    visibility::kubernetes::spawn(
        config,
        NODE,
        kubernetes.clone(),
        &lab.pin_dir,
        Duration::from_secs(3600),
    );
    let names = kubernetes.names(config);
    (kubernetes, names)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn records_name_the_pod_that_had_the_address_through_reuse_relists_and_outages() {
    let lab = lab();
    runtime().block_on(async {
        let api = StandIn::start(&lab.dir).await;
        api.put_node(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
            "spec": {"podCIDR": "10.52.0.0/24", "podCIDRs": ["10.52.0.0/24", "fd00:52::/112"]}}),
        );
        api.put_controller(json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": "web-7d9f", "namespace": "shop", "uid": "web-7d9f-uid",
                "ownerReferences": owner_references(Some(("Deployment", "web")))}}));
        let web = Some(("ReplicaSet", "web-7d9f"));
        api.put_pod(pod(
            "a",
            "web-7d9f-aaaaa",
            "shop",
            &["10.52.0.2", "fd00:52::2"],
            web,
        ));
        api.put_pod(pod("b", "client", "default", &["10.52.0.3"], None));
        let mut elsewhere = pod("z", "elsewhere", "default", &["10.52.0.9"], None);
        elsewhere["spec"]["nodeName"] = json!("node-b");
        api.put_pod(elsewhere);
        api.set_forbidden(true);

        let (kubernetes, names) = watch_pods(
            &lab,
            &KubeConfig {
                access: Access::Kubeconfig(api.kubeconfig.clone()),
                cluster_name: Some("lab".into()),
                pod_metric_labels: true,
            },
        );

        // Refused: status says so, with the error; nothing is named.
        until("forbidden", || {
            kubernetes.state().names_missing == Some(Unnamed::Forbidden)
        })
        .await;
        assert!(kubernetes.state().last_error.unwrap().contains("403"));
        assert_eq!(pod_at(&names, "10.52.0.2", now_ns()), None);
        // The Node is readable all along: its Pod CIDRs are a source.
        until("the Node's Pod CIDRs", || {
            kubernetes.node_pod_cidrs().len() == 2
        })
        .await;
        assert_eq!(
            kubernetes.state().node_pod_cidrs,
            ["10.52.0.0/24", "fd00:52::/112"]
        );

        // Granted: the list, then the watch, of this node's Pods only.
        api.set_forbidden(false);
        until("synced", || kubernetes.state().synced).await;
        assert_eq!(kubernetes.state().names_missing, None);
        let t_a = now_ns();
        let flow = record(&names, "10.52.0.2", "10.52.0.3", t_a);
        assert_eq!(
            flow["src_gke_details"],
            json!({"cluster": {"cluster_name": "lab"}, "pod": {"pod_name": "web-7d9f-aaaaa",
                "pod_namespace": "shop",
                "pod_workload": {"workload_name": "web", "workload_type": "Deployment"}}}),
        );
        assert_eq!(flow["dest_gke_details"]["pod"]["pod_name"], "client");
        assert!(
            flow["dest_gke_details"]["pod"]
                .get("pod_workload")
                .is_none()
        );
        assert_eq!(
            pod_at(&names, "fd00:52::2", t_a).as_deref(),
            Some("shop/web-7d9f-aaaaa")
        );
        assert_eq!(pod_at(&names, "10.52.0.9", t_a), None, "another node's Pod");
        let requests = api.requests();
        assert!(
            requests
                .iter()
                .any(|r| is_pod_list(&r.as_str())
                    && r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
            "{requests:#?}"
        );
        // Synced means listed: the watch from the list's version starts after that.
        until(
            "a watch from the list's resourceVersion, with bookmarks",
            || {
                api.requests().iter().any(|r| {
                    r.contains("watch=true")
                        && r.contains("allowWatchBookmarks=true")
                        && r.contains("resourceVersion=")
                })
            },
        )
        .await;

        // Deleted, and its address reused: each time names the Pod of that time.
        api.delete_pod("a");
        api.put_pod(pod("c", "web-7d9f-ccccc", "shop", &["10.52.0.2"], web));
        until("the reused address names the new Pod", || {
            pod_at(&names, "10.52.0.2", now_ns()).as_deref() == Some("shop/web-7d9f-ccccc")
        })
        .await;
        assert_eq!(
            pod_at(&names, "10.52.0.2", t_a).as_deref(),
            Some("shop/web-7d9f-aaaaa")
        );
        assert_eq!(
            pod_at(&names, "fd00:52::2", now_ns()),
            None,
            "its IPv6 address went with it"
        );

        // A bookmark: the client watches on from it, with no new list, though the
        // history before it is compacted away.
        let lists = count(&api.requests(), |r| is_pod_list(&r));
        let bookmark = api.bookmark_compact_and_end_watches();
        let resumed = format!("resourceVersion={bookmark}");
        until("a watch from the bookmark", || {
            api.requests().iter().any(|r| {
                r.contains("watch=true") && r.split(['?', '&']).any(|param| param == resumed)
            })
        })
        .await;
        let requests = api.requests();
        assert_eq!(
            count(&requests, |r| is_pod_list(&r)),
            lists,
            "{requests:#?}"
        );
        assert!(!requests.contains(&"ERROR 410".to_owned()), "{requests:#?}");

        // Away, changed and compacted meanwhile: 410 Gone, a new list, and the Pod
        // deleted meanwhile ends there while its address names the new one.
        let t_b = now_ns();
        api.stop().await;
        api.delete_pod("b");
        api.put_pod(pod("d", "client-2", "default", &["10.52.0.3"], None));
        api.compact();
        api.restart().await;
        until("the relist names the new Pod", || {
            pod_at(&names, "10.52.0.3", now_ns()).as_deref() == Some("default/client-2")
        })
        .await;
        let requests = api.requests();
        assert!(requests.contains(&"ERROR 410".to_owned()), "{requests:#?}");
        assert_eq!(
            count(&requests, |r| is_pod_list(&r)),
            lists + 1,
            "{requests:#?}"
        );
        assert_eq!(
            pod_at(&names, "10.52.0.3", t_b).as_deref(),
            Some("default/client")
        );

        // Away long enough to be noticed: status says so, names stay; back, the watch
        // resumes where it was and replays what happened meanwhile, with no new list.
        until("synced again", || kubernetes.state().synced).await;
        let t_c = now_ns();
        api.stop().await;
        until("unreachable", || {
            kubernetes.state().names_missing == Some(Unnamed::Unreachable)
        })
        .await;
        assert!(kubernetes.state().last_error.is_some());
        assert_eq!(
            pod_at(&names, "10.52.0.3", now_ns()).as_deref(),
            Some("default/client-2")
        );
        api.delete_pod("c");
        api.put_pod(pod("e", "web-7d9f-eeeee", "shop", &["10.52.0.5"], web));
        api.restart().await;
        until("the Pod added while away", || {
            pod_at(&names, "10.52.0.5", now_ns()).as_deref() == Some("shop/web-7d9f-eeeee")
        })
        .await;
        until("the Pod deleted while away", || {
            pod_at(&names, "10.52.0.2", now_ns()).is_none()
        })
        .await;
        assert_eq!(
            pod_at(&names, "10.52.0.2", t_c).as_deref(),
            Some("shop/web-7d9f-ccccc")
        );
        let requests = api.requests();
        assert_eq!(
            count(&requests, |r| is_pod_list(&r)),
            lists + 1,
            "{requests:#?}"
        );
        until("synced after the outage", || kubernetes.state().synced).await;
        assert_eq!(kubernetes.state().names_missing, None);

        // What `visibility flows` reads: the Pods the daemon saved.
        until("the saved Pods", || {
            pod_at(&PodNames::saved(&lab.pin_dir), "10.52.0.5", now_ns()).as_deref()
                == Some("shop/web-7d9f-eeeee")
        })
        .await;
        // Per-Pod metrics (opt-in, on here) count what the records named.
        let traffic = kubernetes.traffic();
        let a = traffic
            .iter()
            .find(|(pod, _)| pod.name == "web-7d9f-aaaaa")
            .map(|(_, t)| *t)
            .unwrap();
        assert!(a.sent_bytes >= 300, "{a:?}");
        api.stop().await;
    });
}

#[test]
fn workloads_are_named_as_the_controller_a_person_makes() {
    let lab = lab();
    runtime().block_on(async {
        let api = StandIn::start(&lab.dir).await;
        api.put_node(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
            "spec": {"podCIDRs": ["10.52.0.0/24"]}}),
        );
        api.put_controller(json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": "web-7d9f", "namespace": "shop", "uid": "web-7d9f-uid",
                "ownerReferences": owner_references(Some(("Deployment", "web")))}}));
        api.put_controller(json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "backup-29170", "namespace": "ops", "uid": "backup-29170-uid",
                "ownerReferences": owner_references(Some(("CronJob", "backup")))}}));
        api.put_controller(json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "migrate", "namespace": "ops", "uid": "migrate-uid"}}));
        // A Pod, its controller and the workload its records name (`kind/name`, or `-`
        // for none). The orphan's ReplicaSet cannot be read (404): it names itself.
        let cases = [
            "web-7d9f-aaaaa      ReplicaSet/web-7d9f     Deployment/web",
            "backup-29170-xxxxx  Job/backup-29170        CronJob/backup",
            "migrate-yyyyy       Job/migrate             Job/migrate",
            "db-0                StatefulSet/db          StatefulSet/db",
            "orphan-5c4b-zzzzz   ReplicaSet/orphan-5c4b  ReplicaSet/orphan-5c4b",
            "bare                -                       -",
        ]
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let owner = |word: &'static str| word.split_once('/');
            (
                format!("10.52.0.{}", i + 2),
                words[0],
                owner(words[1]),
                owner(words[2]),
            )
        })
        .collect::<Vec<_>>();
        for (ip, name, controller, _) in &cases {
            let namespace = if name.starts_with("web") {
                "shop"
            } else {
                "ops"
            };
            api.put_pod(pod(name, name, namespace, &[ip], *controller));
        }
        let (kubernetes, names) = watch_pods(
            &lab,
            &KubeConfig {
                access: Access::Kubeconfig(api.kubeconfig.clone()),
                cluster_name: Some("lab".into()),
                pod_metric_labels: false,
            },
        );
        until("synced", || kubernetes.state().synced).await;
        for (ip, name, _, expected) in &cases {
            until(name, || pod_at(&names, ip, now_ns()).is_some()).await;
            let flow = record(&names, ip, "10.52.0.7", now_ns());
            let named = &flow["src_gke_details"]["pod"];
            assert_eq!(named["pod_name"], *name);
            let workload =
                expected.map(|(kind, name)| json!({"workload_name": name, "workload_type": kind}));
            assert_eq!(named.get("pod_workload"), workload.as_ref(), "{name}");
        }
        // Each ReplicaSet and Job is read once, by its metadata.
        let requests = api.requests();
        for path in [
            "/apis/apps/v1/namespaces/shop/replicasets/web-7d9f",
            "/apis/batch/v1/namespaces/ops/jobs/backup-29170",
            "/apis/batch/v1/namespaces/ops/jobs/migrate",
        ] {
            assert_eq!(
                count(&requests, |r| r.starts_with(&format!("GET {path}?"))),
                1,
                "{requests:#?}"
            );
        }
        api.stop().await;
    });
}

#[test]
fn without_the_api_the_daemon_says_why_records_carry_no_names() {
    let lab = lab();
    runtime().block_on(async {
        let api = StandIn::start(&lab.dir).await;
        api.stop().await;
        let cases = [
            (Access::Off, Unnamed::TurnedOff),
            (
                Access::Kubeconfig(lab.dir.join("missing")),
                Unnamed::BadKubeconfig,
            ),
            (
                Access::Kubeconfig(api.kubeconfig.clone()),
                Unnamed::Unreachable,
            ),
        ];
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_none();
        let cases = cases
            .into_iter()
            .chain(in_cluster.then_some((Access::Auto, Unnamed::NoInClusterConfig)));
        for (access, why) in cases {
            let (kubernetes, names) = watch_pods(
                &lab,
                &KubeConfig {
                    access: access.clone(),
                    ..Default::default()
                },
            );
            until(&format!("{access:?} says {why:?}"), || {
                kubernetes.state().names_missing == Some(why)
            })
            .await;
            let state = kubernetes.state();
            assert!(!state.synced);
            assert_eq!(state.access, access.describe());
            assert_eq!(
                state.last_error.is_some(),
                why != Unnamed::TurnedOff,
                "{state:?}"
            );
            assert_eq!(pod_at(&names, "10.52.0.2", now_ns()), None);
        }
    });
}
