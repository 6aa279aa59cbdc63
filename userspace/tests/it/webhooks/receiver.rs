//! The webhook receiver: a real axum server on 127.0.0.1 that checks every signature with its
//! own HMAC, records each delivery, can fail chosen subjects, and can be stopped and started
//! again on the same port.

use super::*;

// ---- the receiver --------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub(super) struct Got {
    /// Which endpoint path it came in on (/hooks/<name>).
    pub(super) endpoint: String,
    pub(super) id: String,
    pub(super) kind: String,
    pub(super) subject: String,
    pub(super) timestamp: u64,
    pub(super) body: Value,
    /// What the receiver answered.
    pub(super) answered: u16,
}

#[derive(Clone, Default)]
pub(super) struct RxState {
    pub(super) got: Arc<Mutex<Vec<Got>>>,
    /// Subjects answered with 500.
    pub(super) fail: Arc<Mutex<HashSet<String>>>,
    /// Endpoint name -> secret.
    pub(super) secrets: Arc<HashMap<String, Vec<u8>>>,
    /// Requests with a bad signature or inconsistent headers (must stay empty).
    pub(super) bad: Arc<Mutex<Vec<String>>>,
}

impl RxState {
    pub(super) fn new(secrets: &[(&str, &[u8])]) -> RxState {
        RxState {
            secrets: Arc::new(secrets.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect()),
            ..Default::default()
        }
    }

    pub(super) fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Delivered (answered 2xx) at `endpoint`.
    pub(super) fn delivered(&self, endpoint: &str) -> Vec<Got> {
        self.got().into_iter().filter(|g| g.endpoint == endpoint && g.answered == 200).collect()
    }

    pub(super) fn assert_no_bad(&self) {
        let bad = self.bad.lock().unwrap();
        assert!(bad.is_empty(), "the receiver rejected requests: {bad:#?}");
    }
}

async fn hook(
    State(st): State<RxState>,
    Path(endpoint): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(&'static str, &'static str); 1], &'static str) {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let reject = |why: String| {
        st.bad.lock().unwrap().push(why);
        (StatusCode::UNAUTHORIZED, [("connection", "close")], "rejected")
    };
    let Some(secret) = st.secrets.get(&endpoint) else {
        return reject(format!("unknown endpoint path {endpoint}"));
    };
    let ts = h("x-tunmeter-timestamp");
    let want = support::webhook_signature(secret, &ts, &body);
    if h("x-tunmeter-signature") != want {
        return reject(format!("{endpoint}: signature {:?}, expected {want}", h("x-tunmeter-signature")));
    }
    let Ok(timestamp) = ts.parse::<u64>() else {
        return reject(format!("timestamp {ts:?}"));
    };
    let now_s = tunmeter::time::unix_ms() / 1000;
    if timestamp + 60 < now_s || timestamp > now_s + 1 {
        return reject(format!("timestamp {timestamp} is not now ({now_s})"));
    }
    if h("content-type") != "application/json" {
        return reject(format!("content-type {:?}", h("content-type")));
    }
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return reject(format!("body is not JSON: {e}")),
    };
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    if h("x-tunmeter-event") != s("type") || h("x-tunmeter-delivery") != s("id") {
        return reject(format!(
            "headers {:?}/{:?} do not match the body {v}",
            h("x-tunmeter-event"),
            h("x-tunmeter-delivery")
        ));
    }
    let fail = st.fail.lock().unwrap().contains(&s("subject"));
    let answered = if fail { 500 } else { 200 };
    st.got.lock().unwrap().push(Got {
        endpoint,
        id: s("id"),
        kind: s("type"),
        subject: s("subject"),
        timestamp,
        body: v,
        answered,
    });
    if fail {
        (StatusCode::INTERNAL_SERVER_ERROR, [("connection", "close")], "subject failing on purpose")
    } else {
        (StatusCode::OK, [("connection", "close")], "ok")
    }
}

pub(super) struct Receiver {
    pub(super) addr: SocketAddr,
    pub(super) stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub(super) task: Option<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    /// Listen on `port` (0: any free port), retrying a taken port for up to 5 s.
    pub(super) async fn start(port: u16, st: &RxState) -> Receiver {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("binding the receiver to port {port}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("binding the receiver to port {port}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/hooks/{endpoint}", post(hook)).with_state(st.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Receiver { addr, stop: Some(tx), task: Some(task) }
    }

    pub(super) fn url(&self, endpoint: &str) -> String {
        format!("http://{}/hooks/{endpoint}", self.addr)
    }

    /// Stop serving and close the listener: connections to the port are refused afterwards.
    pub(super) async fn kill(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(mut t) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut t).await.is_err()
        {
            t.abort();
            let _ = t.await;
        }
        let refused = tokio::net::TcpStream::connect(self.addr).await;
        assert!(refused.is_err(), "the receiver's port {} still accepts connections", self.addr);
    }
}
