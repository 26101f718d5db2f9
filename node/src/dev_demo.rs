//! The demo service of `trellis dev`: an HTTP echo named `web` with an instance on each of
//! two nodes (never the first, so a call through node 1 visibly crosses the mesh), registered
//! with a health check, and the commands that show the mesh at work.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// The demo's service name and the port its instances listen on, on their node's address.
pub const SERVICE: &str = "web";
const PORT: u16 = 9080;
/// The intention `try_commands` suggests applying, and its file in the dev dir.
const DENY_NAME: &str = "demo-deny-admin";

/// What is running, for the commands printed to try.
pub struct Demo {
    /// The first node's HTTP proxy, where the suggested calls go.
    pub proxy: SocketAddr,
    pub api: SocketAddr,
    pub instances: Vec<(String, SocketAddr)>,
    pub deny_file: PathBuf,
    /// Node 1's virtual address for the service (`web.trellis`), once it listens.
    pub vip: Option<SocketAddr>,
}

/// Node i's address on `port` (the dev cluster's layout).
pub type Addr = fn(u8, u16) -> SocketAddr;

/// Starts the echo servers on `rt`, registers them, and waits until a call by name through
/// node 1 is answered.
pub fn start(rt: &tokio::runtime::Runtime, dir: &Path, nodes: u8, addr: Addr) -> anyhow::Result<Demo> {
    let on: Vec<u8> = if nodes == 1 { vec![0] } else { (1..nodes.min(3)).collect() };
    let mut instances = Vec::new();
    for (k, i) in on.into_iter().enumerate() {
        let id = format!("{SERVICE}-{}", k + 1);
        let at = addr(i, PORT);
        let listener = rt.block_on(tokio::net::TcpListener::bind(at)).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        rt.spawn(serve(listener, format!("{id} on node{}", i + 1)));
        register(addr(i, 8500), &id, at, k)?;
        instances.push((id, at));
    }
    let deny_file = dir.join(format!("{DENY_NAME}.toml"));
    std::fs::write(&deny_file, deny_policy())?;
    let mut demo = Demo { proxy: addr(0, 15001), api: addr(0, 8500), instances, deny_file, vip: None };
    wait_answered(demo.proxy, Duration::from_secs(20))?;
    demo.vip = virtual_address(demo.api, Duration::from_secs(5));
    Ok(demo)
}

/// Where node 1 listens for the service as `web.trellis`, when it does within `within`.
fn virtual_address(api: SocketAddr, within: Duration) -> Option<SocketAddr> {
    let start = Instant::now();
    while start.elapsed() < within {
        let v: Option<serde_json::Value> =
            crate::client::get(api, "/v1/agent/virtual-addresses").ok().and_then(|t| serde_json::from_str(&t).ok());
        let web = v.as_ref().map(|v| &v["services"][SERVICE]);
        let ip = web.and_then(|w| w["address"].as_str()?.parse::<std::net::IpAddr>().ok());
        let listening = web.and_then(|w| w["ports"].as_array()).is_some_and(|p| p.iter().any(|p| p["port"] == PORT));
        if let (Some(ip), true) = (ip, listening) {
            return Some(SocketAddr::new(ip, PORT));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// `PUT /v1/agent/services/{id}` on the instance's own node, with an HTTP check.
fn register(api: SocketAddr, id: &str, at: SocketAddr, k: usize) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "service": SERVICE,
        "address": at.ip(),
        "port": at.port(),
        "protocol": "http",
        "labels": {"version": format!("v{}", k + 1)},
        "check": {"http": "/healthz", "interval": "2s"},
    });
    crate::client::put(api, &format!("/v1/agent/services/{id}"), &body.to_string())?;
    Ok(())
}

/// An L7 intention: `/admin` and below on `web` denied to every caller.
fn deny_policy() -> String {
    format!(
        "[intentions.{DENY_NAME}]\nsource = \"*\"\ndestination = \"{SERVICE}\"\naction = \"deny\"\npaths = [\"/admin/*\"]\n"
    )
}

/// Polls a call by name through the proxy until an instance answers.
fn wait_answered(proxy: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        match crate::client::get_through(proxy, SERVICE, "/hello") {
            Ok((200, _)) => return Ok(()),
            r if start.elapsed() > within => anyhow::bail!("no answer from {SERVICE} through {proxy}: {r:?}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, who: String) {
    let who: &'static str = Box::leak(who.into_boxed_str());
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| async move {
                Ok::<_, Infallible>(echo(who, &req))
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

/// Says which instance on which node answered, and what it was asked.
fn echo(who: &str, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let caller = req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()).unwrap_or("-");
    let body = format!("{who} answered {} {} (x-forwarded-for: {caller})\n", req.method(), req.uri().path());
    Response::builder()
        .header("content-type", "text/plain; charset=utf-8")
        .header("x-demo-instance", who)
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}

/// The three things to try, as commands to paste into another shell.
pub fn try_commands(d: &Demo, exe: &Path) -> String {
    let instances: Vec<String> = d.instances.iter().map(|(id, at)| format!("{id} at {at}")).collect();
    let exe = exe.display();
    let (proxy, api, file) = (d.proxy, d.api, d.deny_file.display());
    format!(
        "
Demo service `{SERVICE}` (an HTTP echo): {instances}, registered with a health check.

Try, from another shell:
  export TRELLIS_HTTP_ADDR={api}
  # 1. A call by name through node1's proxy{across}
  curl -s -H 'Host: {SERVICE}' http://{proxy}/hello{vip}
  # 2. What the mesh saw: the catalog, every agent's requests merged, the dashboard at http://{api}/ui
  {exe} services
  {exe} stat {SERVICE} --by node
  {exe} dns {SERVICE}.service.trellis        # what node1's DNS interface answers (SRV: -t SRV)
  # 3. Policy on any node takes effect everywhere: deny /admin/* on {SERVICE}, see the 403, undo it
  {exe} policy apply -f {file}
  curl -s -i -H 'Host: {SERVICE}' http://{proxy}/admin/users | head -1
  {exe} policy delete intentions {DENY_NAME}
",
        instances = instances.join(", "),
        vip = d.vip.map_or(String::new(), |v| format!(
            "\n  # ... or as an unchanged app: {SERVICE}.trellis is node1's virtual address for it (DNS: {exe} dns {SERVICE}.trellis)\n  curl -s --resolve {SERVICE}.trellis:{PORT}:{} http://{SERVICE}.trellis:{PORT}/hello",
            v.ip()
        )),
        across =
            if d.instances.len() > 1 { "; an instance on another node answers (again: the other one)" } else { "" },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deny_file_is_a_valid_policy_document() {
        let objects = crate::client::parse_policy_text(&deny_policy(), "toml", &"demo").unwrap();
        assert_eq!(objects.len(), 1);
        let (kind, name, body) = &objects[0];
        assert_eq!((kind.as_str(), name.as_str()), ("intentions", DENY_NAME));
        let k = trellis_core::policy::Kind::parse(kind).unwrap();
        trellis_core::policy::model::parse(k, name, body.to_string().as_bytes()).unwrap();
    }
}
