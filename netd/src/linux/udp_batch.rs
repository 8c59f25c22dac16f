//! Batched UDP receive and send (`recvmmsg`/`sendmmsg`) for the resolver's UDP loop.
//!
//! Why: at a few hundred thousand queries per second and core, the two syscalls per query
//! (`recvfrom`, `sendto`) are most of the cost of a cluster-name answer; one `recvmmsg` and one
//! `sendmmsg` per batch of up to [`BATCH`] datagrams leaves the answer itself as the main cost.
//! Under light load a batch holds one datagram and this costs what the plain calls cost.
//!
//! Memory: one [`UdpBatch`] per resolver *thread*, not per sandbox (the UDP loop uses it
//! synchronously between two awaits, so a thread-local serves every sandbox's loop on that
//! thread): [`BATCH`] × [`SLOT`] bytes of receive buffers plus as many reply buffers.
//!
//! A datagram longer than [`SLOT`] arrives cut (`MSG_TRUNC`); it is reported as truncated so
//! the caller answers FORMERR from the header instead of parsing a cut message. No real query
//! is that long: the largest question is 4 + 255 bytes plus header and an OPT record.

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddrV4;
use std::os::fd::RawFd;

use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrIn, recvmmsg, sendmmsg};

/// Datagrams per syscall.
pub const BATCH: usize = 32;
/// Receive buffer per datagram.
pub const SLOT: usize = 2048;

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub len: usize,
    pub peer: Option<SocketAddrV4>,
    /// Longer than [`SLOT`]: only the first `SLOT` bytes are in the buffer.
    pub truncated: bool,
}

/// Reusable buffers and message headers for one thread.
pub struct UdpBatch {
    rx: Inbox,
    tx: Outbox,
}

/// The datagrams of the last receive.
pub struct Inbox {
    bufs: Box<[[u8; SLOT]]>,
    received: Vec<Received>,
    headers: MultiHeaders<SockaddrIn>,
}

/// The replies queued for the next flush.
pub struct Outbox {
    replies: Vec<Vec<u8>>,
    reply_to: Vec<Option<SockaddrIn>>,
    headers: MultiHeaders<SockaddrIn>,
}

impl std::fmt::Debug for UdpBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpBatch")
            .field("received", &self.rx.received.len())
            .field("queued", &self.tx.reply_to.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("queued", &self.reply_to.len())
            .finish_non_exhaustive()
    }
}

impl Inbox {
    /// The `i`-th datagram of the last [`UdpBatch::recv`] and its bytes.
    pub fn datagram(&self, i: usize) -> (Received, &[u8]) {
        let r = self.received[i];
        (r, &self.bufs[i][..r.len])
    }
}

impl Outbox {
    /// Queues a reply for [`UdpBatch::flush`]; reuses the reply buffers of earlier batches.
    pub fn reply(&mut self, to: SocketAddrV4, bytes: &[u8]) {
        let k = self.reply_to.len();
        if self.replies.len() <= k {
            self.replies.push(Vec::with_capacity(512));
        }
        let buf = &mut self.replies[k];
        buf.clear();
        buf.extend_from_slice(bytes);
        self.reply_to.push(Some(SockaddrIn::from(to)));
    }
}

impl Default for UdpBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl UdpBatch {
    pub fn new() -> Self {
        Self {
            rx: Inbox {
                bufs: vec![[0u8; SLOT]; BATCH].into_boxed_slice(),
                received: Vec::with_capacity(BATCH),
                headers: MultiHeaders::preallocate(BATCH, None),
            },
            tx: Outbox {
                replies: Vec::with_capacity(BATCH),
                reply_to: Vec::with_capacity(BATCH),
                headers: MultiHeaders::preallocate(BATCH, None),
            },
        }
    }

    /// The received datagrams and the reply queue, borrowed apart so a reply can be queued
    /// while a datagram is read.
    pub fn split(&mut self) -> (&Inbox, &mut Outbox) {
        (&self.rx, &mut self.tx)
    }

    /// Receives up to [`BATCH`] datagrams without blocking; `Err(EAGAIN)` when none is queued.
    pub fn recv(&mut self, fd: RawFd) -> std::io::Result<usize> {
        let rx = &mut self.rx;
        rx.received.clear();
        self.tx.reply_to.clear();
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = rx
            .bufs
            .iter_mut()
            .map(|b| [IoSliceMut::new(&mut b[..])])
            .collect();
        let got = recvmmsg(
            fd,
            &mut rx.headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(std::io::Error::from)?;
        for m in got {
            rx.received.push(Received {
                len: m.bytes.min(SLOT),
                peer: m.address.map(|a| SocketAddrV4::new(a.ip(), a.port())),
                truncated: m.flags.contains(MsgFlags::MSG_TRUNC),
            });
        }
        Ok(rx.received.len())
    }

    /// Sends every queued reply (as many per syscall as the kernel takes). Returns how many
    /// could not be sent (a full send buffer: dropped, the client retries) and the last error.
    pub fn flush(&mut self, fd: RawFd) -> (usize, Option<std::io::Error>) {
        let tx = &mut self.tx;
        let total = tx.reply_to.len();
        let mut sent = 0;
        let mut last_err = None;
        while sent < total {
            let iovs: Vec<[IoSlice<'_>; 1]> = tx.replies[sent..total]
                .iter()
                .map(|r| [IoSlice::new(r)])
                .collect();
            let no_cmsgs: [ControlMessage<'_>; 0] = [];
            match sendmmsg(
                fd,
                &mut tx.headers,
                iovs.iter(),
                &tx.reply_to[sent..total],
                no_cmsgs,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(r) => {
                    let n = r.count();
                    if n == 0 {
                        break;
                    }
                    sent += n;
                }
                // An ICMP error of an earlier send surfaces on a later call: skip that reply.
                Err(nix::errno::Errno::EAGAIN) => {
                    last_err = Some(std::io::Error::from(nix::errno::Errno::EAGAIN));
                    break;
                }
                Err(e) => {
                    last_err = Some(std::io::Error::from(e));
                    sent += 1;
                }
            }
        }
        tx.reply_to.clear();
        (total - sent.min(total), last_err)
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn batch_round_trip_on_loopback() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_nonblocking(true).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        let mut b = UdpBatch::new();
        assert_eq!(
            b.recv(server.as_raw_fd()).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
        for i in 0..40u8 {
            client.send_to(&[i; 3], to).unwrap();
        }
        client.send_to(&vec![7u8; SLOT + 10], to).unwrap();
        let mut seen = Vec::new();
        let mut truncated = 0;
        while seen.len() + truncated < 41 {
            let n = b.recv(server.as_raw_fd()).unwrap();
            assert!(n <= BATCH);
            let (rx, tx) = b.split();
            for i in 0..n {
                let (r, bytes) = rx.datagram(i);
                if r.truncated {
                    truncated += 1;
                    assert_eq!(bytes.len(), SLOT);
                    continue;
                }
                seen.push(bytes[0]);
                let peer = r.peer.unwrap();
                let echo = [bytes[0], 0xee];
                tx.reply(peer, &echo);
            }
            assert_eq!(b.flush(server.as_raw_fd()).0, 0);
        }
        assert_eq!(seen, (0..40).collect::<Vec<u8>>());
        assert_eq!(truncated, 1);
        let mut buf = [0u8; 8];
        for i in 0..40u8 {
            let (n, _) = client.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i, 0xee]);
        }
    }
}
