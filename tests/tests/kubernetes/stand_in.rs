//! A stand-in for the Kubernetes API server. No real API server can run here (there is
//! no kube-apiserver, etcd or cluster on this machine), so this is a stand-in that
//! speaks the real protocol the daemon's client uses, over HTTPS with a self-signed
//! certificate the client is told to trust (through a kubeconfig): a list answers
//! with the collection's `resourceVersion`; a watch from a `resourceVersion` streams
//! JSON events (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`) in chunks, replaying the
//! history after that version, or answers a version older than the history with an
//! `ERROR` event `410 Gone` (Expired), as the API server does after compaction. It
//! honours the field selector `spec.nodeName=...`, asks for a bearer token, and can be
//! made to refuse (403) or to go away and come back on the same port.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures::{SinkExt as _, channel::mpsc};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::broadcast, task::JoinHandle};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};

const TOKEN: &str = "stand-in-token";

/// One event of the watch history.
#[derive(Clone, Debug)]
struct Event {
    resource_version: u64,
    kind: &'static str,
    object: Value,
    /// The watch ends after this event, as one does at its `timeoutSeconds`.
    ends_watch: bool,
}

/// The cluster the stand-in serves.
#[derive(Default)]
struct Cluster {
    resource_version: u64,
    pods: BTreeMap<String, Value>,
    history: Vec<Event>,
    nodes: BTreeMap<String, Value>,
    /// ReplicaSets and Jobs, by API group, resource, namespace and name.
    controllers: BTreeMap<[String; 4], Value>,
    /// The requests served (`GET path?query`), for the test to read.
    requests: Vec<String>,
    forbidden: bool,
}

/// The stand-in: its cluster, its listener's address, and the certificate to trust.
pub struct StandIn {
    cluster: Arc<Mutex<Cluster>>,
    events: broadcast::Sender<Event>,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    pub kubeconfig: PathBuf,
}

impl StandIn {
    /// Starts serving on a free port of 127.0.0.1, and writes a kubeconfig (and the CA
    /// it names) into `dir`.
    pub async fn start(dir: &Path) -> Self {
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, certified.cert.pem()).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(certified.cert.der().to_vec())],
                key,
            )
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: stand-in\n\
                 clusters:\n- name: stand-in\n  cluster:\n    server: https://{addr}\n    certificate-authority: {}\n\
                 users:\n- name: daemon\n  user:\n    token: {TOKEN}\n\
                 contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: daemon\n",
                ca.display()
            ),
        )
        .unwrap();
        let stand_in = Self {
            cluster: Arc::default(),
            events: broadcast::channel(1024).0,
            addr,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            tasks: Arc::default(),
            kubeconfig,
        };
        stand_in.serve(listener);
        stand_in
    }

    fn serve(&self, listener: TcpListener) {
        let (cluster, events, acceptor, tasks) = (
            self.cluster.clone(),
            self.events.clone(),
            self.acceptor.clone(),
            self.tasks.clone(),
        );
        let accepting = tokio::spawn({
            let tasks = tasks.clone();
            async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let (cluster, events, acceptor) =
                        (cluster.clone(), events.clone(), acceptor.clone());
                    let connection = tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = service_fn(move |request| {
                            let answer = answer(&cluster, &events, &request);
                            async move { Ok::<_, Infallible>(answer) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    });
                    tasks.lock().unwrap().push(connection);
                }
            }
        });
        tasks.lock().unwrap().push(accepting);
    }

    /// The API goes away: the listener closes and every connection (watches too) drops.
    pub async fn stop(&self) {
        let tasks: Vec<JoinHandle<()>> = self.tasks.lock().unwrap().drain(..).collect();
        for task in tasks {
            task.abort();
            // Cancelled at its next poll: only then are its sockets closed.
            let _ = task.await;
        }
    }

    /// The API comes back on the same address, with the same history.
    pub async fn restart(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn change(&self, kind: &'static str, object: Value) {
        let mut cluster = self.cluster.lock().unwrap();
        cluster.resource_version += 1;
        let mut object = object;
        object["metadata"]["resourceVersion"] = json!(cluster.resource_version.to_string());
        let event = Event {
            resource_version: cluster.resource_version,
            kind,
            object: object.clone(),
            ends_watch: false,
        };
        let uid = object["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match kind {
            "DELETED" => {
                cluster.pods.remove(&uid);
            }
            _ => {
                cluster.pods.insert(uid, object);
            }
        }
        cluster.history.push(event.clone());
        let _ = self.events.send(event);
    }

    /// Adds or changes a Pod (its `metadata.uid` names it).
    pub fn put_pod(&self, pod: Value) {
        let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
        let known = self.cluster.lock().unwrap().pods.contains_key(&uid);
        self.change(if known { "MODIFIED" } else { "ADDED" }, pod);
    }

    pub fn delete_pod(&self, uid: &str) {
        let pod = self.cluster.lock().unwrap().pods[uid].clone();
        self.change("DELETED", pod);
    }

    pub fn put_node(&self, node: Value) {
        let name = node["metadata"]["name"].as_str().unwrap().to_owned();
        self.cluster.lock().unwrap().nodes.insert(name, node);
    }

    /// Adds a ReplicaSet (`apps/v1`) or a Job (`batch/v1`), which the daemon reads to
    /// find the workload that made it.
    pub fn put_controller(&self, object: Value) {
        let text = |field: &Value| field.as_str().unwrap().to_owned();
        let group = text(&object["apiVersion"])
            .trim_end_matches("/v1")
            .to_owned();
        let resource = format!("{}s", text(&object["kind"]).to_lowercase());
        let key = [
            group,
            resource,
            text(&object["metadata"]["namespace"]),
            text(&object["metadata"]["name"]),
        ];
        self.cluster.lock().unwrap().controllers.insert(key, object);
    }

    pub fn set_forbidden(&self, forbidden: bool) {
        self.cluster.lock().unwrap().forbidden = forbidden;
    }

    /// Objects elsewhere in the cluster changed (the resourceVersion moves on with no
    /// event for this node) and the history is compacted; open watches get a `BOOKMARK`
    /// at the new version and end, as at their timeout. A client that took the
    /// bookmark watches on from it; one that did not gets `410`. Returns the version.
    pub fn bookmark_compact_and_end_watches(&self) -> u64 {
        let mut cluster = self.cluster.lock().unwrap();
        cluster.resource_version += 1;
        cluster.history.clear();
        let event = Event {
            resource_version: cluster.resource_version,
            kind: "BOOKMARK",
            object: json!({"kind": "Pod", "apiVersion": "v1",
                "metadata": {"resourceVersion": cluster.resource_version.to_string()}}),
            ends_watch: true,
        };
        let _ = self.events.send(event);
        cluster.resource_version
    }

    /// Compaction: the history so far is gone, and a watch from before now gets `410`.
    pub fn compact(&self) {
        self.cluster.lock().unwrap().history.clear();
    }

    /// The requests served so far.
    pub fn requests(&self) -> Vec<String> {
        self.cluster.lock().unwrap().requests.clone()
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: u16, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

fn answer(
    cluster: &Mutex<Cluster>,
    events: &broadcast::Sender<Event>,
    request: &Request<hyper::body::Incoming>,
) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let query: BTreeMap<String, String> = request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%3D", "=").replace("%3d", "=")))
        .collect();
    let mut cluster = cluster.lock().unwrap();
    cluster.requests.push(format!(
        "GET {path}?{}",
        request.uri().query().unwrap_or_default()
    ));
    let authorized = request
        .headers()
        .get("Authorization")
        .is_some_and(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes());
    if !authorized {
        return json_response(401, &status(401, "Unauthorized", "Unauthorized"));
    }
    if cluster.forbidden && path == "/api/v1/pods" {
        return json_response(
            403,
            &status(
                403,
                "Forbidden",
                "pods is forbidden: User cannot list resource",
            ),
        );
    }
    let not_found = || json_response(404, &status(404, "NotFound", "not found"));
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", "v1", "nodes", name] => cluster
            .nodes
            .get(*name)
            .map_or_else(not_found, |node| json_response(200, node)),
        ["apis", group, "v1", "namespaces", namespace, resource, name] => cluster
            .controllers
            .get(&[group, resource, namespace, name].map(|s| (*s).to_owned()))
            .map_or_else(not_found, |object| json_response(200, object)),
        ["api", "v1", "pods"] => {
            let node = query
                .get("fieldSelector")
                .and_then(|s| s.strip_prefix("spec.nodeName="))
                .map(str::to_owned);
            let on_node =
                move |pod: &Value| node.as_deref().is_none_or(|n| pod["spec"]["nodeName"] == n);
            if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                let from: u64 = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                watch(&mut cluster, events, from, on_node)
            } else {
                let items: Vec<&Value> = cluster.pods.values().filter(|p| on_node(p)).collect();
                json_response(
                    200,
                    &json!({"kind": "PodList", "apiVersion": "v1",
                        "metadata": {"resourceVersion": cluster.resource_version.to_string()},
                        "items": items}),
                )
            }
        }
        _ => not_found(),
    }
}

/// A watch from `from`: the history after it, then each new event as it happens, one
/// JSON object per line in a chunked body; `410 Gone` when the history no longer
/// reaches back to `from`.
fn watch(
    cluster: &mut Cluster,
    events: &broadcast::Sender<Event>,
    from: u64,
    on_node: impl Fn(&Value) -> bool + Send + 'static,
) -> Response<Body> {
    let (mut lines, body) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let line = |kind: &str, object: &Value| {
        Ok(Frame::data(Bytes::from(format!(
            "{}\n",
            json!({"type": kind, "object": object})
        ))))
    };
    let oldest_kept = cluster
        .history
        .first()
        .map_or(cluster.resource_version, |e| e.resource_version - 1);
    let mut first: Vec<Result<Frame<Bytes>, Infallible>> = Vec::new();
    let expired = from < oldest_kept;
    if expired {
        cluster.requests.push("ERROR 410".to_owned());
        first.push(line(
            "ERROR",
            &status(
                410,
                "Expired",
                &format!("too old resource version: {from} ({oldest_kept})"),
            ),
        ));
    } else {
        first.extend(
            cluster
                .history
                .iter()
                .filter(|e| e.resource_version > from && on_node(&e.object))
                .map(|e| line(e.kind, &e.object)),
        );
    }
    let mut live = events.subscribe();
    let last = cluster.resource_version;
    tokio::spawn(async move {
        for frame in first {
            if lines.send(frame).await.is_err() {
                return;
            }
        }
        if expired {
            return;
        }
        while let Ok(event) = live.recv().await {
            let wanted = event.resource_version > last
                && (event.kind == "BOOKMARK" || on_node(&event.object));
            if wanted && lines.send(line(event.kind, &event.object)).await.is_err() {
                return;
            }
            if event.ends_watch {
                return;
            }
        }
    });
    Response::builder()
        .status(200)
        .header("Content-Type", "application/json")
        .body(StreamBody::new(body).boxed())
        .unwrap()
}
