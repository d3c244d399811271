//! Addresses that work on IPv4, IPv6 and dual-stack clusters alike.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};

/// `host:port`, with an IPv6 literal in brackets (a pod IP on an IPv6 cluster is one).
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The address to bind for `addr`: the IPv4 wildcard in place of the IPv6 one where the kernel
/// has no IPv6 (the IPv6 wildcard takes IPv4 connections too where it has).
pub fn fallback(addr: SocketAddr) -> Option<SocketAddr> {
    (addr.ip() == Ipv6Addr::UNSPECIFIED).then(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())))
}

/// Listens on `port` of every address of this host, IPv6 and IPv4.
pub fn listen_any(port: u16) -> io::Result<TcpListener> {
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    TcpListener::bind(addr).or_else(|e| match fallback(addr) {
        Some(v4) => TcpListener::bind(v4),
        None => Err(e),
    })
}

/// [`listen_any`] for the async servers: binds `addr`, falling back as it does.
pub async fn bind(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) => match fallback(addr) {
            Some(v4) => tokio::net::TcpListener::bind(v4).await,
            None => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_hosts_are_bracketed_once() {
        assert_eq!(host_port("10.0.0.5", 50053), "10.0.0.5:50053");
        assert_eq!(host_port("fd00::5", 50053), "[fd00::5]:50053");
        assert_eq!(host_port("[fd00::5]", 50053), "[fd00::5]:50053");
        assert_eq!(host_port("llm-0-0.llm-0.ns.svc", 1), "llm-0-0.llm-0.ns.svc:1");
        use std::net::ToSocketAddrs;
        assert!(host_port("::1", 80).to_socket_addrs().is_ok());
    }

    #[test]
    fn the_any_address_takes_ipv4_connections() {
        let l = listen_any(0).unwrap();
        let port = l.local_addr().unwrap().port();
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(fallback("[::]:7".parse().unwrap()), Some("0.0.0.0:7".parse().unwrap()));
        assert_eq!(fallback("127.0.0.1:7".parse().unwrap()), None);
    }
}
