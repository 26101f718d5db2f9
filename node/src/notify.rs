//! Service-manager readiness (`sd_notify`): one unix datagram to `$NOTIFY_SOCKET` saying the
//! agent serves (`READY=1`) or is leaving (`STOPPING=1`), so a `Type=notify` unit starts its
//! dependents only once transport, membership and API are up.
//!
//! Our own few lines rather than a crate: the protocol is a single datagram, and std reaches
//! abstract socket names (`@name`) without unsafe code.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

/// Where `$NOTIFY_SOCKET` points.
#[derive(Debug, PartialEq, Eq)]
pub enum NotifyTarget {
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract socket name (the value after `@`).
    Abstract(Vec<u8>),
}

/// Reads a `$NOTIFY_SOCKET` value: `/path` or `@abstract`; empty means no service manager.
pub fn parse_target(value: &OsStr) -> Result<Option<NotifyTarget>, String> {
    let bytes = value.as_bytes();
    match bytes.first() {
        None => Ok(None),
        Some(b'/') => Ok(Some(NotifyTarget::Path(PathBuf::from(value)))),
        Some(b'@') if bytes.len() > 1 => Ok(Some(NotifyTarget::Abstract(bytes[1..].to_vec()))),
        _ => Err(format!(
            "NOTIFY_SOCKET={:?} is neither an absolute socket path nor @abstract-name; only unix sockets are supported",
            value
        )),
    }
}

/// Sends `state` (newline-separated `KEY=VALUE` lines) to `target`.
pub fn send(target: &NotifyTarget, state: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match target {
        NotifyTarget::Path(p) => sock.send_to(state.as_bytes(), p).map(drop),
        NotifyTarget::Abstract(name) => send_abstract(&sock, name, state),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(sock: &UnixDatagram, name: &[u8], state: &str) -> std::io::Result<()> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(state.as_bytes(), &addr).map(drop)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &str) -> std::io::Result<()> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "abstract unix sockets exist only on Linux"))
}

/// Tells the service manager, if any, about `state`. A failure is logged, never fatal: the
/// agent serves either way, and the unit's start timeout names the problem.
fn notify(state: &str) {
    let Some(value) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let res = parse_target(&value).and_then(|t| match t {
        Some(t) => send(&t, state).map_err(|e| format!("cannot send to NOTIFY_SOCKET={value:?}: {e}")),
        None => Ok(()),
    });
    match res {
        Ok(()) => tracing::debug!(state = %state.replace('\n', " "), "notified the service manager"),
        Err(e) => tracing::warn!("{e}; a Type=notify unit will not see this state"),
    }
}

/// Transport, membership and API are up.
pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

/// The agent has begun its graceful leave.
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=leaving the cluster");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_socket_values_are_paths_or_abstract_names() {
        let p = |s: &str| parse_target(OsStr::new(s));
        assert_eq!(p(""), Ok(None));
        assert_eq!(p("/run/systemd/notify"), Ok(Some(NotifyTarget::Path("/run/systemd/notify".into()))));
        assert_eq!(p("@/org/systemd/x"), Ok(Some(NotifyTarget::Abstract(b"/org/systemd/x".to_vec()))));
        assert!(p("@").unwrap_err().contains("NOTIFY_SOCKET"));
        assert!(p("relative/sock").unwrap_err().contains("absolute socket path"));
        assert!(p("vsock:2:1234").is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn ready_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("trellis-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        listener.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let target = parse_target(OsStr::new(&format!("@{name}"))).unwrap().unwrap();
        send(&target, "READY=1\nSTATUS=x").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");
    }
}
