//! Who opened a local TCP connection: the kernel's socket diagnostics (`NETLINK_SOCK_DIAG`,
//! what `ss -e` reads) looked up by the connection's exact addresses, and Unix user names.

use std::net::SocketAddr;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

/// The uid owning the client end of a connection this host accepted: the socket whose own
/// address is `client` and whose peer is `server` (our listener's address).
pub fn uid_of(client: SocketAddr, server: SocketAddr) -> std::io::Result<u32> {
    let family = if client.is_ipv4() { AF_INET } else { AF_INET6 };
    let socket_id = SocketId {
        source_port: client.port(),
        destination_port: server.port(),
        source_address: client.ip(),
        destination_address: server.ip(),
        interface_id: 0,
        // INET_DIAG_NOCOOKIE: match by addresses, not by a cookie from an earlier dump.
        cookie: [0xff; 8],
    };
    let req = InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id,
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut packet = NetlinkMessage::new(header, SockDiagMessage::InetRequest(req).into());
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    let socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    socket.send(&buf, 0)?;
    let mut reply = vec![0; 8192];
    let n = socket.recv(&mut &mut reply[..], 0)?;
    let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&reply[..n]).map_err(std::io::Error::other)?;
    match msg.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => Ok(r.header.uid),
        NetlinkPayload::Error(e) => Err(e.to_io()),
        other => Err(std::io::Error::other(format!("unexpected sock_diag reply {other:?}"))),
    }
}

/// A user's uid: a number as written, else a name looked up through the C library's
/// `getpwnam_r` (so NSS sources count, as they do for `id`).
pub fn uid_of_user(user: &str) -> Option<u32> {
    user.parse().ok().or_else(|| uzers::get_user_by_name(user).map(|u| u.uid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_of_a_loopback_connection_is_this_process_user() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let (_accepted, from) = listener.accept().unwrap();
        assert_eq!(from, client.local_addr().unwrap());
        let me = uzers::get_effective_uid();
        assert_eq!(uid_of(from, server).unwrap(), me);
        // A connection that does not exist is an error, not a guess.
        let gone = SocketAddr::new(from.ip(), from.port().wrapping_add(1).max(1));
        assert!(uid_of(gone, server).is_err());
    }

    #[test]
    fn users_resolve_by_number_and_by_name() {
        assert_eq!(uid_of_user("1234"), Some(1234));
        assert_eq!(uid_of_user("root"), Some(0));
        assert_eq!(uid_of_user("no-such-user-here"), None);
    }
}
