//! `trellis dns NAME`: asks the local agent's DNS interface, as an application's resolver
//! would, and prints what it answered.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RecordType};

const TIMEOUT: Duration = Duration::from_secs(3);

/// One query to `server` over UDP (advertising 1232 bytes with EDNS) or TCP.
pub fn query(server: SocketAddr, name: &str, rtype: RecordType, tcp: bool) -> anyhow::Result<Message> {
    let name = Name::from_ascii(name).map_err(|e| anyhow::anyhow!("{name:?} is not a DNS name: {e}"))?;
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(name, rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    q.set_edns(edns);
    let bytes = q.to_vec()?;
    let answer = if tcp {
        let mut s = TcpStream::connect_timeout(&server, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(&(bytes.len() as u16).to_be_bytes())?;
        s.write_all(&bytes)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len)?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf)?;
        buf
    } else {
        let any: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
        let s = UdpSocket::bind(any)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.send_to(&bytes, server)?;
        let mut buf = vec![0u8; 4096];
        let n = s.recv(&mut buf)?;
        buf.truncate(n);
        buf
    };
    let m = Message::from_vec(&answer)?;
    anyhow::ensure!(m.metadata.id == q.metadata.id, "an answer to another query (id {})", m.metadata.id);
    Ok(m)
}

/// Asks the agent at `http` where its DNS interface is, queries it, prints the answer
/// (`dig`'s layout); a truncated UDP answer is asked again over TCP, as resolvers do.
pub fn run(http: SocketAddr, name: &str, rtype: &str, tcp: bool) -> anyhow::Result<()> {
    let rtype: RecordType = rtype
        .to_ascii_uppercase()
        .parse()
        .map_err(|_| anyhow::anyhow!("--type {rtype:?} is not a record type; use A, AAAA, SRV or ANY"))?;
    let me: serde_json::Value = serde_json::from_str(&crate::client::get(http, "/v1/agent/self")?)?;
    let Some(server) = me["dns_addr"].as_str().and_then(|a| a.parse::<SocketAddr>().ok()) else {
        anyhow::bail!("the agent at {http} has no DNS interface; start it without [dns] enabled = false");
    };
    let mut m = query(server, name, rtype, tcp)?;
    let mut over = if tcp { "TCP" } else { "UDP" };
    if m.metadata.truncation && !tcp {
        m = query(server, name, rtype, true)?;
        over = "TCP, after a truncated UDP answer";
    }
    // dig's spelling of the code: NOERROR, NXDOMAIN, REFUSED.
    let status = format!("{:?}", m.metadata.response_code).to_ascii_uppercase();
    println!(";; {status} from {server} over {over}");
    for (title, records) in [("ANSWER", &m.answers), ("ADDITIONAL", &m.additionals)] {
        if !records.is_empty() {
            println!(";; {title}");
            for r in records.iter() {
                println!("{}\t{}\t{}\t{}", r.name, r.ttl, r.record_type(), r.data);
            }
        }
    }
    Ok(())
}
