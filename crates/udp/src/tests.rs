//! Batches over real loopback sockets.

use std::io::{self, IoSlice};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;

use super::*;

fn pair(addr: &str) -> (UdpSocket, UdpSocket) {
    let a = UdpSocket::bind(addr).expect("bind a");
    let b = UdpSocket::bind(addr).expect("bind b");
    (a, b)
}

#[test]
fn send_to_and_recv_with_truncation() {
    let (a, b) = pair("127.0.0.1:0");
    let to = b.local_addr().expect("addr");
    let msgs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
    let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
    assert_eq!(send_to(a.as_fd(), &refs, Some(to)).expect("send"), 5);
    let mut batch = RecvBatch::new(8, 102);
    assert_eq!(batch.recv(b.as_fd()).expect("recv"), 5);
    assert_eq!(batch.len(), 5);
    for (i, d) in batch.iter().enumerate() {
        assert_eq!(d.from, Some(a.local_addr().expect("addr")));
        assert_eq!(d.truncated, i > 2, "slot of 102 bytes truncates the 103+ byte datagrams");
        assert_eq!(d.data.len(), (100 + i).min(102));
        assert!(d.data.iter().all(|&x| usize::from(x) == i));
        assert_eq!(d.segment, 0);
    }
    let e = batch.recv(b.as_fd()).expect_err("nothing queued");
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    assert!(batch.is_empty());
}

#[test]
fn one_call_to_several_destinations_over_ipv6() {
    let Ok(a) = UdpSocket::bind("[::1]:0") else {
        eprintln!("skipping: no IPv6 loopback here");
        return;
    };
    let (b, c) = pair("[::1]:0");
    let (bt, ct) = (b.local_addr().expect("addr"), c.local_addr().expect("addr"));
    let iov = [IoSlice::new(b"to b"), IoSlice::new(b"to c"), IoSlice::new(b"b again")];
    let msgs = [
        Message { iov: &iov[0..1], to: Some(bt), segment: None },
        Message { iov: &iov[1..2], to: Some(ct), segment: None },
        Message { iov: &iov[2..3], to: Some(bt), segment: None },
    ];
    assert_eq!(send(a.as_fd(), &msgs, false).expect("send"), 3);
    let from = Some(a.local_addr().expect("addr"));
    let mut batch = RecvBatch::new(4, 64);
    assert_eq!(batch.recv(b.as_fd()).expect("recv b"), 2);
    let got: Vec<_> = batch.iter().map(|d| (d.data.to_vec(), d.from)).collect();
    assert_eq!(got, vec![(b"to b".to_vec(), from), (b"b again".to_vec(), from)]);
    assert_eq!(batch.recv(c.as_fd()).expect("recv c"), 1);
    assert_eq!(batch.get(0).data, b"to c");
}

#[test]
fn gathered_slices_make_one_datagram() {
    let (a, b) = pair("127.0.0.1:0");
    let iov = [IoSlice::new(b"head-"), IoSlice::new(b"body")];
    let msgs = [Message { iov: &iov, to: Some(b.local_addr().expect("addr")), segment: None }];
    assert_eq!(send(a.as_fd(), &msgs, true).expect("send"), 1);
    let mut batch = RecvBatch::new(1, 64);
    assert_eq!(batch.recv(b.as_fd()).expect("recv"), 1);
    assert_eq!(batch.get(0).data, b"head-body");
}

#[test]
fn gso_send_arrives_as_segments_or_one_gro_buffer() {
    let (a, b) = pair("127.0.0.1:0");
    if !probe_gso(a.as_fd()) || !enable_gro(b.as_fd()) {
        eprintln!("skipping: this kernel lacks UDP GSO or GRO");
        return;
    }
    let payload: Vec<u8> = (0..250u32).map(|i| (i / 100) as u8).collect();
    let iov = [IoSlice::new(&payload)];
    let to: SocketAddr = b.local_addr().expect("addr");
    let msgs = [Message { iov: &iov, to: Some(to), segment: Some(100) }];
    assert_eq!(send(a.as_fd(), &msgs, true).expect("send"), 1);
    let mut batch = RecvBatch::new(4, 65536);
    let mut datagrams = Vec::new();
    while datagrams.len() < 3 {
        match batch.recv(b.as_fd()) {
            Ok(_) => {
                for d in batch.iter() {
                    let seg = if d.segment > 0 { d.segment } else { d.data.len() };
                    datagrams.extend(d.data.chunks(seg).map(<[u8]>::to_vec));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(e) => panic!("recv: {e}"),
        }
    }
    let lens: Vec<usize> = datagrams.iter().map(Vec::len).collect();
    assert_eq!(lens, vec![100, 100, 50]);
    for (i, d) in datagrams.iter().enumerate() {
        assert!(d.iter().all(|&x| usize::from(x) == i));
    }
}

#[test]
fn a_full_batch_is_capped_at_max_batch() {
    let (a, b) = pair("127.0.0.1:0");
    let one = [7u8; 8];
    let refs = vec![&one[..]; MAX_BATCH + 5];
    let sent = send_to(a.as_fd(), &refs, Some(b.local_addr().expect("addr"))).expect("send");
    assert_eq!(sent, MAX_BATCH);
    let mut batch = RecvBatch::new(MAX_BATCH * 2, 16);
    assert_eq!(batch.recv(b.as_fd()).expect("recv"), MAX_BATCH);
}
